"""Tests for netjail.relay: the job's output copied whole, netjail's lines let in only
between the job's lines, and the job given a pipe or a pty only where it shares a file with them.
"""

from __future__ import annotations

import fcntl
import os
import struct
import termios
from collections.abc import Iterator

import pytest

from netjail.relay import Relay, Sink, StdioPlan

EVENT = b"netjail: blocked tcp 203.0.113.9:443 uid=65534\n"


class Pipes:
    """A relay from a pipe the test writes to (the job's end) to one it reads (the user's)."""

    def __init__(self, *, dest_is_tty: bool = False) -> None:
        self.source, self.job = os.pipe()
        self.user, self.dest = os.pipe()
        os.set_blocking(self.source, False)
        os.set_blocking(self.user, False)
        self.relay = Relay(self.source, self.dest, dest_is_tty=dest_is_tty)

    def job_writes(self, data: bytes) -> None:
        os.write(self.job, data)
        self.relay.pump()

    def seen(self) -> bytes:
        try:
            return os.read(self.user, 1 << 16)
        except BlockingIOError:
            return b""

    def close(self) -> None:
        self.relay.close()
        for fd in (self.job, self.user, self.dest):
            try:
                os.close(fd)
            except OSError:
                continue


@pytest.fixture
def pipes() -> Iterator[Pipes]:
    made = Pipes()
    yield made
    made.close()


@pytest.fixture
def tty_pipes() -> Iterator[Pipes]:
    made = Pipes(dest_is_tty=True)
    yield made
    made.close()


def test_the_jobs_output_is_copied_unchanged(pipes: Pipes) -> None:
    """Whatever the job writes, in whatever pieces, comes out byte for byte."""
    pipes.job_writes(b"half a li")
    pipes.job_writes(b"ne\n\x00\xff binary\r\n")
    assert pipes.seen() == b"half a line\n\x00\xff binary\r\n"


def test_a_line_between_the_jobs_lines_goes_out_at_once(pipes: Pipes) -> None:
    """When the job's output ends with a newline, netjail's line is written straight away."""
    pipes.job_writes(b"first\n")
    pipes.relay.insert(EVENT)
    assert pipes.seen() == b"first\n" + EVENT


def test_a_line_waits_for_the_end_of_the_jobs_line(pipes: Pipes) -> None:
    """A line offered in the middle of one of the job's lines comes out after its newline."""
    pipes.job_writes(b"curl: (7) Failed to connect to 203.0.113.9 port 44")
    pipes.relay.insert(EVENT)
    assert pipes.seen() == b"curl: (7) Failed to connect to 203.0.113.9 port 44"
    pipes.job_writes(b"3 after 0 ms\nnext li")
    assert pipes.seen() == b"3 after 0 ms\n" + EVENT + b"next li"
    assert pipes.relay.held == []


def test_held_lines_end_on_a_line_of_their_own(pipes: Pipes) -> None:
    """When the job ends in the middle of a line, held lines follow a newline of their own."""
    pipes.job_writes(b"no newline at the end")
    pipes.relay.insert(EVENT)
    pipes.relay.finish()
    assert pipes.seen() == b"no newline at the end\n" + EVENT


def test_a_carriage_return_is_no_boundary_off_a_terminal(pipes: Pipes) -> None:
    """In a file or pipe, only a newline ends a line."""
    pipes.job_writes(b"progress")
    pipes.relay.insert(EVENT)
    pipes.job_writes(b"\r 45%\r 46%")
    assert pipes.seen() == b"progress\r 45%\r 46%"


def test_a_progress_bars_next_frame_is_a_boundary_on_a_terminal(tty_pipes: Pipes) -> None:
    """On a terminal a line goes in where a progress bar's next frame starts, clearing the
    rest of the old frame; a "\\r\\n" is not split."""
    tty_pipes.job_writes(b"[==>    ] 45%")
    tty_pipes.relay.insert(EVENT)
    tty_pipes.job_writes(b"\r[===>   ] 46%")
    assert tty_pipes.seen() == (
        b"[==>    ] 45%\rnetjail: blocked tcp 203.0.113.9:443 uid=65534\x1b[K\n[===>   ] 46%"
    )
    tty_pipes.job_writes(b"\r")
    tty_pipes.relay.insert(EVENT)
    tty_pipes.job_writes(b"\ndone\n")
    assert tty_pipes.seen() == b"\r\n" + EVENT + b"done\n"


def test_the_relay_ends_with_the_jobs_output(pipes: Pipes) -> None:
    """Once every writer of the job's end is gone, the relay reaches its end."""
    pipes.job_writes(b"last\n")
    os.close(pipes.job)
    pipes.relay.pump()
    assert not pipes.relay.open
    assert pipes.seen() == b"last\n"


