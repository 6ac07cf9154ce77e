"""netjail.kernel.cgroup's pure half and what is the same in every layout.

Layout detection, limit planning, stat parsing and the manager's job-id and parent-name rules.
Each layout's strategy has tests of its own (``test_cgroup_v2``, ``test_cgroup_hybrid``,
``test_cgroup_v1``), on the fake kernfs in ``test_cgroup_fakefs``.
"""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path

import pytest

from netjail import units
from netjail.errors import CgroupError, RequestError
from netjail.jobid import new_job_id
from netjail.kernel import cgroup_plan as plan
from netjail.kernel.cgroup import (
    CgroupFs,
    CgroupLayout,
    CgroupManager,
    Limits,
    ResourceUsage,
    V1Hierarchy,
    detect_cgroup_layout,
    load_cgroup_layout,
)
from netjail.kernel.cgroup_plan import ControlWrite, V1UsageFiles

from .test_cgroup_fakefs import v2_manager, v2_tree

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


def test_detect_ignores_malformed_lines_and_second_mounts_of_a_hierarchy() -> None:
    """Junk in /proc/self/cgroup is skipped; a hierarchy mounted twice counts once."""
    mountinfo = (
        "32 31 0:29 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n"
        "33 31 0:29 / /mnt/pids rw - cgroup cgroup rw,pids\n"
        "34 31 0:30 /job /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
    )
    layout = detect_cgroup_layout(mountinfo, "garbage\n3:pids:/a\n2:memory:/job\n")
    assert layout == CgroupLayout(
        "v1",
        None,
        None,
        (
            V1Hierarchy(frozenset({"pids"}), "/sys/fs/cgroup/pids", "/a"),
            V1Hierarchy(frozenset({"memory"}), "/sys/fs/cgroup/memory", "/"),
        ),
    )


def test_the_real_cgroupfs_on_a_plain_directory(tmp_path: Path) -> None:
    """CgroupFs makes, lists, writes (never creating a file), reads and removes directories."""
    fs = CgroupFs()
    top = str(tmp_path / "job")
    fs.make_dir(top)
    fs.make_dir(f"{top}/inner")
    Path(top, "cgroup.procs").write_text("")
    fs.write(f"{top}/cgroup.procs", "12")
    assert fs.read(f"{top}/cgroup.procs") == "12"
    with pytest.raises(FileNotFoundError):
        fs.write(f"{top}/memory.max", "1")
    assert not fs.exists(f"{top}/memory.max")
    assert fs.list_dirs(top) == ["inner"]
    assert fs.list_tree(top) == [top, f"{top}/inner"]
    assert fs.list_tree(f"{top}/gone") == []
    fs.remove_dir(f"{top}/inner")
    assert fs.list_tree(top) == [top]


def test_the_real_cgroupfs_kills_with_sigkill() -> None:
    """CgroupFs.kill_process() sends SIGKILL."""
    with subprocess.Popen(["sleep", "60"]) as child:
        try:
            CgroupFs().kill_process(child.pid)
            assert child.wait(timeout=5) == -9
        finally:
            child.kill()


class _ProcFs(CgroupFs):
    """Serves canned /proc files, or fails to read them."""

    def __init__(self, files: dict[str, str]) -> None:
        self.files = files

    def read(self, path: str) -> str:
        if path not in self.files:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return self.files[path]


def test_load_reads_mountinfo_and_cgroup_of_the_calling_process() -> None:
    """load_cgroup_layout() detects from /proc/self/mountinfo and /proc/self/cgroup via fs."""
    fs = _ProcFs({"/proc/self/mountinfo": V1_MOUNTINFO, "/proc/self/cgroup": V1_CGROUP})
    assert load_cgroup_layout(fs) == detect_cgroup_layout(V1_MOUNTINFO, V1_CGROUP)


