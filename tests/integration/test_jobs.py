"""Jobs: identity, stdio, exit status, permissions and protocol robustness, on a real daemon."""

from __future__ import annotations

import base64
import contextlib
import json
import pwd
import queue
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from netjail import Client, JobResult
from netjail.errors import JailError, NetjailError, NotFoundError
from netjail.kernel.cgroup import load_cgroup_layout
from netjail.protocol import BindMount

from .conftest import Daemon, assert_leased_uid

pytestmark = pytest.mark.usefixtures("no_leaks")

NETJAIL = [sys.executable, "-m", "netjail.cli"]
PY = "/usr/bin/python3"

# A client that speaks the wire protocol with nothing but the standard library, run with the
# system Python as an unprivileged user (who cannot read the project's venv under /root).
RAW_CLIENT = textwrap.dedent(
    """
    import json, socket, sys
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    f = s.makefile("rwb")
    def send(m):
        f.write(json.dumps(m).encode() + b"\\n"); f.flush()
    send({"op": "hello", "version": 1})
    print(f.readline().decode().strip())
    for line in sys.argv[2:]:
        send(json.loads(line))
        while True:
            reply = f.readline().decode().strip()
            print(reply)
            if not reply or json.loads(reply)["op"] in ("exit", "error", "ps", "killed", "end"):
                break
    """
)


# The Python client library, run by the project's interpreter as an unprivileged user: one run
# per JSON line of options in argv[2:], each printed as one JSON line, the error's class and
# message in place of a result when the run raised.
LIBRARY_CLIENT = textwrap.dedent(
    """
    import json, sys
    from netjail import Client
    from netjail.errors import NetjailError
    client = Client(sys.argv[1], timeout=10)
    for options in sys.argv[2:]:
        try:
            result = client.run(["id", "-u"], cwd="/", stdio="capture", **json.loads(options))
        except NetjailError as e:
            kind = f"{type(e).__module__}.{type(e).__qualname__}"
            print(json.dumps({"error": kind, "message": str(e)}))
        else:
            print(json.dumps({"uid": result.report.uid, "stdout": result.stdout.decode()}))
    """
)


@contextlib.contextmanager
def background_job(client: Client) -> Iterator[tuple[str, list[JobResult]]]:
    """A `sleep 30` job running in a thread: yields its id and (once it ended) its result.

    Whatever the test did, the job is killed at the end and its thread joined.
    """
    started: list[str] = []
    results: list[JobResult] = []

    def run() -> None:
        results.append(
            client.run(["sleep", "30"], cwd="/", on_start=lambda j, _p: started.append(j))
        )

    runner = threading.Thread(target=run)
    runner.start()
    deadline = time.monotonic() + 10
    while not started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert started, "the background job did not start"
    try:
        yield started[0], results
    finally:
        with contextlib.suppress(NetjailError):
            client.kill(started[0], 9)
        runner.join(30)


def cli(daemon: Daemon, *args: str, **kwargs: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*NETJAIL, "--socket", daemon.socket, *args],
        capture_output=True,
        timeout=60,
        check=False,
        **kwargs,  # type: ignore[arg-type]
    )


def raw_as_user(
    daemon: Daemon, user: pwd.struct_passwd, *messages: dict[str, object]
) -> list[dict[str, object]]:
    out = subprocess.run(
        [
            "setpriv",
            f"--reuid={user.pw_uid}",
            f"--regid={user.pw_gid}",
            "--init-groups",
            PY,
            "-c",
            RAW_CLIENT,
            daemon.socket,
            *(json.dumps(m) for m in messages),
        ],
        capture_output=True,
        timeout=60,
        check=True,
        cwd="/",
    )
    return [json.loads(line) for line in out.stdout.decode().splitlines() if line]


def test_cli_runs_a_command_with_its_exit_status(daemon: Daemon) -> None:
    """`netjail run` prints the job's output and passes its exit status through."""
    done = cli(daemon, "run", "--cwd", "/", "--", PY, "-c", "print('hi'); raise SystemExit(3)")
    assert (done.returncode, done.stdout) == (3, b"hi\n")


def test_cli_signal_exit_status_is_128_plus_n(daemon: Daemon) -> None:
    """A job killed by signal N makes the CLI exit 128+N."""
    done = cli(daemon, "run", "--cwd", "/", "--", "sh", "-c", "kill -TERM $$")
    assert done.returncode == 128 + 15


