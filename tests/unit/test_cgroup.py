"""Tests for netjail.kernel.cgroup: layout detection, and job cgroups on an emulated cgroupfs.

``FakeKernelFs`` plays kernfs in a temporary directory: creating a cgroup fills it with the
control files its hierarchy would have, writing cgroup.procs moves a process, cgroup.kill
empties a subtree, and the cgroup2 "no internal processes" rule is enforced.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterable
from pathlib import Path

import pytest

from netjail.errors import CgroupError, RequestError
from netjail.kernel import cgroup as cg
from netjail.kernel.cgroup import (
    CgroupFs,
    CgroupLayout,
    CgroupManager,
    Limits,
    V1Hierarchy,
    detect_cgroup_layout,
)

# ---------------------------------------------------------------------------------------------
# detect_cgroup_layout

V2_MOUNTINFO = (
    "22 28 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw\n"
    "26 23 0:24 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4"
    " - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n"
    "28 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro\n"
)
V2_CGROUP = "0::/system.slice/netjail.service\n"

HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
HYBRID_CGROUP = """\
9:name=systemd:/
8:pids:/
7:blkio:/
6:freezer:/
5:devices:/
4:memory:/process_api/abc
3:cpuset:/
2:cpuacct:/
1:cpu:/
0::/
"""

V1_MOUNTINFO = """\
24 18 0:20 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:7 - tmpfs tmpfs ro,mode=755
25 24 0:21 / /sys/fs/cgroup/systemd rw,relatime shared:8 - cgroup cgroup rw,xattr,name=systemd
27 24 0:23 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:10 - cgroup cgroup rw,cpu,cpuacct
28 24 0:24 / /sys/fs/cgroup/memory rw,relatime shared:11 - cgroup cgroup rw,memory
29 24 0:25 / /sys/fs/cgroup/freezer rw,relatime shared:12 - cgroup cgroup rw,freezer
30 24 0:26 / /sys/fs/cgroup/pids rw,relatime shared:13 - cgroup cgroup rw,pids
"""
V1_CGROUP = """\
5:pids:/system.slice/netjail.service
4:freezer:/
3:memory:/system.slice/netjail.service
2:cpu,cpuacct:/system.slice/netjail.service
1:name=systemd:/system.slice/netjail.service
"""


def test_detect_pure_v2() -> None:
    """A lone cgroup2 mount is mode v2, with the daemon's cgroup from the 0:: line."""
    layout = detect_cgroup_layout(V2_MOUNTINFO, V2_CGROUP)
    assert layout == CgroupLayout(
        mode="v2",
        unified_mount="/sys/fs/cgroup",
        unified_own_cgroup="/system.slice/netjail.service",
        v1_hierarchies=(),
    )


def test_detect_hybrid() -> None:
    """v1 controller mounts plus a cgroup2 mount are mode hybrid; name=systemd is ignored."""
    layout = detect_cgroup_layout(HYBRID_MOUNTINFO, HYBRID_CGROUP)
    assert layout.mode == "hybrid"
    assert layout.unified_mount == "/sys/fs/cgroup/unified"
    assert layout.unified_own_cgroup == "/"
    assert layout.v1_hierarchy("memory") == V1Hierarchy(
        frozenset({"memory"}), "/sys/fs/cgroup/memory", "/process_api/abc"
    )
    assert layout.v1_hierarchy("cpu") == V1Hierarchy(frozenset({"cpu"}), "/sys/fs/cgroup/cpu", "/")
    assert {c for h in layout.v1_hierarchies for c in h.controllers} == {
        "cpu",
        "cpuacct",
        "cpuset",
        "memory",
        "devices",
        "freezer",
        "blkio",
        "pids",
    }


def test_detect_pure_v1_with_comounted_cpu_cpuacct() -> None:
    """Without cgroup2 the mode is v1; cpu and cpuacct mounted together are one hierarchy."""
    layout = detect_cgroup_layout(V1_MOUNTINFO, V1_CGROUP)
    assert layout.mode == "v1"
    assert layout.unified_mount is None
    cpu = layout.v1_hierarchy("cpu")
    assert cpu is not None
    assert cpu is layout.v1_hierarchy("cpuacct")
    assert cpu.mount_point == "/sys/fs/cgroup/cpu,cpuacct"
    assert cpu.own_cgroup == "/system.slice/netjail.service"
    freezer = layout.v1_hierarchy("freezer")
    assert freezer is not None
    assert freezer.own_cgroup == "/"


