"""A connection's job with a pty (its master handed to the client with ``started``), and a
stopping daemon's ``shutdown`` error straight after each job's report."""

from __future__ import annotations

import array
import asyncio
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from netjail import protocol as p
from netjail.daemon.outbox import Outbox, OutFrame
from netjail.daemon.pipeline import Job
from netjail.daemon.spec import TerminalStdio

from .daemonfakes import ALICE, BOB, Daemon, connect, listening_socket, make_daemon, run, session
from .test_server import SOCKET_NAME, accepting

SHUTDOWN = p.ErrorMessage(code="shutdown", message="netjaild is stopping")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    made = make_daemon(str(tmp_path), listener=listening_socket(str(tmp_path / SOCKET_NAME)))
    yield made
    made.close()


async def receive_with_fds(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One read of ``sock`` (non-blocking) and the fds that came with it."""
    loop = asyncio.get_running_loop()
    while True:
        fds = array.array("i")
        try:
            data, ancdata, _flags, _addr = sock.recvmsg(65536, socket.CMSG_SPACE(4 * fds.itemsize))
        except BlockingIOError:
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_reader(sock.fileno(), ready.set_result, None)
            try:
                await ready
            finally:
                loop.remove_reader(sock.fileno())
            continue
        for _level, _kind, payload in ancdata:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        return data, list(fds)


def test_a_tty_job_hands_its_client_a_copy_of_the_pty_master(daemon: Daemon) -> None:
    """stdio "tty": no fds go to the job's start, the spec has the window size, and `started`
    carries a copy of the job's master (the job keeps its own until teardown)."""
    master, slave = os.openpty()

    def give_terminal(job: Job) -> None:
        job.terminal = master

    daemon.jobs.on_start = give_terminal

    async def main() -> None:
        async with session(daemon, ALICE) as s:
            await s.client.hello()
            await s.client.send(
                p.RunRequest(argv=["sh"], stdio="tty", window=p.WindowSize(rows=30, cols=90))
            )
            data, fds = await receive_with_fds(s.client.sock)
            assert isinstance(p.decode_reply(data.rstrip(b"\n")), p.Started)
            assert len(fds) == 1
            try:
                assert os.fstat(fds[0]).st_rdev == os.fstat(master).st_rdev
                assert fds[0] != master
                os.write(fds[0], b"typed\n")
                assert os.read(slave, 100) == b"typed\n"
            finally:
                os.close(fds[0])
            os.fstat(master)  # still open: the daemon sent a copy

    try:
        run(main())
        [call] = daemon.jobs.starts
        assert call.spec.stdio == TerminalStdio(rows=30, cols=90)
        assert call.stdio == []
    finally:
        os.close(master)
        os.close(slave)


def test_an_outbox_closes_the_fds_of_frames_it_drops_or_discards() -> None:
    """fds queued with a frame are the outbox's: closed when it refuses the frame (closed
    outbox) or discards what was not sent."""

    async def main() -> None:
        outbox = Outbox()
        kept_r, kept_w = os.pipe()
        outbox.put(b"started", fds=[kept_r])
        outbox.discard()
        closed_outbox = Outbox()
        closed_outbox.close()
        late_r, late_w = os.pipe()
        closed_outbox.put(b"late", fds=[late_r])
        for fd in (kept_r, late_r):
            with pytest.raises(OSError, match="Bad file descriptor"):
                os.fstat(fd)
        os.close(kept_w)
        os.close(late_w)
        assert outbox.queued_bytes == 0
        outbox.put(b"next")
        assert await outbox.get() == OutFrame(b"next")

    run(main())


def test_a_stopping_daemon_sends_each_client_shutdown_straight_after_its_jobs_report(
    daemon: Daemon,
) -> None:
    """During a stop, a client whose job ends gets its report (marked shutdown) and at once
    the `shutdown` error, while another client's job still runs; nothing comes after it."""

    async def main() -> None:
        async with accepting(daemon):
            alice = await connect(str(daemon.server.listener.getsockname()))
            bob = await connect(str(daemon.server.listener.getsockname()))
            try:
                for client in (alice, bob):
                    await client.hello()
                    await client.send(p.RunRequest(argv=["sleep", "100"], events=False))
                    assert isinstance(await client.receive(), p.Started)
                first, second = daemon.jobs.jobs.values()
                stopping = asyncio.ensure_future(daemon.server.stop("netjaild is stopping"))
                for _ in range(5):
                    await asyncio.sleep(0)
                report = daemon.jobs.finish(first)
                assert [await alice.receive(), await alice.receive()] == [
                    p.Exit(report=report, shutdown=True),
                    SHUTDOWN,
                ]
                assert not stopping.done()
                other = daemon.jobs.finish(second)
                assert await bob.receive_all() == [p.Exit(report=other, shutdown=True), SHUTDOWN]
                assert await alice.receive_all() == []
                await stopping
            finally:
                alice.close()
                bob.close()
        assert daemon.jobs.shutdowns == 1

    run(main())


def test_a_stopping_daemon_starts_no_new_job(daemon: Daemon) -> None:
    """A run request that arrives while the daemon stops gets `shutdown`; nothing starts."""
    daemon.server.stopping = "netjaild is stopping"

    async def main() -> None:
        async with session(daemon, BOB) as s:
            await s.client.hello()
            await s.client.send(p.RunRequest(argv=["true"]))
            assert await s.client.receive() == SHUTDOWN

    run(main())
    assert daemon.jobs.starts == []
