"""A connection's bounds (netjail.daemon.connection): the outbox's byte bound and what a client
that does not read its replies gets, and the hello and idle timeouts; over socketpairs to a stub
JobManager."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from netjail import protocol as p
from netjail.daemon import connection as connection_module
from netjail.daemon.outbox import MAX_QUEUED_BYTES, MAX_QUEUED_EVENTS, Outbox, OutFrame

from .daemonfakes import ALICE, Daemon, WireClient, make_daemon, run, session, spec_for


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    made = make_daemon(str(tmp_path))
    yield made
    made.close()


# ---------------------------------------------------------------------- the outbox in bytes


def test_a_reply_finding_the_byte_bound_reached_overflows_and_empties_the_outbox() -> None:
    """Replies are queued up to the byte bound; the next one closes the outbox, frees what it
    held and marks it overflowed."""

    async def main() -> None:
        outbox = Outbox(max_bytes=100)
        outbox.put(b"a" * 60)
        outbox.put(b"b" * 60)  # queued: the bound was not reached when it came
        assert (outbox.queued_bytes, outbox.overflowed) == (120, False)
        outbox.put(b"c")
        assert (outbox.closed, outbox.overflowed, outbox.queued_bytes) == (True, True, 0)
        assert await outbox.get() is None

    run(main())


def test_one_reply_larger_than_the_bound_is_queued_when_the_client_keeps_up() -> None:
    """A single large reply (a report with captured output) goes out when nothing is queued."""

    async def main() -> None:
        outbox = Outbox(max_bytes=100)
        outbox.put(b"r" * 1000)
        assert outbox.overflowed is False
        assert await outbox.get() == OutFrame(b"r" * 1000)
        assert outbox.queued_bytes == 0
        outbox.put(b"next")
        assert await outbox.get() == OutFrame(b"next")

    run(main())


def test_events_past_the_byte_bound_are_dropped_and_counted() -> None:
    """With the byte bound reached, events are dropped and counted, not queued."""

    async def main() -> None:
        outbox = Outbox(max_bytes=100)
        outbox.put(b"e" * 100, droppable=True)
        outbox.put(b"lost", droppable=True)
        assert (outbox.dropped, outbox.queued_bytes, outbox.overflowed) == (1, 100, False)
        assert await outbox.get() == OutFrame(b"e" * 100)
        outbox.put(b"kept", droppable=True)
        assert (outbox.dropped, outbox.queued_bytes) == (1, 4)

    run(main())


def test_the_default_bounds() -> None:
    """An outbox holds at most 1,000 events and 8 MiB before it drops or disconnects."""
    outbox = Outbox()
    assert (MAX_QUEUED_EVENTS, MAX_QUEUED_BYTES, outbox.max_bytes) == (1000, 8 << 20, 8 << 20)


class PeakOutbox(Outbox):
    """An outbox that remembers the most bytes it ever held."""

    peaks: list[int] = []  # noqa: RUF012 - one list shared by the test that installs the class

    def put(self, frame: bytes, *, droppable: bool = False, fds: Sequence[int] = ()) -> None:
        super().put(frame, droppable=droppable, fds=fds)
        PeakOutbox.peaks.append(self.queued_bytes)


def test_300_unread_ps_replies_keep_the_outbox_bounded_and_disconnect_the_client(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """300 ps requests whose ~150 KB replies are never read: the outbox never holds more than
    its bound plus one reply, the client is disconnected with a warning in the log, and the
    replies it got before are whole."""
    monkeypatch.setattr(connection_module, "Outbox", PeakOutbox)
    PeakOutbox.peaks = []

    async def main() -> None:
        for n in range(20):
            daemon.jobs.add_job(spec_for(ALICE, ["sh", "-c", "sleep 100", f"{n:04d}" + "x" * 7000]))
        async with session(daemon, ALICE) as s:
            await s.client.hello()
            one_reply = len(p.encode_message(await ps_reply(s.client)))
            assert one_reply > 140_000
            requests = p.encode_message(p.PsRequest()) * 300
            # Sent without reading; the daemon hangs up part way, which ends the sending.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                await asyncio.wait_for(s.client.send_bytes(requests), 20)
            received = await s.client.receive_all()
            assert len(received) < 300
            assert all(isinstance(reply, p.PsReply) for reply in received)
            assert all(len(reply.jobs) == 20 for reply in received if isinstance(reply, p.PsReply))
            await s.serving
            assert max(PeakOutbox.peaks) <= MAX_QUEUED_BYTES + one_reply
            assert s.connection.outbox.overflowed is True
        warnings = [r for r in daemon.log.records if r[0] == "warning"]
        assert warnings == [
            (
                "warning",
                "disconnected a client that does not read its replies",
                {
                    "pid": ALICE.pid,
                    "uid": ALICE.uid,
                    "limit_bytes": MAX_QUEUED_BYTES,
                    "reply_bytes": one_reply,
                },
            )
        ]

    run(main())


async def ps_reply(client: WireClient) -> p.PsReply:
    await client.send(p.PsRequest())
    reply = await client.receive()
    assert isinstance(reply, p.PsReply)
    return reply


# ---------------------------------------------------------------------- timeouts


def test_a_connection_that_sends_no_hello_is_told_and_closed(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No hello within HELLO_TIMEOUT_S: a protocol error, then end of file."""
    monkeypatch.setattr(connection_module, "HELLO_TIMEOUT_S", 0.05)

    async def main() -> None:
        async with session(daemon, ALICE) as s:
            assert await s.client.receive_all() == [
                p.ErrorMessage(
                    code="protocol", message="no hello within 0.05 s; closing the connection"
                )
            ]

    run(main())