def test_load_without_proc_fails_clearly() -> None:
    """An unreadable /proc/self/cgroup is one CgroupError line with the reason."""
    fs = _ProcFs({"/proc/self/mountinfo": V1_MOUNTINFO})
    with pytest.raises(
        CgroupError, match=r"^cannot read the process's cgroup information: Permission denied$"
    ):
        load_cgroup_layout(fs)


# ---------------------------------------------------------------------------------------------
# Limits and the plans made of them


@pytest.mark.parametrize(
    "kwargs", [{"memory_bytes": 0}, {"cpus": 0.0}, {"cpus": 0.001}, {"cpus": 2000.0}, {"pids": 0}]
)
def test_limits_reject_values_the_kernel_would_refuse(kwargs: dict[str, float]) -> None:
    """Limits() refuses zero, negative and out-of-range values up front."""
    with pytest.raises(RequestError, match="invalid"):
        Limits(**kwargs)  # type: ignore[arg-type]


def test_limits_cpu_bounds_are_the_units_bounds() -> None:
    """Limits accepts exactly units.MIN_CPUS to units.MAX_CPUS, and says so when refusing."""
    assert Limits(cpus=units.MIN_CPUS).cpus == units.MIN_CPUS
    assert Limits(cpus=units.MAX_CPUS).cpus == units.MAX_CPUS
    with pytest.raises(RequestError, match=r"^invalid CPU limit: use 0\.01 to 1024 CPUs, e\.g\."):
        Limits(cpus=units.MAX_CPUS * 2)


def test_limits_name_the_controllers_they_need_in_order() -> None:
    """controllers() lists memory, cpu and pids for the limits set, in that order."""
    assert Limits().controllers() == ()
    assert Limits(pids=1, memory_bytes=1).controllers() == ("memory", "pids")
    assert Limits(pids=1, cpus=1, memory_bytes=1).controllers() == ("memory", "cpu", "pids")


def test_cpu_quota_is_a_share_of_a_100ms_period() -> None:
    """cpu_quota_us() turns CPUs into microseconds of a 100 ms period, at least 1 ms."""
    assert plan.cpu_quota_us(0.5) == 50_000
    assert plan.cpu_quota_us(2) == 200_000
    assert plan.cpu_quota_us(units.MIN_CPUS) == plan.MIN_CPU_QUOTA_US == 1_000


def test_plan_v2_writes_caps_swap_with_memory_and_sets_oom_group_last() -> None:
    """Every v2 limit is one exact write; memory brings swap.max 0; oom.group comes last."""
    limits = Limits(memory_bytes=4096, cpus=1.5, pids=9)
    assert plan.plan_v2_writes(limits, oom_group=True) == (
        ControlWrite("unified", "memory.max", "4096"),
        ControlWrite("unified", "memory.swap.max", "0"),
        ControlWrite("unified", "cpu.max", "150000 100000"),
        ControlWrite("unified", "pids.max", "9"),
        ControlWrite("unified", "memory.oom.group", "1"),
    )
    assert plan.plan_v2_writes(Limits(), oom_group=False) == ()


def test_plan_v1_writes_orders_memory_before_memsw() -> None:
    """The memory limit is written before memsw, which the kernel requires to be >= it."""
    writes = plan.plan_v1_writes(Limits(memory_bytes=4096), "memsw")
    assert [w.file for w in writes] == ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"]


def test_plan_v1_writes_without_swap_accounting_sets_swappiness() -> None:
    """With the "swappiness" guard a memory limit comes with swappiness 0, and CFS is exact."""
    assert plan.plan_v1_writes(Limits(memory_bytes=8192, cpus=0.25), "swappiness") == (
        ControlWrite("memory", "memory.limit_in_bytes", "8192"),
        ControlWrite("memory", "memory.swappiness", "0"),
        ControlWrite("cpu", "cpu.cfs_period_us", "100000"),
        ControlWrite("cpu", "cpu.cfs_quota_us", "25000"),
    )


_ALL_V1: tuple[plan.Role, ...] = ("freezer", "memory", "cpu", "cpuacct", "pids")


