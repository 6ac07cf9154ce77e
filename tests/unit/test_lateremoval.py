"""Job cgroups whose removal failed at their teardown: retried, released, or named at a stop."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path

import pytest

from netjail.daemon.jobs import JobManager
from netjail.daemon.lateremoval import LateRemovals
from netjail.daemon.pipeline import Job
from netjail.daemon.spec import LeasedUser
from tests.unit.fakehost import FakeJailHost, exited
from tests.unit.test_pipeline import Logged, fake_context, finish, host, run, spec

__all__ = ["host"]  # a fixture


def busy() -> OSError:
    return OSError(16, "Device or resource busy")


class Flaky:
    """A removal that fails ``times`` times, then succeeds."""

    def __init__(self, times: int) -> None:
        self.left = times
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        if self.left:
            self.left -= 1
            raise busy()


def test_a_removal_is_retried_until_it_succeeds_then_what_follows_runs() -> None:
    log = Logged()
    removal = Flaky(3)
    then: list[str] = []

    async def scenario() -> list[str]:
        late = LateRemovals(first_s=0.01, max_s=0.02)
        late.add("j-00000001", removal, lambda: then.append("released"), log, error="busy")
        assert late.pending == ["j-00000001"]
        async with asyncio.timeout(5):
            while late.pending:
                await asyncio.sleep(0.01)
        return await late.close(log)

    assert run(scenario()) == []
    assert (removal.calls, then) == (4, ["released"])
    assert [(lv, m) for lv, m, _ in log.lines] == [
        ("warning", "cannot remove a job's cgroup yet; retrying in the background"),
        ("info", "removed a job's cgroup late"),
    ]


def test_the_stop_tries_once_more_before_its_pause_is_over() -> None:
    """A slow retry (its pause still running) does not hold the stop up: close tries now."""
    log = Logged()
    removal = Flaky(1)
    then: list[str] = []

    async def scenario() -> list[str]:
        late = LateRemovals(first_s=60)
        late.add("j-00000002", removal, lambda: then.append("released"), log, error="busy")
        removal.left = 0
        return await late.close(log)

    assert run(scenario()) == []
    assert then == ["released"]


def test_one_still_busy_at_the_stop_is_named_in_an_error_and_its_follow_up_never_runs() -> None:
    log = Logged()
    then: list[str] = []

    async def scenario() -> list[str]:
        late = LateRemovals(first_s=0.01, final_s=0.05)
        late.add("j-00000003", Flaky(10**6), lambda: then.append("released"), log, error="busy")
        return await late.close(log)

    assert run(scenario()) == ["j-00000003"]
    assert then == []
    assert [f for lv, m, f in log.lines if lv == "error"] == [
        {"cgroup": "j-00000003", "error": "[Errno 16] Device or resource busy"}
    ]


def test_a_follow_up_that_fails_is_logged_and_does_not_end_the_loop() -> None:
    log = Logged()

    def broken() -> None:
        raise RuntimeError("no")

    async def scenario() -> list[str]:
        late = LateRemovals(first_s=0.01)
        late.add("j-00000004", Flaky(0), broken, log, error="busy")
        async with asyncio.timeout(5):
            while late.pending:
                await asyncio.sleep(0.01)
        return late.pending

    assert run(scenario()) == []
    assert ("error", "after a job's cgroup was removed") in [(lv, m) for lv, m, _ in log.lines]


def test_a_job_cgroup_that_cannot_be_removed_keeps_its_uid_until_it_is_gone(
    host: FakeJailHost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the pipeline: the lease stays while a process may still hold the uid, the
    cgroup is retried in the background, and once it is gone, the lease goes too."""
    host.exit_at_once = exited(0)
    ctx = dataclasses.replace(
        fake_context(host, tmp_path), late_removals=LateRemovals(first_s=0.01, max_s=0.02)
    )
    failures = Flaky(3)

    async def scenario() -> tuple[Job, list[int], list[str]]:
        manager = JobManager(ctx)
        job = await manager.start(spec(user=LeasedUser()), [], None)
        cgroup = host.cgroups[job.id]
        really_remove = cgroup.remove

        def stuck() -> None:
            failures()
            really_remove()

        monkeypatch.setattr(cgroup, "remove", stuck)
        await finish(manager, job)
        held = [lease.uid for lease in ctx.uids.held]
        recorded = os.listdir(ctx.records.directory)
        async with asyncio.timeout(5):
            while ctx.late_removals.pending:
                await asyncio.sleep(0.01)
        return job, held, recorded

    job, held_at_teardown, recorded_at_teardown = run(scenario())
    assert held_at_teardown == [job.uid]
    # The record stays too, for recovery to find the cgroup by, until it is gone.
    assert [name for name in recorded_at_teardown if job.id in name] != []
    assert os.listdir(ctx.records.directory) == []
    assert failures.calls == 4
    assert ctx.uids.held == []
    log = ctx.log
    assert isinstance(log, Logged)
    messages = [(level, message) for level, message, _ in log.lines]
    assert ("warning", "uid kept leased: the job's cgroup is still there") in messages
    assert ("info", "removed a job's cgroup late") in messages


def test_a_job_cgroup_still_busy_at_a_graceful_stop_is_left_for_recovery(
    host: FakeJailHost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stop gives it a last try; still busy, it is named in an error, its uid kept."""
    host.exit_at_once = exited(0)
    ctx = dataclasses.replace(
        fake_context(host, tmp_path), late_removals=LateRemovals(first_s=0.01, final_s=0.05)
    )

    async def scenario() -> Job:
        manager = JobManager(ctx)
        job = await manager.start(spec(user=LeasedUser()), [], None)
        monkeypatch.setattr(host.cgroups[job.id], "remove", Flaky(10**6))
        await finish(manager, job)
        await manager.shutdown()
        return job

    job = run(scenario())
    assert [lease.uid for lease in ctx.uids.held] == [job.uid]
    assert [name for name in os.listdir(ctx.records.directory) if job.id in name] != []
    log = ctx.log
    assert isinstance(log, Logged)
    assert [f for lv, m, f in log.lines if m.startswith("a job's cgroup is left behind")] == [
        {"cgroup": job.id, "error": "[Errno 16] Device or resource busy"}
    ]
