"""Tests for the netjail CLI, run as a subprocess against a fake daemon on a temporary socket.

The fake speaks the wire protocol from a thread: it answers hello, records each request (and how
many file descriptors came with it, which it closes), and replies with a scripted list of
messages. The CLI runs as a real process because ``run`` passes its fds 0-2 and installs signal
handlers, which an in-process runner would share with pytest. Only ``format_event``, which is
pure, is also called in-process, at the end, for every line shape it produces.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest

from netjail import protocol as p
from netjail.eventview import format_event

JOB = "j-0123abcd"
NOBODY = 65534


def _event(
    dst: str, port: int | None, *, proto: str = "tcp", family: int = 4, count: int = 1
) -> dict[str, Any]:
    return {
        "job": JOB,
        "time": "2026-01-01T00:00:00.000Z",
        "kind": "egress",
        "verdict": "blocked",
        "proto": proto,
        "family": family,
        "dst": dst,
        "port": port,
        "uid": NOBODY,
        "count": count,
        "via": "nflog",
    }


EV_TCP4 = _event("203.0.113.9", 443)
EV_TCP6 = _event("2001:db8::1", 443, family=6)
EV_ICMP = _event("203.0.113.9", None, proto="icmp")


def _report(**overrides: Any) -> dict[str, Any]:
    report: dict[str, Any] = {
        "job": JOB,
        "argv": ["echo", "hi"],
        "uid": NOBODY,
        "gid": NOBODY,
        "exit_code": 0,
        "signal": None,
        "wall_s": 0.5,
        "events": [EV_TCP4, EV_TCP6],
        "lost_events": 0,
        "limits": {
            "memory_bytes": None,
            "cpus": None,
            "pids": None,
            "timeout_s": None,
            "kill_grace_s": 2.0,
        },
    }
    report.update(overrides)
    return report


def _run_script(report: dict[str, Any], events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"op": "started", "job": JOB, "pid": 4242},
        *({"op": "event", "event": e} for e in events),
        {"op": "exit", "report": report},
    ]


@dataclass
class Received:
    """A request the fake daemon got, decoded strictly, with its raw JSON and fd count."""

    request: p.Request
    raw: dict[str, Any]
    fds: int


@dataclass
class FakeDaemon:
    """A protocol-speaking stand-in for netjaild; replies to each op with a script.

    Besides messages, a script may hold steps for the fake itself: ``{"op": "_hold"}`` waits
    until ``release`` is set, ``{"op": "_write", "fd": 2, "data": "..."}`` writes to one of the
    fds the request brought (as the job would), ``{"op": "_close_fds"}`` closes them (as the
    job's end does), ``{"op": "_sleep", "s": 0.1}`` pauses, and ``{"op": "_batch", "messages":
    [...]}`` sends several messages in one write.
    """

    path: str
    script: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    hellos: list[p.Request] = field(default_factory=list)
    failures: list[BaseException] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    #: Set once a request has been received (and recorded).
    got_request: threading.Event = field(default_factory=threading.Event)

    def serve(self, listener: socket.socket, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        fds: list[int] = []
        with conn:
            conn.settimeout(10)
            try:
                frames = _FrameReader(conn)
                hello, _ = frames.next()
                self.hellos.append(p.decode_request(hello))
                _send(conn, {"op": "hello", "version": 1, "daemon": "fake"})
                frame, fds = frames.next()
                request = p.decode_request(frame)
                raw = json.loads(frame)
                self.received.append(Received(request, raw, len(fds)))
                self.got_request.set()
                for message in self.script.get(raw["op"], []):
                    self._step(conn, message, fds)
                # As netjaild does: half-close, then wait for the client to hang up. Closing
                # outright could race the client's last send and turn our reply into EPIPE.
                conn.shutdown(socket.SHUT_WR)
                while conn.recv(1 << 16):
                    pass
            except Exception as e:  # reported by the fixture rather than lost in this thread
                self.failures.append(e)
            finally:
                _close_all(fds)

    def _step(self, conn: socket.socket, message: dict[str, Any], fds: list[int]) -> None:
        match message["op"]:
            case "_hold":
                if not self.release.wait(20):
                    raise TimeoutError("the test never released the fake daemon")
            case "_write":
                os.write(fds[message["fd"]], message["data"].encode())
            case "_close_fds":
                _close_all(fds)
            case "_sleep":
                time.sleep(message["s"])
            case "_batch":
                conn.sendall(b"".join(json.dumps(m).encode() + b"\n" for m in message["messages"]))
            case _:
                _send(conn, message)


def _close_all(fds: list[int]) -> None:
    while fds:
        os.close(fds.pop())


class _FrameReader:
    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.buffer = p.FrameBuffer()
        self.frames: list[tuple[bytes, list[int]]] = []

    def next(self) -> tuple[bytes, list[int]]:
        fds: list[int] = []
        while not self.frames:
            data, ancdata, _flags, _addr = self.conn.recvmsg(
                1 << 16, socket.CMSG_SPACE(p.MAX_FDS * 4)
            )
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    received = array.array("i")
                    received.frombytes(payload[: len(payload) - len(payload) % 4])
                    fds.extend(received)
            if not data:
                _close_all(fds)
                raise ConnectionError("client closed the connection")
            self.frames.extend((frame, []) for frame in self.buffer.feed(data))
            if self.frames and fds:
                self.frames[0] = (self.frames[0][0], fds)
        return self.frames.pop(0)


def _send(conn: socket.socket, message: dict[str, Any]) -> None:
    conn.sendall(json.dumps(message).encode() + b"\n")


@contextlib.contextmanager
def fake_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeDaemon]:
    """A FakeDaemon serving on a fresh socket until the block ends."""
    # tmp_path_factory keeps the path short: a Unix socket path must fit in 108 bytes.
    path = str(tmp_path_factory.mktemp("s") / "d.sock")
    fake = FakeDaemon(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    listener.settimeout(0.05)
    stop = threading.Event()
    thread = threading.Thread(target=fake.serve, args=(listener, stop), daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        fake.release.set()
        stop.set()
        thread.join(5)
        listener.close()
    assert fake.failures == []


@pytest.fixture
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeDaemon]:
    with fake_daemon(tmp_path_factory) as fake:
        yield fake


def _netjail(socket_path: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "NETJAIL_SOCKET"}
    return subprocess.run(
        [sys.executable, "-m", "netjail.cli", "--socket", socket_path, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def _run(
    daemon: FakeDaemon, report: dict[str, Any], *args: str
) -> subprocess.CompletedProcess[str]:
    daemon.script["run"] = _run_script(report, [])
    return _netjail(daemon.path, "run", *args, "--", "echo", "hi")


# --- run: the request ----------------------------------------------------------------------


def test_run_sends_the_request_with_its_options_and_three_fds(daemon: FakeDaemon) -> None:
    """run sends hello, then one run request carrying the options and fds 0-2."""
    daemon.script["run"] = _run_script(_report(), [])
    result = _netjail(
        daemon.path,
        "run",
        "--env",
        "A=1",
        "--cwd",
        "/tmp",
        "--timeout",
        "30s",
        "--memory",
        "64M",
        "--",
        "echo",
        "hi",
    )
    assert result.returncode == 0, result.stderr
    assert len(daemon.hellos) == 1
    assert isinstance(daemon.hellos[0], p.Hello)
    assert daemon.hellos[0].version == p.PROTOCOL_VERSION
    [received] = daemon.received
    request = received.request
    assert isinstance(request, p.RunRequest)
    assert request.argv == ["echo", "hi"]
    assert request.env == {"A": "1"}
    assert request.cwd == "/tmp"
    assert request.stdio == "fds"
    assert request.timeout_s == 30.0
    assert request.memory_bytes == 67108864
    assert request.events is True
    assert (request.uid, request.gid, request.cpus, request.pids) == (None, None, None, None)
    assert received.fds == 3


def test_run_defaults_cwd_to_the_current_directory(daemon: FakeDaemon, tmp_path: Path) -> None:
    """Without --cwd the job runs in the directory netjail was started in."""
    daemon.script["run"] = _run_script(_report(), [])
    subprocess.run(
        [sys.executable, "-m", "netjail.cli", "--socket", daemon.path, "run", "true"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        cwd=tmp_path,
        timeout=60,
        check=True,
    )
    [received] = daemon.received
    assert isinstance(received.request, p.RunRequest)
    assert received.request.cwd == str(tmp_path)


def test_run_passes_options_after_the_command_to_the_command(daemon: FakeDaemon) -> None:
    """Options after the command's name belong to the command, as with sudo or timeout."""
    daemon.script["run"] = _run_script(_report(), [])
    result = _netjail(daemon.path, "run", "ls", "-l")
    assert result.returncode == 0, result.stderr
    [received] = daemon.received
    assert isinstance(received.request, p.RunRequest)
    assert received.request.argv == ["ls", "-l"]


