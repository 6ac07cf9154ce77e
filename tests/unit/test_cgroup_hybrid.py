"""The hybrid strategy, on an emulated systemd hybrid host (``test_cgroup_fakefs``)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from netjail.errors import CgroupError
from netjail.kernel.cgroup import CgroupLayout, CgroupManager, Limits, ResourceUsage

from .test_cgroup_fakefs import (
    HYBRID_MOUNTS,
    HYBRID_OWN,
    all_dirs,
    hybrid_manager,
    sleeping_child,
    v1_hierarchies,
    v1_tree,
)


def _hierarchy_names(tmp_path: Path, directories: tuple[str, ...]) -> list[str]:
    return [Path(d).relative_to(tmp_path / "sys/fs/cgroup").parts[0] for d in directories]


def test_hybrid_setup_creates_parents_only_where_jobs_go(tmp_path: Path) -> None:
    """setup() on hybrid makes netjail/ in unified, memory (below own), cpu, cpuacct and pids."""
    fs = v1_tree(tmp_path, HYBRID_MOUNTS, HYBRID_OWN)
    layout = CgroupLayout(
        "hybrid", "/sys/fs/cgroup/unified", "/", v1_hierarchies(HYBRID_MOUNTS, HYBRID_OWN)
    )
    manager = CgroupManager(layout, root=str(tmp_path), fs=fs)
    before = all_dirs(tmp_path)
    manager.setup()
    made = all_dirs(tmp_path) - before
    assert made == {
        "sys/fs/cgroup/unified/netjail",
        "sys/fs/cgroup/memory/process_api/abc/netjail",
        "sys/fs/cgroup/cpu/netjail",
        "sys/fs/cgroup/cpuacct/netjail",
        "sys/fs/cgroup/pids/netjail",
    }
    assert _hierarchy_names(tmp_path, manager.parent_dirs) == [
        "unified",
        "memory",
        "cpu",
        "cpuacct",
        "pids",
    ]
    manager.setup()
    assert all_dirs(tmp_path) - before == made


def test_hybrid_create_job_writes_exact_limit_values(tmp_path: Path) -> None:
    """create_job() on hybrid sets memory+memsw limits, CFS period/quota and pids.max."""
    manager, fs = hybrid_manager(tmp_path)
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
        str(cg_root / "pids/netjail/j1"),
    )
    assert job.procs_files[0] == str(cg_root / "unified/netjail/j1/cgroup.procs")
    assert len(job.procs_files) == 4
    assert job.mode == "hybrid"


def test_hybrid_without_cpu_limit_skips_the_cpu_hierarchy(tmp_path: Path) -> None:
    """A job without a CPU limit joins neither cpu nor cpuacct (cgroup2 counts its CPU time)."""
    manager, _fs = hybrid_manager(tmp_path)
    job = manager.create_job("j1", Limits())
    assert _hierarchy_names(tmp_path, job.directories) == ["unified", "memory", "pids"]


def test_hybrid_without_swap_accounting_sets_swappiness_zero(tmp_path: Path) -> None:
    """Without memory.memsw.* the job's swappiness is set to 0 instead."""
    manager, fs = hybrid_manager(tmp_path, omit={"memory.memsw.limit_in_bytes"})
    fs.writes.clear()
    job = manager.create_job("j1", Limits(memory_bytes=1 << 30))
    memory = Path(job.directories[1])
    assert fs.writes == [
        (str(memory / "memory.limit_in_bytes"), "1073741824"),
        (str(memory / "memory.swappiness"), "0"),
    ]


def test_hybrid_missing_limit_file_fails_and_leaves_nothing(tmp_path: Path) -> None:
    """A missing pids.max is a CgroupError, and every job cgroup already made is removed."""
    manager, _fs = hybrid_manager(tmp_path, omit={"pids.max"})
    before = all_dirs(tmp_path)
    with pytest.raises(CgroupError, match=r"cannot set pids\.max to 16 .* does not exist"):
        manager.create_job("j1", Limits(memory_bytes=64 << 20, cpus=0.5, pids=16))
    assert all_dirs(tmp_path) == before
    assert manager.leftover_job_ids() == []


def test_hybrid_rejected_limit_value_fails_and_leaves_nothing(tmp_path: Path) -> None:
    """A kernel refusing a value (EINVAL) is a CgroupError naming file and value; nothing stays."""
    manager, fs = hybrid_manager(tmp_path)
    fs.refuse_write["cpu.cfs_quota_us"] = errno.EINVAL
    before = all_dirs(tmp_path)
    with pytest.raises(CgroupError, match=r"set cpu\.cfs_quota_us to 50000 in .*Invalid argument"):
        manager.create_job("j1", Limits(cpus=0.5))
    assert all_dirs(tmp_path) == before


