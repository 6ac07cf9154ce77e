"""A connection's way out: a bounded queue of frames (with their fds), and a graceful close.

A client that stops reading only fills its own outbox. Streamed events beyond the bound are
dropped and counted for that client (they all stay in the job's report); replies are never
dropped, but a reply that finds ``MAX_QUEUED_BYTES`` already queued means the client is not
reading them: the outbox overflows, and its connection hangs up.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

#: Streamed events queued for one client before further ones are dropped (and counted).
MAX_QUEUED_EVENTS = 1000
#: Bytes queued for one client past which events are dropped and a reply disconnects it. One
#: reply may be larger (a report with captured output): it is queued when the client keeps up.
MAX_QUEUED_BYTES = 8 << 20
_LINGER_S = 1.0
_LINGER_BYTES = 4 << 20


async def close_gracefully(sock: socket.socket) -> None:
    """Half-close, discard what the peer still sends (bounded in time and bytes), close.

    Closing a socket with unread input makes the kernel send a reset, which can destroy our
    last message (the error explaining why we hang up) before the peer reads it.
    """
    loop = asyncio.get_running_loop()
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
    budget = _LINGER_BYTES
    deadline = loop.time() + _LINGER_S
    while budget > 0:
        try:
            chunk = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            if loop.time() >= deadline:
                break
            await asyncio.sleep(0.01)
            continue
        except OSError:
            break
        if not chunk:
            break
        budget -= len(chunk)
    sock.close()


@dataclass(frozen=True)
class OutFrame:
    """One frame to send, and the file descriptors that go with it (SCM_RIGHTS), which the
    outbox owns: closed once sent, or when the frame is dropped."""

    data: bytes
    fds: tuple[int, ...] = ()

    def close_fds(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)


class Outbox:
    """A connection's queue of frames to send, bounded in events and in bytes.

    ``overflowed`` is set when a reply found the byte bound reached: the outbox is closed and
    emptied then, and its connection must hang up.
    """

    def __init__(
        self, max_events: int = MAX_QUEUED_EVENTS, max_bytes: int = MAX_QUEUED_BYTES
    ) -> None:
        self._frames: deque[tuple[OutFrame, bool]] = deque()
        self._max_events = max_events
        self.max_bytes = max_bytes
        self._droppable = 0
        #: Bytes queued and not yet handed to the writer.
        self.queued_bytes = 0
        self.dropped = 0
        self._wake = asyncio.Event()
        self.closed = False
        self.overflowed = False

    def put(self, frame: bytes, *, droppable: bool = False, fds: Sequence[int] = ()) -> None:
        """Queue ``frame`` (with ``fds``, which the outbox then owns)."""
        out = OutFrame(frame, tuple(fds))
        if self.closed:
            out.close_fds()
            return
        if droppable:
            if self._droppable >= self._max_events or self.queued_bytes >= self.max_bytes:
                self.dropped += 1
                return
            self._droppable += 1
        elif self.queued_bytes >= self.max_bytes:
            self.overflowed = True
            out.close_fds()
            self.discard()
            self.close()
            return
        self._frames.append((out, droppable))
        self.queued_bytes += len(frame)
        self._wake.set()

    async def get(self) -> OutFrame | None:
        while not self._frames:
            if self.closed:
                return None
            self._wake.clear()
            await self._wake.wait()
        frame, droppable = self._frames.popleft()
        self.queued_bytes -= len(frame.data)
        if droppable:
            self._droppable -= 1
        return frame

    def close(self) -> None:
        self.closed = True
        self._wake.set()

    def discard(self) -> None:
        """Forget every frame not sent yet (and close their fds)."""
        for frame, _droppable in self._frames:
            frame.close_fds()
        self._frames.clear()
        self._droppable = self.queued_bytes = 0