def test_run_rejects_a_bad_memory_size_as_a_usage_error(daemon: FakeDaemon) -> None:
    """--memory 12Q is a usage error (exit 2) that says what a size looks like."""
    result = _netjail(daemon.path, "run", "--memory", "12Q", "--", "echo", "hi")
    assert result.returncode == 2
    assert "Invalid value for '--memory'" in result.stderr
    assert "use a number with an optional K, M, G or T suffix, e.g. 512M" in result.stderr
    assert daemon.received == []


def test_run_rejects_env_without_equals(daemon: FakeDaemon) -> None:
    """--env without K=V is refused before anything is sent."""
    result = _netjail(daemon.path, "run", "--env", "A", "--", "true")
    assert result.returncode == 2
    assert "expected K=V" in result.stderr
    assert daemon.received == []


# --- run: exit status ----------------------------------------------------------------------


def test_run_passes_the_exit_code_through(daemon: FakeDaemon) -> None:
    """The job's exit code becomes netjail's."""
    result = _run(daemon, _report(exit_code=3), "--quiet")
    assert result.returncode == 3
    assert result.stderr == ""


def test_run_killed_by_signal_exits_128_plus_signal(daemon: FakeDaemon) -> None:
    """A job killed by signal 9 makes netjail exit 137, as a shell does."""
    result = _run(daemon, _report(exit_code=None, signal=9), "--quiet")
    assert result.returncode == 137