def test_detect_strips_the_root_of_a_bind_mounted_subtree() -> None:
    """A cgroup mount exposing only a subtree yields the daemon's path relative to it."""
    mountinfo = (
        "50 40 0:30 /docker/c1 /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n"
        "51 40 0:30 /docker/c1 /mnt/with\\040space rw - cgroup2 cgroup2 rw\n"
    )
    layout = detect_cgroup_layout(mountinfo, "0::/docker/c1/app\n")
    assert layout.unified_mount == "/sys/fs/cgroup"
    assert layout.unified_own_cgroup == "/app"


def test_detect_skips_a_mount_the_daemon_is_not_visible_in() -> None:
    """A mount of another subtree is passed over for one that shows the daemon's cgroup."""
    mountinfo = (
        "50 40 0:30 /other /a rw - cgroup2 cgroup2 rw\n"
        "51 40 0:30 / /mnt/with\\040space rw - cgroup2 cgroup2 rw\n"
    )
    layout = detect_cgroup_layout(mountinfo, "0::/mine\n")
    assert layout.unified_mount == "/mnt/with space"
    assert layout.unified_own_cgroup == "/mine"


def test_detect_without_any_cgroup_mount_fails_clearly() -> None:
    """No cgroup filesystem at all is a CgroupError that says what to mount."""
    with pytest.raises(CgroupError, match="mount cgroup2 at /sys/fs/cgroup"):
        detect_cgroup_layout("28 1 8:1 / / rw - ext4 /dev/sda1 rw\n", "0::/\n")


# ---------------------------------------------------------------------------------------------
# A fake kernfs

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


class FakeKernelFs(CgroupFs):
    """kernfs semantics on a plain directory tree; records every control-file write."""

    def __init__(self, hierarchies: dict[Path, frozenset[str] | None], omit: Iterable[str]) -> None:
        #: mount point -> its v1 controllers, or None for the cgroup2 tree.
        self.hierarchies = hierarchies
        #: control files this "kernel" lacks.
        self.omit = set(omit)
        self.writes: list[tuple[str, str]] = []
        self.refuse: dict[str, int] = {}

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
        text = super().read(path)
        if path.endswith("/cgroup.procs"):
            return "".join(f"{pid}\n" for pid in map(int, text.split()) if _alive(pid))
        return text

    def write(self, path: str, value: str) -> None:
        name = os.path.basename(path)
        if name in self.refuse:
            raise OSError(self.refuse[name], os.strerror(self.refuse[name]), path)
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
                Path(sub, "cgroup.procs").write_text("")
        else:
            super().write(path, value)

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


def _all_dirs(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_dir()}


# ---------------------------------------------------------------------------------------------
# cgroup2


V2_OWN = "/system.slice/netjail.service"


def _v2_tree(tmp_path: Path, omit: Iterable[str] = (), own: str = V2_OWN) -> FakeKernelFs:
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


def _v2_manager(tmp_path: Path, fs: FakeKernelFs, own: str = V2_OWN) -> CgroupManager:
    layout = CgroupLayout("v2", "/sys/fs/cgroup", own)
    return CgroupManager(layout, root=str(tmp_path), fs=fs)


@pytest.fixture
def v2(tmp_path: Path) -> tuple[CgroupManager, FakeKernelFs, Path]:
    """A set-up manager on an emulated cgroup2 host, and the daemon's cgroup directory."""
    fs = _v2_tree(tmp_path)
    manager = _v2_manager(tmp_path, fs)
    manager.setup()
    return manager, fs, tmp_path / "sys/fs/cgroup" / V2_OWN.strip("/")


def test_v2_setup_moves_the_daemon_into_a_leaf_and_enables_controllers(
    v2: tuple[CgroupManager, FakeKernelFs, Path],
) -> None:
    """setup() empties the daemon's cgroup into <own>/daemon, then delegates controllers."""
    _manager, _fs, own = v2
    assert (own / "cgroup.procs").read_text() == ""
    assert (own / "daemon/cgroup.procs").read_text() == f"{os.getpid()}\n"
    assert (own / "cgroup.subtree_control").read_text().split() == ["memory", "cpu", "pids"]
    assert (own / "netjail/cgroup.subtree_control").read_text().split() == [
        "memory",
        "cpu",
        "pids",
    ]