def test_cli_prints_blocked_attempts_and_writes_the_report(daemon: Daemon, tmp_path: Path) -> None:
    """Each blocked attempt is a stderr line; --report writes the JSON report."""
    report = tmp_path / "report.json"
    done = cli(
        daemon,
        "run",
        "--cwd",
        "/",
        "--report",
        str(report),
        "--",
        "curl",
        "-sS",
        "https://203.0.113.9/",
    )
    assert done.returncode == 7
    data = json.loads(report.read_text())
    for key in ("job", "argv", "uid", "exit_code", "signal", "wall_s", "events", "lost_events"):
        assert key in data
    # The line names the uid the job ran as: leased from the daemon's own block.
    assert data["uid"] in daemon.job_uids
    assert f"netjail: blocked tcp 203.0.113.9:443 uid={data['uid']}\n".encode() in done.stderr
    assert data["argv"] == ["curl", "-sS", "https://203.0.113.9/"]
    assert data["exit_code"] == 7
    assert [(e["proto"], e["dst"], e["port"]) for e in data["events"]] == [
        ("tcp", "203.0.113.9", 443)
    ]


def test_cli_quiet_prints_no_events(daemon: Daemon) -> None:
    """--quiet suppresses the event lines."""
    done = cli(daemon, "run", "-q", "--cwd", "/", "--", "curl", "-sS", "http://203.0.113.9/")
    assert done.returncode == 7
    assert b"netjail:" not in done.stderr


def test_cli_stdio_pipes_and_redirects_work(daemon: Daemon, tmp_path: Path) -> None:
    """`netjail run -- cat < f > g` works: the CLI's own fds are the job's stdio."""
    src, dst = tmp_path / "in", tmp_path / "out"
    src.write_bytes(b"line one\nline two\n")
    # The files are the job's fds 0 and 1, opened here: the job needs no path to them.
    with open(src, "rb") as stdin, open(dst, "wb") as stdout:
        done = subprocess.run(
            [*NETJAIL, "--socket", daemon.socket, "run", "--cwd", "/", "--", "cat"],
            stdin=stdin,
            stdout=stdout,
            stderr=subprocess.PIPE,
            timeout=60,
            check=False,
        )
    assert done.returncode == 0, done.stderr
    assert dst.read_bytes() == b"line one\nline two\n"
    piped = cli(
        daemon, "run", "--cwd", "/", "--", "sh", "-c", "tr a-z A-Z; echo err >&2", input=b"abc\n"
    )
    assert (piped.stdout, piped.stderr) == (b"ABC\n", b"err\n")