def test_run_timeout_exits_124_and_says_so(daemon: FakeDaemon) -> None:
    """A job killed by --timeout exits 124 with one line naming the job and the limit."""
    limits = {**_report()["limits"], "timeout_s": 1.0}
    report = _report(exit_code=None, signal=9, timed_out=True, limits=limits)
    result = _run(daemon, report, "--quiet")
    assert result.returncode == 124
    assert result.stderr == f"netjail: job {JOB} killed: timeout 1s reached\n"


def test_run_oom_exits_137_and_names_the_limit(daemon: FakeDaemon) -> None:
    """A job killed for its memory limit exits 137 with one line naming the limit."""
    limits = {**_report()["limits"], "memory_bytes": 64 << 20}
    report = _report(exit_code=None, signal=9, oom_killed=True, limits=limits)
    result = _run(daemon, report, "--quiet")
    assert result.returncode == 137
    assert result.stderr == f"netjail: job {JOB} killed: memory limit 64M reached\n"


def test_run_reports_lost_events(daemon: FakeDaemon) -> None:
    """Events the daemon could not keep are mentioned on stderr."""
    result = _run(daemon, _report(lost_events=3), "--quiet")
    assert result.returncode == 0
    assert result.stderr == "netjail: 3 events lost (see the report)\n"


# --- run: events and report ----------------------------------------------------------------


