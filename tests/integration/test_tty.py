"""A job with a pty of its own (stdio "tty"), through the library against the real daemon: the
pty comes from the jail's devpts, it is the job's controlling terminal, its size is the one
asked for and follows resizes, and TIOCSTI on it is refused."""

from __future__ import annotations

import os
import select
import time
from collections.abc import Iterator

import pytest

from netjail import Client
from netjail import protocol as p
from netjail.client import RunningJob

pytestmark = pytest.mark.usefixtures("no_leaks")

WAIT_S = 10.0


def _start(client: Client, script: str, rows: int = 24, cols: int = 80) -> RunningJob:
    request = p.RunRequest(
        argv=["sh", "-c", script],
        cwd="/",
        stdio="tty",
        window=p.WindowSize(rows=rows, cols=cols),
        events=False,
    )
    return client.start(request)


def _read_until(job: RunningJob, text: bytes, seen: bytearray) -> None:
    assert job.terminal is not None
    deadline = time.monotonic() + WAIT_S
    while text not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {text!r} in {bytes(seen)!r}"
        if select.select([job.terminal], [], [], left)[0]:
            try:
                chunk = os.read(job.terminal, 4096)
            except OSError:  # EIO: the job's side is closed
                chunk = b""
            assert chunk, f"the pty closed before {text!r}: {bytes(seen)!r}"
            seen += chunk


def _output(job: RunningJob) -> tuple[bytes, p.Exit]:
    """Everything the job writes to its pty until it ends, and its exit message."""
    assert job.terminal is not None
    out = bytearray()
    os.set_blocking(job.terminal, False)
    deadline = time.monotonic() + WAIT_S
    exit_message: p.Exit | None = None
    pty_open = True
    while exit_message is None or pty_open:
        assert time.monotonic() < deadline, bytes(out)
        waits = [job, job.terminal] if pty_open else [job]
        ready = select.select(waits, [], [], 0.5)[0]
        if job.terminal in ready:
            try:
                chunk = os.read(job.terminal, 4096)
            except BlockingIOError:
                chunk = b"?"
            except OSError:
                chunk = b""
            if chunk:
                out += chunk
            else:
                pty_open = False
        if job in ready or job.buffered:
            for message in job.receive():
                if isinstance(message, p.Exit):
                    exit_message = message
    return bytes(out), exit_message


@pytest.fixture
def jobs(client: Client) -> Iterator[list[RunningJob]]:
    started: list[RunningJob] = []
    yield started
    for job in started:
        job.close()


def test_the_job_gets_a_pty_of_its_jail_as_its_controlling_terminal(
    client: Client, jobs: list[RunningJob]
) -> None:
    """stdin, stdout and stderr are one pty of the jail's own devpts (its path exists in the
    job's /dev), the job's controlling terminal, with the job in its foreground group."""
    script = (
        "t=$(tty); echo tty=$t; test -c $t && echo exists;"
        " test -t 1 && test -t 2 && echo all-terminals;"
        " stty size; ps -o stat= -p $$; ls /dev/pts"
    )
    job = _start(client, script, rows=31, cols=97)
    jobs.append(job)
    out, exit_message = _output(job)
    lines = out.decode().split("\r\n")
    assert exit_message.report.exit_code == 0, out
    assert lines[0] == "tty=/dev/pts/0"
    assert lines[1:4] == ["exists", "all-terminals", "31 97"]
    # ps's "+": the process is in the foreground process group of its controlling terminal.
    assert "+" in lines[4], lines[4]
    assert lines[5].split() == ["0", "ptmx"]


def test_a_resize_reaches_the_job_with_sigwinch(client: Client, jobs: list[RunningJob]) -> None:
    """RunningJob.resize gives the pty its new size, and the job's foreground group gets
    SIGWINCH from the kernel."""
    script = "trap 'stty size; exit 0' WINCH; echo ready; while :; do sleep 0.05; done"
    job = _start(client, script, rows=20, cols=70)
    jobs.append(job)
    seen = bytearray()
    _read_until(job, b"ready", seen)
    job.resize(44, 132)
    out, exit_message = _output(job)
    assert exit_message.report.exit_code == 0
    assert b"44 132" in out


def test_ctrl_c_on_the_pty_interrupts_the_foreground_job(
    client: Client, jobs: list[RunningJob]
) -> None:
    """^C written to the master is SIGINT to the job's foreground group: the job ends by it."""
    job = _start(client, "echo ready; exec sleep 20")
    jobs.append(job)
    seen = bytearray()
    _read_until(job, b"ready", seen)
    assert job.terminal is not None
    os.write(job.terminal, b"\x03")
    _out, exit_message = _output(job)
    assert exit_message.report.signal == 2


def test_tiocsti_on_the_jobs_own_pty_is_refused(client: Client, jobs: list[RunningJob]) -> None:
    """TIOCSTI, which would type into the terminal, fails with EPERM (the seccomp filter),
    even on the job's own pty."""
    script = (
        "import errno, fcntl, termios\n"
        "try:\n"
        "    fcntl.ioctl(0, termios.TIOCSTI, b'x')\n"
        "    print('typed')\n"
        "except OSError as e:\n"
        "    print(errno.errorcode[e.errno])\n"
    )
    request = p.RunRequest(
        argv=["/usr/bin/python3", "-c", script], cwd="/", stdio="tty", events=False
    )
    job = client.start(request)
    jobs.append(job)
    out, exit_message = _output(job)
    assert exit_message.report.exit_code == 0
    assert out.split(b"\r\n")[0] == b"EPERM"


def test_a_tty_job_holds_only_its_pty(client: Client, jobs: list[RunningJob]) -> None:
    """A job with a pty holds fds 0-2 (and ls's own directory fd), not its init's socket."""
    job = _start(client, "ls /proc/self/fd | tr '\\n' ' '; echo END")
    jobs.append(job)
    out, exit_message = _output(job)
    assert exit_message.report.exit_code == 0, out
    fds = {int(n) for n in out.decode(errors="replace").split("END")[0].split()}
    assert fds <= {0, 1, 2, 3}, out