def test_v2_setup_is_idempotent(v2: tuple[CgroupManager, FakeKernelFs, Path]) -> None:
    """A second setup() (a restarted daemon) changes nothing and does not fail."""
    manager, fs, own = v2
    before = len(fs.writes)
    manager.setup()
    assert len(fs.writes) == before
    assert (own / "daemon/cgroup.procs").read_text() == f"{os.getpid()}\n"


def test_v2_setup_in_the_root_cgroup_moves_nobody(tmp_path: Path) -> None:
    """The kernel's root cgroup may hold processes, so setup() leaves the daemon there."""
    fs = _v2_tree(tmp_path, own="/")
    (tmp_path / "sys/fs/cgroup/cgroup.subtree_control").write_text("")
    _v2_manager(tmp_path, fs, own="/").setup()
    mount = tmp_path / "sys/fs/cgroup"
    assert not (mount / "daemon").exists()
    assert (mount / "cgroup.procs").read_text() == f"{os.getpid()}\n"
    assert (mount / "netjail/cgroup.subtree_control").read_text().split() == [
        "memory",
        "cpu",
        "pids",
    ]


def test_v2_setup_fails_clearly_when_the_daemon_cannot_be_moved(tmp_path: Path) -> None:
    """setup() reports a non-delegated cgroup as CgroupError with what to do."""
    fs = _v2_tree(tmp_path)
    fs.refuse["cgroup.procs"] = errno.EACCES
    with pytest.raises(CgroupError, match=r"cannot move process \d+ into .*Delegate=yes"):
        _v2_manager(tmp_path, fs).setup()


def test_v2_create_job_writes_exact_limit_values(
    v2: tuple[CgroupManager, FakeKernelFs, Path],
) -> None:
    """create_job() sets memory.max, memory.swap.max=0, cpu.max, pids.max and oom.group."""
    manager, fs, own = v2
    fs.writes.clear()
    job = manager.create_job("j1", Limits(memory_bytes=64 << 20, cpus=0.2, pids=16))
    d = own / "netjail/j1"
    assert fs.writes == [
        (str(d / "memory.max"), "67108864"),
        (str(d / "memory.swap.max"), "0"),
        (str(d / "cpu.max"), "20000 100000"),
        (str(d / "pids.max"), "16"),
        (str(d / "memory.oom.group"), "1"),
    ]
    assert (d / "memory.max").read_text() == "67108864"
    assert (d / "memory.swap.max").read_text() == "0"
    assert (d / "cpu.max").read_text() == "20000 100000"
    assert (d / "pids.max").read_text() == "16"
    assert job.procs_files == (str(d / "cgroup.procs"),)
    assert job.directories == (str(d),)


def test_v2_create_job_without_limits_leaves_defaults(
    v2: tuple[CgroupManager, FakeKernelFs, Path],
) -> None:
    """Without limits only memory.oom.group is written; the job still gets a cgroup."""
    manager, fs, own = v2
    fs.writes.clear()
    manager.create_job("j1", Limits())
    d = own / "netjail/j1"
    assert fs.writes == [(str(d / "memory.oom.group"), "1")]
    assert (d / "memory.max").read_text() == "max\n"


def test_v2_missing_swap_control_fails_and_leaves_nothing(tmp_path: Path) -> None:
    """Without memory.swap.max a memory limit is refused, not applied without swap."""
    fs = _v2_tree(tmp_path, omit={"memory.swap.max"})
    manager = _v2_manager(tmp_path, fs)
    manager.setup()
    before = _all_dirs(tmp_path)
    with pytest.raises(CgroupError, match=r"cannot set memory\.swap\.max to 0 .* does not exist"):
        manager.create_job("j1", Limits(memory_bytes=64 << 20))
    assert _all_dirs(tmp_path) == before


def test_v2_limit_needing_an_undelegated_controller_is_refused(tmp_path: Path) -> None:
    """A pids limit where pids was not delegated is a CgroupError; no cgroup is made."""
    fs = _v2_tree(tmp_path)
    own = tmp_path / "sys/fs/cgroup" / V2_OWN.strip("/")
    (own / "cgroup.controllers").write_text("cpu memory")
    manager = _v2_manager(tmp_path, fs)
    manager.setup()
    with pytest.raises(CgroupError, match="the pids controller is not enabled"):
        manager.create_job("j1", Limits(pids=16))
    assert not (own / "netjail/j1").exists()
    manager.create_job("j2", Limits(memory_bytes=1 << 20))