def test_hybrid_existing_cgroup_in_a_later_hierarchy_undoes_the_earlier_ones(
    tmp_path: Path,
) -> None:
    """A job dir already in memory/ fails create_job; the unified one just made is removed."""
    manager, _fs = hybrid_manager(tmp_path)
    stale = tmp_path / "sys/fs/cgroup/memory/process_api/abc/netjail/j1"
    stale.mkdir()
    with pytest.raises(CgroupError, match=r"cannot create cgroup .*/memory/.*/j1: File exists"):
        manager.create_job("j1", Limits())
    assert not (tmp_path / "sys/fs/cgroup/unified/netjail/j1").exists()
    assert stale.is_dir()


def test_hybrid_kill_all_uses_the_unified_cgroup_kill(tmp_path: Path) -> None:
    """kill_all() on hybrid writes cgroup.kill in the job's cgroup2-tree cgroup only."""
    manager, fs = hybrid_manager(tmp_path)
    job = manager.create_job("j1", Limits())
    with sleeping_child() as child:
        for procs in job.procs_files:
            fs.write(procs, str(child.pid))
        fs.writes.clear()
        job.kill_all(timeout=5.0)
        # Written again while the killed process finishes exiting, but only there.
        assert set(fs.writes) == {(os.path.join(job.directories[0], "cgroup.kill"), "1")}
        assert "/unified/" in job.directories[0]


def test_hybrid_kill_all_before_cgroup_kill_uses_the_cgroup2_freezer(tmp_path: Path) -> None:
    """A hybrid host before 5.14 kills by freezing the job's cgroup2 cgroup, not the v1 one."""
    manager, fs = hybrid_manager(tmp_path, omit={"cgroup.kill"})
    job = manager.create_job("j1", Limits())
    with sleeping_child() as child:
        fs.write(job.procs_files[0], str(child.pid))
        fs.writes.clear()
        job.kill_all(timeout=5.0)
        assert child.wait(timeout=5) == -9
        assert [value for _path, value in fs.writes][:2] == ["1", "0"]
        assert {os.path.basename(path) for path, _value in fs.writes} == {"cgroup.freeze"}


def test_hybrid_leftover_without_its_unified_cgroup_is_removed_when_empty(tmp_path: Path) -> None:
    """A leftover whose cgroup2 cgroup is gone and whose v1 ones hold no process needs no kill:
    kill_all() returns and remove() clears every hierarchy."""
    manager, fs = hybrid_manager(tmp_path)
    for hierarchy in ("pids", "cpuacct"):
        fs.make_dir(str(tmp_path / f"sys/fs/cgroup/{hierarchy}/netjail/j-0ld"))
    job = manager.open_job("j-0ld")
    assert _hierarchy_names(tmp_path, job.directories) == ["cpuacct", "pids"]
    job.kill_all()
    job.remove()
    assert manager.leftover_job_ids() == []


def test_hybrid_leftover_with_processes_but_no_unified_cgroup_is_refused(tmp_path: Path) -> None:
    """Processes in a leftover's v1 cgroups with no cgroup2 cgroup to kill them by: kill_all()
    refuses, naming how many (killing by pid without a handle could hit a reused pid)."""
    manager, fs = hybrid_manager(tmp_path)
    leftover = tmp_path / "sys/fs/cgroup/pids/netjail/j-0ld"
    fs.make_dir(str(leftover))
    (leftover / "cgroup.procs").write_text(f"{os.getpid()}\n{os.getppid()}\n")  # alive
    job = manager.open_job("j-0ld")
    with pytest.raises(CgroupError, match=r"j-0ld: it has 2 process\(es\) but no cgroup to kill"):
        job.kill_all()


