"""No netjail command ever prints a traceback: each subcommand, given bad input (a bad socket, a
daemon that speaks nonsense, bad arguments, files it cannot write, closed stdio), fails with
one line, never "Traceback"."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.test_cli import _netjail as netjail_cli

#: Every subcommand, with arguments that are valid as far as the command line goes.
COMMANDS = {
    "run": ["run", "--", "true"],
    "events": ["events"],
    "events-follow": ["events", "--follow"],
    "ps": ["ps"],
    "kill": ["kill", "j-0123abcd"],
    "status": ["status"],
    "doctor": ["doctor", "--json"],
}

#: Bad command lines, each for one subcommand (and the group itself).
BAD_ARGS = [
    ["--nosuch"],
    ["nosuch"],
    ["run"],
    ["run", "--memory", "12Q", "true"],
    ["run", "--memory", "1", "true"],
    ["run", "--cpus", "-1", "true"],
    ["run", "--cpus", "nan", "true"],
    ["run", "--timeout", "forever", "true"],
    ["run", "--timeout", "9" * 5000, "true"],
    ["run", "--pids", "0", "true"],
    ["run", "--uid", "-1", "true"],
    ["run", "--uid", "root", "true"],
    ["run", "--env", "NOEQUALS", "true"],
    ["run", "--bind", "relative/path", "true"],
    ["run", "--ro-bind", "/a:relative", "true"],
    ["run", "--hostname", "bad name!", "true"],
    ["run", "--allow", "*", "true"],
    ["run", "--events", "fd:", "true"],
    ["run", "--events", "fd:99999999999999999999", "true"],
    ["run", "--report", "/", "true"],
    ["run", "--report", "/nonexistent/r.json", "true"],
    ["run", "--events", "/proc/self/nosuch/x", "true"],
    ["run", "--", *["x" * 2000] * 70],
    ["kill"],
    ["kill", "j-1", "--signal", "NOPE"],
    ["kill", "j-1", "--signal", "0"],
    ["kill", "j-1", "--signal", "99999999999999999999999"],
    ["kill", "j-1", "--signal", "-9"],
    ["events", "--job"],
    ["ps", "extra"],
    ["status", "--nosuch"],
]


def _assert_no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode != 0 or result.stderr == ""


class Server:
    """A Unix socket that answers every connection with the same bytes, then closes it."""

    def __init__(self, path: str, answer: bytes) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen()
        self.listener.settimeout(0.05)
        self.answer = answer
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                try:
                    conn.sendall(self.answer)
                    conn.shutdown(socket.SHUT_WR)
                    conn.settimeout(2)
                    while conn.recv(1 << 16):
                        pass
                except OSError:
                    continue

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.listener.close()


#: What a socket that is not netjaild's may answer.
ANSWERS = {
    "silence": b"",
    "garbage": b"\x00\xffnot json at all\n",
    "json-but-not-ours": b'{"op": "nosuch"}\n',
    "wrong-first-reply": b'{"op": "killed", "job": "j-1"}\n',
    "hello-then-garbage": b'{"op": "hello", "version": 1, "daemon": "x"}\n[1, 2\n',
    "hello-then-close": b'{"op": "hello", "version": 1, "daemon": "x"}\n',
}


@pytest.fixture(params=list(ANSWERS))
def bad_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    path = str(tmp_path_factory.mktemp("b") / "s.sock")
    server = Server(path, ANSWERS[request.param])
    yield path
    server.close()


@pytest.mark.parametrize("command", list(COMMANDS))
def test_no_daemon_no_traceback(command: str, tmp_path: Path) -> None:
    """Missing socket, a directory, a regular file, a path too long: one line each."""
    regular = tmp_path / "file"
    regular.write_text("")
    for path in (str(tmp_path / "missing.sock"), str(tmp_path), str(regular), "/" + "x" * 200):
        result = netjail_cli(path, *COMMANDS[command])
        _assert_no_traceback(result)
        if command != "doctor":
            assert result.returncode == 125
            assert result.stderr.count("\n") == 1, result.stderr


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_daemon_speaking_nonsense_no_traceback(command: str, bad_server: str) -> None:
    """A socket whose server is not netjaild (or breaks mid-way) gives one line, no trace."""
    result = netjail_cli(bad_server, *COMMANDS[command])
    _assert_no_traceback(result)
    if command != "doctor":
        assert result.returncode == 125
        assert result.stderr.startswith("netjail: ")


@pytest.mark.parametrize("args", BAD_ARGS, ids=lambda a: " ".join(a)[:40])
def test_bad_arguments_no_traceback(args: list[str], tmp_path: Path) -> None:
    """Bad options, values, rules, paths and signals are one error, never a traceback."""
    result = netjail_cli(str(tmp_path / "missing.sock"), *args)
    _assert_no_traceback(result)
    assert result.returncode in (2, 125), result.stderr


@pytest.mark.parametrize("command", list(COMMANDS))
def test_closed_stdio_no_traceback(command: str, tmp_path: Path) -> None:
    """Started with stdin, stdout and stderr closed, no command dies of an exception."""
    path = str(tmp_path / "missing.sock")
    env = {k: v for k, v in os.environ.items() if k != "NETJAIL_SOCKET"}
    # The exception hook writes to a copy of the test's pipe, which stays open when 0-2 close.
    script = (
        "import os, runpy, sys\n"
        "out = os.dup(2)\n"
        "def hook(kind, value, tb):\n"
        "    os.write(out, f'Traceback: {value!r}'.encode())\n"
        "    os._exit(99)\n"
        "sys.excepthook = hook\n"
        "for fd in (0, 1, 2): os.close(fd)\n"
        f"sys.argv = ['netjail', '--socket', {path!r}, *{COMMANDS[command]!r}]\n"
        "runpy.run_module('netjail.cli', run_name='__main__')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert "Traceback" not in result.stderr, result.stderr
    # What the command said went nowhere (its stderr was closed): only how it ended is seen.
    assert result.returncode in (0, 1, 125), result.returncode


def test_a_deleted_working_directory_no_traceback(tmp_path: Path) -> None:
    """`netjail run` from a directory that was removed says so in one line."""
    gone = tmp_path / "gone"
    gone.mkdir()
    script = (
        "import os, runpy, sys\n"
        f"os.chdir({str(gone)!r}); os.rmdir({str(gone)!r})\n"
        f"sys.argv = ['netjail', '--socket', {str(tmp_path / 'missing.sock')!r}, 'run', 'true']\n"
        "runpy.run_module('netjail.cli', run_name='__main__')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    _assert_no_traceback(result)
    assert result.returncode == 125
    assert result.stderr == (
        "netjail: the current directory cannot be used (No such file or directory): "
        "cd elsewhere or use --cwd DIR\n"
    )


@pytest.mark.parametrize("command", ["doctor", "ps", "status", "--help", "--version"])
def test_a_broken_stdout_pipe_no_traceback(command: str, tmp_path: Path) -> None:
    """`netjail doctor | head -1`: a reader gone before netjail writes ends it quietly."""
    missing = str(tmp_path / "missing.sock")
    r, w = os.pipe()
    os.close(r)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "netjail.cli", "--socket", missing, command],
            stdin=subprocess.DEVNULL,
            stdout=w,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(w)
    assert "Traceback" not in result.stderr, result.stderr
