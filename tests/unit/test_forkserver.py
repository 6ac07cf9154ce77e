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
from netjail.kernel.prefault import HotPages
from netjail.kernel.standby import StandbyTable


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
    inits = forkserver._Inits()
    r, w = os.pipe2(os.O_NONBLOCK)
    inits.add(4321, r)
    os.write(w, encode_job_status(3 << 8))  # exit 3
    os.close(w)
    assert inits.watched() == [(r, 4321)]
    inits.on_status(ours, 4321)
    assert sent(theirs) == [forkserver.Ended(pid=4321, exit_code=3, signal=None)]
    assert inits.watched() == []
    inits.on_status(ours, 4321)  # a stale event: nothing more
    assert sent(theirs) == []
    assert inits.reaped(4321, signal.SIGKILL) == JobExit(exit_code=3, signal=None)
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(r)
    assert inits.reaped(4321, 0) is None


def test_eof_without_a_record_waits_for_the_reaping(
    channel: tuple[socket.socket, socket.socket],
) -> None:
    """An init killed before it wrote its record: EOF says nothing; its own end is the job's."""
    ours, theirs = channel
    inits = forkserver._Inits()
    r, w = os.pipe2(os.O_NONBLOCK)
    inits.add(4321, r)
    os.close(w)
    assert inits.watched() == [(r, 4321)]
    inits.on_status(ours, 4321)
    assert sent(theirs) == []
    assert inits.reaped(4321, signal.SIGKILL) == JobExit(exit_code=None, signal=signal.SIGKILL)


class _Standbys(StandbyTable):
    """A standby table whose watched fds the test sets."""

    def __init__(self) -> None:
        super().__init__()
        self.fds: list[tuple[int, int]] = []

    def watched(self) -> list[tuple[int, int]]:
        return list(self.fds)


def test_an_fd_number_reused_from_a_standby_by_a_status_pipe_is_watched_once() -> None:
    """One place registers every watched fd: a standby's pipe closed and its number taken by a
    new init's status pipe is re-registered for the new one, never twice."""
    selector = selectors.DefaultSelector()
    standbys, inits = _Standbys(), forkserver._Inits()
    watching: dict[int, forkserver._Watched] = {}
    r, w = os.pipe2(os.O_NONBLOCK)
    try:
        standbys.fds = [(r, 1)]
        forkserver._watch_inits(selector, watching, standbys, inits, HotPages())
        assert watching == {r: forkserver._StandbyFd(1)}
        standbys.fds = []  # its pipe closed; the same number is now init 2's status pipe
        inits.add(2, r)
        forkserver._watch_inits(selector, watching, standbys, inits, HotPages())
        assert watching == {r: forkserver._StatusFd(2)}
        assert selector.get_key(r).fd == r
        os.write(w, encode_job_status(0))
        assert [key.fd for key, _ in selector.select(0)] == [r]
    finally:
        selector.close()
        os.close(r)
        os.close(w)


def test_a_handed_over_status_pipe_is_no_longer_read_and_its_reaping_is_the_inits_own(
    channel: tuple[socket.socket, socket.socket],
) -> None:
    """hand_over gives the daemon a standby's pipe: it leaves the watched fds, a record in it
    is not read (nor told as Ended) here, and the reaping reports the init's own end. An
    init whose pipe was read already (EOF: it is ending) is not handed over."""
    ours, theirs = channel
    inits = forkserver._Inits()
    r, w = os.pipe2(os.O_NONBLOCK)
    inits.add(4321, r)
    assert inits.hand_over(4321) == r
    assert inits.watched() == []
    os.write(w, encode_job_status(3 << 8))
    assert inits.reaped(4321, 7 << 8) == JobExit(exit_code=7, signal=None)
    assert sent(theirs) == []
    assert os.read(r, 8) == encode_job_status(3 << 8)  # the pipe is the daemon's, still open
    os.close(r)
    os.close(w)
    r, w = os.pipe2(os.O_NONBLOCK)
    inits.add(99, r)
    os.close(w)
    inits.on_status(ours, 99)  # EOF
    assert inits.hand_over(99) is None
    assert inits.reaped(99, signal.SIGKILL) == JobExit(exit_code=None, signal=signal.SIGKILL)
