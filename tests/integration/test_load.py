"""The daemon under hostile load, for real: unread replies do not grow its memory, a connection
flood (at systemd's default fd limit) does not stop it, and argv up to the protocol's bound
reaches the job through the fork server. (bench/load.py measures throughput and concurrency.)"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import pytest

from netjail import Client
from netjail import protocol as p
from netjail.errors import BusyError, NetjailError, ProtocolError

from .conftest import Daemon, launch_daemon, start_daemon, stop_daemon, wait_until_ready

#: How much the daemon's RSS may grow under 300 unread ~150 KB replies: the outbox bound
#: (8 MiB), and as much again for what the allocator keeps of freed replies. Before the bound
#: the growth was 42 MB.
RSS_GROWTH_BOUND = 16 << 20


@pytest.fixture
def load_base() -> Iterator[str]:
    base = tempfile.mkdtemp(prefix="netjail-test-load-", dir="/run")
    os.chmod(base, 0o755)  # noqa: S103 - the unprivileged test client must reach the socket
    yield base
    shutil.rmtree(base, ignore_errors=True)


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        kib = next(line.split()[1] for line in f if line.startswith("VmRSS:"))
    return int(kib) * 1024


def until(predicate: object, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def hold_job(daemon: Daemon, argv: list[str]) -> socket.socket:
    """A connection whose job runs (once this returns) until the connection closes."""
    held = socket.socket(socket.AF_UNIX)
    held.connect(daemon.socket)
    held.settimeout(10)
    request = p.RunRequest(argv=argv, cwd="/", events=False)
    held.sendall(p.encode_message(p.Hello(version=1)) + p.encode_message(request))
    frames = p.FrameBuffer()
    replies: list[bytes] = []
    while len(replies) < 2:
        data = held.recv(65536)
        assert data, replies
        replies += frames.feed(data)
    assert isinstance(p.decode_reply(replies[1]), p.Started), replies[1]
    return held


def test_300_unread_ps_replies_keep_the_daemons_rss_within_its_bound(load_base: str) -> None:
    """With 20 jobs of 7 KB argv running (each ps reply ~150 KB), a client sends 300 ps and
    reads none: it is disconnected, and the daemon's RSS grows by less than 16 MiB."""
    daemon = start_daemon(load_base)
    holders: list[socket.socket] = []
    try:
        client = Client(daemon.socket, timeout=10)
        holders = [
            hold_job(daemon, ["sh", "-c", "sleep 100", f"{n:03d}" + "x" * 7000]) for n in range(20)
        ]
        assert len(client.ps()) == 20
        for _ in range(10):
            client.ps()  # read in full: whatever one reply costs the allocator is paid before
        before = rss(daemon.process.pid)
        flood = socket.socket(socket.AF_UNIX)
        flood.connect(daemon.socket)
        flood.settimeout(30)
        frames = p.encode_message(p.Hello(version=1)) + p.encode_message(p.PsRequest()) * 300
        # The daemon may hang up part way: what this test expects.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            flood.sendall(frames)
        until(lambda: "disconnected a client that does not read its replies" in daemon.log())
        after = rss(daemon.process.pid)
        flood.close()
        assert after - before < RSS_GROWTH_BOUND, (before, after)
        assert len(client.ps()) == 20  # and it serves on
    finally:
        for held in holders:
            held.close()
        stop_daemon(daemon)
    assert daemon.process.returncode == 0, daemon.log()


#: Opens N connections to the socket (each with hello, or idle) and holds them until stdin
#: closes; prints how many connected and how many answers of each kind came within 2 s.
FLOOD = """
import json, select, socket, sys, time
path, count = sys.argv[1], int(sys.argv[2])
held, refused = [], 0
for _ in range(count):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.setblocking(False)
    held.append(s)
time.sleep(2)
answers = {}
for s in held:
    try:
        data = s.recv(4096)
    except BlockingIOError:
        continue
    except OSError as e:
        data = repr(e).encode()
    key = "busy" if b'"code":"busy"' in data else (data[:80].decode(errors="replace") or "closed")
    answers[key] = answers.get(key, 0) + 1
print(json.dumps({"connected": len(held), "answers": answers}), flush=True)
sys.stdin.read()
"""