def test_cli_reports_netjail_failures_with_125(tmp_path: Path) -> None:
    """An unreachable daemon is a one-line error and exit 125, no traceback."""
    done = subprocess.run(
        [*NETJAIL, "--socket", str(tmp_path / "none.sock"), "run", "--", "true"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 125
    assert done.stderr.startswith(b"netjail: cannot connect to ")
    assert len(done.stderr.splitlines()) == 1


def test_cli_command_not_found_is_127(daemon: Daemon) -> None:
    """A command that does not exist: exit 127 and a one-line message."""
    done = cli(daemon, "run", "--cwd", "/", "--", "no-such-command-xyz")
    assert done.returncode == 127
    assert (
        done.stderr == b"netjail: cannot execute no-such-command-xyz: No such file or directory\n"
    )


def test_inaccessible_cwd_is_a_clear_error(client: Client, tmp_path: Path) -> None:
    """A cwd the job user cannot enter fails the start, saying which directory and why."""
    # Bound into the job, so it is there: root's mode 0700 is what keeps the job out. (/root
    # itself is not in the job's view at all: test_hidden_cwd_is_a_clear_error.)
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    with pytest.raises(JailError) as caught:
        client.run(["true"], cwd=str(private), binds=[BindMount(source=str(private))])
    assert str(caught.value) == (
        f"cannot start the job (working directory): {private}: Permission denied"
    )


def test_hidden_cwd_is_a_clear_error(client: Client) -> None:
    """A library cwd outside the job's view (here /root) fails the start: no silent fallback."""
    with pytest.raises(JailError) as caught:
        client.run(["true"], cwd="/root")
    assert str(caught.value) == (
        "cannot start the job (working directory): /root: No such file or directory"
    )


def test_job_runs_as_its_own_uid_without_capabilities(client: Client, daemon: Daemon) -> None:
    """Root's jobs run as a leased uid: no capabilities, no groups, no_new_privs, own session."""
    code = (
        "import os\n"
        "s = dict(l.split(':', 1) for l in open('/proc/self/status'))\n"
        "print(os.getuid(), os.getgid(), os.getgroups(), os.getsid(0))\n"
        "print(*[s[k].strip() for k in ('CapInh', 'CapPrm', 'CapEff', 'CapAmb', 'NoNewPrivs')])\n"
    )
    result = client.run([PY, "-c", code], stdio="capture", cwd="/")
    uid = result.report.uid
    assert_leased_uid(result.report, daemon)
    # Its session is the one the job's init made (setsid, as PID 1 of the job's namespace): a
    # session led from outside the namespace, the daemon's say, would show as 0.
    assert result.stdout == (
        f"{uid} {uid} [] 1\n".encode()
        + b"0000000000000000 0000000000000000 0000000000000000 0000000000000000 1\n"
    )


def test_root_asking_for_uid_65534_runs_as_nobody(client: Client) -> None:
    """`uid=65534` is a fixed identity, leased from no range: the job runs as nobody."""
    code = "import os; print(os.getuid(), os.getgid(), os.getgroups())"
    result = client.run([PY, "-c", code], uid=65534, stdio="capture", cwd="/")
    assert (result.report.uid, result.report.gid) == (65534, 65534)
    assert result.stdout == b"65534 65534 []\n"


def test_root_asking_for_uid_0_still_gets_no_capabilities(client: Client) -> None:
    """A job run as uid 0 holds no capability and cannot gain one."""
    code = (
        "s = dict(l.split(':', 1) for l in open('/proc/self/status')); print(s['CapEff'].strip())"
    )
    result = client.run([PY, "-c", code], uid=0, gid=0, stdio="capture", cwd="/")
    assert result.stdout == b"0000000000000000\n"
    flush = client.run(["ip", "link", "set", "lo", "down"], uid=0, gid=0, stdio="capture", cwd="/")
    assert (flush.exit_code, flush.stderr) == (2, b"RTNETLINK answers: Operation not permitted\n")


def test_job_cannot_reach_the_daemon_socket(client: Client, daemon: Daemon) -> None:
    """The daemon's socket directory is hidden from the job (even for uid 0)."""
    code = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        "    s.connect(sys.argv[1]); print('connected')\n"
        "except OSError as e:\n"
        "    print(type(e).__name__)\n"
    )
    result = client.run([PY, "-c", code, daemon.socket], uid=0, gid=0, stdio="capture", cwd="/")
    assert result.stdout == b"FileNotFoundError\n"


def test_connections_from_inside_a_jail_are_refused(client: Client, daemon: Daemon) -> None:
    """A process in a jail's netns that still reaches the socket is refused by the daemon."""
    with background_job(client) as (job, _results):
        out = subprocess.run(
            ["ip", "netns", "exec", f"netjail-{job}", PY, "-c", RAW_CLIENT, daemon.socket],
            capture_output=True,
            timeout=30,
            check=False,
        )
        reply = json.loads(out.stdout.decode().splitlines()[0])
        assert reply["op"] == "error"
        assert reply["message"] == "connections from inside a jail are refused"


def test_non_root_client_job_runs_as_that_user(
    client: Client, daemon: Daemon, test_user: pwd.struct_passwd
) -> None:
    """A non-root client in the netjail group runs jobs as itself and sees only its own jobs."""
    with background_job(client) as (root_job, _results):
        replies = raw_as_user(
            daemon,
            test_user,
            {
                "op": "run",
                "argv": [PY, "-c", "import os; print(os.getuid(), os.getgid())"],
                "stdio": "capture",
                "cwd": "/",
            },
            {"op": "run", "argv": ["true"], "uid": 0},
            {"op": "run", "argv": ["true"], "gid": 0},
            {"op": "ps"},
        )
        assert root_job in [job.job for job in client.ps()]  # there for root to see
    assert replies[0]["op"] == "hello"
    exit_report = next(r for r in replies if r["op"] == "exit")["report"]
    assert isinstance(exit_report, dict)
    assert (
        base64.b64decode(exit_report["stdout"]).decode()
        == f"{test_user.pw_uid} {test_user.pw_gid}\n"
    )
    assert exit_report["uid"] == test_user.pw_uid
    denied = {
        "op": "error",
        "code": "permission",
        "message": "only root may choose the job's uid or gid",
        "exit_code": None,
    }
    assert [r for r in replies if r["op"] == "error"] == [denied, denied]  # uid 0, then gid 0
    # Root's job runs throughout and is not listed; the user's own ended job may still be,
    # while its jail is torn down (teardown follows the report).
    ps = replies[-1]
    assert ps["op"] == "ps"
    assert isinstance(ps["jobs"], list)
    assert [job["job"] for job in ps["jobs"]] in ([], [exit_report["job"]])


def test_non_root_client_cannot_see_or_kill_others_jobs(
    client: Client, daemon: Daemon, test_user: pwd.struct_passwd
) -> None:
    """Another user's jobs are invisible: ps omits them and kill says no such job."""
    with background_job(client) as (job, _results):
        replies = raw_as_user(
            daemon,
            test_user,
            {"op": "ps"},
            {"op": "kill", "job": job},
            {"op": "events", "job": job},
            {"op": "events", "job": "j-00000000"},
        )
        assert replies[1] == {"op": "ps", "jobs": []}
        # Another user's job and no job at all get the same answer: ids are not disclosed.
        assert [(r["op"], r["code"], r["message"]) for r in replies[2:]] == [
            ("error", "not_found", f"no such job: {job}"),
            ("error", "not_found", f"no such job: {job}"),
            ("error", "not_found", "no such job: j-00000000"),
        ]
        assert [j.job for j in client.ps()] == [job]


def test_kill_ends_a_running_job(client: Client) -> None:
    """`kill` with SIGTERM ends the job; the report shows the signal."""
    with background_job(client) as (job, results):
        client.kill(job)
        # Until the job has ended: the SIGTERM goes through the job's init, and leaving the
        # block first would let background_job's own SIGKILL win the race.
        deadline = time.monotonic() + 10
        while not results and time.monotonic() < deadline:
            time.sleep(0.01)
    assert results[0].signal == 15


def test_capture_is_bounded_and_flags_truncation(client: Client) -> None:
    """Captured output stops at the asked size and says it was truncated."""
    result = client.run(
        ["sh", "-c", "head -c 100000 /dev/zero"], stdio="capture", capture_bytes=1000, cwd="/"
    )
    assert result.stdout == b"\0" * 1000
    assert result.report.stdout_truncated is True
    assert result.report.stderr_truncated is False


def test_events_command_lists_past_events(daemon: Daemon, client: Client) -> None:
    """`netjail events --job J --json` prints that job's events as JSON lines."""
    result = client.run(["curl", "-sS", "http://203.0.113.9:8443/"], cwd="/")
    done = cli(daemon, "events", "--job", result.job, "--json")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(e["job"], e["dst"], e["port"]) for e in lines] == [(result.job, "203.0.113.9", 8443)]