def test_run_prints_each_event_on_stderr(daemon: FakeDaemon) -> None:
    """Each streamed event is one stderr line; IPv6 with a port in brackets, ICMP without; then
    the summary of what was blocked."""
    events = [EV_TCP4, EV_TCP6, EV_ICMP]
    daemon.script["run"] = _run_script(_report(events=events), events)
    result = _netjail(daemon.path, "run", "--", "echo", "hi")
    assert result.returncode == 0
    assert result.stderr.splitlines() == [
        "netjail: blocked tcp 203.0.113.9:443 uid=65534",
        "netjail: blocked tcp [2001:db8::1]:443 uid=65534",
        "netjail: blocked icmp 203.0.113.9 uid=65534",
        "netjail: blocked 3 destinations: 203.0.113.9:443 (x1), [2001:db8::1]:443 (x1), "
        "203.0.113.9 (x1)",
    ]


def test_run_event_line_shows_count_and_sanitized_domain(daemon: FakeDaemon) -> None:
    """A folded event shows its count, and a job-supplied domain cannot forge lines."""
    event = {**_event("203.0.113.9", 443, count=4), "domain": "evil\n.example"}
    daemon.script["run"] = _run_script(_report(events=[event]), [event])
    result = _netjail(daemon.path, "run", "--", "echo", "hi")
    assert result.stderr.splitlines()[0] == (
        "netjail: blocked tcp evil?.example (203.0.113.9):443 uid=65534 x4"
    )


def test_run_quiet_suppresses_events(daemon: FakeDaemon) -> None:
    """--quiet prints no event lines."""
    daemon.script["run"] = _run_script(_report(), [EV_TCP4, EV_TCP6, EV_ICMP])
    result = _netjail(daemon.path, "run", "--quiet", "--", "echo", "hi")
    assert result.returncode == 0
    assert result.stderr == ""


def test_run_writes_the_report_as_json(daemon: FakeDaemon, tmp_path: Path) -> None:
    """--report FILE holds the job's report as JSON."""
    path = tmp_path / "report.json"
    report = _report(exit_code=3)
    result = _run(daemon, report, "--quiet", "--report", str(path))
    assert result.returncode == 3
    written = json.loads(path.read_text())
    for key in ("job", "argv", "uid", "exit_code", "signal", "wall_s", "events", "lost_events"):
        assert written[key] == report[key], key
    assert written["events"][1]["dst"] == "2001:db8::1"


def test_run_writes_the_report_to_stdout_with_a_dash(daemon: FakeDaemon) -> None:
    """--report - prints the JSON report on stdout (no file named '-')."""
    result = _run(daemon, _report(exit_code=0), "--quiet", "--report", "-")
    assert result.returncode == 0
    assert json.loads(result.stdout)["job"] == JOB
    assert not os.path.exists("-")


def test_run_refuses_an_unwritable_report_path_before_the_job(daemon: FakeDaemon) -> None:
    """A bad --report path is one line, exit 125, and no run request is sent."""
    daemon.received.clear()
    result = _run(daemon, _report(), "--report", "/nonexistent/r.json")
    assert result.returncode == 125
    assert result.stderr == ("netjail: --report /nonexistent/r.json: No such file or directory\n")
    assert "Traceback" not in result.stderr
    assert [r.raw["op"] for r in daemon.received if r.raw["op"] == "run"] == []


def test_report_to_dict_is_its_json_as_plain_data() -> None:
    """Report.to_dict gives the same data as the report's JSON, captured bytes as base64."""
    report = p.Report(
        job=JOB,
        argv=["echo"],
        uid=1,
        gid=1,
        exit_code=0,
        signal=None,
        wall_s=0.1,
        events=[],
        lost_events=0,
        stdout=b"hi\n",
    )
    data = report.to_dict()
    assert data == json.loads(msgspec.json.encode(report))
    assert data["stdout"] == "aGkK"
    assert data["domains"] == {}


# --- errors --------------------------------------------------------------------------------


def test_error_reply_exits_125_with_its_message(daemon: FakeDaemon) -> None:
    """A daemon error becomes exit 125 and exactly one stderr line with its message."""
    daemon.script["run"] = [{"op": "error", "code": "request", "message": "nope"}]
    result = _netjail(daemon.path, "run", "--", "echo", "hi")
    assert result.returncode == 125
    assert result.stderr == "netjail: nope\n"


