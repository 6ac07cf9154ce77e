"""The cgroup v2 strategy, on an emulated cgroup2 host (``test_cgroup_fakefs``)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from netjail.errors import CgroupError
from netjail.kernel import cgroup as cg
from netjail.kernel.cgroup import CgroupManager, Limits, ResourceUsage

from .test_cgroup_fakefs import (
    V2_OWN,
    FakeKernelFs,
    all_dirs,
    sleeping_child,
    v2_manager,
    v2_tree,
)

V2 = tuple[CgroupManager, FakeKernelFs, Path]


@pytest.fixture
def v2(tmp_path: Path) -> V2:
    """A set-up manager on an emulated cgroup2 host, and the daemon's cgroup directory."""
    fs = v2_tree(tmp_path)
    manager = v2_manager(tmp_path, fs)
    manager.setup()
    return manager, fs, tmp_path / "sys/fs/cgroup" / V2_OWN.strip("/")


# ---------------------------------------------------------------------------------------------
# setup


def test_v2_setup_moves_the_daemon_into_a_leaf_and_enables_controllers(
    v2: V2,
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


def test_v2_setup_is_idempotent(v2: V2) -> None:
    """A second setup() (a restarted daemon) changes nothing and does not fail."""
    manager, fs, own = v2
    before = len(fs.writes)
    manager.setup()
    assert len(fs.writes) == before
    assert (own / "daemon/cgroup.procs").read_text() == f"{os.getpid()}\n"


def test_v2_setup_in_the_root_cgroup_moves_nobody(tmp_path: Path) -> None:
    """The kernel's root cgroup may hold processes, so setup() leaves the daemon there."""
    fs = v2_tree(tmp_path, own="/")
    (tmp_path / "sys/fs/cgroup/cgroup.subtree_control").write_text("")
    v2_manager(tmp_path, fs, own="/").setup()
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
    fs = v2_tree(tmp_path)
    fs.refuse_write["cgroup.procs"] = errno.EACCES
    with pytest.raises(CgroupError, match=r"cannot move process \d+ into .*Delegate=yes"):
        v2_manager(tmp_path, fs).setup()


def test_v2_setup_fails_clearly_when_a_controller_cannot_be_enabled(tmp_path: Path) -> None:
    """A refused write to cgroup.subtree_control names the controller and the fix."""
    fs = v2_tree(tmp_path)
    fs.refuse_write["cgroup.subtree_control"] = errno.EACCES
    with pytest.raises(
        CgroupError, match=r"cannot enable the memory controller in .*Permission denied; netjaild"
    ):
        v2_manager(tmp_path, fs).setup()


def test_v2_setup_without_cgroup_controllers_fails_clearly(tmp_path: Path) -> None:
    """An unreadable cgroup.controllers is a CgroupError naming the file."""
    fs = v2_tree(tmp_path, omit={"cgroup.controllers"})
    with pytest.raises(CgroupError, match=r"cannot read .*/cgroup\.controllers: No such file"):
        v2_manager(tmp_path, fs).setup()


class _RespawningFs(FakeKernelFs):
    """A cgroup where a new process appears for every one moved out (a fork loop)."""

    def write(self, path: str, value: str) -> None:
        if path.endswith("/daemon/cgroup.procs"):
            self.writes.append((path, value))  # moved, but a child took its place
            return
        super().write(path, value)


def test_v2_setup_gives_up_on_a_cgroup_that_never_empties(tmp_path: Path) -> None:
    """setup() stops after a bounded number of passes if processes keep appearing."""
    own = tmp_path / "sys/fs/cgroup" / V2_OWN.strip("/")
    plain = v2_tree(tmp_path)
    fs = _RespawningFs(plain.hierarchies, ())
    with pytest.raises(CgroupError, match="processes keep appearing in it"):
        v2_manager(tmp_path, fs).setup()
    assert (own / "cgroup.procs").read_text() == f"{os.getpid()}\n"
    assert len(fs.writes) == 20


def test_v2_layout_without_a_cgroup2_mount_is_a_bug_report(tmp_path: Path) -> None:
    """A v2 layout that names no cgroup2 tree is refused at once, as a netjail bug."""
    with pytest.raises(CgroupError, match="this is a netjail bug"):
        CgroupManager(cg.CgroupLayout("v2", None, None), root=str(tmp_path))


# ---------------------------------------------------------------------------------------------
# create_job


def test_v2_create_job_writes_exact_limit_values(
    v2: V2,
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
    v2: V2,
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
    fs = v2_tree(tmp_path, omit={"memory.swap.max"})
    manager = v2_manager(tmp_path, fs)
    manager.setup()
    before = all_dirs(tmp_path)
    with pytest.raises(CgroupError, match=r"cannot set memory\.swap\.max to 0 .* does not exist"):
        manager.create_job("j1", Limits(memory_bytes=64 << 20))
    assert all_dirs(tmp_path) == before


def test_v2_limit_needing_an_undelegated_controller_is_refused(tmp_path: Path) -> None:
    """A pids limit where pids was not delegated is a CgroupError; no cgroup is made."""
    fs = v2_tree(tmp_path)
    own = tmp_path / "sys/fs/cgroup" / V2_OWN.strip("/")
    (own / "cgroup.controllers").write_text("cpu memory")
    manager = v2_manager(tmp_path, fs)
    manager.setup()
    with pytest.raises(CgroupError, match="the pids controller is not enabled"):
        manager.create_job("j1", Limits(pids=16))
    assert not (own / "netjail/j1").exists()
    manager.create_job("j2", Limits(memory_bytes=1 << 20))


def test_v2_existing_job_cgroup_is_not_reused_or_removed(
    v2: V2,
) -> None:
    """create_job() of an existing id fails and leaves the existing cgroup alone."""
    manager, _fs, own = v2
    manager.create_job("j1", Limits(pids=4))
    with pytest.raises(CgroupError, match=r"cannot create cgroup .*/j1: File exists"):
        manager.create_job("j1", Limits(pids=8))
    assert (own / "netjail/j1/pids.max").read_text() == "4"


def test_v2_create_job_without_oom_group_skips_it(tmp_path: Path) -> None:
    """A kernel without memory.oom.group gets no such write (it is not a limit)."""
    fs = v2_tree(tmp_path, omit={"memory.oom.group"})
    manager = v2_manager(tmp_path, fs)
    manager.setup()
    fs.writes.clear()
    manager.create_job("j1", Limits(pids=3))
    assert [os.path.basename(path) for path, _value in fs.writes] == ["pids.max"]


# ---------------------------------------------------------------------------------------------
# processes, killing, usage and removal


def test_v2_kill_all_writes_cgroup_kill_and_waits_until_empty(v2: V2) -> None:
    """kill_all() on cgroup2 writes "1" to the job's cgroup.kill."""
    manager, fs, _own = v2
    job = manager.create_job("j1", Limits())
    with sleeping_child() as child:
        fs.write(job.procs_files[0], str(child.pid))
        assert job.contains(child.pid)
        fs.writes.clear()
        job.kill_all(timeout=5.0)
        assert fs.writes[0] == (os.path.join(job.directories[0], "cgroup.kill"), "1")
        assert job.pids() == []


def test_v2_kill_all_lists_cgroups_the_job_made_below_its_own(v2: V2) -> None:
    """pids() includes a sub-cgroup's processes; remove() then removes it bottom-up."""
    manager, fs, _own = v2
    job = manager.create_job("j1", Limits())
    sub = os.path.join(job.directories[0], "inner")
    fs.make_dir(sub)
    with sleeping_child() as child:
        fs.write(os.path.join(sub, "cgroup.procs"), str(child.pid))
        assert job.pids() == [child.pid]
        job.kill_all(timeout=5.0)
        assert job.pids() == []
    job.remove()
    assert not os.path.exists(job.directories[0])


def test_v2_kill_all_before_cgroup_kill_freezes_kills_and_thaws(tmp_path: Path) -> None:
    """Without cgroup.kill (before 5.14) the job is frozen, SIGKILLed and thawed."""
    fs = v2_tree(tmp_path, omit={"cgroup.kill"})
    manager = v2_manager(tmp_path, fs)
    manager.setup()
    job = manager.create_job("j1", Limits())
    with sleeping_child() as child:
        fs.write(job.procs_files[0], str(child.pid))
        fs.writes.clear()
        job.kill_all(timeout=5.0)
        assert child.wait(timeout=5) == -9
        assert set(fs.killed) == {child.pid}
        # A round is freeze, kill, thaw; more rounds only while the process finishes exiting.
        freeze = os.path.join(job.directories[0], "cgroup.freeze")
        assert [w for w in fs.writes if w[0] == freeze][:2] == [(freeze, "1"), (freeze, "0")]
        assert job.pids() == []


def test_v2_kill_all_of_a_process_that_will_not_die_fails_with_its_pid(v2: V2) -> None:
    """A process still there at the deadline is a CgroupError that names it."""
    manager, fs, _own = v2
    job = manager.create_job("j1", Limits())
    with sleeping_child() as child:
        fs.write(job.procs_files[0], str(child.pid))
        fs.unkillable.add(child.pid)
        with pytest.raises(CgroupError, match=rf"still has 1 process\(es\) .*pids {child.pid}\)"):
            job.kill_all(timeout=0.05)


def test_v2_kill_all_of_a_cgroup_removed_meanwhile_succeeds(v2: V2) -> None:
    """cgroup.kill giving ENODEV (the cgroup went away) means there is nothing left to kill."""
    manager, fs, _own = v2
    job = manager.create_job("j1", Limits())
    fs.refuse_write["cgroup.kill"] = errno.ENODEV
    job.kill_all(timeout=0.5)
    assert job.pids() == []


def test_v2_kill_all_refused_is_a_cgroup_error(v2: V2) -> None:
    """A cgroup.kill the kernel refuses (EACCES) is a CgroupError naming the cgroup."""
    manager, fs, _own = v2
    job = manager.create_job("j1", Limits())
    fs.refuse_write["cgroup.kill"] = errno.EACCES
    with pytest.raises(CgroupError, match=r"cannot kill the processes of .*/j1: Permission"):
        job.kill_all(timeout=0.5)


def test_v2_pids_skip_a_cgroup_that_vanished_and_report_other_errors(v2: V2) -> None:
    """A cgroup.procs that is gone (ENODEV) lists nobody; EACCES is a CgroupError."""
    manager, fs, _own = v2
    job = manager.create_job("j1", Limits())
    fs.refuse_read["cgroup.procs"] = errno.ENODEV
    assert job.pids() == []
    fs.refuse_read["cgroup.procs"] = errno.EACCES
    with pytest.raises(CgroupError, match=r"cannot list the processes of .*/j1: Permission"):
        job.pids()


def test_v2_usage_reads_cpu_stat_peaks_and_oom_events(v2: V2) -> None:
    """usage() converts cpu.stat usecs to seconds and reports memory.peak, pids.peak, oom_kill."""
    manager, _fs, _own = v2
    job = manager.create_job("j1", Limits())
    d = Path(job.directories[0])
    (d / "cpu.stat").write_text("usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\n")
    (d / "memory.peak").write_text("123456\n")
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    (d / "pids.peak").unlink()
    assert job.usage() == ResourceUsage(
        cpu_user_s=1.0,
        cpu_system_s=0.5,
        memory_peak_bytes=123456,
        pids_peak=None,
        oom_killed=True,
    )


def test_v2_usage_of_a_removed_job_is_all_unknown(v2: V2) -> None:
    """usage() after the cgroup is gone reports None everywhere, never an error."""
    manager, _fs, _own = v2
    job = manager.create_job("j1", Limits())
    job.remove()
    assert job.usage() == ResourceUsage(None, None, None, None, oom_killed=False)


def test_v2_leftovers_are_found_opened_and_removed(v2: V2) -> None:
    """leftover_job_ids() lists job cgroups; open_job() + remove() (idempotent) clear them."""
    manager, _fs, own = v2
    manager.create_job("b", Limits())
    manager.create_job("a", Limits())
    assert manager.leftover_job_ids() == ["a", "b"]
    for job_id in manager.leftover_job_ids():
        job = manager.open_job(job_id)
        assert job.mode == "v2"
        job.remove()
        job.remove()
    assert manager.leftover_job_ids() == []
    manager.teardown()
    assert not (own / "netjail").exists()


def test_remove_of_a_busy_cgroup_fails_after_retrying(
    v2: V2, monkeypatch: pytest.MonkeyPatch
) -> None:
    """remove() retries EBUSY briefly, then raises CgroupError saying to kill first."""
    manager, fs, _own = v2
    monkeypatch.setattr(cg, "_REMOVE_RETRY_S", 0.05)
    job = manager.create_job("j1", Limits())
    fs.write(job.procs_files[0], str(os.getpid()))
    with pytest.raises(CgroupError, match="Device or resource busy; kill the job's processes"):
        job.remove()


def test_remove_refused_is_a_cgroup_error_at_once(v2: V2) -> None:
    """An rmdir error other than EBUSY is not retried: CgroupError naming the cgroup."""
    manager, fs, _own = v2
    job = manager.create_job("j1", Limits())
    fs.refuse_remove["j1"] = errno.EACCES
    with pytest.raises(CgroupError, match=r"cannot remove .*/j1: Permission denied"):
        job.remove()
    del fs.refuse_remove["j1"]
    job.remove()


def test_teardown_with_a_job_left_says_to_remove_it_first(v2: V2) -> None:
    """teardown() while a job cgroup remains is a CgroupError; it succeeds once it is gone."""
    manager, _fs, own = v2
    job = manager.create_job("j1", Limits())
    with pytest.raises(CgroupError, match="remove the job cgroups in it first"):
        manager.teardown()
    job.remove()
    manager.teardown()
    manager.teardown()
    assert not (own / "netjail").exists()


def test_remove_of_a_cgroup_that_vanishes_meanwhile_succeeds(v2: V2) -> None:
    """An rmdir that finds the cgroup already gone (ENOENT) counts as removed."""
    manager, fs, _own = v2
    job = manager.create_job("j1", Limits())
    assert repr(job) == f"JobCgroup('j1', 'v2', ({job.directories[0]!r},))"
    fs.refuse_remove["j1"] = errno.ENOENT
    job.remove()