def test_hybrid_usage_reads_cgroup2_cpu_time_and_v1_accounting(tmp_path: Path) -> None:
    """usage() on hybrid reads the cgroup2 cpu.stat, max_usage_in_bytes, oom_control and
    pids.peak."""
    manager, _fs = hybrid_manager(tmp_path)
    job = manager.create_job("j1", Limits())
    unified, memory, pids = map(Path, job.directories)
    (unified / "cpu.stat").write_text("usage_usec 2750000\nuser_usec 2500000\nsystem_usec 250000\n")
    (memory / "memory.max_usage_in_bytes").write_text("8388608\n")
    (memory / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    (pids / "pids.peak").write_text("7\n")
    assert job.usage() == ResourceUsage(2.5, 0.25, 8388608, 7, oom_killed=True)


def test_hybrid_cpu_time_of_a_job_from_before_still_comes_from_its_cpuacct(tmp_path: Path) -> None:
    """A leftover job cgroup that joined cpuacct (an older daemon's) is opened with it, and its
    CPU time read from cpuacct's ns counters."""
    manager, fs = hybrid_manager(tmp_path)
    job = manager.create_job("j-0ld", Limits())
    cpuacct = tmp_path / "sys/fs/cgroup/cpuacct/netjail/j-0ld"
    fs.make_dir(str(cpuacct))
    (cpuacct / "cpuacct.usage_user").write_text("2500000000\n")
    (cpuacct / "cpuacct.usage_sys").write_text("250000000\n")
    opened = manager.open_job("j-0ld")
    assert str(cpuacct) in opened.directories
    usage = opened.usage()
    assert (usage.cpu_user_s, usage.cpu_system_s) == (2.5, 0.25)
    assert len(job.directories) == 3


def test_hybrid_holds_other_than_reads_the_first_hierarchy_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The end's check for leftovers lists the first hierarchy's tree only (a sub-cgroup the
    job made included): every process of the job is in all its cgroups at once."""
    manager, fs = hybrid_manager(tmp_path)
    job = manager.create_job("j1", Limits())
    first = job.directories[0]
    read, paths = fs.read, []

    def recording(path: str) -> str:
        paths.append(path)
        return read(path)

    monkeypatch.setattr(fs, "read", recording)
    with sleeping_child() as init, sleeping_child() as other:
        for procs in job.procs_files:
            fs.write(procs, str(init.pid))
        assert job.holds_other_than(init.pid) is False
        sub = os.path.join(first, "inner")
        fs.make_dir(sub)
        fs.write(os.path.join(sub, "cgroup.procs"), str(other.pid))
        assert job.holds_other_than(init.pid) is True
        assert job.holds_other_than(other.pid) is True  # the init is the other one then
    assert paths
    assert all(path.startswith(first + "/") for path in paths)


def test_hybrid_usage_is_none_where_the_kernel_cannot_tell(tmp_path: Path) -> None:
    """Without pids.peak or a cpu.stat, usage() says None instead of guessing."""
    manager, _fs = hybrid_manager(tmp_path, omit={"pids.peak"})
    job = manager.create_job("j1", Limits())
    stat = Path(job.directories[0]) / "cpu.stat"
    if stat.exists():
        stat.unlink()
    usage = job.usage()
    assert usage.pids_peak is None
    assert (usage.cpu_user_s, usage.cpu_system_s) == (None, None)
    assert usage.memory_peak_bytes == 0


def test_hybrid_without_cpuacct_counts_cpu_time_in_the_cgroup2_tree(tmp_path: Path) -> None:
    """With no cpuacct hierarchy, CPU time comes from the job's cgroup2 cpu.stat."""
    mounts = {k: v for k, v in HYBRID_MOUNTS.items() if k != "cpuacct"}
    manager, _fs = hybrid_manager(tmp_path, mounts=mounts)
    job = manager.create_job("j1", Limits())
    assert _hierarchy_names(tmp_path, job.directories) == ["unified", "memory", "pids"]
    unified = Path(job.directories[0])
    (unified / "cpu.stat").write_text(
        "usage_usec 3000000\nuser_usec 2000000\nsystem_usec 1000000\n"
    )
    usage = job.usage()
    assert (usage.cpu_user_s, usage.cpu_system_s) == (2.0, 1.0)


def test_hybrid_limit_without_its_hierarchy_is_refused(tmp_path: Path) -> None:
    """A memory limit with no v1 memory hierarchy is a CgroupError; no cgroup is made."""
    mounts = {k: v for k, v in HYBRID_MOUNTS.items() if k != "memory"}
    manager, _fs = hybrid_manager(tmp_path, mounts=mounts)
    before = all_dirs(tmp_path)
    with pytest.raises(CgroupError, match="no cgroup v1 memory hierarchy is mounted"):
        manager.create_job("j1", Limits(memory_bytes=1 << 20))
    assert all_dirs(tmp_path) == before


def test_hybrid_layout_without_a_cgroup2_mount_is_a_bug_report(tmp_path: Path) -> None:
    """A hybrid layout that names no cgroup2 tree is refused at once, as a netjail bug."""
    layout = CgroupLayout("hybrid", None, None, v1_hierarchies(HYBRID_MOUNTS, HYBRID_OWN))
    with pytest.raises(CgroupError, match="hybrid mode without a cgroup2 mount"):
        CgroupManager(layout, root=str(tmp_path))
