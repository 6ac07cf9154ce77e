"""The pipeline's steps for a job with a pty, over the fake JailHost: the init is asked for a
pty of the window size, the master it sends is the job's until teardown, and a missing one
fails the job closed. And a stop that begins while a job is being built ends that job too."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import pytest

from netjail.daemon.jobs import JobManager
from netjail.daemon.pipeline import JailContext, Job
from netjail.daemon.spec import TerminalStdio
from netjail.errors import JailError
from netjail.kernel.jobplan import TerminalPlan
from tests.unit import test_pipeline as pipeline_tests
from tests.unit.fakehost import FakeJailHost, exited
from tests.unit.test_pipeline import (
    assert_nothing_left,
    assert_undone_in_reverse,
    finish,
    run,
    spec,
)

# The pipeline tests' fixtures: a fake host, and a JailContext over it.
host = pipeline_tests.host
ctx = pipeline_tests.ctx


def test_a_tty_job_gets_the_pty_its_init_sends_until_teardown(
    host: FakeJailHost, ctx: JailContext
) -> None:
    """The plan asks for a pty of the spec's size, the init's stdin is the socket to send the
    master on, and the master received is the job's terminal, closed at teardown."""

    async def scenario() -> int:
        manager = JobManager(ctx)
        job = await manager.start(spec(stdio=TerminalStdio(rows=25, cols=81)), [], None)  # type: ignore[arg-type]
        assert job.terminal is not None
        assert os.isatty(job.terminal)
        host.end(job.process.pid, exited(0))
        await finish(manager, job)
        return job.terminal

    terminal = run(scenario())
    (plan,) = host.requests
    assert plan.terminal == TerminalPlan(rows=25, cols=81)
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(terminal)
    assert_nothing_left(host, ctx)


def test_a_tty_job_whose_init_sends_no_pty_fails_closed(
    host: FakeJailHost, ctx: JailContext
) -> None:
    """No master from the init: JailError naming the terminal, and everything undone."""
    host.sends_terminal = False

    async def scenario() -> None:
        manager = JobManager(ctx)
        with pytest.raises(JailError, match=r"\(terminal\): the job's init sent no pty"):
            await manager.start(spec(stdio=TerminalStdio(rows=25, cols=81)), [], None)  # type: ignore[arg-type]
        assert manager.jobs == {}

    run(scenario())
    assert_undone_in_reverse(host)
    assert_nothing_left(host, ctx)


def test_a_job_whose_build_was_under_way_when_the_stop_began_is_ended_too(
    host: FakeJailHost, ctx: JailContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """shutdown() also ends a job still being built when it was called (its command may
    already run), once it runs, and returns only after its report and teardown."""
    host.fatal_signals.add(signal.SIGTERM)
    spawning = asyncio.Event()
    go_on = asyncio.Event()
    real_spawn = host.spawn

    async def slow_spawn(*args: Any) -> Any:
        spawning.set()
        await go_on.wait()
        return await real_spawn(*args)

    monkeypatch.setattr(host, "spawn", slow_spawn)

    async def scenario() -> Job:
        manager = JobManager(ctx)
        starting = asyncio.ensure_future(manager.start(spec(), [], None))
        await spawning.wait()
        stopping = asyncio.ensure_future(manager.shutdown())
        for _ in range(5):
            await asyncio.sleep(0)
        assert not stopping.done()
        go_on.set()
        job = await starting
        await asyncio.wait_for(stopping, 5)
        assert job.finished.done()
        assert job.removed.is_set()
        return job

    job = run(scenario())
    assert host.processes[job.process.pid].signals == [signal.SIGTERM]
    assert_nothing_left(host, ctx)