def test_error_reply_with_exit_code_passes_it_through(daemon: FakeDaemon) -> None:
    """An error for a command that could not be executed exits with the given status."""
    daemon.script["run"] = [
        {"op": "error", "code": "exec", "message": "nosuch: not found", "exit_code": 127}
    ]
    result = _netjail(daemon.path, "run", "--", "nosuch")
    assert result.returncode == 127
    assert result.stderr == "netjail: nosuch: not found\n"


def test_error_reply_message_is_sanitized(daemon: FakeDaemon) -> None:
    """An error message with escape sequences is printed as one clean line."""
    daemon.script["run"] = [{"op": "error", "code": "request", "message": "a\x1b[2Jb"}]
    result = _netjail(daemon.path, "run", "--", "echo", "hi")
    assert result.returncode == 125
    assert result.stderr == "netjail: a?[2Jb\n"


def test_unreachable_daemon_exits_125_with_one_line(tmp_path: Path) -> None:
    """With no daemon on the socket, netjail exits 125 with one line and no traceback."""
    path = str(tmp_path / "missing.sock")
    result = _netjail(path, "run", "--", "echo", "hi")
    assert result.returncode == 125
    assert result.stderr == (
        f"netjail: cannot connect to {path}: No such file or directory (is netjaild running?)\n"
    )


def test_unreachable_daemon_for_ps_exits_125(tmp_path: Path) -> None:
    """The other commands fail the same way when there is no daemon."""
    result = _netjail(str(tmp_path / "missing.sock"), "ps")
    assert result.returncode == 125
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("netjail: cannot connect to ")


def test_daemon_closing_early_exits_125(daemon: FakeDaemon) -> None:
    """A daemon that closes the connection mid-job is a one-line netjail failure."""
    daemon.script["run"] = [{"op": "started", "job": JOB, "pid": 1}]
    result = _netjail(daemon.path, "run", "--", "echo", "hi")
    assert result.returncode == 125
    assert result.stderr == "netjail: netjaild closed the connection\n"


# --- ps, status, kill, events --------------------------------------------------------------


def test_ps_json(daemon: FakeDaemon) -> None:
    """ps --json prints the daemon's job list as JSON."""
    jobs = [
        {
            "job": JOB,
            "argv": ["sleep", "9"],
            "uid": NOBODY,
            "gid": NOBODY,
            "pid": 4242,
            "owner_uid": 1000,
            "started": "2026-01-01T00:00:00.000Z",
            "events": 2,
        }
    ]
    daemon.script["ps"] = [{"op": "ps", "jobs": jobs}]
    result = _netjail(daemon.path, "ps", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == jobs
    assert daemon.received[0].request == p.PsRequest()


def test_ps_table_sanitizes_argv(daemon: FakeDaemon) -> None:
    """ps's table shows the job's command on one line, control characters replaced."""
    job = {
        "job": JOB,
        "argv": ["sh", "-c", "x\ny"],
        "uid": NOBODY,
        "gid": NOBODY,
        "pid": None,
        "owner_uid": 0,
        "started": "2026-01-01T00:00:00.000Z",
        "events": 0,
    }
    daemon.script["ps"] = [{"op": "ps", "jobs": [job]}]
    result = _netjail(daemon.path, "ps")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    assert lines[1].startswith(JOB)
    assert lines[1].endswith("sh -c x?y")


def test_status_json(daemon: FakeDaemon) -> None:
    """status --json prints the daemon's status as JSON."""
    status = {
        "version": "0.1.0",
        "pid": 1,
        "uptime_s": 12.5,
        "jobs_running": 1,
        "jobs_total": 7,
        "events_seen": 30,
        "events_lost": 0,
        "cgroup_mode": "delegated",
    }
    daemon.script["status"] = [{"op": "status", **status}]
    result = _netjail(daemon.path, "status", "--json")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert {key: printed.get(key) for key in status} == status
    assert daemon.received[0].request == p.StatusRequest()


def test_status_says_how_the_fork_server_is(daemon: FakeDaemon) -> None:
    """status prints the fork server's state, its restarts and how the last one ended."""
    status = {
        "version": "0.1.0",
        "pid": 1,
        "uptime_s": 12.5,
        "jobs_running": 0,
        "jobs_total": 7,
        "events_seen": 30,
        "events_lost": 0,
        "cgroup_mode": "hybrid",
        "fork_server": "up",
        "fork_server_restarts": 2,
        "fork_server_last_exit": "was killed by SIGKILL",
    }
    daemon.script["status"] = [{"op": "status", **status}]
    result = _netjail(daemon.path, "status")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-2:] == [
        "cgroups: hybrid",
        "fork server: up; restarted 2 times; the last one was killed by SIGKILL",
    ]


