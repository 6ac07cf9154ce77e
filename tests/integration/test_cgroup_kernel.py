"""netjail.kernel.cgroup against this host's real cgroup filesystems (root only).

Each test uses its own parent cgroup (``netjail-test-<pid>``), so it cannot disturb a running
netjaild, and the ``manager`` fixture checks that no job cgroup, parent cgroup or process is left.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from netjail.kernel.cgroup import (
    CgroupFs,
    CgroupLayout,
    CgroupManager,
    JobCgroup,
    Limits,
    detect_cgroup_layout,
    load_cgroup_layout,
)
from netjail.kernel.cgroup_plan import parse_keyed_counters

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]


def _host_mode() -> str:
    # Told apart by what is mounted where, independently of detect_cgroup_layout.
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        return "v2"
    if os.path.exists("/sys/fs/cgroup/unified/cgroup.controllers"):
        return "hybrid"
    return "v1"


needs_v1_controllers = pytest.mark.skipif(
    _host_mode() == "v2",
    reason="these checks read v1 control files; on a cgroup2 host setup() would move pytest",
)


@contextlib.contextmanager
def _managed(manager: CgroupManager) -> Iterator[CgroupManager]:
    """Set *manager* up; afterwards nothing of it may remain."""
    manager.setup()
    try:
        yield manager
    finally:
        leftovers = manager.leftover_job_ids()
        for job_id in leftovers:  # clean up even when a test failed, then report it
            job = manager.open_job(job_id)
            job.kill_all()
            job.remove()
        manager.teardown()
        assert leftovers == [], f"job cgroups left behind: {leftovers}"
        assert not any(os.path.exists(p) for p in manager.parent_dirs)


@pytest.fixture
def manager() -> Iterator[CgroupManager]:
    """A set-up manager with a private parent; afterwards nothing of it may remain."""
    parent = f"netjail-test-{os.getpid()}"
    with _managed(CgroupManager(load_cgroup_layout(), parent_name=parent)) as manager:
        yield manager


class _RecordingFs(CgroupFs):
    """The real cgroupfs, keeping (file name, value) of every write."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, str]] = []

    def write(self, path: str, value: str) -> None:
        super().write(path, value)
        self.writes.append((os.path.basename(path), value))


class _NoCgroupKillFs(_RecordingFs):
    """The real cgroupfs as a kernel before 5.14 shows it: without cgroup.kill."""

    def exists(self, path: str) -> bool:
        return not path.endswith("/cgroup.kill") and super().exists(path)


def _spawn_in(job: JobCgroup, then: str = "exec sleep 1000") -> subprocess.Popen[bytes]:
    """Start a shell that joins every cgroup of *job* (as the spawner's child will), then *then*."""
    joins = "; ".join(f"echo 0 > {shlex.quote(p)}" for p in job.procs_files)
    return subprocess.Popen(["/bin/sh", "-ec", f"{joins}; {then}"])


def _wait_for_exec(pid: int, comm: str) -> None:
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}/comm").read_text().strip() != comm:
        assert time.monotonic() < deadline, f"process {pid} did not exec {comm}"
        time.sleep(0.01)


def _read(path: str) -> str:
    return Path(path).read_text().strip()


def _dir_of(job: JobCgroup, hierarchy: str) -> str:
    return next(d for d in job.directories if f"/sys/fs/cgroup/{hierarchy}/" in d)


def test_detect_matches_this_host() -> None:
    """detect_cgroup_layout() on this host's /proc files finds the mounted layout."""
    mountinfo = Path("/proc/self/mountinfo").read_text()
    own = Path("/proc/self/cgroup").read_text()
    layout = detect_cgroup_layout(mountinfo, own)
    assert layout.mode == _host_mode()
    if layout.mode == "hybrid":
        assert layout.unified_mount == "/sys/fs/cgroup/unified"
        memory = layout.v1_hierarchy("memory")
        assert memory is not None
        assert f"memory:{memory.own_cgroup}" in own


