"""`netjail run` with a pty of the job's own (the default on a terminal) against a real daemon,
driven from a pty as a user's shell would: job control in `bash -i`, `tty` in the jail, Ctrl-C
as a key, the user's terminal raw while the job runs and restored after, and exit statuses."""

from __future__ import annotations

import os
import re
import signal
import termios
import time

import pytest

from .test_cli_terminal import NETJAIL, WAIT_S, Terminal, terminal  # noqa: F401 - the fixture

pytestmark = pytest.mark.usefixtures("no_leaks")

RUN = [*NETJAIL, "run", "--cwd", "/", "--"]


def _modes(t: Terminal) -> tuple[int, int]:
    """The user's terminal's local and output modes (the pty's, seen from its master)."""
    attrs = termios.tcgetattr(t.master)
    return attrs[3], attrs[1]


@pytest.fixture
def shell(terminal: type[Terminal]) -> Terminal:  # noqa: F811 - the fixture's own
    """`bash -i` in a job, at its first prompt (closed by the terminal fixture)."""
    t = terminal([*NETJAIL, "run", "--cwd", "/", "--env", "PS1=$ ", "--", "bash", "--norc", "-i"])
    t.read_until(b"$ ")
    return t


def test_job_control_works_in_an_interactive_bash(shell: Terminal) -> None:
    """bash -i starts with job control (no warning), and a background job can be listed,
    brought to the foreground and interrupted there with ^C."""
    shell.press(b"sleep 30 &\r")
    shell.read_until(b"[1] ")
    shell.press(b"jobs\r")
    shell.read_until(b"Running")
    shell.press(b"fg\r")
    shell.read_until(b"sleep 30\r\n")
    time.sleep(0.2)  # fg has given the terminal to sleep's group
    shell.press(b"\x03")
    shell.press(b"echo status=$?\r")
    shell.read_until(b"status=130")
    shell.press(b"exit\r")
    assert shell.wait() == 0
    out = shell.output
    assert b"no job control" not in out
    assert b"cannot set terminal process group" not in out
    assert re.search(rb"\[1\]\+\s+Running\s+sleep 30 &", out), out


def test_tty_names_a_device_of_the_jails_own_dev(terminal: type[Terminal]) -> None:  # noqa: F811
    """`tty` in the job prints a pts path that exists in the job's /dev (its own devpts)."""
    t = terminal([*RUN, "sh", "-c", 't=$(tty); echo "tty=$t"; test -c "$t" && echo exists'])
    assert t.wait() == 0
    assert t.lines() == ["tty=/dev/pts/0", "exists"]


def test_ctrl_c_is_a_key_that_interrupts_the_foreground_command(
    terminal: type[Terminal],  # noqa: F811
) -> None:
    """^C (0x03) typed on the user's terminal reaches the job's pty as a key, which makes it
    SIGINT for `sleep`: netjail exits 130, long before the 20 s."""
    t = terminal([*RUN, "sh", "-c", "echo ready; exec sleep 20"])
    t.read_until(b"ready")
    pressed = time.monotonic()
    t.press(b"\x03")
    assert t.wait() == 130
    assert time.monotonic() - pressed < WAIT_S
    assert b"second interrupt" not in t.output


def test_the_terminal_is_raw_while_the_job_runs_and_restored_after(
    terminal: type[Terminal],  # noqa: F811
) -> None:
    """While the job has it, the user's terminal neither echoes nor edits lines (the job's
    pty does that); once netjail exits, it is as it was, and the job's exit status is kept."""
    t = terminal([*RUN, "sh", "-c", "echo ready; read line; echo got=$line; exit 3"])
    before = _modes(t)
    t.read_until(b"ready")
    lflag, oflag = _modes(t)
    assert lflag & (termios.ICANON | termios.ECHO | termios.ISIG) == 0
    assert oflag & termios.OPOST == 0
    t.press(b"hello\r")
    assert t.wait() == 3
    assert b"got=hello" in t.output
    assert _modes(t) == before


def test_a_signal_to_netjail_ends_the_job_and_restores_the_terminal(
    terminal: type[Terminal],  # noqa: F811
) -> None:
    """SIGTERM sent to netjail goes to the job; netjail still restores the terminal, then
    exits 143."""
    t = terminal([*RUN, "sh", "-c", "echo ready; exec sleep 20"])
    before = _modes(t)
    t.read_until(b"ready")
    assert _modes(t) != before
    os.kill(t.process.pid, signal.SIGTERM)
    assert t.wait() == 128 + signal.SIGTERM
    assert _modes(t) == before


def test_a_resize_reaches_the_jobs_pty(terminal: type[Terminal]) -> None:  # noqa: F811
    """A new size of the user's terminal is the job's pty's (stty size), with SIGWINCH."""
    script = "trap 'stty size; exit 0' WINCH; echo ready; while :; do sleep 0.05; done"
    t = terminal([*RUN, "sh", "-c", script], rows=20)
    t.read_until(b"ready")
    t.resize(50, 160)
    assert t.wait() == 0
    assert t.lines()[-1] == "50 160"
