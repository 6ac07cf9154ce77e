"""The fork server's watch of its inits' status pipes (forkserver._Inits), over real pipes."""

from __future__ import annotations

import os
import selectors
import signal
import socket
from collections.abc import Iterator

import pytest

from netjail.kernel import forkserver
from netjail.kernel.jobplan import JobExit, encode_job_status


@pytest.fixture
def channel() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    yield ours, theirs
    ours.close()
    theirs.close()


def sent(theirs: socket.socket) -> list[forkserver.FromServer]:
    theirs.setblocking(False)
    out = []
    while True:
        try:
            out.append(forkserver.from_server.decode(theirs.recv(1 << 16)))
        except BlockingIOError:
            return out


def test_a_status_record_is_told_at_once_and_kept_for_the_reaping(
    channel: tuple[socket.socket, socket.socket],
) -> None:
    """The record says Ended as soon as it is readable; the reaping (the init itself killed
    meanwhile) still reports the command's status from it, and the pipe is closed."""
    ours, theirs = channel
    inits = forkserver._Inits(selectors.DefaultSelector())
    r, w = os.pipe2(os.O_NONBLOCK)
    inits.add(4321, r)
    os.write(w, encode_job_status(3 << 8))  # exit 3
    os.close(w)
    inits.on_status(ours, r)
    assert sent(theirs) == [forkserver.Ended(pid=4321, exit_code=3, signal=None)]
    assert inits.watched == {}
    assert inits.reaped(4321, signal.SIGKILL) == JobExit(exit_code=3, signal=None)
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(r)
    assert inits.reaped(4321, 0) is None


def test_eof_without_a_record_waits_for_the_reaping(
    channel: tuple[socket.socket, socket.socket],
) -> None:
    """An init killed before it wrote its record: EOF says nothing; its own end is the job's."""
    ours, theirs = channel
    inits = forkserver._Inits(selectors.DefaultSelector())
    r, w = os.pipe2(os.O_NONBLOCK)
    inits.add(4321, r)
    os.close(w)
    inits.on_status(ours, r)
    assert sent(theirs) == []
    assert inits.reaped(4321, signal.SIGKILL) == JobExit(exit_code=None, signal=signal.SIGKILL)