@needs_v1_controllers
def test_limits_land_in_the_kernel_files(manager: CgroupManager) -> None:
    """create_job() writes memory(+memsw), CFS quota and pids.max into the real cgroups."""
    job = manager.create_job("j-limits", Limits(memory_bytes=64 << 20, cpus=0.2, pids=16))
    try:
        memory = _dir_of(job, "memory")
        assert _read(f"{memory}/memory.limit_in_bytes") == "67108864"
        if os.path.exists(f"{memory}/memory.memsw.limit_in_bytes"):
            assert _read(f"{memory}/memory.memsw.limit_in_bytes") == "67108864"
        else:
            assert _read(f"{memory}/memory.swappiness") == "0"
        cpu = _dir_of(job, "cpu")
        assert _read(f"{cpu}/cpu.cfs_period_us") == "100000"
        assert _read(f"{cpu}/cpu.cfs_quota_us") == "20000"
        assert _read(f"{_dir_of(job, 'pids')}/pids.max") == "16"
        if manager.mode == "hybrid":
            assert job.procs_files[0].startswith("/sys/fs/cgroup/unified/")
        assert all(os.path.isdir(d) for d in job.directories)
        assert not any("/cpuset/" in d or "/devices/" in d for d in job.directories)
    finally:
        job.remove()
    assert not any(os.path.exists(d) for d in job.directories)


def test_process_is_contained_then_killed_and_cgroups_removed(manager: CgroupManager) -> None:
    """A child that joins the procs files is listed; kill_all() empties; remove() clears all."""
    job = manager.create_job("j-kill", Limits(memory_bytes=64 << 20, pids=16))
    child = _spawn_in(job)
    try:
        _wait_for_exec(child.pid, "sleep")
        assert job.contains(child.pid)
        assert job.pids() == [child.pid]
        for procs in job.procs_files:
            assert str(child.pid) in Path(procs).read_text().split()
        job.kill_all()
        assert job.pids() == []
        assert child.wait(timeout=5) == -9
    finally:
        child.kill()
        child.wait()
        job.remove()
    assert not any(os.path.exists(d) for d in job.directories)
    job.remove()  # idempotent


def test_kill_all_catches_forked_descendants(manager: CgroupManager) -> None:
    """kill_all() kills background children the job forked, not only its main process."""
    job = manager.create_job("j-fork", Limits(pids=32))
    child = _spawn_in(job, "for i in 1 2 3 4 5; do sleep 1000 & done; exec sleep 1000")
    try:
        deadline = time.monotonic() + 5
        while len(job.pids()) < 6:
            assert time.monotonic() < deadline, job.pids()
            time.sleep(0.01)
        job.kill_all()
        assert job.pids() == []
    finally:
        child.kill()
        child.wait()
        job.remove()


def test_usage_reports_cpu_time_and_memory_peak(manager: CgroupManager) -> None:
    """usage() after a busy job reports positive CPU seconds, a memory peak and a pids peak."""
    job = manager.create_job("j-usage", Limits())
    busy = "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done"
    child = _spawn_in(job, busy)
    try:
        assert child.wait(timeout=60) == 0
        usage = job.usage()
        print(f"usage on {manager.mode}: {usage}")  # shown with -s, for the record
        assert usage.cpu_user_s is not None
        assert usage.cpu_user_s > 0
        assert usage.cpu_system_s is not None
        assert usage.memory_peak_bytes is not None
        assert usage.memory_peak_bytes > 0
        if os.path.exists(f"{_dir_of(job, 'pids')}/pids.peak"):
            assert usage.pids_peak is not None
            assert usage.pids_peak >= 1
        assert usage.oom_killed is False
    finally:
        child.kill()
        child.wait()
        job.remove()


