"""A fake kernfs for the cgroup unit tests, the emulated hosts built on it, and its own tests.

``FakeKernelFs`` plays kernfs in a temporary directory: creating a cgroup fills it with the
control files its hierarchy would have, writing cgroup.procs moves a process, cgroup.kill
empties a subtree, freezing takes one status read to finish, and the cgroup2 "no internal
processes" rule is enforced. Processes are real (``sleep`` children), so that kill paths
really kill; a process counts as in a cgroup while it is alive and not a zombie.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from netjail.kernel.cgroup import CgroupFs, CgroupLayout, CgroupManager, V1Hierarchy

_V1_FILES: dict[str, dict[str, str]] = {
    "memory": {
        "memory.limit_in_bytes": "9223372036854771712\n",
        "memory.memsw.limit_in_bytes": "9223372036854771712\n",
        "memory.swappiness": "60\n",
        "memory.max_usage_in_bytes": "0\n",
        "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n",
    },
    "cpu": {"cpu.cfs_period_us": "100000\n", "cpu.cfs_quota_us": "-1\n"},
    "cpuacct": {
        "cpuacct.usage_user": "0\n",
        "cpuacct.usage_sys": "0\n",
        "cpuacct.stat": "user 0\nsystem 0\n",
    },
    "pids": {"pids.max": "max\n", "pids.peak": "0\n"},
    "freezer": {"freezer.state": "THAWED\n"},
    "cpuset": {"cpuset.cpus": "\n", "cpuset.mems": "\n"},
}
_V2_FILES: dict[str, dict[str, str]] = {
    "memory": {
        "memory.max": "max\n",
        "memory.swap.max": "max\n",
        "memory.peak": "0\n",
        "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n",
        "memory.oom.group": "0\n",
    },
    "cpu": {"cpu.max": "max 100000\n"},
    "pids": {"pids.max": "max\n", "pids.peak": "0\n"},
}


def _alive(pid: int) -> bool:
    # Like the kernel, list neither exited processes nor zombies in cgroup.procs.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _refused(refuse: dict[str, int], path: str) -> None:
    code = refuse.get(os.path.basename(path))
    if code is not None:
        raise OSError(code, os.strerror(code), path)


class FakeKernelFs(CgroupFs):
    """kernfs semantics on a plain directory tree; records every control-file write."""

    def __init__(self, hierarchies: dict[Path, frozenset[str] | None], omit: Iterable[str]) -> None:
        #: mount point -> its v1 controllers, or None for the cgroup2 tree.
        self.hierarchies = hierarchies
        #: control files this "kernel" lacks.
        self.omit = set(omit)
        self.writes: list[tuple[str, str]] = []
        #: file or directory name -> the errno that writing, reading or removing it gives.
        self.refuse_write: dict[str, int] = {}
        self.refuse_read: dict[str, int] = {}
        self.refuse_remove: dict[str, int] = {}
        #: processes that neither cgroup.kill nor SIGKILL gets rid of (stuck in the kernel).
        self.unkillable: set[int] = set()
        self.killed: list[int] = []
        # status file -> what it says once a freeze in progress has finished
        self._freezing: dict[str, str] = {}

    def _mount_of(self, path: Path) -> Path:
        return next(m for m in self.hierarchies if path == m or m in path.parents)

    def populate(self, path: Path) -> None:
        """Fill a new cgroup directory with its control files."""
        controllers = self.hierarchies[self._mount_of(path)]
        files = {"cgroup.procs": ""}
        if controllers is None:
            given = (path.parent / "cgroup.subtree_control").read_text().split()
            files |= {
                "cgroup.controllers": " ".join(given),
                "cgroup.subtree_control": "",
                "cgroup.type": "domain\n",
                "cgroup.kill": "",
                "cgroup.freeze": "0\n",
                "cgroup.events": "populated 0\nfrozen 0\n",
                "cpu.stat": "usage_usec 0\nuser_usec 0\nsystem_usec 0\n",
            }
            for controller in given:
                files |= _V2_FILES.get(controller, {})
        else:
            for controller in controllers:
                files |= _V1_FILES.get(controller, {})
        for name, content in files.items():
            if name not in self.omit:
                (path / name).write_text(content)

    def make_dir(self, path: str) -> None:
        os.mkdir(path)
        self.populate(Path(path))

    def remove_dir(self, path: str) -> None:
        _refused(self.refuse_remove, path)
        cgroup = Path(path)
        if not cgroup.exists():
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        if self.read(str(cgroup / "cgroup.procs")).strip():
            raise OSError(errno.EBUSY, "Device or resource busy", path)
        if any(p.is_dir() for p in cgroup.iterdir()):
            raise OSError(errno.EBUSY, "Device or resource busy", path)
        for file in cgroup.iterdir():
            file.unlink()
        cgroup.rmdir()

    def read(self, path: str) -> str:
        _refused(self.refuse_read, path)
        text = super().read(path)
        name = os.path.basename(path)
        if name == "cgroup.procs":
            return "".join(f"{pid}\n" for pid in map(int, text.split()) if _alive(pid))
        # Freezing is asynchronous, as the kernel's is: the status a freeze leaves says "not
        # yet" once, and the next read sees it done.
        done = self._freezing.pop(path, None)
        if done is not None:
            Path(path).write_text(done)
        return text

    def write(self, path: str, value: str) -> None:
        _refused(self.refuse_write, path)
        name = os.path.basename(path)
        cgroup = Path(path).parent
        if not Path(path).exists():
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        self.writes.append((path, value))
        if name == "cgroup.procs":
            self._move(cgroup, int(value))
        elif name == "cgroup.subtree_control":
            self._enable(cgroup, value)
        elif name == "cgroup.kill":
            for sub, _dirs, _files in os.walk(cgroup):
                procs = Path(sub, "cgroup.procs")
                for pid in map(int, procs.read_text().split()):
                    # Really killed, so that it leaves the v1 hierarchies too; never pytest.
                    if pid not in self.unkillable and pid != os.getpid() and _alive(pid):
                        os.kill(pid, signal.SIGKILL)
                left = [p for p in procs.read_text().split() if int(p) in self.unkillable]
                procs.write_text("".join(f"{p}\n" for p in left))
        elif name == "cgroup.freeze":
            super().write(path, value)
            events = str(cgroup / "cgroup.events")
            Path(events).write_text("populated 1\nfrozen 0\n")
            if value == "1":
                self._freezing[events] = "populated 1\nfrozen 1\n"
        elif name == "freezer.state" and value == "FROZEN":
            super().write(path, "FREEZING\n")
            self._freezing[path] = "FROZEN\n"
        else:
            self._freezing.pop(path, None)
            super().write(path, value)

    def kill_process(self, pid: int) -> None:
        self.killed.append(pid)
        if pid not in self.unkillable:
            super().kill_process(pid)

    def _has_internal_rule(self, cgroup: Path) -> bool:
        return (
            self.hierarchies[self._mount_of(cgroup)] is None and (cgroup / "cgroup.type").exists()
        )

    def _move(self, cgroup: Path, pid: int) -> None:
        if self._has_internal_rule(cgroup) and (cgroup / "cgroup.subtree_control").read_text():
            raise OSError(errno.EBUSY, "Device or resource busy", str(cgroup))
        for procs in self._mount_of(cgroup).rglob("cgroup.procs"):
            pids = [p for p in procs.read_text().split() if int(p) != pid]
            procs.write_text("".join(f"{p}\n" for p in pids))
        with open(cgroup / "cgroup.procs", "a") as f:
            f.write(f"{pid}\n")

    def _enable(self, cgroup: Path, value: str) -> None:
        controller = value.removeprefix("+")
        if controller not in (cgroup / "cgroup.controllers").read_text().split():
            raise FileNotFoundError(errno.ENOENT, "No such file or directory")
        if self._has_internal_rule(cgroup) and self.read(str(cgroup / "cgroup.procs")).strip():
            raise OSError(errno.EBUSY, "Device or resource busy", str(cgroup))
        control = cgroup / "cgroup.subtree_control"
        words = control.read_text().split()
        control.write_text(" ".join([*words, controller]))


def all_dirs(root: Path) -> set[str]:
    """Every directory below *root*, relative to it."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_dir()}


