"""A job's stdio: the child's fds 0-2 (the client's, capture pipes, or a pty's socket), the
capture pipes read from the loop, and the pty master its init sends (pipeline steps 12, 14)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from contextlib import AsyncExitStack
from dataclasses import dataclass

from netjail.daemon.report import Capture
from netjail.daemon.spec import JobSpec, PassedStdio, TerminalStdio
from netjail.daemon.stdinfeed import open_stdin_feed
from netjail.errors import JailError
from netjail.kernel.pty import receive_master

__all__ = ["WiredStdio", "close_capture", "drain_capture", "take_terminal", "wire_stdio"]

_CAPTURE_READ = 65536


@dataclass(frozen=True)
class WiredStdio:
    """The child's fds 0-2, the capture pipes, and, for a job with a pty, the socket its init
    sends the master on (the child's stdin is the other end)."""

    child: list[int]
    captures: tuple[Capture, ...] = ()
    terminal: socket.socket | None = None


def wire_stdio(
    always: AsyncExitStack, stack: AsyncExitStack, spec: JobSpec, stdio: list[int]
) -> WiredStdio:
    """12. The child's fds 0-2: the client's own; or /dev/null (or a pipe fed the request's
    stdin payload) and two capture pipes; or, for a pty (made by the job's init inside the
    jail), a socket to send its master on."""
    if isinstance(spec.stdio, PassedStdio):
        return WiredStdio(stdio)
    if isinstance(spec.stdio, TerminalStdio):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        always.callback(ours.close)
        always.callback(theirs.close)  # the child has its own copy once spawned
        return WiredStdio([theirs.fileno()] * 3, terminal=ours)
    limit = spec.stdio.limit
    if spec.stdio.stdin is not None:
        child = [open_stdin_feed(always, stack, spec.stdio.stdin)]
    else:
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        always.callback(os.close, null)
        child = [null]
    captures = []
    loop = asyncio.get_running_loop()
    for _ in range(2):
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        always.callback(os.close, write_fd)  # the child has its own copy once spawned
        # The child's end must block as an inherited pipe normally does.
        os.set_blocking(write_fd, True)
        capture = Capture(fd=read_fd, limit=limit)
        stack.callback(close_capture, capture)
        loop.add_reader(read_fd, _on_capture, capture)
        captures.append(capture)
        child.append(write_fd)
    return WiredStdio(child, tuple(captures))


def take_terminal(stack: AsyncExitStack, wired: WiredStdio) -> int | None:
    """14. The master of the job's pty, which its init sent before spawning the command;
    kept until teardown (its client gets a copy)."""
    if wired.terminal is None:
        return None
    try:
        master = receive_master(wired.terminal)
    except OSError as e:
        raise JailError(f"cannot start the job (terminal): {e.strerror or e}") from None
    stack.callback(os.close, master)
    return master


def drain_capture(capture: Capture) -> None:
    """Read what the job wrote to a capture pipe, up to EOF or what is there now."""
    while not capture.closed:
        try:
            chunk = os.read(capture.fd, _CAPTURE_READ)
        except BlockingIOError:
            return
        if not chunk:
            close_capture(capture)
            return
        capture.take(chunk)


def close_capture(capture: Capture) -> None:
    if capture.closed:
        return
    capture.closed = True
    with contextlib.suppress(ValueError, RuntimeError):
        asyncio.get_running_loop().remove_reader(capture.fd)
    os.close(capture.fd)


def _on_capture(capture: Capture) -> None:
    drain_capture(capture)