def test_a_gone_user_end_stops_the_relay(pipes: Pipes) -> None:
    """When the user's end is closed (a pipe whose reader left), the relay stops, so that the
    job's next writes fail as they would have without netjail in between."""
    os.close(pipes.user)
    pipes.job_writes(b"nobody reads this\n")
    assert not pipes.relay.open
    assert pipes.relay.broken


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def test_only_the_stdio_that_shares_the_sinks_file_is_relayed() -> None:
    """The job's stderr (the sink's file) goes through a pipe; its stdout, elsewhere, does not."""
    stdout_r, stdout_w = os.pipe()
    stderr_r, stderr_w = os.pipe()
    plan = StdioPlan([0, stdout_w, stderr_w], Sink(stderr_w))
    try:
        assert plan.relay is not None
        assert plan.relayed == (2,)
        assert plan.fds[:2] == [0, stdout_w]
        assert plan.fds[2] != stderr_w
        assert plan.relay.dest == stderr_w
        assert not os.isatty(plan.fds[2])
    finally:
        plan.close_job_ends()
        if plan.relay is not None:
            plan.relay.close()
        for fd in (stdout_r, stdout_w, stderr_r, stderr_w):
            os.close(fd)


def test_stdout_and_stderr_on_one_file_share_one_relay() -> None:
    """When stdout and stderr are the sink's file (2>&1), both get the same pipe, in order."""
    r, w = os.pipe()
    plan = StdioPlan([0, w, w], Sink(w))
    try:
        assert plan.relayed == (1, 2)
        assert plan.fds[1] == plan.fds[2] != w
    finally:
        plan.close_job_ends()
        if plan.relay is not None:
            plan.relay.close()
        os.close(r)
        os.close(w)


def test_nothing_is_relayed_when_events_go_elsewhere() -> None:
    """With the sink on a file the job does not write to, or on /dev/null, the job gets its
    own fds."""
    r, w = os.pipe()
    other_r, other_w = os.pipe()
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        assert StdioPlan([0, w, w], Sink(other_w)).relay is None
        plan = StdioPlan([0, null, null], Sink(null))
        assert plan.relay is None
        assert plan.fds == [0, null, null]
        assert StdioPlan([0, w, w], None).relay is None
    finally:
        for fd in (r, w, other_r, other_w, null):
            os.close(fd)


def test_a_terminal_is_relayed_through_a_pty_of_the_same_size() -> None:
    """When the sink is a terminal, the job still writes to a terminal: a pty, as large as the
    user's, that passes its bytes unchanged (no output processing of its own)."""
    master, terminal = os.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 31, 97, 0, 0))
    plan = StdioPlan([0, terminal, terminal], Sink(terminal))
    try:
        assert plan.relay is not None
        job_end = plan.fds[2]
        assert plan.fds[1] == job_end
        assert os.isatty(job_end)
        assert _identity(job_end) != _identity(terminal)
        size = fcntl.ioctl(job_end, termios.TIOCGWINSZ, b"\0" * 8)
        assert struct.unpack("HHHH", size)[:2] == (31, 97)
        assert not termios.tcgetattr(job_end)[1] & termios.OPOST
        fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        plan.resize()
        size = fcntl.ioctl(job_end, termios.TIOCGWINSZ, b"\0" * 8)
        assert struct.unpack("HHHH", size)[:2] == (40, 120)
    finally:
        plan.close_job_ends()
        if plan.relay is not None:
            plan.relay.close()
        os.close(master)
        os.close(terminal)


def test_netjail_lines_end_in_cr_lf_while_the_terminal_is_raw(tty_pipes: Pipes) -> None:
    """With the relay's newline set for a raw terminal, netjail's lines (held ones too, and
    the progress-bar case) end in \\r\\n, and the job's own bytes are untouched."""
    tty_pipes.relay.newline = b"\r\n"
    tty_pipes.relay.insert(EVENT)
    tty_pipes.job_writes(b"job line\r\n[=> ] 1%")
    tty_pipes.relay.insert(EVENT)
    tty_pipes.job_writes(b"\r[==>] 2%")
    line = EVENT[:-1]
    assert tty_pipes.seen() == (line + b"\r\njob line\r\n[=> ] 1%\r" + line + b"\x1b[K\r\n[==>] 2%")
    tty_pipes.relay.insert(EVENT)
    tty_pipes.relay.finish()
    assert tty_pipes.seen() == b"\r\n" + line + b"\r\n"