@contextlib.contextmanager
def sleeping_child() -> Iterator[subprocess.Popen[bytes]]:
    """A real ``sleep`` process to put in emulated cgroups; killed and reaped afterwards."""
    with subprocess.Popen(["sleep", "60"]) as child:
        try:
            yield child
        finally:
            child.kill()


# ---------------------------------------------------------------------------------------------
# Emulated hosts

#: The daemon's cgroup on the emulated cgroup2 host.
V2_OWN = "/system.slice/netjail.service"


def v2_tree(tmp_path: Path, omit: Iterable[str] = (), own: str = V2_OWN) -> FakeKernelFs:
    """A cgroup2 host at <tmp_path>/sys/fs/cgroup, with pytest's pid in the daemon's cgroup."""
    mount = tmp_path / "sys/fs/cgroup"
    mount.mkdir(parents=True)
    fs = FakeKernelFs({mount: None}, omit)
    (mount / "cgroup.procs").write_text("1\n")
    (mount / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
    (mount / "cgroup.subtree_control").write_text("cpu memory pids")
    path = mount
    for part in own.strip("/").split("/") if own != "/" else []:
        path /= part
        fs.make_dir(str(path))
        if path != mount / own.strip("/"):
            (path / "cgroup.subtree_control").write_text("cpu memory pids")
    (path / "cgroup.procs").write_text(f"{os.getpid()}\n")
    return fs


def v2_manager(tmp_path: Path, fs: FakeKernelFs, own: str = V2_OWN) -> CgroupManager:
    """A manager (not set up) for the host ``v2_tree`` made."""
    layout = CgroupLayout("v2", "/sys/fs/cgroup", own)
    return CgroupManager(layout, root=str(tmp_path), fs=fs)


def v1_tree(
    tmp_path: Path,
    mounts: dict[str, frozenset[str] | None],
    own: dict[str, str],
    omit: Iterable[str] = (),
) -> FakeKernelFs:
    """A host with *mounts* (name -> v1 controllers, or None for cgroup2) and the daemon's
    cgroup per mount in *own* (default "/")."""
    base = tmp_path / "sys/fs/cgroup"
    fs = FakeKernelFs({base / name: ctrls for name, ctrls in mounts.items()}, omit)
    for name in mounts:
        mount = base / name
        mount.mkdir(parents=True)
        (mount / "cgroup.procs").write_text("")
        (mount / "cgroup.subtree_control").write_text("")
        path = mount
        for part in own.get(name, "/").strip("/").split("/") if own.get(name, "/") != "/" else []:
            path /= part
            fs.make_dir(str(path))
    return fs


def v1_hierarchies(
    mounts: dict[str, frozenset[str] | None], own: dict[str, str]
) -> tuple[V1Hierarchy, ...]:
    """The v1 hierarchies of *mounts*, as ``detect_cgroup_layout`` would find them."""
    return tuple(
        V1Hierarchy(ctrls, f"/sys/fs/cgroup/{name}", own.get(name, "/"))
        for name, ctrls in mounts.items()
        if ctrls is not None
    )


#: The hybrid host of a systemd machine; the daemon's memory cgroup is not the root.
HYBRID_MOUNTS: dict[str, frozenset[str] | None] = {
    "cpu": frozenset({"cpu"}),
    "cpuacct": frozenset({"cpuacct"}),
    "cpuset": frozenset({"cpuset"}),
    "memory": frozenset({"memory"}),
    "freezer": frozenset({"freezer"}),
    "pids": frozenset({"pids"}),
    "unified": None,
}
HYBRID_OWN = {"memory": "/process_api/abc"}

#: A pure v1 host with cpu and cpuacct mounted together.
V1_MOUNTS: dict[str, frozenset[str] | None] = {
    "cpu,cpuacct": frozenset({"cpu", "cpuacct"}),
    "memory": frozenset({"memory"}),
    "freezer": frozenset({"freezer"}),
    "pids": frozenset({"pids"}),
}


def hybrid_manager(
    tmp_path: Path,
    omit: Iterable[str] = (),
    mounts: dict[str, frozenset[str] | None] = HYBRID_MOUNTS,
) -> tuple[CgroupManager, FakeKernelFs]:
    """A set-up manager on an emulated hybrid host."""
    fs = v1_tree(tmp_path, mounts, HYBRID_OWN, omit)
    layout = CgroupLayout(
        "hybrid", "/sys/fs/cgroup/unified", "/", v1_hierarchies(mounts, HYBRID_OWN)
    )
    manager = CgroupManager(layout, root=str(tmp_path), fs=fs)
    manager.setup()
    return manager, fs


def v1_manager(
    tmp_path: Path, mounts: dict[str, frozenset[str] | None] = V1_MOUNTS
) -> tuple[CgroupManager, FakeKernelFs]:
    """A manager (not set up) on an emulated pure v1 host."""
    fs = v1_tree(tmp_path, mounts, {})
    layout = CgroupLayout("v1", None, None, v1_hierarchies(mounts, {}))
    return CgroupManager(layout, root=str(tmp_path), fs=fs), fs


# ---------------------------------------------------------------------------------------------
# The fake itself


def test_fake_fills_cgroups_with_their_hierarchys_control_files(tmp_path: Path) -> None:
    """A new cgroup2 cgroup gets its parent's enabled controllers' files, a v1 one its own."""
    fs = v1_tree(tmp_path, {"unified": None, "pids": frozenset({"pids"})}, {})
    base = tmp_path / "sys/fs/cgroup"
    (base / "unified/cgroup.subtree_control").write_text("pids")
    fs.make_dir(str(base / "unified/a"))
    fs.make_dir(str(base / "pids/a"))
    assert (base / "unified/a/cgroup.controllers").read_text() == "pids"
    assert (base / "unified/a/pids.max").exists()
    assert not (base / "unified/a/memory.max").exists()
    assert sorted(p.name for p in (base / "pids/a").iterdir()) == [
        "cgroup.procs",
        "pids.max",
        "pids.peak",
    ]


def test_fake_enforces_no_internal_processes_on_cgroup2(tmp_path: Path) -> None:
    """Like cgroup2, the fake refuses a process in a cgroup that hands controllers down."""
    fs = v2_tree(tmp_path)
    own = tmp_path / "sys/fs/cgroup" / V2_OWN.strip("/")
    with pytest.raises(OSError, match="busy") as busy:
        fs.write(str(own / "cgroup.subtree_control"), "+pids")
    assert busy.value.errno == errno.EBUSY


def test_fake_cgroup_kill_kills_a_subtree_but_spares_unkillable_processes(tmp_path: Path) -> None:
    """cgroup.kill in the fake SIGKILLs a subtree's processes, except those marked unkillable."""
    fs = v2_tree(tmp_path)
    job = tmp_path / "sys/fs/cgroup" / V2_OWN.strip("/") / "job"
    fs.make_dir(str(job))
    fs.make_dir(str(job / "sub"))
    with sleeping_child() as a, sleeping_child() as b:
        fs.write(str(job / "sub/cgroup.procs"), str(a.pid))
        fs.write(str(job / "cgroup.procs"), str(b.pid))
        fs.unkillable.add(b.pid)
        fs.write(str(job / "cgroup.kill"), "1")
        assert a.wait(timeout=5) == -9
        assert fs.read(str(job / "sub/cgroup.procs")) == ""
        assert fs.read(str(job / "cgroup.procs")) == f"{b.pid}\n"
        assert b.poll() is None


@pytest.mark.parametrize(
    "case",
    [
        ("unified", "cgroup.freeze", "1", "cgroup.events", "frozen 0", "frozen 1"),
        ("freezer", "freezer.state", "FROZEN", "freezer.state", "FREEZING", "FROZEN"),
    ],
)
def test_fake_freezing_finishes_at_the_second_status_read(
    tmp_path: Path, case: tuple[str, str, str, str, str, str]
) -> None:
    """A freeze in the fake reads as in progress once, then as done, as in the kernel."""
    mount, state_file, frozen, status_file, before, after = case
    fs = v1_tree(tmp_path, {"unified": None, "freezer": frozenset({"freezer"})}, {})
    cgroup = tmp_path / "sys/fs/cgroup" / mount / "job"
    fs.make_dir(str(cgroup))
    fs.write(str(cgroup / state_file), frozen)
    assert before in fs.read(str(cgroup / status_file))
    assert after in fs.read(str(cgroup / status_file))