def test_plan_v1_roles_joins_accounting_always_and_cpu_only_for_a_cpu_limit() -> None:
    """The tracker comes first; memory, cpuacct and pids always; cpu with a CPU limit only."""
    assert plan.plan_v1_roles("freezer", _ALL_V1, Limits()) == (
        "freezer",
        "memory",
        "cpuacct",
        "pids",
    )
    assert plan.plan_v1_roles("unified", ("unified", "cpu", "pids"), Limits(cpus=1)) == (
        "unified",
        "cpu",
        "pids",
    )


def test_plan_v1_roles_refuses_a_missing_tracker_or_limit_hierarchy() -> None:
    """No tracker, or no hierarchy for a limit, is a CgroupError: never silently unlimited."""
    with pytest.raises(CgroupError, match="no unified hierarchy is mounted to list and kill"):
        plan.plan_v1_roles("unified", _ALL_V1, Limits())
    with pytest.raises(CgroupError, match="cannot apply the cpu limit: no cgroup v1 cpu"):
        plan.plan_v1_roles("freezer", ("freezer", "memory"), Limits(cpus=1))


def test_check_v2_controllers_names_the_missing_one_and_the_fix() -> None:
    """A limit whose controller is not enabled is refused with delegation as the fix."""
    plan.check_v2_controllers(Limits(pids=1), {"pids"}, "/cg/netjail")
    with pytest.raises(
        CgroupError, match=r"^cannot apply the memory limit: .* enabled in /cg/netjail; .*Delegate"
    ):
        plan.check_v2_controllers(Limits(memory_bytes=1, pids=1), {"pids"}, "/cg/netjail")


def test_freezers_read_their_status_files() -> None:
    """cgroup2 is frozen at "frozen 1" in cgroup.events; v1 at FROZEN, not FREEZING."""
    assert plan.CGROUP2_FREEZER.is_frozen("populated 1\nfrozen 1\n")
    assert not plan.CGROUP2_FREEZER.is_frozen("populated 1\nfrozen 0\n")
    assert plan.V1_FREEZER.is_frozen("FROZEN\n")
    assert not plan.V1_FREEZER.is_frozen("FREEZING\n")


# ---------------------------------------------------------------------------------------------
# Parsing control files


def test_parsers_take_only_what_the_kernel_writes() -> None:
    """Counters, keyed counters and pid lists skip what is not a plain number."""
    assert plan.parse_keyed_counters("user 5\nsystem x\nbad\nnr 1 2\n") == {"user": 5}
    assert plan.parse_counter(" 42\n") == 42
    assert plan.parse_counter("max\n") is None
    assert plan.parse_pids("3\n1\n\nx\n") == [3, 1]


def test_usage_from_v2_without_files_is_unknown_and_not_oom() -> None:
    """No cgroup2 accounting files at all means None everywhere and no OOM kill."""
    assert plan.usage_from_v2(None, None, None, None) == ResourceUsage(
        None, None, None, None, oom_killed=False
    )


def test_usage_from_v1_prefers_ns_counters_then_ticks_then_cgroup2() -> None:
    """CPU time comes from cpuacct ns, else cpuacct.stat ticks, else the cgroup2 cpu.stat."""
    cpu_stat = "user_usec 4000000\nsystem_usec 0\n"
    ns = V1UsageFiles(
        cpuacct_usage_user="1000000000\n",
        cpuacct_usage_sys="0\n",
        cpuacct_stat="user 300\nsystem 300\n",
        unified_cpu_stat=cpu_stat,
    )
    assert plan.usage_from_v1(ns, 100).cpu_user_s == 1.0
    ticks = V1UsageFiles(cpuacct_stat="user 300\nsystem 50\n", unified_cpu_stat=cpu_stat)
    usage = plan.usage_from_v1(ticks, 100)
    assert (usage.cpu_user_s, usage.cpu_system_s) == (3.0, 0.5)
    assert plan.usage_from_v1(V1UsageFiles(unified_cpu_stat=cpu_stat), 100).cpu_user_s == 4.0
    assert plan.usage_from_v1(V1UsageFiles(), 100) == ResourceUsage(
        None, None, None, None, oom_killed=False
    )