def test_v2_existing_job_cgroup_is_not_reused_or_removed(
    v2: tuple[CgroupManager, FakeKernelFs, Path],
) -> None:
    """create_job() of an existing id fails and leaves the existing cgroup alone."""
    manager, _fs, own = v2
    manager.create_job("j1", Limits(pids=4))
    with pytest.raises(CgroupError, match=r"cannot create cgroup .*/j1: File exists"):
        manager.create_job("j1", Limits(pids=8))
    assert (own / "netjail/j1/pids.max").read_text() == "4"


def test_v2_kill_all_writes_cgroup_kill_and_waits_until_empty(
    v2: tuple[CgroupManager, FakeKernelFs, Path],
) -> None:
    """kill_all() on cgroup2 writes "1" to the job's cgroup.kill."""
    manager, fs, _own = v2
    job = manager.create_job("j1", Limits())
    with subprocess.Popen(["sleep", "60"]) as child:
        try:
            fs.write(job.procs_files[0], str(child.pid))
            assert job.contains(child.pid)
            fs.writes.clear()
            job.kill_all(timeout=1.0)
            assert fs.writes[0] == (os.path.join(job.directories[0], "cgroup.kill"), "1")
            assert job.pids() == []
        finally:
            child.kill()


def test_v2_usage_reads_cpu_stat_peaks_and_oom_events(
    v2: tuple[CgroupManager, FakeKernelFs, Path],
) -> None:
    """usage() converts cpu.stat usecs to seconds and reports memory.peak, pids.peak, oom_kill."""
    manager, _fs, _own = v2
    job = manager.create_job("j1", Limits())
    d = Path(job.directories[0])
    (d / "cpu.stat").write_text("usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\n")
    (d / "memory.peak").write_text("123456\n")
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    (d / "pids.peak").unlink()
    usage = job.usage()
    assert usage == cg.ResourceUsage(
        cpu_user_s=1.0,
        cpu_system_s=0.5,
        memory_peak_bytes=123456,
        pids_peak=None,
        oom_killed=True,
    )


def test_v2_leftovers_are_found_opened_and_removed(
    v2: tuple[CgroupManager, FakeKernelFs, Path],
) -> None:
    """leftover_job_ids() lists job cgroups; open_job() + remove() (idempotent) clear them."""
    manager, _fs, own = v2
    manager.create_job("b", Limits())
    manager.create_job("a", Limits())
    assert manager.leftover_job_ids() == ["a", "b"]
    for job_id in manager.leftover_job_ids():
        job = manager.open_job(job_id)
        job.remove()
        job.remove()
    assert manager.leftover_job_ids() == []
    manager.teardown()
    assert not (own / "netjail").exists()


