"""The asyncio client and the stdin payload, against the real daemon."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket

import msgspec
import pytest

from netjail import AsyncClient, Client, JobResult
from netjail import protocol as p
from netjail.errors import NotFoundError, ProtocolError

from .conftest import Daemon

pytestmark = pytest.mark.usefixtures("no_leaks")

#: Every byte value, NUL included, and more than a pipe holds (64 KiB) several times over.
PAYLOAD = bytes(range(256)) * 1200


def async_client(daemon: Daemon) -> AsyncClient:
    return AsyncClient(daemon.socket, timeout=10)


def test_a_job_that_cats_its_stdin_gets_exactly_the_payload(client: Client) -> None:
    """The sync client's stdin payload reaches the job byte for byte, then EOF."""
    result = client.run(["cat"], stdio="capture", stdin=PAYLOAD)
    assert (result.exit_code, result.stdout, result.stderr) == (0, PAYLOAD, b"")


def test_a_stdin_payload_over_the_bound_is_a_clear_error(client: Client, daemon: Daemon) -> None:
    """Over MAX_STDIN_BYTES: the client refuses to send, and the daemon refuses it by name."""
    with pytest.raises(ProtocolError, match="over the 524288-byte bound"):
        client.run(["cat"], stdio="capture", stdin=bytes(p.MAX_STDIN_BYTES + 1))
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(daemon.socket)
        request = {"op": "run", "argv": ["cat"], "stdio": "capture", "stdin": bytes(600000)}
        sock.sendall(b'{"op":"hello","version":1}\n' + msgspec.json.encode(request) + b"\n")
        replies = sock.makefile("rb")
        replies.readline()
        error = json.loads(replies.readline())
    assert (error["op"], error["code"]) == ("error", "protocol")
    assert "stdin payload of 600000 bytes is over the 524288-byte bound" in error["message"]


def test_fifty_concurrent_jobs_in_one_event_loop(daemon: Daemon) -> None:
    """50 runs gathered on one loop all finish, each with its own job and exit status."""

    async def scenario() -> list[tuple[str, int | None, bytes | None]]:
        client = async_client(daemon)
        results = await asyncio.gather(
            *(
                client.run(["sh", "-c", f"exit {i % 7}"], stdio="capture")
                if i % 2
                else client.run(["/bin/true"])
                for i in range(50)
            )
        )
        return [(r.job, r.exit_code, r.stdout) for r in results]

    results = asyncio.run(scenario())
    assert len({job for job, _, _ in results}) == 50
    assert [code for _, code, _ in results] == [i % 7 if i % 2 else 0 for i in range(50)]


def test_the_async_client_feeds_stdin_and_streams_events(daemon: Daemon) -> None:
    """AsyncClient.run: stdin payload in, captured output and live events out."""
    seen: list[p.Event] = []

    async def scenario() -> tuple[bytes | None, list[p.Event]]:
        script = "cat; exec 3<>/dev/tcp/192.0.2.7/443"
        result = await async_client(daemon).run(
            ["bash", "-c", script], stdio="capture", stdin=b"to the job\n", on_event=seen.append
        )
        return result.stdout, result.events

    stdout, events = asyncio.run(scenario())
    assert stdout == b"to the job\n"
    assert [(e.verdict, e.dst, e.port) for e in events] == [("blocked", "192.0.2.7", 443)]
    assert seen == events


def test_cancelling_an_async_run_kills_the_job(daemon: Daemon) -> None:
    """Cancelling the task awaiting run() kills the job: it leaves ps, and nothing leaks."""

    async def scenario() -> tuple[str, list[str], list[str]]:
        client = async_client(daemon)
        started: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(
            client.run(["sleep", "60"], on_start=lambda job, _pid: started.set_result(job))
        )
        job = await started
        before = [info.job for info in await client.ps()]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(250):
            after = [info.job for info in await client.ps()]
            if job not in after:
                break
            await asyncio.sleep(0.02)
        return job, before, after

    job, before, after = asyncio.run(scenario())
    assert job in before
    assert job not in after


def test_async_kill_events_and_status(daemon: Daemon) -> None:
    """AsyncClient.kill ends a job with the signal; events and status answer as the sync
    client's; killing an unknown job is NotFoundError."""

    async def scenario() -> tuple[int | None, list[str | None], int]:
        client = async_client(daemon)
        blocked: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(
            client.run(
                ["bash", "-c", "exec 3<>/dev/tcp/198.51.100.3/80; sleep 60"],
                on_event=lambda event: blocked.done() or blocked.set_result(event.job),
            )
        )
        job = await blocked
        await client.kill(job, 9)
        result = await task
        with pytest.raises(NotFoundError):
            await client.kill("j-00000000")
        dsts = [event.dst async for event in client.events(job)]
        status = await client.status()
        return result.signal, dsts, status.jobs_total

    signal, dsts, jobs_total = asyncio.run(scenario())
    assert signal == 9
    assert dsts == ["198.51.100.3"]
    assert jobs_total >= 1


def test_the_async_client_passes_stdio_fds(daemon: Daemon) -> None:
    """stdio "fds": the job writes to the pipe the async client passed, not to a capture."""
    read_end, write_end = os.pipe()

    async def scenario() -> JobResult:
        with open(os.devnull, "rb") as null:
            return await async_client(daemon).run(
                ["sh", "-c", "echo to the pipe"],
                stdio="fds",
                fds=(null.fileno(), write_end, write_end),
            )

    try:
        result = asyncio.run(scenario())
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            output = pipe.read()
    finally:
        with contextlib.suppress(OSError):
            os.close(write_end)
    assert (result.exit_code, result.stdout, output) == (0, None, b"to the pipe\n")