def flood(daemon: Daemon, count: int, user: pwd.struct_passwd | None) -> subprocess.Popen[str]:
    """A process (as ``user``, or root) holding ``count`` connections to the daemon."""
    prefix: list[str] = []
    if user is not None:
        prefix = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups"]
    return subprocess.Popen(
        [*prefix, sys.executable, "-c", FLOOD, daemon.socket, str(count)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def answered(process: subprocess.Popen[str]) -> dict[str, object]:
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line, "the flood process died"
    result: dict[str, object] = json.loads(line)
    return result


def end(process: subprocess.Popen[str]) -> None:
    assert process.stdin is not None
    process.stdin.close()
    process.wait(30)


def test_a_connection_flood_at_1024_fds_leaves_the_daemon_serving(
    load_base: str, test_user: pwd.struct_passwd
) -> None:
    """Against a daemon limited to 1,024 fds: 1,100 idle connections from one user get 64
    served and the rest a busy error; 1,100 from root exhaust the fds, and the daemon turns
    the waiting ones away busy, logs it once, answers status throughout and after, and
    accepts again once they are gone."""
    daemon = launch_daemon(load_base, prefix=["prlimit", "--nofile=1024:1024", "--"])
    wait_until_ready(daemon)
    status = Client(daemon.socket, timeout=10)
    try:
        by_user = flood(daemon, 1100, test_user)
        result = answered(by_user)
        # The 64 served wait for their hello (nothing yet); every other one was refused.
        assert result == {"connected": 1100, "answers": {"busy": 1100 - 64}}
        assert status.status().pid == daemon.process.pid
        end(by_user)

        by_root = flood(daemon, 1100, None)
        answered(by_root)
        # While every fd is taken, a client is answered, not left hanging: served or busy.
        try:
            reply: object = status.status().pid
        except BusyError as e:
            reply = str(e)
        assert reply in (
            daemon.process.pid,
            "netjaild is out of file descriptors; try again shortly",
        )
        end(by_root)
        until(lambda: _status_ok(status, daemon))
        log = daemon.log()
        assert log.count("cannot accept connections (out of fds or memory)") >= 1
        assert "accepting connections again" in log
        assert log.count("refused a connection over the per-uid limit") == 1
        assert daemon.process.poll() is None
    finally:
        stop_daemon(daemon)
    assert daemon.process.returncode == 0, daemon.log()


def _status_ok(client: Client, daemon: Daemon) -> bool:
    try:
        return client.status().pid == daemon.process.pid
    except NetjailError:
        return False


def test_argv_up_to_the_exec_bound_reaches_the_job_and_past_it_is_refused(
    daemon: Daemon, no_leaks: None
) -> None:
    """A command line of exactly MAX_EXEC_BYTES goes through the fork server and exec; one byte
    more is refused at the protocol layer, by the client and by the daemon, with the bound."""
    fixed = ["sh", "-c", 'printf %s "$1$2" | wc -c', "sh"]
    filler = p.MAX_EXEC_BYTES - p.exec_size([*fixed, "", ""], {})
    # Two halves: one string may hold at most 65,536 characters.
    halves = ["x" * (filler // 2), "y" * (filler - filler // 2)]
    result = daemon.client().run([*fixed, *halves], cwd="/", stdio="capture")
    assert result.exit_code == 0, result.report
    assert result.stdout == f"{filler}\n".encode()
    over = [*fixed, halves[0], halves[1] + "y"]
    with pytest.raises(ProtocolError, match=f"must be under {p.MAX_EXEC_BYTES} bytes"):
        daemon.client().run(over, cwd="/")
    raw = socket.socket(socket.AF_UNIX)
    raw.connect(daemon.socket)
    raw.settimeout(10)
    request = {"op": "run", "argv": over, "cwd": "/"}
    raw.sendall(b'{"op":"hello","version":1}\n' + json.dumps(request).encode() + b"\n")
    replies = b""
    while replies.count(b"\n") < 2:
        chunk = raw.recv(65536)
        assert chunk, replies
        replies += chunk
    raw.close()
    error = json.loads(replies.splitlines()[1])
    assert error == {
        "op": "error",
        "code": "protocol",
        "message": f"argv and env together must be under {p.MAX_EXEC_BYTES} bytes (as execve "
        f"counts them: each string, its NUL and its pointer); these are {p.MAX_EXEC_BYTES + 1}",
        "exit_code": None,
    }


def test_concurrent_starts_with_large_command_lines_all_start(
    daemon: Daemon, no_leaks: None
) -> None:
    """20 jobs with 7 KB command lines, asked for at once, all start: none is refused for the
    fork server's channel being full."""
    sockets = []
    for n in range(20):
        s = socket.socket(socket.AF_UNIX)
        s.connect(daemon.socket)
        s.settimeout(15)
        request = p.RunRequest(argv=["sh", "-c", "exit 0", f"{n:03d}" + "x" * 7000], cwd="/")
        s.sendall(p.encode_message(p.Hello(version=1)) + p.encode_message(request))
        sockets.append(s)
    kinds = []
    for s in sockets:
        frames, replies = p.FrameBuffer(), []
        while len(replies) < 2:
            data = s.recv(65536)
            if not data:
                break
            replies += frames.feed(data)
        kinds.append(type(p.decode_reply(replies[1])).__name__ if len(replies) > 1 else "none")
        s.close()
    assert kinds == ["Started"] * 20


def test_past_max_jobs_a_job_is_refused_busy_and_the_daemon_serves_on(load_base: str) -> None:
    """With max_jobs = 2 and two jobs running, a third gets the busy error naming max_jobs; the
    daemon goes on answering, and once a job has ended a new one runs."""
    daemon = start_daemon(load_base, config_extra="max_jobs = 2\n")
    holders: list[socket.socket] = []
    try:
        client = Client(daemon.socket, timeout=10)
        holders = [hold_job(daemon, ["sleep", "100"]) for _ in range(2)]
        with pytest.raises(BusyError) as busy:
            client.run(["true"], cwd="/")
        assert str(busy.value) == (
            "netjaild is running as many jobs as it may at once (2, its max_jobs); try again "
            "when one has ended"
        )
        assert client.status().jobs_running == 2
        holders.pop().close()  # its job is killed with its connection
        until(lambda: len(client.ps()) < 2)
        assert client.run(["true"], cwd="/").exit_code == 0
    finally:
        for held in holders:
            held.close()
        stop_daemon(daemon)
    assert daemon.process.returncode == 0, daemon.log()
