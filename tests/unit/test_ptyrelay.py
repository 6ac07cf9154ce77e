"""`netjail run -t`'s side of a job's pty (``netjail.ptyrelay``): the raw modes and their
restoring, typed keys passed on (held while the job does not read, and the end of input), and
the -t/-T default."""

from __future__ import annotations

import os
import termios
from collections.abc import Iterator

import pytest

from netjail import ptyrelay
from netjail.ptyrelay import EOF_KEY, KeyRelay, RawTerminal, raw_attributes, wants_tty


def cooked() -> list[object]:
    """A terminal's modes as a shell leaves them (what tcgetattr gives)."""
    master, slave = os.openpty()
    try:
        return termios.tcgetattr(slave)
    finally:
        os.close(master)
        os.close(slave)


def test_raw_modes_turn_off_every_processing_step_and_pass_bytes_one_at_a_time() -> None:
    """As cfmakeraw: no echo, no line editing, no signals from keys, no CR/NL mapping, no
    output processing, 8-bit characters, reads that return each byte."""
    raw = raw_attributes(cooked())
    iflag, oflag, cflag, lflag, cc = raw[0], raw[1], raw[2], raw[3], raw[6]
    assert lflag & (termios.ECHO | termios.ICANON | termios.ISIG | termios.IEXTEN) == 0
    assert iflag & (termios.ICRNL | termios.IXON | termios.ISTRIP | termios.BRKINT) == 0
    assert oflag & termios.OPOST == 0
    assert cflag & termios.CSIZE == termios.CS8
    assert (cc[termios.VMIN], cc[termios.VTIME]) == (1, 0)
    # The speeds are kept.
    assert raw[4:6] == cooked()[4:6]


def test_a_raw_terminal_is_restored_once_whatever_calls_restore() -> None:
    """enter() makes the terminal raw; restore() gives back its modes, and again does nothing."""
    master, slave = os.openpty()
    try:
        before = termios.tcgetattr(slave)
        raw = RawTerminal(slave)
        raw.enter()
        assert raw.active
        assert termios.tcgetattr(slave)[3] & termios.ICANON == 0
        raw.restore()
        raw.restore()
        assert not raw.active
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


def test_a_raw_terminal_leaves_a_non_terminal_alone() -> None:
    """stdin a pipe: nothing to make raw, nothing to restore."""
    read_end, write_end = os.pipe()
    try:
        raw = RawTerminal(read_end)
        raw.enter()
        assert not raw.active
        raw.restore()
    finally:
        os.close(read_end)
        os.close(write_end)


class Keys:
    """A KeyRelay from a pipe the test types into to a pty master the test reads as the job."""

    def __init__(self) -> None:
        self.typed, self.keyboard = os.pipe()
        self.master, self.slave = os.openpty()
        os.set_blocking(self.master, False)
        # The job's side raw too, so that it reads exactly the bytes typed.
        termios.tcsetattr(
            self.slave, termios.TCSANOW, raw_attributes(termios.tcgetattr(self.slave))
        )
        os.set_blocking(self.slave, False)
        self.relay = KeyRelay(self.typed, self.master)

    def job_reads(self) -> bytes:
        """Everything the job's side has to read now."""
        data = b""
        while True:
            try:
                chunk = os.read(self.slave, 1 << 16)
            except BlockingIOError:
                return data
            data += chunk

    def close(self) -> None:
        for fd in (self.typed, self.keyboard, self.master, self.slave):
            os.close(fd)


@pytest.fixture
def keys() -> Iterator[Keys]:
    made = Keys()
    yield made
    made.close()


def test_typed_keys_reach_the_job_unchanged(keys: Keys) -> None:
    """What is typed (^C included: the job's pty decides what it means) is what the job reads."""
    os.write(keys.keyboard, b"ls\x03\r")
    keys.relay.pump()
    assert keys.job_reads() == b"ls\x03\r"
    assert keys.relay.pending == bytearray()


def test_the_end_of_input_is_the_ptys_eof_key(keys: Keys) -> None:
    """When stdin ends, the job reads its end-of-file key once, and stdin is no longer read."""
    os.close(keys.keyboard)
    keys.keyboard = os.open(os.devnull, os.O_RDONLY)
    keys.relay.pump()
    assert keys.job_reads() == EOF_KEY
    assert not keys.relay.wants_input


def test_keys_the_job_does_not_read_are_held_and_stdin_left_unread_past_a_bound(
    keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pty that takes no more keeps the rest pending (offered again soon); past the bound
    stdin is not read, and once the job reads, what was held goes on."""
    monkeypatch.setattr(ptyrelay, "MAX_PENDING_KEYS", 8)
    keys.relay.pending += b"x" * 100_000
    keys.relay.flush()
    assert keys.relay.pending
    assert not keys.relay.wants_input
    assert keys.relay.wait(None) == ptyrelay.KEYS_RETRY_S
    taken = b""
    while keys.relay.pending:
        taken += keys.job_reads()
        keys.relay.flush()
    taken += keys.job_reads()
    assert taken == b"x" * 100_000
    assert keys.relay.wants_input
    assert keys.relay.wait(3.0) == 3.0


@pytest.mark.parametrize(
    ("asked", "stdin", "stdout", "expected"),
    [
        (True, False, False, True),
        (False, True, True, False),
        (None, True, True, True),
        (None, True, False, False),
        (None, False, True, False),
    ],
)
def test_a_terminal_by_default_only_when_stdin_and_stdout_are_terminals(
    monkeypatch: pytest.MonkeyPatch,
    asked: bool | None,
    stdin: bool,
    stdout: bool,
    expected: bool,
) -> None:
    """-t and -T decide; without either, a pty only when both stdin and stdout are terminals
    (`netjail run cmd | less` keeps a pipe, and stderr apart)."""
    monkeypatch.setattr(os, "isatty", lambda fd: {0: stdin, 1: stdout}.get(fd, False))
    assert wants_tty(asked) is expected