def test_remove_of_a_busy_cgroup_fails_after_retrying(
    v2: tuple[CgroupManager, FakeKernelFs, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """remove() retries EBUSY briefly, then raises CgroupError saying to kill first."""
    manager, fs, _own = v2
    monkeypatch.setattr(cg, "_REMOVE_RETRY_S", 0.05)
    job = manager.create_job("j1", Limits())
    fs.write(job.procs_files[0], str(os.getpid()))
    with pytest.raises(CgroupError, match="Device or resource busy; kill the job's processes"):
        job.remove()


@pytest.mark.parametrize("job_id", ["", "..", "a/b", "-x", "x" * 65, "a\nb"])
def test_unsafe_job_ids_are_refused(
    v2: tuple[CgroupManager, FakeKernelFs, Path], job_id: str
) -> None:
    """A job id that is not one safe path component never reaches mkdir."""
    manager, _fs, _own = v2
    with pytest.raises(CgroupError, match="invalid job id"):
        manager.create_job(job_id, Limits())


@pytest.mark.parametrize(
    "kwargs", [{"memory_bytes": 0}, {"cpus": 0.0}, {"cpus": 0.001}, {"cpus": 2000.0}, {"pids": 0}]
)
def test_limits_reject_values_the_kernel_would_refuse(kwargs: dict[str, float]) -> None:
    """Limits() refuses zero, negative and out-of-range values up front."""
    with pytest.raises(RequestError, match="invalid"):
        Limits(**kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# hybrid and v1

HYBRID_OWN_MEMORY = "/process_api/abc"


def _v1_tree(
    tmp_path: Path,
    mounts: dict[str, frozenset[str] | None],
    own: dict[str, str],
    omit: Iterable[str] = (),
) -> FakeKernelFs:
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


_HYBRID_MOUNTS: dict[str, frozenset[str] | None] = {
    "cpu": frozenset({"cpu"}),
    "cpuacct": frozenset({"cpuacct"}),
    "cpuset": frozenset({"cpuset"}),
    "memory": frozenset({"memory"}),
    "freezer": frozenset({"freezer"}),
    "pids": frozenset({"pids"}),
    "unified": None,
}


def _hybrid_layout() -> CgroupLayout:
    def h(name: str, own: str = "/") -> V1Hierarchy:
        return V1Hierarchy(frozenset({name}), f"/sys/fs/cgroup/{name}", own)

    return CgroupLayout(
        "hybrid",
        "/sys/fs/cgroup/unified",
        "/",
        (
            h("cpu"),
            h("cpuacct"),
            h("cpuset"),
            h("memory", HYBRID_OWN_MEMORY),
            h("freezer"),
            h("pids"),
        ),
    )


def _hybrid(tmp_path: Path, omit: Iterable[str] = ()) -> tuple[CgroupManager, FakeKernelFs]:
    fs = _v1_tree(tmp_path, _HYBRID_MOUNTS, {"memory": HYBRID_OWN_MEMORY}, omit)
    manager = CgroupManager(_hybrid_layout(), root=str(tmp_path), fs=fs)
    manager.setup()
    return manager, fs


def test_hybrid_setup_creates_parents_only_where_jobs_go(tmp_path: Path) -> None:
    """setup() on hybrid makes netjail/ in unified, memory (below own), cpu, cpuacct and pids."""
    fs = _v1_tree(tmp_path, _HYBRID_MOUNTS, {"memory": HYBRID_OWN_MEMORY})
    manager = CgroupManager(_hybrid_layout(), root=str(tmp_path), fs=fs)
    before = _all_dirs(tmp_path)
    manager.setup()
    made = _all_dirs(tmp_path) - before
    assert made == {
        "sys/fs/cgroup/unified/netjail",
        "sys/fs/cgroup/memory/process_api/abc/netjail",
        "sys/fs/cgroup/cpu/netjail",
        "sys/fs/cgroup/cpuacct/netjail",
        "sys/fs/cgroup/pids/netjail",
    }


def test_hybrid_create_job_writes_exact_limit_values(tmp_path: Path) -> None:
    """create_job() on hybrid sets memory+memsw limits, CFS period/quota and pids.max."""
    manager, fs = _hybrid(tmp_path)
    fs.writes.clear()
    job = manager.create_job("j1", Limits(memory_bytes=64 << 20, cpus=0.2, pids=16))
    cg_root = tmp_path / "sys/fs/cgroup"
    memory = cg_root / "memory/process_api/abc/netjail/j1"
    assert fs.writes == [
        (str(memory / "memory.limit_in_bytes"), "67108864"),
        (str(memory / "memory.memsw.limit_in_bytes"), "67108864"),
        (str(cg_root / "cpu/netjail/j1/cpu.cfs_period_us"), "100000"),
        (str(cg_root / "cpu/netjail/j1/cpu.cfs_quota_us"), "20000"),
        (str(cg_root / "pids/netjail/j1/pids.max"), "16"),
    ]
    assert job.directories == (
        str(cg_root / "unified/netjail/j1"),
        str(memory),
        str(cg_root / "cpu/netjail/j1"),
        str(cg_root / "cpuacct/netjail/j1"),
        str(cg_root / "pids/netjail/j1"),
    )
    assert job.procs_files[0] == str(cg_root / "unified/netjail/j1/cgroup.procs")
    assert len(job.procs_files) == 5


def test_hybrid_without_cpu_limit_skips_the_cpu_hierarchy(tmp_path: Path) -> None:
    """A job without a CPU limit joins cpuacct (accounting) but not cpu."""
    manager, _fs = _hybrid(tmp_path)
    job = manager.create_job("j1", Limits())
    names = [Path(d).relative_to(tmp_path / "sys/fs/cgroup").parts[0] for d in job.directories]
    assert names == ["unified", "memory", "cpuacct", "pids"]


def test_hybrid_without_swap_accounting_sets_swappiness_zero(tmp_path: Path) -> None:
    """Without memory.memsw.* the job's swappiness is set to 0 instead."""
    manager, fs = _hybrid(tmp_path, omit={"memory.memsw.limit_in_bytes"})
    fs.writes.clear()
    job = manager.create_job("j1", Limits(memory_bytes=1 << 30))
    memory = Path(job.directories[1])
    assert fs.writes == [
        (str(memory / "memory.limit_in_bytes"), "1073741824"),
        (str(memory / "memory.swappiness"), "0"),
    ]


def test_hybrid_missing_limit_file_fails_and_leaves_nothing(tmp_path: Path) -> None:
    """A missing pids.max is a CgroupError, and every job cgroup already made is removed."""
    manager, _fs = _hybrid(tmp_path, omit={"pids.max"})
    before = _all_dirs(tmp_path)
    with pytest.raises(CgroupError, match=r"cannot set pids\.max to 16 .* does not exist"):
        manager.create_job("j1", Limits(memory_bytes=64 << 20, cpus=0.5, pids=16))
    assert _all_dirs(tmp_path) == before
    assert manager.leftover_job_ids() == []


def test_hybrid_rejected_limit_value_fails_and_leaves_nothing(tmp_path: Path) -> None:
    """A kernel refusing a value (EINVAL) is a CgroupError naming file and value; nothing stays."""
    manager, fs = _hybrid(tmp_path)
    fs.refuse["cpu.cfs_quota_us"] = errno.EINVAL
    before = _all_dirs(tmp_path)
    with pytest.raises(CgroupError, match=r"set cpu\.cfs_quota_us to 50000 in .*Invalid argument"):
        manager.create_job("j1", Limits(cpus=0.5))
    assert _all_dirs(tmp_path) == before


def test_hybrid_kill_all_uses_the_unified_cgroup_kill(tmp_path: Path) -> None:
    """kill_all() on hybrid writes cgroup.kill in the job's cgroup2-tree cgroup."""
    manager, fs = _hybrid(tmp_path)
    job = manager.create_job("j1", Limits())
    fs.writes.clear()
    job.kill_all(timeout=0.5)
    assert fs.writes == [(os.path.join(job.directories[0], "cgroup.kill"), "1")]
    assert "/unified/" in job.directories[0]


def test_hybrid_usage_reads_v1_accounting(tmp_path: Path) -> None:
    """usage() on hybrid reads cpuacct ns counters, max_usage_in_bytes, oom_control, pids.peak."""
    manager, _fs = _hybrid(tmp_path)
    job = manager.create_job("j1", Limits())
    _unified, memory, cpuacct, pids = map(Path, job.directories)
    (cpuacct / "cpuacct.usage_user").write_text("2500000000\n")
    (cpuacct / "cpuacct.usage_sys").write_text("250000000\n")
    (memory / "memory.max_usage_in_bytes").write_text("8388608\n")
    (memory / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    (pids / "pids.peak").write_text("7\n")
    assert job.usage() == cg.ResourceUsage(2.5, 0.25, 8388608, 7, oom_killed=True)


def test_v1_usage_is_none_where_the_kernel_cannot_tell(tmp_path: Path) -> None:
    """Without pids.peak or cpuacct usage files, usage() says None instead of guessing."""
    manager, _fs = _hybrid(tmp_path, omit={"pids.peak", "cpuacct.usage_user"})
    job = manager.create_job("j1", Limits())
    usage = job.usage()
    assert usage.pids_peak is None
    assert usage.cpu_user_s == 0.0  # from cpuacct.stat, in clock ticks
    assert usage.memory_peak_bytes == 0


_V1_MOUNTS: dict[str, frozenset[str] | None] = {
    "cpu,cpuacct": frozenset({"cpu", "cpuacct"}),
    "memory": frozenset({"memory"}),
    "freezer": frozenset({"freezer"}),
    "pids": frozenset({"pids"}),
}


def _v1_layout(mounts: dict[str, frozenset[str] | None]) -> CgroupLayout:
    hierarchies = tuple(
        V1Hierarchy(ctrls, f"/sys/fs/cgroup/{name}", "/")
        for name, ctrls in mounts.items()
        if ctrls is not None
    )
    return CgroupLayout("v1", None, None, hierarchies)


def test_v1_job_joins_freezer_first_and_shares_cpu_cpuacct(tmp_path: Path) -> None:
    """On pure v1 the freezer cgroup lists the job; co-mounted cpu,cpuacct is one directory."""
    fs = _v1_tree(tmp_path, _V1_MOUNTS, {})
    manager = CgroupManager(_v1_layout(_V1_MOUNTS), root=str(tmp_path), fs=fs)
    manager.setup()
    job = manager.create_job("j1", Limits(cpus=1.5))
    names = [Path(d).relative_to(tmp_path / "sys/fs/cgroup").parts[0] for d in job.directories]
    assert names == ["freezer", "memory", "cpu,cpuacct", "pids"]
    assert (tmp_path / "sys/fs/cgroup/cpu,cpuacct/netjail/j1/cpu.cfs_quota_us").read_text() == (
        "150000"
    )


def test_v1_kill_all_freezes_kills_and_thaws(tmp_path: Path) -> None:
    """kill_all() on v1 freezes the job, SIGKILLs its processes, thaws, and ends empty."""
    fs = _v1_tree(tmp_path, _V1_MOUNTS, {})
    manager = CgroupManager(_v1_layout(_V1_MOUNTS), root=str(tmp_path), fs=fs)
    manager.setup()
    job = manager.create_job("j1", Limits())
    with subprocess.Popen(["sleep", "60"]) as child:
        try:
            for procs in job.procs_files:
                fs.write(procs, str(child.pid))
            fs.writes.clear()
            job.kill_all(timeout=2.0)
            assert job.pids() == []
            assert child.wait(timeout=5) == -9
            state = os.path.join(job.directories[0], "freezer.state")
            assert [w for w in fs.writes if w[0] == state] == [(state, "FROZEN"), (state, "THAWED")]
        finally:
            child.kill()
    job.remove()
    assert manager.leftover_job_ids() == []


def test_v1_without_freezer_is_refused_at_setup(tmp_path: Path) -> None:
    """Pure v1 without a freezer hierarchy cannot kill reliably, so setup() fails closed."""
    mounts = {k: v for k, v in _V1_MOUNTS.items() if k != "freezer"}
    fs = _v1_tree(tmp_path, mounts, {})
    manager = CgroupManager(_v1_layout(mounts), root=str(tmp_path), fs=fs)
    with pytest.raises(CgroupError, match="without a freezer hierarchy"):
        manager.setup()


def test_v1_limit_without_its_hierarchy_is_refused(tmp_path: Path) -> None:
    """A pids limit on a host with no v1 pids hierarchy is a CgroupError; nothing is made."""
    mounts = {k: v for k, v in _V1_MOUNTS.items() if k != "pids"}
    fs = _v1_tree(tmp_path, mounts, {})
    manager = CgroupManager(_v1_layout(mounts), root=str(tmp_path), fs=fs)
    manager.setup()
    before = _all_dirs(tmp_path)
    with pytest.raises(CgroupError, match="no cgroup v1 pids hierarchy is mounted"):
        manager.create_job("j1", Limits(pids=4))
    assert _all_dirs(tmp_path) == before


def test_plan_v1_writes_orders_memory_before_memsw() -> None:
    """The memory limit is written before memsw, which the kernel requires to be >= it."""
    writes = cg.plan_v1_writes(Limits(memory_bytes=4096), "memsw")
    assert [w.file for w in writes] == ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"]


def test_cpu_quota_is_a_share_of_a_100ms_period() -> None:
    """cpu_quota_us() turns CPUs into microseconds of a 100 ms period, at least 1 ms."""
    assert cg.cpu_quota_us(0.5) == 50_000
    assert cg.cpu_quota_us(2) == 200_000
    assert cg.cpu_quota_us(0.01) == 1_000


def test_v1_create_job_without_freezer_is_refused(tmp_path: Path) -> None:
    """create_job() on v1 without a freezer fails closed even if setup() was skipped."""
    mounts = {k: v for k, v in _V1_MOUNTS.items() if k != "freezer"}
    fs = _v1_tree(tmp_path, mounts, {})
    manager = CgroupManager(_v1_layout(mounts), root=str(tmp_path), fs=fs)
    with pytest.raises(CgroupError, match="no freezer hierarchy is mounted"):
        manager.create_job("j1", Limits())