def test_usage_from_v1_reads_peaks_and_oom_kills() -> None:
    """memory.max_usage_in_bytes, pids.peak and oom_control's oom_kill count make the rest."""
    files = V1UsageFiles(
        memory_max_usage_in_bytes="4096\n",
        memory_oom_control="oom_kill_disable 0\nunder_oom 0\noom_kill 1\n",
        pids_peak="max\n",
    )
    usage = plan.usage_from_v1(files, 100)
    assert (usage.memory_peak_bytes, usage.pids_peak, usage.oom_killed) == (4096, None, True)


# ---------------------------------------------------------------------------------------------
# The manager's names


@pytest.mark.parametrize("job_id", ["", "..", "a/b", "J1", "x" * 33, "a\nb", "j_1"])
def test_ids_outside_the_job_id_grammar_are_refused(tmp_path: Path, job_id: str) -> None:
    """create_job() and open_job() refuse an id outside netjail.jobid's grammar."""
    manager = v2_manager(tmp_path, v2_tree(tmp_path))
    manager.setup()
    with pytest.raises(CgroupError, match=r"invalid job id .*: it must match \[a-z0-9-\]"):
        manager.create_job(job_id, Limits())
    with pytest.raises(CgroupError, match="invalid job id"):
        manager.open_job(job_id)


def test_leftovers_are_only_names_in_the_job_id_grammar(tmp_path: Path) -> None:
    """leftover_job_ids() ignores directories and files that are not job ids."""
    fs = v2_tree(tmp_path)
    manager = v2_manager(tmp_path, fs)
    manager.setup()
    job_id = new_job_id()
    manager.create_job(job_id, Limits())
    parent = Path(manager.parent_dirs[0])
    (parent / "Not_A_Job").mkdir()
    (parent / "j-file").write_text("")
    assert manager.leftover_job_ids() == [job_id]
    with pytest.raises(CgroupError, match="no cgroup exists for job j-none"):
        manager.open_job("j-none")


def test_leftovers_of_a_manager_never_set_up_are_none(tmp_path: Path) -> None:
    """Before setup() (no parent cgroup yet) there are no leftovers, and no error."""
    assert v2_manager(tmp_path, v2_tree(tmp_path)).leftover_job_ids() == []


@pytest.mark.parametrize("name", ["", "a/b", ".", "..", "-x", "x" * 65, "daemon"])
def test_unsafe_or_reserved_parent_names_are_refused(tmp_path: Path, name: str) -> None:
    """The parent cgroup's name is one safe path component, and not the daemon's leaf."""
    layout = CgroupLayout("v2", "/sys/fs/cgroup", "/")
    with pytest.raises(CgroupError, match="invalid parent cgroup name"):
        CgroupManager(layout, root=str(tmp_path), parent_name=name)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0::/system.slice/netjail.service/netjail/j-1a2b3c4d\n", True),
        ("4:memory:/netjail/j-1a2b3c4d/inner\n0::/\n", True),
        ("0::/system.slice/netjail.service/daemon\n", False),
        ("0::/netjail/other\n", False),
        ("0::/xnetjail/j-1a2b3c4d\n", False),
        ("0::/j-1a2b3c4d/netjail\n", False),
        ("", False),
    ],
)
def test_in_job_cgroup_finds_the_parent_then_a_job_id(
    tmp_path: Path, text: str, expected: bool
) -> None:
    """in_job_cgroup() is true for a /proc/PID/cgroup line through <parent>/j-…, only."""
    manager = CgroupManager(CgroupLayout("v2", "/sys/fs/cgroup", "/"), root=str(tmp_path))
    assert manager.in_job_cgroup(text) is expected
