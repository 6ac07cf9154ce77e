"""max_jobs: the job manager refuses a job past the limit with a busy error, over a fake
JailHost, and builds nothing of it; the default is sized to the fd limit."""

from __future__ import annotations

import asyncio

import pytest

from netjail.daemon.jobs import FD_RESERVE, FDS_PER_JOB, JobManager, max_jobs_for
from netjail.daemon.pipeline import JailContext, Job
from netjail.errors import BusyError
from tests.unit.fakehost import FakeJailHost, exited
from tests.unit.test_pipeline import ctx, finish, host, run, spec

__all__ = ["ctx", "host"]  # fixtures, used by name


def test_past_max_jobs_a_job_is_busy_and_an_ended_one_makes_room(
    host: FakeJailHost, ctx: JailContext
) -> None:
    """With max_jobs 2 and two running, a third is refused busy with nothing built; once one
    has ended and its jail is gone, the next one starts."""

    async def scenario() -> tuple[str, list[str], list[str]]:
        manager = JobManager(ctx, max_jobs=2)
        first = await manager.start(spec(), [], None)
        second = await manager.start(spec(), [], None)
        made = list(host.made)
        with pytest.raises(BusyError) as busy:
            await manager.start(spec(), [], None)
        after = list(host.made)
        host.end(first.process.pid, exited(0))
        await finish(manager, first)
        third = await manager.start(spec(), [], None)
        for job in (second, third):
            host.end(job.process.pid, exited(0))
            await finish(manager, job)
        return str(busy.value), made, after

    message, made, after = run(scenario())
    assert message == (
        "netjaild is running as many jobs as it may at once (2, its max_jobs); try again when "
        "one has ended"
    )
    assert after == made


def test_jobs_being_built_count_against_max_jobs(host: FakeJailHost, ctx: JailContext) -> None:
    """Two jobs asked for at once under max_jobs 1: one starts, the other is busy."""

    async def scenario() -> list[Job | BaseException]:
        manager = JobManager(ctx, max_jobs=1)
        outcomes = await asyncio.gather(
            manager.start(spec(), [], None), manager.start(spec(), [], None), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, Job):
                host.end(outcome.process.pid, exited(0))
                await finish(manager, outcome)
        return outcomes

    outcomes = run(scenario())
    assert sorted(type(outcome).__name__ for outcome in outcomes) == ["BusyError", "Job"]


@pytest.mark.parametrize(
    ("nofile", "expected"),
    [
        (1024, (1024 - FD_RESERVE) // FDS_PER_JOB),
        (65536, (65536 - 65536 // 8) // FDS_PER_JOB),
        (100, 1),
    ],
)
def test_the_default_max_jobs_leaves_a_reserve_of_the_fd_limit(nofile: int, expected: int) -> None:
    """The default keeps FD_RESERVE fds (or an eighth of the limit, if more) and gives each job
    FDS_PER_JOB; never less than one job."""
    assert max_jobs_for(nofile) == expected
