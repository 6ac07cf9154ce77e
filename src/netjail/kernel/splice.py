"""Zero-copy relaying between two sockets with splice(2), driven by an asyncio loop.

Bytes move socket → pipe → socket inside the kernel, never through Python. The pipe is the
only buffer, so its capacity bounds what one direction may hold when the receiving side is
slow: backpressure without any buffer of ours. Needs Linux and Python ≥ 3.10 (os.splice).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket

_PIPE_BYTES = 1 << 20
_F_SETPIPE_SZ = 1031
_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK


class SpliceDirection:
    """One direction of a relay: everything read from ``src`` is written to ``dst``."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, src: socket.socket, dst: socket.socket
    ) -> None:
        self._loop = loop
        self._src = src.fileno()
        self._dst = dst.fileno()
        self._dst_sock = dst
        self._pipe_r, self._pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            # A bigger pipe means fewer wake-ups per MiB; the default (64 KiB) also works.
            fcntl.fcntl(self._pipe_w, _F_SETPIPE_SZ, _PIPE_BYTES)
        self._pending = 0
        self._eof = False
        self.count = 0
        self.done: asyncio.Future[None] = loop.create_future()
        self._reading = False
        self._writing = False

    def start(self) -> None:
        self._want_read(True)

    def _want_read(self, on: bool) -> None:
        if on and not self._reading:
            self._loop.add_reader(self._src, self._on_readable)
        elif not on and self._reading:
            self._loop.remove_reader(self._src)
        self._reading = on

    def _want_write(self, on: bool) -> None:
        if on and not self._writing:
            self._loop.add_writer(self._dst, self._on_writable)
        elif not on and self._writing:
            self._loop.remove_writer(self._dst)
        self._writing = on

    def _on_readable(self) -> None:
        try:
            moved = os.splice(self._src, self._pipe_w, _PIPE_BYTES, flags=_FLAGS)
        except BlockingIOError:
            return
        except OSError as e:
            self._finish(e)
            return
        if moved == 0:
            self._eof = True
            self._want_read(False)
        self._pending += moved
        self._flush()

    def _on_writable(self) -> None:
        self._flush()

    def _flush(self) -> None:
        while self._pending:
            try:
                moved = os.splice(self._pipe_r, self._dst, self._pending, flags=_FLAGS)
            except BlockingIOError:
                # The receiver is slow: stop reading until it takes what the pipe holds.
                self._want_read(False)
                self._want_write(True)
                return
            except OSError as e:
                self._finish(e)
                return
            self._pending -= moved
            self.count += moved
        self._want_write(False)
        if self._eof:
            with contextlib.suppress(OSError):
                self._dst_sock.shutdown(socket.SHUT_WR)
            self._finish(None)
        else:
            self._want_read(True)

    def _finish(self, error: OSError | None) -> None:
        self.close()
        if not self.done.done():
            if error is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(error)

    def close(self) -> None:
        self._want_read(False)
        self._want_write(False)
        for fd in (self._pipe_r, self._pipe_w):
            if fd >= 0:
                os.close(fd)
        self._pipe_r = self._pipe_w = -1


async def splice_relay(a: socket.socket, b: socket.socket) -> tuple[int, int]:
    """Relay between ``a`` and ``b`` until both directions ended; (bytes a→b, bytes b→a).

    A half-close is passed on (EOF one way shuts down writing on the other side). An error in
    either direction ends both. The caller closes the sockets.
    """
    loop = asyncio.get_running_loop()
    forward, backward = SpliceDirection(loop, a, b), SpliceDirection(loop, b, a)
    try:
        forward.start()
        backward.start()
        await asyncio.gather(forward.done, backward.done)
    except OSError:
        pass  # a reset on either side ends the relay; the counts so far stand
    finally:
        forward.close()
        backward.close()
    return forward.count, backward.count
