"""A job's stdin payload: the request's bytes, written into the job's stdin pipe, then EOF.

The daemon's end of the pipe is non-blocking and written from the loop as the job reads
(``add_writer``), so a job that reads slowly, or never, stalls nothing but its own feed. The
write end is closed once everything is written, which is the job's EOF; also when the job
closes its end or ends (EPIPE: the rest is not wanted), and at the latest by the job's
teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from contextlib import AsyncExitStack

#: Bytes handed to one write(2); a pipe holds 64 KiB unless resized.
_WRITE_BYTES = 64 << 10


class StdinFeed:
    """Writes ``data`` into the pipe ``fd`` (the daemon's non-blocking write end), then
    closes it."""

    def __init__(self, fd: int, data: bytes) -> None:
        self._fd = fd
        self._left = memoryview(data)
        self._loop = asyncio.get_running_loop()
        self._waiting = False
        self.closed = False

    def write(self) -> None:
        """Write what the pipe takes now; wait for room (on the loop) for the rest."""
        while self._left and not self.closed:
            try:
                written = os.write(self._fd, self._left[:_WRITE_BYTES])
            except BlockingIOError:
                if not self._waiting:
                    self._loop.add_writer(self._fd, self.write)
                    self._waiting = True
                return
            except OSError:
                # EPIPE: the job closed its stdin or is gone, so it wants no more.
                break
            self._left = self._left[written:]
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._left = memoryview(b"")
        if self._waiting:
            with contextlib.suppress(ValueError, RuntimeError):
                self._loop.remove_writer(self._fd)
        os.close(self._fd)


def open_stdin_feed(always: AsyncExitStack, stack: AsyncExitStack, data: bytes) -> int:
    """The child's stdin: the read end of a pipe the loop fills with ``data`` and then closes.

    The feed's close goes on ``stack`` (the job's undo), the daemon's copy of the read end on
    ``always`` (the child has its own once spawned).
    """
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    always.callback(os.close, read_fd)
    # O_NONBLOCK is per open file: the child's end must block as an inherited pipe does.
    os.set_blocking(read_fd, True)
    feed = StdinFeed(write_fd, data)
    stack.callback(feed.close)
    feed.write()
    return read_fd