def test_kill_sends_the_named_signal(daemon: FakeDaemon) -> None:
    """kill JOB --signal KILL sends a kill request with signal 9."""
    daemon.script["kill"] = [{"op": "killed", "job": JOB}]
    result = _netjail(daemon.path, "kill", JOB, "--signal", "KILL")
    assert result.returncode == 0, result.stderr
    assert daemon.received[0].request == p.KillRequest(job=JOB, signal=9)


def test_kill_defaults_to_sigterm(daemon: FakeDaemon) -> None:
    """kill JOB without --signal sends SIGTERM."""
    daemon.script["kill"] = [{"op": "killed", "job": JOB}]
    result = _netjail(daemon.path, "kill", JOB)
    assert result.returncode == 0, result.stderr
    assert daemon.received[0].request == p.KillRequest(job=JOB, signal=15)


def test_kill_unknown_job_exits_125(daemon: FakeDaemon) -> None:
    """A not-found reply to kill is one line and exit 125."""
    daemon.script["kill"] = [{"op": "error", "code": "not_found", "message": "no job j-x"}]
    result = _netjail(daemon.path, "kill", "j-x")
    assert result.returncode == 125
    assert result.stderr == "netjail: no job j-x\n"


def test_kill_unknown_signal_is_a_usage_error(daemon: FakeDaemon) -> None:
    """An unknown signal name is a usage error and nothing is sent."""
    result = _netjail(daemon.path, "kill", JOB, "--signal", "NOPE")
    assert result.returncode == 2
    assert "unknown signal 'NOPE'" in result.stderr
    assert daemon.received == []


def test_events_json(daemon: FakeDaemon) -> None:
    """events --json prints one JSON object per event, then stops at the end message."""
    daemon.script["events"] = [
        {"op": "event", "event": EV_TCP4},
        {"op": "event", "event": EV_ICMP},
        {"op": "end", "lost_events": 0},
    ]
    result = _netjail(daemon.path, "events", "--json", "--job", JOB)
    assert result.returncode == 0, result.stderr
    assert [json.loads(line) for line in result.stdout.splitlines()] == [EV_TCP4, EV_ICMP]
    assert daemon.received[0].request == p.EventsRequest(job=JOB, follow=False)


def test_events_text(daemon: FakeDaemon) -> None:
    """events prints time, job and the event, one line each."""
    daemon.script["events"] = [
        {"op": "event", "event": EV_TCP6},
        {"op": "end", "lost_events": 0},
    ]
    result = _netjail(daemon.path, "events")
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        f"2026-01-01T00:00:00.000Z {JOB} blocked tcp [2001:db8::1]:443 uid=65534\n"
    )


# format_event, called in-process: every line shape the CLI prints (pure).


def _as_event(**fields: Any) -> p.Event:
    """EV_TCP4 with ``fields`` replaced, as the Event the client decodes."""
    return p.Event(**(EV_TCP4 | fields))


