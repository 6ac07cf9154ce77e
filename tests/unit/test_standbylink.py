"""A standby init's hand-over, over real sockets and pipes: the fork server passes a ready
standby's channel and set-up pipe to the daemon and keeps neither (forkserver,
standby.StandbyTable), and the daemon gives the standby its job down that channel and reads
the outcome from the pipe (standbylink). The real standby (namespaces) is tested in
tests/integration."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Coroutine, Iterator
from typing import Any

import pytest

from netjail.errors import SpawnError
from netjail.kernel import forkserver
from netjail.kernel.fdpass import read_payload, recv_with_fds
from netjail.kernel.fsplan import FsPlan
from netjail.kernel.jobplan import SpawnFailure, encode_failure
from netjail.kernel.standby import Standby, StandbyReady, StandbyTable
from netjail.kernel.standbychannel import STANDBY_PLAN, STANDBY_READY, plans
from netjail.kernel.standbylink import StandbyLink, start_standby_job

from .daemonfakes import job_plan, open_fds, run

#: A plan with no steps of the job's own, so no bind tree is made (that needs root).
PLAN = job_plan(fs=FsPlan(root_size_bytes=1 << 20, steps=()))


class StandbyEnds:
    """The standby's ends of a link: its channel and its set-up pipe's write end."""

    def __init__(self) -> None:
        daemon_end, self.channel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        report_r, self.report_w = os.pipe2(os.O_CLOEXEC)
        self.link = StandbyLink.from_fds(daemon_end.detach(), report_r)

    def close(self) -> None:
        self.channel.close()
        if self.report_w >= 0:
            os.close(self.report_w)
            self.report_w = -1

    def execs(self, failure: SpawnFailure | None = None) -> None:
        """As the init: a record if a step failed; then its write end goes."""
        if failure is not None:
            os.write(self.report_w, encode_failure(failure))
        os.close(self.report_w)
        self.report_w = -1


@pytest.fixture
def standby() -> Iterator[StandbyEnds]:
    before = open_fds()
    peer = StandbyEnds()
    yield peer
    peer.close()
    peer.link.close()
    assert open_fds() == before


def start(link: StandbyLink) -> Coroutine[Any, Any, SpawnFailure | None]:
    """PLAN's start on ``link``, the job's stdio this process's own."""
    return start_standby_job(link, PLAN, [0, 1, 2], ())


def test_the_plan_goes_down_the_channel_and_the_pipes_end_is_the_exec(
    standby: StandbyEnds,
) -> None:
    """One datagram: STANDBY_PLAN with the plan's memfd and the job's stdio; the start waits
    for the set-up pipe and returns None at its EOF; the link is spent and closed."""

    async def main() -> None:
        r, w = os.pipe()
        try:
            task = asyncio.ensure_future(start_standby_job(standby.link, PLAN, [r, w, w], ()))
            await asyncio.sleep(0.01)
            data, fds = recv_with_fds(standby.channel, 64, 16)
            assert data == STANDBY_PLAN
            assert len(fds) == 4
            assert plans.decode(read_payload(fds[0], 1 << 20)) == PLAN
            for fd in fds:
                os.close(fd)
            assert not task.done()  # the command has not exec'd yet
            standby.execs()
            assert await asyncio.wait_for(task, 5) is None
            assert standby.link.used
            assert standby.channel.recv(16) == b""  # a standby takes one plan
        finally:
            os.close(r)
            os.close(w)

    run(main())


def test_a_failed_step_is_read_from_the_set_up_pipe(standby: StandbyEnds) -> None:
    async def main() -> None:
        failure = SpawnFailure(stage="privileges", errno=1, detail="Operation not permitted")
        standby.execs(failure)  # before the plan is even read: the pipe holds it
        assert await asyncio.wait_for(start(standby.link), 5) == failure

    run(main())


def test_a_standby_gone_fails_the_start_closed(standby: StandbyEnds) -> None:
    """Its channel's other end closed: SpawnError, never a start taken for granted."""

    async def main() -> None:
        standby.channel.close()
        with pytest.raises(SpawnError, match="cannot hand the job's plan to its standby init"):
            await asyncio.wait_for(start(standby.link), 5)
        assert standby.link.used

    run(main())


def test_a_link_takes_one_plan(standby: StandbyEnds) -> None:
    async def main() -> None:
        standby.execs()
        assert await asyncio.wait_for(start(standby.link), 5) is None
        with pytest.raises(SpawnError, match="already given a job"):
            await start(standby.link)

    run(main())


def test_a_cancelled_start_stops_reading_and_closes_the_pipe(standby: StandbyEnds) -> None:
    async def main() -> None:
        task = asyncio.ensure_future(start(standby.link))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert standby.link.report_fd == -1

    def test_the_fork_server_passes_a_ready_standby_on_and_keeps_nothing() -> None:
        """Ready on its channel: the standby leaves the table, and the daemon gets one Spawned
        with its pidfd, channel and set-up pipe; the fork server's copies are closed."""
        before = open_fds()
        daemon, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours, init_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        table = StandbyTable()
        pid = os.getpid()  # a live process to open a pidfd of
        table.add(Standby(request=7, pid=pid, channel=ours, report_fd=report_r, status_fd=status_r))
        try:
            assert table.watched() == [(ours.fileno(), pid)]
            init_end.send(STANDBY_READY)
            ready = table.on_readable(pid)
            assert isinstance(ready, StandbyReady)
            assert table.watched() == []
            assert table.forget(pid) is None  # its reaping now concerns the reaper alone
            forkserver._answer_standby(server, ready)
            data, fds = recv_with_fds(daemon, 1 << 16, 8)
            assert forkserver.from_server.decode(data) == forkserver.Spawned(id=7, pid=pid)
            assert len(fds) == 3
            pidfd, channel_fd, report_fd = fds
            os.close(pidfd)
            with socket.socket(fileno=channel_fd) as channel:
                channel.send(b"plan")
                assert init_end.recv(16) == b"plan"
            assert init_end.recv(16) == b""  # the fork server's copy is closed too
            os.write(report_w, b"x")
            assert os.read(report_fd, 8) == b"x"
            os.close(report_fd)
        finally:
            for sock in (daemon, server, init_end):
                sock.close()
            for fd in (report_w, status_r, status_w):
                os.close(fd)
        assert open_fds() == before

    def test_a_standby_that_ends_while_warming_fails_with_its_reason() -> None:
        before = open_fds()
        daemon, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours, init_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        failure = SpawnFailure(stage="network namespace", errno=2, detail="No such file")
        os.write(report_w, encode_failure(failure))
        os.close(report_w)
        table = StandbyTable()
        table.add(Standby(request=3, pid=99999, channel=ours, report_fd=report_r, status_fd=-1))
        try:
            init_end.close()  # it ended: its channel's EOF
            forkserver._answer_standby(server, table.on_readable(99999))
            reply = forkserver.from_server.decode(daemon.recv(1 << 16))
            assert reply == forkserver.SpawnFailed(id=3, failure=failure)
            assert table.watched() == []
        finally:
            daemon.close()
            server.close()
        assert open_fds() == before

    run(main())
