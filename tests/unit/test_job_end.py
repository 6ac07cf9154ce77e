"""A job's end (jobs.read_remains): the leftover check and the usage read run on the loop; only
a kill, whose cgroup write may wait behind a migration, goes to a worker thread."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from netjail.daemon.jobs import Remains, read_remains
from netjail.kernel.cgroup_plan import ResourceUsage

from .daemonfakes import StubCgroup, run

USAGE = ResourceUsage(
    cpu_user_s=0.25, cpu_system_s=0.5, memory_peak_bytes=1 << 20, pids_peak=2, oom_killed=False
)


@dataclass
class RecordingCgroup(StubCgroup):
    """A job cgroup that says whether anything but the init is left, and notes on which thread
    each call ran."""

    left_behind: bool = False
    unreadable: bool = False
    calls: list[tuple[str, str]] = field(default_factory=list)

    def _note(self, what: str) -> None:
        self.calls.append((what, threading.current_thread().name))

    def holds_other_than(self, pid: int) -> bool:
        self._note(f"holds_other_than {pid}")
        return self.left_behind

    def kill_all(self, timeout: float = 2.0) -> None:
        self._note("kill_all")

    def usage(self) -> ResourceUsage:
        self._note("usage")
        if self.unreadable:
            raise OSError(2, "No such file or directory")
        return USAGE


LOOP = threading.current_thread().name


def test_a_job_with_nothing_left_ends_with_no_kill_and_no_worker_thread() -> None:
    cgroup = RecordingCgroup()
    assert run(read_remains(cgroup, 4321)) == Remains(usage=USAGE, usage_error=None)
    assert cgroup.calls == [("holds_other_than 4321", LOOP), ("usage", LOOP)]


def test_a_job_that_left_processes_behind_is_killed_on_a_worker_thread_then_read() -> None:
    cgroup = RecordingCgroup(left_behind=True)
    assert run(read_remains(cgroup, 4321)) == Remains(usage=USAGE, usage_error=None)
    (check, on_loop), (kill, killer), (usage, reader) = cgroup.calls
    assert (check, on_loop, kill, usage, reader) == (
        "holds_other_than 4321",
        LOOP,
        "kill_all",
        "usage",
        LOOP,
    )
    assert killer != LOOP


def test_unreadable_usage_is_said_not_raised() -> None:
    remains = run(read_remains(RecordingCgroup(unreadable=True), 1))
    assert remains.usage is None
    assert remains.usage_error == "[Errno 2] No such file or directory"