def test_events_follow_streams_new_events(client: Client, daemon: Daemon) -> None:
    """A follower sees events of jobs started after it subscribed."""
    follower = subprocess.Popen(
        [*NETJAIL, "--socket", daemon.socket, "events", "--follow", "--json"],
        stdout=subprocess.PIPE,
    )
    stream = follower.stdout
    assert stream is not None
    lines: queue.Queue[bytes] = queue.Queue()

    def read() -> None:
        for line in stream:
            lines.put(line)

    # A thread reads, so that a stream that never brings the event fails the test, not hangs it.
    reader = threading.Thread(target=read)
    reader.start()
    try:
        time.sleep(0.5)
        result = client.run(["curl", "-sS", "http://203.0.113.9:8444/"], cwd="/")
        while (event := json.loads(lines.get(timeout=10)))["job"] != result.job:
            pass
        assert (event["dst"], event["port"]) == ("203.0.113.9", 8444)
    finally:
        follower.kill()
        follower.wait()
        reader.join(10)


def test_status_reports_counters(client: Client) -> None:
    """`status` has the version, job and event counters."""
    before = client.status()
    client.run(["curl", "-sS", "http://203.0.113.9:8445/"], cwd="/")
    after = client.status()
    assert after.jobs_total == before.jobs_total + 1
    assert after.events_seen >= before.events_seen + 1
    assert after.cgroup_mode == load_cgroup_layout().mode  # the daemon's view is this host's


