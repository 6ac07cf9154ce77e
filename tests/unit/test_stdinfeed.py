"""Tests for netjail.daemon.stdinfeed: a job's stdin payload, written from the loop, then EOF."""

from __future__ import annotations

import asyncio
import os
from contextlib import AsyncExitStack

from netjail.daemon.stdinfeed import open_stdin_feed


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _child_end(undo: AsyncExitStack, data: bytes) -> int:
    """The job's stdin as the spawned child holds it: the daemon's copy is released at once."""
    async with AsyncExitStack() as always:
        child_end = os.dup(open_stdin_feed(always, undo, data))
    return child_end


async def _read_all(fd: int) -> bytes:
    """What the job reads from ``fd`` until EOF, in small reads as a slow job would."""
    chunks = []
    while chunk := await asyncio.to_thread(os.read, fd, 4096):
        chunks.append(chunk)
    return b"".join(chunks)


def test_a_payload_larger_than_a_pipe_arrives_whole_and_then_eof() -> None:
    """Bytes beyond the pipe's capacity are written as the reader drains it, then EOF."""
    data = bytes(range(256)) * 2048  # 512 KiB, NUL bytes included

    async def scenario() -> bytes:
        async with AsyncExitStack() as undo:
            child_end = await _child_end(undo, data)
            try:
                return await _read_all(child_end)
            finally:
                os.close(child_end)

    assert asyncio.run(scenario()) == data


def test_a_reader_that_goes_away_ends_the_feed_without_an_error() -> None:
    """EPIPE (the job closed its stdin) closes the daemon's end at once; nothing is raised."""

    async def scenario() -> tuple[int, int, list[str]]:
        errors: list[str] = []
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, context: errors.append(context["message"]))
        before = _open_fds()
        async with AsyncExitStack() as undo:
            child_end = await _child_end(undo, bytes(1 << 19))
            os.read(child_end, 1000)
            os.close(child_end)
            await asyncio.sleep(0)  # room in the pipe wakes the writer, which meets EPIPE
            await asyncio.sleep(0)
            during = _open_fds()
        return before, during, errors

    before, during, errors = asyncio.run(scenario())
    assert (during, errors) == (before, [])


def test_the_undo_closes_a_feed_the_job_never_read() -> None:
    """A job that never reads its stdin leaves no fd behind once the undo runs."""

    async def scenario() -> tuple[int, int]:
        before = _open_fds()
        async with AsyncExitStack() as undo:
            os.close(await _child_end(undo, bytes(1 << 19)))
        return before, _open_fds()

    before, after = asyncio.run(scenario())
    assert after == before