def test_trickling_bytes_without_a_whole_hello_does_not_hold_the_connection_open(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hello deadline runs from the connection's start: bytes that form no frame do not
    move it."""
    monkeypatch.setattr(connection_module, "HELLO_TIMEOUT_S", 0.2)

    async def main() -> None:
        async with session(daemon, ALICE) as s:
            trickle = b'{"op":"hello","version":1'
            for byte in trickle:
                try:
                    s.client.sock.send(bytes([byte]))
                except OSError:
                    break
                await asyncio.sleep(0.02)
            replies = await s.client.receive_all()
            assert replies == [
                p.ErrorMessage(
                    code="protocol", message="no hello within 0.2 s; closing the connection"
                )
            ]

    run(main())


def test_a_greeted_connection_with_nothing_to_do_is_closed_after_the_idle_timeout(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After hello and one request, silence past IDLE_TIMEOUT_S ends the connection."""
    monkeypatch.setattr(connection_module, "IDLE_TIMEOUT_S", 0.05)

    async def main() -> None:
        async with session(daemon, ALICE) as s:
            await s.client.hello()
            await s.client.send(p.PsRequest())
            assert await s.client.receive() == p.PsReply(jobs=[])
            assert await s.client.receive_all() == [
                p.ErrorMessage(
                    code="protocol",
                    message="no request for 0.05 s and nothing running; closing the connection",
                )
            ]

    run(main())


def test_a_connection_whose_job_runs_is_not_idle_and_its_report_still_comes(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a job of the connection runs, silence does not end it: the report arrives, and
    only then does the idle timeout apply."""
    monkeypatch.setattr(connection_module, "IDLE_TIMEOUT_S", 0.05)

    async def main() -> None:
        async with session(daemon, ALICE) as s:
            await s.client.hello()
            await s.client.send(p.RunRequest(argv=["sleep", "1"], events=False))
            started = await s.client.receive()
            assert isinstance(started, p.Started)
            await asyncio.sleep(0.3)  # six idle timeouts
            assert not s.serving.done()
            report = daemon.jobs.finish(daemon.jobs.jobs[started.job])
            assert await s.client.receive_all() == [
                p.Exit(report=report),
                p.ErrorMessage(
                    code="protocol",
                    message="no request for 0.05 s and nothing running; closing the connection",
                ),
            ]

    run(main())


def test_a_follower_is_never_idle(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    """`events --follow` keeps its connection however long nothing happens."""
    monkeypatch.setattr(connection_module, "IDLE_TIMEOUT_S", 0.05)

    async def main() -> None:
        async with session(daemon, ALICE) as s:
            await s.client.hello()
            await s.client.send(p.EventsRequest(follow=True))
            await asyncio.sleep(0.3)
            assert not s.serving.done()
            assert len(daemon.intake.followers) == 1
        assert daemon.intake.followers == []

    run(main())


def test_a_client_that_hangs_up_during_the_hello_wait_is_cleaned_up(daemon: Daemon) -> None:
    """A client gone before hello ends the connection at once, without waiting for the timeout."""

    async def main() -> None:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        connection = connection_module.Connection(daemon.server, ours, ALICE)
        serving = asyncio.ensure_future(connection.serve())
        theirs.close()
        await asyncio.wait_for(serving, 5)
        assert ours.fileno() == -1

    run(main())