@pytest.mark.parametrize(
    ("fields", "line"),
    [
        ({}, "blocked tcp 203.0.113.9:443 uid=65534"),
        ({"family": 6, "dst": "2001:db8::1", "port": 22}, "blocked tcp [2001:db8::1]:22 uid=65534"),
        ({"proto": "icmp", "port": None}, "blocked icmp 203.0.113.9 uid=65534"),
        ({"count": 3}, "blocked tcp 203.0.113.9:443 uid=65534 x3"),
        (
            {"dst": "198.18.0.3", "domain": "api.stripe.com"},
            "blocked tcp api.stripe.com (198.18.0.3):443 uid=65534",
        ),
        (
            {"via": "proxy", "dst": "198.18.0.3", "domain": "a.test", "reason": "sni_mismatch"},
            "blocked tcp a.test (198.18.0.3):443 uid=65534 (sni_mismatch)",
        ),
        (
            {
                "via": "proxy",
                "verdict": "allowed",
                "dst": "198.18.0.2",
                "domain": "pypi.org",
                "bytes_out": 517,
                "bytes_in": 6120,
            },
            "allowed tcp pypi.org (198.18.0.2):443 uid=65534 out=517 in=6120",
        ),
        (
            {
                "verdict": "redirected",
                "proto": "udp",
                "dst": "8.8.8.8",
                "port": 53,
                "reason": "foreign_resolver",
            },
            "redirected udp 8.8.8.8:53 uid=65534 (foreign_resolver)",
        ),
    ],
)
def test_egress_lines(fields: dict[str, Any], line: str) -> None:
    """Each egress event shape is one line: verdict, protocol, name and address, port, extras."""
    assert format_event(_as_event(**fields)) == line


def _dns(**fields: Any) -> p.Event:
    """A DNS event from the stub, with ``fields`` set."""
    return _as_event(kind="dns", via="dns", proto="udp", dst="127.0.0.1", port=53, **fields)


def test_dns_lines_name_the_query() -> None:
    """A DNS event line names the query and its type; reasons other than not_allowed show."""
    assert format_event(_dns(domain="api.stripe.com", qtype="A")) == "blocked dns api.stripe.com A"
    # not_allowed is what "blocked" already says; other reasons are shown, counts folded.
    blocked = _dns(domain="x.test", qtype="TXT", reason="not_allowed", count=4)
    assert format_event(blocked) == "blocked dns x.test TXT x4"
    assert (
        format_event(_dns(domain="a.test", qtype="A", verdict="allowed")) == "allowed dns a.test A"
    )


def test_a_query_without_a_name_reads_as_a_query() -> None:
    """A DNS event with no name (a malformed query) reads 'query' and gives its reason."""
    assert format_event(_dns(reason="short_header")) == "blocked dns query (short_header)"


def test_hostile_names_are_sanitised() -> None:
    """Escape sequences and line breaks in a job's DNS name or type become "?" on one line."""
    line = format_event(_dns(domain="evil\x1b[31m.test\nnetjail: allowed", qtype="A\r"))
    assert line == "blocked dns evil?[31m.test?netjail: allowed A?"


def test_format_event_shows_an_allowed_events_reason() -> None:
    """An allowed raw-TCP connection says it was not verified."""
    fields = {**EV_TCP4, "verdict": "allowed", "via": "proxy", "dst": "198.18.0.4", "port": 5432}
    event = _as_event(**fields, domain="db.example", reason="unverified", bytes_out=10, bytes_in=20)
    assert format_event(event) == (
        "allowed tcp db.example (198.18.0.4):5432 uid=65534 out=10 in=20 (unverified)"
    )


def test_format_event_shows_a_blocked_events_detail_sanitised() -> None:
    """A refused upstream's detail follows the reason, on the same line, sanitised."""
    fields = {**EV_TCP4, "via": "proxy", "dst": "198.18.0.2"}
    event = _as_event(
        **fields,
        domain="pkgs.example",
        reason="upstream_forbidden",
        detail="pkgs.example resolved to 203.0.113.80\n, a documentation address",
    )
    assert format_event(event) == (
        "blocked tcp pkgs.example (198.18.0.2):443 uid=65534 (upstream_forbidden): "
        "pkgs.example resolved to 203.0.113.80?, a documentation address"
    )
