"""`netjail run` in a real terminal (a pty of its own, as a user's shell gives it) against a real
daemon: Ctrl-C ends the whole job, with a pty of the job's own (-t, the default here) or
without (-T, where a second one kills it), event lines never land inside the job's own lines,
the end-of-job summary, and a stopping daemon that says why the job ended."""

from __future__ import annotations

import fcntl
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Iterator, Sequence

import pytest

from .conftest import (
    Daemon,
    netjail_job_cgroups,
    netjail_netns,
    processes_of_jobs,
    start_daemon,
    stop_daemon,
)

pytestmark = pytest.mark.usefixtures("no_leaks")

NETJAIL = [sys.executable, "-m", "netjail.cli"]
#: Long enough for any check here on a loaded machine; far shorter than the jobs' 20 s sleeps,
#: so a job that was not ended is told apart from one that was.
WAIT_S = 10.0


class Terminal:
    """A command in a pty of its own: its own session, the pty its controlling terminal, so
    that ^C written to the pty is SIGINT to the command, as in a user's shell."""

    def __init__(self, argv: Sequence[str], env: dict[str, str], rows: int = 24) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, 100, 0, 0))
        # setsid -c: a new session whose controlling terminal is its stdin (without a fork:
        # the child is not a process-group leader, so the pid is netjail's).
        self.process = subprocess.Popen(
            ["setsid", "-c", *argv], stdin=slave, stdout=slave, stderr=slave, env=env
        )
        os.close(slave)
        self.output = b""

    def _read(self, timeout: float) -> bool:
        if not select.select([self.master], [], [], timeout)[0]:
            return True
        try:
            chunk = os.read(self.master, 1 << 16)
        except OSError:  # EIO: every holder of the pty's other side is gone
            chunk = b""
        self.output += chunk
        return bool(chunk)

    def read_until(self, text: bytes) -> None:
        deadline = time.monotonic() + WAIT_S
        while text not in self.output:
            left = deadline - time.monotonic()
            assert left > 0, f"no {text!r} in {self.output!r}"
            assert self._read(left), f"the terminal closed before {text!r}: {self.output!r}"

    def press(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def resize(self, rows: int, cols: int) -> None:
        """Give the terminal a new size: its foreground group (netjail) gets SIGWINCH."""
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def wait(self) -> int:
        """The command's exit status, once its output is all read."""
        returncode = self.process.wait(WAIT_S)
        while self._read(0.5):
            pass
        return returncode

    def lines(self) -> list[str]:
        return self.output.decode(errors="replace").replace("\r\n", "\n").splitlines()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.master >= 0:
            os.close(self.master)
            self.master = -1


def _env(daemon: Daemon) -> dict[str, str]:
    return {**os.environ, "NETJAIL_SOCKET": daemon.socket, "TERM": "xterm"}


def _wait_for_command(daemon: Daemon, cmdline: bytes) -> None:
    """Wait until a process of one of ``daemon``'s jobs runs ``cmdline`` (NUL-separated)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        for pid in processes_of_jobs(daemon.job_ids()):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if f.read() == cmdline:
                        return
            except OSError:
                continue
        time.sleep(0.01)
    raise AssertionError(f"no job process ran {cmdline!r}")


@pytest.fixture
def terminal(daemon: Daemon) -> Iterator[type[Terminal]]:
    made: list[Terminal] = []

    class Made(Terminal):
        def __init__(self, argv: Sequence[str], rows: int = 24) -> None:
            super().__init__(argv, _env(daemon), rows)
            made.append(self)

    yield Made
    for t in made:
        t.close()


@pytest.mark.parametrize("mode", ["-t", "-T"])
@pytest.mark.parametrize(
    "script", ["echo ready; sleep 20", "echo ready; bash -c 'sleep 20; echo done'"]
)
def test_ctrl_c_ends_the_whole_job_with_130(
    terminal: type[Terminal], daemon: Daemon, script: str, mode: str
) -> None:
    """^C in the terminal ends the job's whole process tree (not only its main process) long
    before its 20 s, and netjail exits 130, as a shell would."""
    t = terminal([*NETJAIL, "run", mode, "--cwd", "/", "--", "sh", "-c", script])
    t.read_until(b"ready")
    # A shell that gets SIGINT between its fork and its child's exec can lose it (bash's
    # child still runs bash's handler): ^C goes once the tree it must end is in place.
    _wait_for_command(daemon, b"sleep\x0020\x00")
    pressed = time.monotonic()
    t.press(b"\x03")
    assert t.wait() == 130
    ended_after = time.monotonic() - pressed
    assert ended_after < WAIT_S, "the job ran to its end: ^C did not reach it"
    assert b"done" not in t.output
    assert b"interrupted before the job started" not in t.output


def test_a_second_ctrl_c_kills_the_job(terminal: type[Terminal]) -> None:
    """Without a pty of its own (-T), a job that ignores SIGINT is killed by a second ^C
    within 2 s, with one line saying so."""
    t = terminal(
        [*NETJAIL, "run", "-T", "--cwd", "/", "--", "sh", "-c", "trap '' INT; echo ready; sleep 20"]
    )
    t.read_until(b"ready")
    t.press(b"\x03")
    # Two signals sent together may reach netjail as one (a pending signal is not queued
    # twice): the second ^C comes a moment later, well within the 2 s.
    time.sleep(0.5)
    t.press(b"\x03")
    assert t.wait() == 137
    [job] = re.findall(
        rb"netjail: second interrupt: killing job (j-[0-9a-f]{8}) \(SIGKILL\)", t.output
    )
    assert job


#: A job that writes long stderr lines in two pieces, with a blocked attempt between them.
SPLICER = """
import os, socket, time
for i in range(4):
    os.write(2, b"job line %d: " % i + b"a" * 150)
    s = socket.socket()
    try:
        s.connect(("203.0.113.%d" % (i + 1), 443))
    except OSError:
        pass
    s.close()
    time.sleep(0.02)
    os.write(2, b"b" * 150 + b"\\n")
"""


def test_event_lines_never_land_inside_the_jobs_lines(terminal: type[Terminal]) -> None:
    """Over 50 runs of a job whose stderr lines are written in pieces around blocked attempts,
    every line on the terminal is either one of the job's, whole, or one of netjail's."""
    job_line = re.compile(r"job line [0-3]: a{150}b{150}")
    # An attempt names its process when the socket is still there to look up (the job closes
    # it at once, so only sometimes).
    netjail_line = re.compile(
        r"netjail: blocked (tcp 203\.0\.113\.[1-4]:443 (by python3 \(pid \d+\) )?uid=\d+"
        r"|4 destinations: .*)"
    )
    for _ in range(50):
        t = terminal([*NETJAIL, "run", "--cwd", "/", "--", "python3", "-c", SPLICER])
        assert t.wait() == 0, t.output
        lines = t.lines()
        assert [
            line for line in lines if not (job_line.fullmatch(line) or netjail_line.fullmatch(line))
        ] == []
        assert len([line for line in lines if job_line.fullmatch(line)]) == 4
        t.close()


def test_the_summary_names_what_was_blocked_and_the_allow_that_fixes_it(
    terminal: type[Terminal],
) -> None:
    """The job's last line: the blocked destinations by name with counts, and the --allow for
    the name (none for the bare address)."""
    script = "for i in 1 2 3; do getent hosts api.stripe.com; done; curl -sS https://203.0.113.9/"
    t = terminal([*NETJAIL, "run", "--cwd", "/", "--", "sh", "-c", script])
    assert t.wait() == 7
    lines = t.lines()
    assert lines[-1] == (
        "netjail: blocked 2 destinations: api.stripe.com (x3), 203.0.113.9:443 (x1); "
        "allow with --allow api.stripe.com"
    )
    # One line per name, A and AAAA folded: printed when first seen, then with its count.
    # Each names the getent that asked first, by its pid inside the job.
    dns = [line for line in lines if line.startswith("netjail: blocked dns api.stripe.com")]
    first = r"netjail: blocked dns api\.stripe\.com (A|AAAA) by getent \(pid \d+\)"
    assert re.fullmatch(first, dns[0]), dns
    assert re.fullmatch(
        r"netjail: blocked dns api\.stripe\.com A,AAAA by getent \(pid \d+\) x3", dns[-1]
    )


@pytest.mark.parametrize("mode", ["-t", "-T"])
def test_the_job_writes_to_a_terminal_of_the_users_size(
    terminal: type[Terminal], mode: str
) -> None:
    """Its own pty (-t), or relayed so that event lines stay whole (-T), the job's stdout and
    stderr are terminals as large as the user's."""
    t = terminal(
        [
            *NETJAIL,
            "run",
            mode,
            "--cwd",
            "/",
            "--",
            "sh",
            "-c",
            "test -t 1 && test -t 2 && stty size <&1",
        ],
        rows=33,
    )
    assert t.wait() == 0
    assert t.lines() == ["33 100"]


@pytest.mark.parametrize("mode", ["-t", "-T"])
def test_window_size_changes_reach_the_job(terminal: type[Terminal], mode: str) -> None:
    """Resizing the user's terminal resizes the job's and sends the job SIGWINCH."""
    script = "trap 'stty size <&1; exit 0' WINCH; echo ready; while :; do sleep 0.1; done"
    t = terminal([*NETJAIL, "run", mode, "--cwd", "/", "--", "sh", "-c", script], rows=20)
    t.read_until(b"ready")
    t.resize(44, 132)
    assert t.wait() == 0
    assert t.lines()[-1] == "44 132"


@pytest.fixture
def own_daemon() -> Iterator[Daemon]:
    base = tempfile.mkdtemp(prefix="netjail-test-cli-", dir="/run")
    os.chmod(base, 0o755)  # noqa: S103 - clients must reach the socket's directory
    d = start_daemon(base)
    yield d
    stop_daemon(d)
    jobs = d.job_ids()
    shutil.rmtree(base, ignore_errors=True)
    assert {n.removeprefix("netjail-") for n in netjail_netns()} & jobs == set()
    assert [c for c in netjail_job_cgroups() if os.path.basename(c) in jobs] == []
    assert processes_of_jobs(jobs) == []
    assert d.leftovers == []


def test_a_stopping_daemon_says_why_the_job_ended(own_daemon: Daemon) -> None:
    """When netjaild stops while a job runs, netjail says so in one line and exits 143."""
    cli = subprocess.Popen(
        [*NETJAIL, "run", "--cwd", "/", "--", "sh", "-c", "echo ready; sleep 20"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "NETJAIL_SOCKET": own_daemon.socket},
    )
    try:
        assert cli.stdout is not None
        assert cli.stdout.readline() == b"ready\n"
        own_daemon.process.send_signal(signal.SIGTERM)
        _, stderr = cli.communicate(timeout=WAIT_S * 3)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    assert cli.returncode == 143
    assert re.fullmatch(rb"netjail: job j-[0-9a-f]{8} ended: netjaild is stopping\n", stderr), (
        stderr
    )