def raw_frames(path: str, payload: bytes, read: bool = True) -> bytes:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(path)
    # The daemon may hang up on an oversize frame before reading it all.
    with contextlib.suppress(BrokenPipeError):
        s.sendall(payload)
    data = b""
    if read:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_WR)
        while chunk := s.recv(65536):
            data += chunk
    s.close()
    return data


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"garbage\n", b"bad request"),
        (b'{"op":"run","argv":["true"]}\n', b"the first message must be hello"),
        (b'{"op":"hello","version":99}\n', b"unsupported protocol version 99"),
        (b'{"op":"hello","version":1}\n{"op":"run","argv":["true"],"bogus":1}\n', b"unknown field"),
        (b'{"op":"hello","version":1}\n{"op":"run","argv":"true"}\n', b"Expected `array`"),
        (b'{"op":"hello","version":1}\n{"op":"explode"}\n', b"unknown or missing op"),
        (
            b'{"op":"hello","version":1}\n{"op":"run","argv":[]}\n',
            b"Expected `array` of length >= 1",
        ),
        (b'{"op":"hello","version":1}\n' + b"x" * (2 << 20), b"frame larger than"),
    ],
)
def test_malformed_requests_get_an_error_and_the_daemon_keeps_serving(
    daemon: Daemon, client: Client, payload: bytes, expected: bytes
) -> None:
    """Garbage, unknown fields or ops, wrong types and oversize frames get an error message."""
    reply = raw_frames(daemon.socket, payload)
    assert b'"op":"error"' in reply
    assert expected in reply
    assert client.status().pid == daemon.process.pid


def test_slow_and_vanishing_clients_do_not_affect_others(daemon: Daemon, client: Client) -> None:
    """A client that never reads, and one that disconnects mid-job, leave others unaffected."""
    hog = socket.socket(socket.AF_UNIX)
    hog.connect(daemon.socket)
    hog.sendall(b'{"op":"hello","version":1}\n{"op":"events","follow":true}\n')
    quitter = socket.socket(socket.AF_UNIX)
    quitter.connect(daemon.socket)
    quitter.sendall(b'{"op":"hello","version":1}\n{"op":"run","argv":["sleep","30"]}\n')
    time.sleep(0.3)
    quitter.close()
    code = (
        "import socket\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "for port in range(1000, 1300):\n"
        "    try:\n"
        "        s.sendto(b'x', ('203.0.113.9', port))\n"
        "    except PermissionError:\n"
        "        pass\n"
    )
    result = client.run([PY, "-c", code], cwd="/", on_event=lambda e: None)
    assert len(result.events) == 300
    assert result.lost_events == 0
    hog.close()
    deadline = time.monotonic() + 10
    while client.ps() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.ps() == []


def test_unknown_job_kill_is_not_found(client: Client) -> None:
    """Killing a job that does not exist is a clear error."""
    with pytest.raises(NotFoundError) as caught:
        client.kill("j-00000000")
    assert str(caught.value) == "no such job: j-00000000"


def test_non_root_library_client_choosing_a_uid_or_gid_gets_permission_denied(
    daemon: Daemon, client: Client, test_user: pwd.struct_passwd
) -> None:
    """A non-root Client choosing another uid or gid gets PermissionDeniedError; serving goes on."""
    uid, gid = test_user.pw_uid, test_user.pw_gid
    out = subprocess.run(
        [
            "setpriv",
            f"--reuid={uid}",
            f"--regid={gid}",
            "--init-groups",
            sys.executable,
            "-c",
            LIBRARY_CLIENT,
            daemon.socket,
            *(json.dumps(o) for o in ({"uid": 0}, {"gid": 0}, {"uid": uid, "gid": gid}, {})),
        ],
        capture_output=True,
        timeout=60,
        check=True,
        cwd="/",
    )
    denied = {
        "error": "netjail.errors.PermissionDeniedError",
        "message": "only root may choose the job's uid or gid",
    }
    # Its own uid and gid are no choice of another's: those runs, after the refusals, work.
    assert [json.loads(line) for line in out.stdout.splitlines()] == [
        denied,
        denied,
        {"uid": uid, "stdout": f"{uid}\n"},
        {"uid": uid, "stdout": f"{uid}\n"},
    ], out.stderr
    assert daemon.process.poll() is None
    assert client.run(["true"], cwd="/").exit_code == 0


def test_many_jobs_started_at_once_all_work(client: Client) -> None:
    """Twelve jobs submitted together each report their blocked attempt; the daemon lives on."""
    # Jails are built on threads in parallel: shared native state (libnftables) must not race.
    results: list[JobResult] = []
    lock = threading.Lock()

    def one(port: int) -> None:
        result = client.run(["curl", "-sS", f"http://203.0.113.9:{port}/"], cwd="/")
        with lock:
            results.append(result)

    threads = [threading.Thread(target=one, args=(9000 + i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(r.events[0].port for r in results) == list(range(9000, 9012))
    assert all(r.exit_code == 7 for r in results)
    assert client.status().jobs_total >= 12  # still answering: it survived the burst
