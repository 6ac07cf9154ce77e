"""The cgroup v1 strategy, on an emulated host without cgroup2 (``test_cgroup_fakefs``)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from netjail.errors import CgroupError
from netjail.kernel.cgroup import Limits

from .test_cgroup_fakefs import V1_MOUNTS, all_dirs, sleeping_child, v1_manager

_WITHOUT_FREEZER = {k: v for k, v in V1_MOUNTS.items() if k != "freezer"}


def _hierarchy_names(tmp_path: Path, directories: tuple[str, ...]) -> list[str]:
    return [Path(d).relative_to(tmp_path / "sys/fs/cgroup").parts[0] for d in directories]


def test_v1_setup_creates_one_parent_per_hierarchy(tmp_path: Path) -> None:
    """setup() on v1 makes netjail/ in freezer, memory, cpu,cpuacct (once) and pids."""
    manager, _fs = v1_manager(tmp_path)
    before = all_dirs(tmp_path)
    manager.setup()
    assert _hierarchy_names(tmp_path, manager.parent_dirs) == [
        "freezer",
        "memory",
        "cpu,cpuacct",
        "pids",
    ]
    assert all_dirs(tmp_path) - before == {
        f"sys/fs/cgroup/{name}/netjail" for name in ("freezer", "memory", "cpu,cpuacct", "pids")
    }


def test_v1_job_joins_freezer_first_and_shares_cpu_cpuacct(tmp_path: Path) -> None:
    """On pure v1 the freezer cgroup lists the job; co-mounted cpu,cpuacct is one directory."""
    manager, _fs = v1_manager(tmp_path)
    manager.setup()
    job = manager.create_job("j1", Limits(cpus=1.5))
    assert _hierarchy_names(tmp_path, job.directories) == [
        "freezer",
        "memory",
        "cpu,cpuacct",
        "pids",
    ]
    assert (tmp_path / "sys/fs/cgroup/cpu,cpuacct/netjail/j1/cpu.cfs_quota_us").read_text() == (
        "150000"
    )
    assert job.mode == "v1"


def test_v1_kill_all_freezes_kills_and_thaws(tmp_path: Path) -> None:
    """kill_all() on v1 freezes the job, SIGKILLs its processes, thaws, and ends empty."""
    manager, fs = v1_manager(tmp_path)
    manager.setup()
    job = manager.create_job("j1", Limits())
    with sleeping_child() as child:
        for procs in job.procs_files:
            fs.write(procs, str(child.pid))
        fs.writes.clear()
        job.kill_all(timeout=5.0)
        assert job.pids() == []
        assert child.wait(timeout=5) == -9
        assert set(fs.killed) == {child.pid}
        # A round is freeze, kill, thaw; more rounds only while the process finishes exiting.
        state = os.path.join(job.directories[0], "freezer.state")
        assert [w for w in fs.writes if w[0] == state][:2] == [(state, "FROZEN"), (state, "THAWED")]
        assert {path for path, _value in fs.writes} == {state}
    job.remove()
    assert manager.leftover_job_ids() == []


def test_v1_kill_all_of_an_empty_job_writes_nothing(tmp_path: Path) -> None:
    """A job with no process left is not frozen at all."""
    manager, fs = v1_manager(tmp_path)
    manager.setup()
    job = manager.create_job("j1", Limits())
    fs.writes.clear()
    job.kill_all(timeout=0.5)
    assert fs.writes == []


def test_v1_freeze_refused_is_a_cgroup_error_and_still_thaws(tmp_path: Path) -> None:
    """A freezer that refuses to freeze is a CgroupError; the thaw is written all the same."""
    manager, fs = v1_manager(tmp_path)
    manager.setup()
    job = manager.create_job("j1", Limits())
    with sleeping_child() as child:
        fs.write(job.procs_files[0], str(child.pid))
        fs.writes.clear()
        fs.refuse_read["freezer.state"] = errno.EIO
        with pytest.raises(
            CgroupError, match=r"cannot freeze and kill the processes of .*/freezer/.*j1: "
        ):
            job.kill_all(timeout=5.0)
        assert [value for _path, value in fs.writes] == ["FROZEN", "THAWED"]
        assert fs.killed == []


def test_v1_kill_all_of_a_process_that_will_not_die_fails_with_its_pid(tmp_path: Path) -> None:
    """On v1 too, a process left at the deadline is a CgroupError that names it."""
    manager, fs = v1_manager(tmp_path)
    manager.setup()
    job = manager.create_job("j1", Limits())
    with sleeping_child() as child:
        fs.write(job.procs_files[0], str(child.pid))
        fs.unkillable.add(child.pid)
        with pytest.raises(CgroupError, match=rf"still has 1 process\(es\) .*pids {child.pid}\)"):
            job.kill_all(timeout=0.05)


def test_v1_usage_reads_cpuacct_ticks_when_ns_counters_are_missing(tmp_path: Path) -> None:
    """usage() on an old kernel divides cpuacct.stat's ticks by USER_HZ."""
    manager, _fs = v1_manager(tmp_path)
    manager.setup()
    job = manager.create_job("j1", Limits())
    cpu = Path(job.directories[2])
    (cpu / "cpuacct.usage_user").unlink()
    hz = os.sysconf("SC_CLK_TCK")
    (cpu / "cpuacct.stat").write_text(f"user {hz}\nsystem {hz // 2}\n")
    usage = job.usage()
    assert (usage.cpu_user_s, usage.cpu_system_s) == (1.0, (hz // 2) / hz)


def test_v1_without_freezer_is_refused_at_setup(tmp_path: Path) -> None:
    """Pure v1 without a freezer hierarchy cannot kill reliably, so setup() fails closed."""
    manager, _fs = v1_manager(tmp_path, _WITHOUT_FREEZER)
    before = all_dirs(tmp_path)
    with pytest.raises(CgroupError, match="without a freezer hierarchy"):
        manager.setup()
    assert all_dirs(tmp_path) == before


def test_v1_create_job_without_freezer_is_refused(tmp_path: Path) -> None:
    """create_job() on v1 without a freezer fails closed even if setup() was skipped."""
    manager, _fs = v1_manager(tmp_path, _WITHOUT_FREEZER)
    with pytest.raises(CgroupError, match="no freezer hierarchy is mounted"):
        manager.create_job("j1", Limits())


def test_v1_limit_without_its_hierarchy_is_refused(tmp_path: Path) -> None:
    """A pids limit on a host with no v1 pids hierarchy is a CgroupError; nothing is made."""
    manager, _fs = v1_manager(tmp_path, {k: v for k, v in V1_MOUNTS.items() if k != "pids"})
    manager.setup()
    before = all_dirs(tmp_path)
    with pytest.raises(CgroupError, match="no cgroup v1 pids hierarchy is mounted"):
        manager.create_job("j1", Limits(pids=4))
    assert all_dirs(tmp_path) == before


def test_v1_leftover_without_its_freezer_cgroup_is_killed_only_when_empty(tmp_path: Path) -> None:
    """A v1 leftover whose freezer cgroup is gone: with a process in it, kill_all() refuses
    clearly; once empty, it returns, and remove() clears it."""
    manager, fs = v1_manager(tmp_path)
    manager.setup()
    leftover = tmp_path / "sys/fs/cgroup/memory/netjail/j-0ld"
    fs.make_dir(str(leftover))
    (leftover / "cgroup.procs").write_text(f"{os.getpid()}\n")  # a live process
    job = manager.open_job("j-0ld")
    with pytest.raises(CgroupError, match=r"1 process\(es\) but no cgroup to kill them by"):
        job.kill_all()
    (leftover / "cgroup.procs").write_text("")
    job.kill_all()
    job.remove()
    assert manager.leftover_job_ids() == []