def test_memory_limit_oom_kills_the_job(manager: CgroupManager) -> None:
    """A job that touches more than its memory limit is OOM-killed, and usage() says so."""
    job = manager.create_job("j-oom", Limits(memory_bytes=32 << 20))
    # bytes * n writes every page (a calloc'ed bytearray would not be charged).
    child = _spawn_in(job, "exec /usr/bin/python3 -c 'b = b\"x\" * (256 << 20)'")
    try:
        assert child.wait(timeout=60) == -9
        usage = job.usage()
        assert usage.oom_killed is True
        assert usage.memory_peak_bytes is not None
        assert usage.memory_peak_bytes <= 32 << 20
    finally:
        child.kill()
        child.wait()
        job.kill_all()
        job.remove()


def test_pids_limit_caps_the_number_of_tasks(manager: CgroupManager) -> None:
    """With pids=8 a job that tries to start 30 processes gets 8 tasks and a failing fork."""
    job = manager.create_job("j-pids", Limits(pids=8))
    # The shell is one task and its background sleeps the others, until fork() fails and
    # the shell gives up ("Cannot fork") with the sleeps still running.
    child = _spawn_in(job, "exec 2>/dev/null; for i in $(seq 30); do sleep 1000 & done")
    try:
        assert child.wait(timeout=10) != 0
        assert 1 <= len(job.pids()) <= 7
        peak = job.usage().pids_peak
        assert peak is None or peak == 8
    finally:
        job.kill_all()
        child.kill()
        child.wait()
        job.remove()


@needs_v1_controllers
def test_cpu_quota_throttles_a_busy_job(manager: CgroupManager) -> None:
    """With cpus=0.05 a busy job is throttled by CFS (cpu.stat nr_throttled > 0)."""
    job = manager.create_job("j-cpu", Limits(cpus=0.05))
    child = _spawn_in(job, "i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done")
    try:
        assert child.wait(timeout=120) == 0
        stat = parse_keyed_counters(Path(f"{_dir_of(job, 'cpu')}/cpu.stat").read_text())
        assert stat["nr_throttled"] > 0
    finally:
        child.kill()
        child.wait()
        job.remove()


def _kill_a_forking_job(manager: CgroupManager, job_id: str) -> None:
    job = manager.create_job(job_id, Limits(pids=32))
    child = _spawn_in(job, "for i in 1 2 3; do sleep 1000 & done; exec sleep 1000")
    try:
        deadline = time.monotonic() + 5
        while len(job.pids()) < 4:
            assert time.monotonic() < deadline, job.pids()
            time.sleep(0.01)
        job.kill_all()
        assert job.pids() == []
        assert child.wait(timeout=5) == -9
    finally:
        child.kill()
        child.wait()
        job.remove()


@pytest.mark.skipif(_host_mode() == "v1", reason="needs a cgroup2 tree")
def test_cgroup2_freezer_kills_where_cgroup_kill_is_missing() -> None:
    """Without cgroup.kill, kill_all() freezes the job's cgroup2 cgroup, kills and thaws."""
    parent = f"netjail-test-freeze-{os.getpid()}"
    fs = _NoCgroupKillFs()
    with _managed(CgroupManager(load_cgroup_layout(), parent_name=parent, fs=fs)) as manager:
        _kill_a_forking_job(manager, "j-freeze")
    freezes = [value for name, value in fs.writes if name == "cgroup.freeze"]
    assert freezes[:2] == ["1", "0"]
    assert "cgroup.kill" not in {name for name, _value in fs.writes}


@needs_v1_controllers
def test_v1_strategy_kills_by_the_v1_freezer() -> None:
    """The v1 strategy on this host's v1 hierarchies freezes, kills and thaws a forking job."""
    host = load_cgroup_layout()
    if host.v1_hierarchy("freezer") is None:
        pytest.skip("no v1 freezer hierarchy on this host")
    layout = CgroupLayout("v1", None, None, host.v1_hierarchies)
    parent = f"netjail-test-v1-{os.getpid()}"
    fs = _RecordingFs()
    with _managed(CgroupManager(layout, parent_name=parent, fs=fs)) as manager:
        assert manager.mode == "v1"
        _kill_a_forking_job(manager, "j-v1")
    states = [value for name, value in fs.writes if name == "freezer.state"]
    assert states[:2] == ["FROZEN", "THAWED"]
