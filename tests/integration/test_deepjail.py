"""The deep jail end to end, through a real daemon: each way out fails, and common tools work."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from netjail import Client, JobResult
from netjail.errors import NetjailError
from netjail.kernel.fsplan import JOB_HOME
from netjail.kernel.rules import DNS_PORT, PROXY_PORT
from netjail.protocol import BindMount

from .conftest import Daemon, processes_of_jobs
from .test_limits import kernel_has_pids_peak

pytestmark = pytest.mark.usefixtures("no_leaks")

PY = "/usr/bin/python3"
#: The shipped `[limits] default_pids` and `[jail] tmp_size` (docs/CONFIG.md).
DEFAULT_PIDS = 4096
TMP_SIZE = 256 << 20

# The Python client library run as an unprivileged user: one run per JSON line of options in
# argv[2:], each printed as one JSON line (the error's class, code and message if it raised).
# "{client_pid}" in an argv becomes this client's own pid: a process in the host's netns.
USER_CLIENT = textwrap.dedent(
    """
    import json, os, sys
    from netjail import Client
    from netjail.errors import NetjailError
    from netjail.protocol import BindMount
    client = Client(sys.argv[1], timeout=10)
    for line in sys.argv[2:]:
        options = json.loads(line)
        options["argv"] = [a.replace("{client_pid}", str(os.getpid())) for a in options["argv"]]
        options["binds"] = [BindMount(**b) for b in options.get("binds", [])]
        try:
            r = client.run(cwd="/", stdio="capture", **options)
        except NetjailError as e:
            print(json.dumps({"error": type(e).__name__, "code": e.code, "message": str(e)}))
        else:
            out, err = r.stdout.decode(), r.stderr.decode()
            print(json.dumps({"exit": r.exit_code, "uid": r.report.uid, "out": out, "err": err}))
    """
)

# Job-side Python: outcome(f, *args) is "ok", or the name of the errno that f(*args) raised.
OUTCOME = textwrap.dedent(
    """
    import errno, os, sys
    def outcome(f, *args):
        try:
            f(*args)
        except OSError as e:
            return errno.errorcode[e.errno]
        return "ok"
    """
)

# Prints, for each pid in argv[1:], how kill(pid, 0), reading its environ and PTRACE_ATTACH
# end, then the pids this job's /proc shows.
PROBE_PROCESSES = OUTCOME + textwrap.dedent(
    """
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    def attach(pid):
        if libc.ptrace(16, pid, 0, 0) != 0:  # PTRACE_ATTACH
            raise OSError(ctypes.get_errno(), "ptrace")
    for pid in map(int, sys.argv[1:]):
        environ = lambda p: open(f"/proc/{p}/environ", "rb").read()
        print(pid, *(outcome(f, pid) for f in (lambda p: os.kill(p, 0), environ, attach)))
    print(sorted(int(p) for p in os.listdir("/proc") if p.isdigit()))
    """
)


def text(result: JobResult) -> str:
    """A captured job's stdout."""
    assert result.stdout is not None
    return result.stdout.decode()


def as_user(user: pwd.struct_passwd, *argv: str) -> list[str]:
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", *argv]


def run_as_user(
    daemon: Daemon, user: pwd.struct_passwd, *requests: dict[str, object]
) -> list[dict[str, object]]:
    """Each request run by ``user``'s own library client; one result dict per request."""
    out = subprocess.run(
        as_user(user, sys.executable, "-c", USER_CLIENT, daemon.socket)
        + [json.dumps(r) for r in requests],
        capture_output=True,
        timeout=60,
        check=True,
        cwd="/",
    )
    return [json.loads(line) for line in out.stdout.splitlines()]


def cli_run(
    daemon: Daemon, cwd: str, *args: str, user: pwd.struct_passwd | None = None
) -> subprocess.CompletedProcess[bytes]:
    """`netjail run ARGS` started in ``cwd``, by root or by ``user``."""
    argv = [sys.executable, "-m", "netjail.cli", "--socket", daemon.socket, "run", *args]
    if user is not None:
        argv = as_user(user, *argv)
    return subprocess.run(argv, capture_output=True, timeout=60, cwd=cwd, check=False)


def cwd_note(cwd: str | Path) -> str:
    """The CLI's line when its cwd is not in the jail's view."""
    return (
        f"netjail: {cwd} is not in the jail's view, so the job runs in {JOB_HOME} "
        f"(--ro-bind {cwd} or --bind {cwd} to run it there)"
    )


@contextlib.contextmanager
def user_sleeper(user: pwd.struct_passwd, cwd: str | Path = "/", **env: str) -> Iterator[str]:
    """A `sleep 60` of ``user``'s on the host, started in ``cwd`` with ``env``: yields its pid."""
    sleeper = subprocess.Popen(as_user(user, "sleep", "60"), cwd=cwd, env=env)
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{sleeper.pid}/comm").read_text() != "sleep\n":  # setpriv is done
            assert time.monotonic() < deadline, "the sleeper never exec'd"
            time.sleep(0.01)
        yield str(sleeper.pid)
    finally:
        sleeper.kill()
        sleeper.wait()


@contextlib.contextmanager
def unix_server(path: str) -> Iterator[None]:
    """A world-writable Unix socket at ``path`` ("@name": abstract) that says b"hello" to each
    connection."""
    server = socket.socket(socket.AF_UNIX)
    abstract = path.startswith("@")
    server.bind("\0" + path[1:] if abstract else path)
    if not abstract:
        os.chmod(path, 0o777)  # noqa: S103 - a socket anyone may connect to is the attack
    server.listen()

    def serve() -> None:
        with contextlib.suppress(OSError):  # closed at the end
            while True:
                conn, _ = server.accept()
                with conn:
                    conn.sendall(b"hello")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown(socket.SHUT_RDWR)
        server.close()
        thread.join(10)
        if not abstract:
            os.unlink(path)


def test_host_unix_sockets_are_unreachable_unless_bound(client: Client, tmp_path: Path) -> None:
    """Host sockets in /tmp, /run, /dev/shm are ENOENT, abstract ones refused; a bound one works."""
    tag = f"nj-{os.getpid()}"
    bound = tmp_path / "bound"
    bound.mkdir(mode=0o755)
    hidden = [f"/tmp/{tag}.sock", f"/run/{tag}.sock", f"/dev/shm/{tag}.sock"]
    code = OUTCOME + textwrap.dedent(
        """
        import socket
        for path in sys.argv[1:]:
            s = socket.socket(socket.AF_UNIX)
            connected = outcome(s.connect, "\\0" + path[1:] if path[0] == "@" else path)
            print(path, connected, s.recv(5).decode() if connected == "ok" else "-")
        """
    )
    with contextlib.ExitStack() as stack:
        for path in [*hidden, f"@{tag}", str(bound / "s.sock")]:
            stack.enter_context(unix_server(path))
        result = client.run(
            [PY, "-c", code, *hidden, f"@{tag}", "/srv/s.sock"],
            binds=[BindMount(source=str(bound), target="/srv", access="ro")],
            stdio="capture",
        )
    assert text(result).splitlines() == [
        *(f"{path} ENOENT -" for path in hidden),
        f"@{tag} ECONNREFUSED -",  # abstract names are per network namespace
        "/srv/s.sock ok hello",
    ], result.stderr
    assert result.events == []


def test_non_root_job_cannot_reach_its_users_host_processes(
    daemon: Daemon, test_user: pwd.struct_passwd
) -> None:
    """The user's host sleeper and its own client are ESRCH/ENOENT to kill, environ and ptrace."""
    with user_sleeper(test_user, NJ_SECRET="hunter2") as pid:  # noqa: S106 - a planted secret
        # On the host, the same user can signal it and read the secret: only the jail stops it.
        host = subprocess.run(
            as_user(test_user, "sh", "-c", f"kill -0 {pid} && cat /proc/{pid}/environ"),
            capture_output=True,
            check=True,
        )
        assert b"NJ_SECRET=hunter2" in host.stdout
        shell = f"ps -e -o pid=; kill -0 {pid}; echo kill=$?; cat /proc/{pid}/environ; echo cat=$?"
        probe, ps = run_as_user(
            daemon,
            test_user,
            {"argv": [PY, "-c", PROBE_PROCESSES, pid, "{client_pid}", "1"]},
            {"argv": ["sh", "-c", shell]},
        )
    lines = str(probe["out"]).splitlines()
    assert (probe["exit"], probe["uid"]) == (0, test_user.pw_uid)
    assert lines[0] == f"{pid} ESRCH ENOENT ESRCH"
    assert lines[1].split()[1:] == ["ESRCH", "ENOENT", "ESRCH"]  # the client, in the host netns
    # Its own init runs as the same uid, but is non-dumpable: no ptrace, no environ.
    assert lines[2:] == ["1 ok EACCES EPERM", "[1, 2]"]
    assert str(ps["out"]).split() == ["1", "2", "3", "kill=1", "cat=1"]  # init, sh, ps
    assert ps["err"] == (
        f"sh: 1: kill: No such process\n\ncat: /proc/{pid}/environ: No such file or directory\n"
    )


def test_concurrent_root_jobs_cannot_see_or_signal_each_other(
    client: Client, daemon: Daemon
) -> None:
    """Two root jobs at once have different uids, and each sees only its own processes."""
    view = (
        "import os\nprint(os.getuid(), sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))"
    )
    read_end, write_end = os.pipe()
    null = os.open(os.devnull, os.O_RDWR)
    started: list[tuple[str, int]] = []
    first: list[JobResult] = []

    def run_first() -> None:
        argv = [PY, "-c", view + "\nimport sys, time\nsys.stdout.flush()\ntime.sleep(30)"]
        first.append(
            client.run(
                argv,
                stdio="fds",
                fds=(null, write_end, null),
                on_start=lambda job, pid: started.append((job, pid)),
            )
        )

    runner = threading.Thread(target=run_first)
    runner.start()
    try:
        # The first job's own view, printed once it runs: it is running while the second does.
        assert select.select([read_end], [], [], 10)[0], "the first job printed nothing"
        first_uid, first_view = os.read(read_end, 4096).decode().split(" ", 1)
        pid = started[0][1]
        attack = f"{OUTCOME}{view}\nprint(outcome(os.kill, {pid}, 9), outcome(os.kill, -1, 9))"
        second = client.run([PY, "-c", attack], stdio="capture")
    finally:
        if started:
            with contextlib.suppress(NetjailError):
                client.kill(started[0][0], 15)
        runner.join(30)
        for fd in (read_end, write_end, null):
            os.close(fd)
    assert first_view == "[1, 2]\n"
    assert text(second) == f"{second.report.uid} [1, 2]\nESRCH ESRCH\n"
    assert int(first_uid) == first[0].report.uid != second.report.uid
    assert {int(first_uid), second.report.uid} <= set(daemon.job_uids)
    assert first[0].signal == 15  # the test's SIGTERM ended it, not the other job's SIGKILL


def test_proc_shows_only_the_jobs_processes(client: Client) -> None:
    """PID 1 is the job's init, the command is PID 2, and /proc lists nothing else."""
    shell = "ps -e -o pid=,ppid=; ls /proc > /tmp/l; grep -c '^[0-9]' /tmp/l"
    lines = text(client.run(["sh", "-c", shell], stdio="capture")).splitlines()
    # init (its parent is outside the namespace: 0), sh, then ps; then ls saw 1, 2 and itself.
    assert [line.split() for line in lines] == [["1", "0"], ["2", "1"], ["3", "2"], ["3"]]


def test_network_view_is_the_jails_only(client: Client) -> None:
    """ip link and /sys/class/net list lo, nj0, nj1; /proc/1/net/tcp has only the jail's sockets."""
    host_listener = socket.socket()
    host_listener.bind(("127.0.0.1", 0))
    host_listener.listen()
    port = host_listener.getsockname()[1]
    shell = "ip -o link; echo --; ls /sys/class/net; echo --; cat /proc/1/net/tcp /proc/1/net/tcp6"
    try:
        result = client.run(["sh", "-c", shell], stdio="capture")
        host_tcp = Path("/proc/net/tcp").read_text()
    finally:
        host_listener.close()
    links, sysfs, tcp = (part.strip().splitlines() for part in text(result).split("--"))
    assert sorted(line.split(": ")[1].split("@")[0] for line in links) == ["lo", "nj0", "nj1"]
    assert sysfs == ["lo", "nj0", "nj1"]
    # (local address, state) of every socket, header lines left out.
    sockets = {tuple(line.split()[1:4:2]) for line in tcp if not line.split()[0].isalpha()}
    listening = "0A"
    v4, v6 = "0100007F", "00000000000000000000000001000000"  # 127.0.0.1 and ::1, as /proc shows
    assert sockets == {
        (f"{address}:{p:04X}", listening) for address in (v4, v6) for p in (DNS_PORT, PROXY_PORT)
    }
    assert f"{v4}:{port:04X} 00000000:0000 0A" in host_tcp  # the host's listener, not the job's
    nics = [Path(f"/sys/class/net/{n}/address") for n in os.listdir("/sys/class/net") if n != "lo"]
    assert nics
    assert [n for n in nics if n.read_text().strip() in text(result)] == []  # no host MAC


def test_vsock_and_new_user_namespaces_are_refused(client: Client) -> None:
    """socket(AF_VSOCK) is EAFNOSUPPORT and `unshare -U true` is EPERM (seccomp)."""
    code = OUTCOME + "import socket\nprint(outcome(socket.socket, 40, socket.SOCK_STREAM))"
    assert client.run([PY, "-c", code], stdio="capture").stdout == b"EAFNOSUPPORT\n"
    unshare = client.run(["unshare", "-U", "true"], stdio="capture")
    assert (unshare.exit_code, unshare.stderr) == (
        1,
        b"unshare: unshare failed: Operation not permitted\n",
    )


def test_files_in_tmp_and_home_are_gone_after_the_job(client: Client, daemon: Daemon) -> None:
    """What a job writes to /tmp, /var/tmp, /dev/shm and $HOME is gone, in jails and on the host."""
    marker = f"nj-marker-{os.getpid()}"
    places = ["/tmp", "/var/tmp", "/dev/shm", JOB_HOME]
    write = f"for d in {' '.join(places)}; do echo secret > $d/{marker}; done; echo $HOME"
    first = client.run(["sh", "-c", write], stdio="capture")
    assert (first.exit_code, first.stdout) == (0, f"{JOB_HOME}\n".encode())
    second = client.run(["sh", "-c", f"ls -A {' '.join(places)}"], stdio="capture")
    assert sorted(text(second).split()) == sorted(f"{p}:" for p in places)  # all empty
    deadline = time.monotonic() + 10
    while client.ps():  # a job is unlisted once its teardown is done
        assert time.monotonic() < deadline, client.ps()
        time.sleep(0.05)
    left = [n for _root, dirs, files in os.walk(daemon.state_dir) for n in dirs + files]
    assert [n for n in left if marker in n or first.job in n] == []
    assert os.listdir(os.path.join(daemon.state_dir, "homes")) == []
    assert not any(os.path.exists(f"{p}/{marker}") for p in places)
    assert first.job not in Path("/proc/self/mountinfo").read_text()


@pytest.fixture
def user_home(test_user: pwd.struct_passwd) -> Iterator[Path]:
    """The test user's real home with a .bashrc (made if missing; put back as it was after)."""
    home = Path(test_user.pw_dir)
    made, bashrc = not home.exists(), home / ".bashrc"
    home.mkdir(mode=0o755, exist_ok=True)
    saved = bashrc.read_bytes() if bashrc.exists() else None
    bashrc.write_bytes(b"# the user's own\n")
    for path in (home, bashrc):
        os.chown(path, test_user.pw_uid, test_user.pw_gid)
    yield home
    if made:
        shutil.rmtree(home)
    elif saved is None:
        bashrc.unlink()
    else:
        bashrc.write_bytes(saved)


def test_bashrc_cannot_be_written_unless_bound(
    daemon: Daemon, test_user: pwd.struct_passwd, user_home: Path
) -> None:
    """A user's job run from their home cannot write its .bashrc; with --bind of the home it can."""
    bashrc = user_home / ".bashrc"
    shell = f'pwd; echo x >> ~/.bashrc; echo x >> "{bashrc}"'
    hidden = cli_run(daemon, str(user_home), "--", "sh", "-c", shell, user=test_user)
    assert (hidden.returncode, hidden.stdout) == (2, f"{JOB_HOME}\n".encode())
    # The note comes from the CLI and the error from the job, on one stderr: in either order.
    assert sorted(hidden.stderr.decode().splitlines()) == [
        cwd_note(user_home),
        f"sh: 1: cannot create {bashrc}: Directory nonexistent",
    ]
    assert bashrc.read_bytes() == b"# the user's own\n"
    bound = cli_run(
        daemon, str(user_home), "--bind", str(user_home), "--", "sh", "-c", shell, user=test_user
    )
    assert (bound.returncode, bound.stdout, bound.stderr) == (0, f"{user_home}\n".encode(), b"")
    # ~ is still the job's HOME; the real home is the cwd, and bound read-write.
    assert bashrc.read_bytes() == b"# the user's own\nx\n"


def test_a_bound_proc_is_no_way_to_the_users_files(
    daemon: Daemon, test_user: pwd.struct_passwd, user_home: Path
) -> None:
    """`--ro-bind /proc` is refused: its cwd/root links would reach the host's files read-write."""
    bashrc = user_home / ".bashrc"
    bind = {"source": "/proc", "target": "/hostproc", "access": "ro"}
    with user_sleeper(test_user, cwd=user_home) as pid:  # in its home, as its shell would be
        shell = f"echo x >> /hostproc/{pid}/cwd/.bashrc"
        [result] = run_as_user(daemon, test_user, {"argv": ["sh", "-c", shell], "binds": [bind]})
    assert bashrc.read_bytes() == b"# the user's own\n"
    assert result == {
        "error": "RequestError",
        "code": "request",
        "message": "--ro-bind /proc: /proc cannot be bound (it reaches host processes)",
    }


@pytest.mark.parametrize("parent", ["/tmp", "/var/tmp", "/run", "/dev/shm", "/var/lib"])
def test_cli_runs_from_any_host_directory(daemon: Daemon, parent: str) -> None:
    """From a host directory the jail does not show, `netjail run` starts in HOME with a note."""
    # Below /tmp, /var/tmp, /run and /dev/shm the job has mounts of its own: empty ones.
    cwd = tempfile.mkdtemp(prefix="netjail-test-cwd-", dir=parent)
    try:
        done = cli_run(daemon, cwd, "--", "pwd")
    finally:
        os.rmdir(cwd)
    assert (done.returncode, done.stdout, done.stderr) == (
        0,
        f"{JOB_HOME}\n".encode(),
        f"{cwd_note(cwd)}\n".encode(),
    )


def test_non_root_client_cannot_bind_root_or_another_users_file(
    daemon: Daemon, test_user: pwd.struct_passwd
) -> None:
    """Binding /root or another user's 0600 file is refused with the daemon's exact message."""
    base = tempfile.mkdtemp(prefix="netjail-test-binds-", dir="/run")
    try:
        os.chmod(base, 0o755)  # noqa: S103 - the test user must reach the files in it
        theirs, own = f"{base}/theirs", f"{base}/own"
        for path, owner in ((theirs, 65534), (own, test_user.pw_uid)):
            Path(path).write_text("secret\n")
            os.chmod(path, 0o600)
            os.chown(path, owner, owner)
        results = run_as_user(
            daemon,
            test_user,
            {"argv": ["true"], "binds": [{"source": "/root", "access": "rw"}]},
            {"argv": ["true"], "binds": [{"source": "/root", "target": "/r", "access": "ro"}]},
            {"argv": ["true"], "binds": [{"source": theirs, "target": "/f", "access": "ro"}]},
            {"argv": ["cat", "/f"], "binds": [{"source": own, "target": "/f", "access": "ro"}]},
        )
    finally:
        shutil.rmtree(base)
    denied = [
        f"--bind /root: permission denied for uid {test_user.pw_uid}",
        f"--ro-bind /root: permission denied for uid {test_user.pw_uid}",
        f"--ro-bind {theirs}: permission denied for uid {test_user.pw_uid}",
    ]
    # BindSourceError on the daemon's side, wire code "request": a RequestError for the client.
    assert results[:3] == [
        {"error": "RequestError", "code": "request", "message": m} for m in denied
    ]
    assert results[3] == {"exit": 0, "uid": test_user.pw_uid, "out": "secret\n", "err": ""}


def test_bind_is_read_write_and_ro_bind_read_only(client: Client, tmp_path: Path) -> None:
    """--bind writes reach the host (as the job's uid); a write under --ro-bind is EROFS."""
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    for d in (rw, ro):
        d.mkdir()
        os.chmod(d, 0o777)  # noqa: S103 - the job's leased uid writes here
    (ro / "in").write_text("given\n")
    code = OUTCOME + textwrap.dedent(
        """
        open("/mnt/rw/out", "w").write("written\\n")
        print(open("/mnt/ro/in").read(), end="")
        print(outcome(open, "/mnt/ro/out", "w"))
        """
    )
    result = client.run(
        [PY, "-c", code],
        binds=[
            BindMount(source=str(rw), target="/mnt/rw", access="rw"),
            BindMount(source=str(ro), target="/mnt/ro", access="ro"),
        ],
        stdio="capture",
    )
    assert (result.exit_code, result.stdout) == (0, b"given\nEROFS\n"), result.stderr
    assert (rw / "out").read_text() == "written\n"
    assert (rw / "out").stat().st_uid == result.report.uid  # the leased uid owns it
    assert sorted(os.listdir(ro)) == ["in"]


def test_common_tools_keep_working(client: Client) -> None:
    """python3, node, npm, pip, bash and git run, with their caches in the job's HOME."""
    missing = [t for t in ("node", "npm") if shutil.which(t) is None]
    pip = subprocess.run([PY, "-m", "pip", "--version"], capture_output=True, check=False)
    if missing or pip.returncode:
        pytest.skip(f"not installed on this host: {missing or ['python3-pip']}")
    script = textwrap.dedent(
        """
        set -e
        /usr/bin/python3 -c 'print("python", 6 * 7)'
        node -e 'console.log("node", 6 * 7)'
        npm config get cache
        /usr/bin/python3 -m pip --version | cut -d' ' -f1,4-
        /usr/bin/python3 -m pip cache dir
        bash -c 'echo bash $((6 * 7))'
        cd ~ && git init -q repo && git -C repo rev-parse --absolute-git-dir
        """
    )
    result = client.run(["bash", "-c", script], stdio="capture", timeout_s=60)
    assert text(result).splitlines() == [
        "python 42",
        "node 42",
        f"{JOB_HOME}/.npm",
        "pip /usr/lib/python3/dist-packages/pip (python 3.11)",
        f"{JOB_HOME}/.cache/pip",
        "bash 42",
        f"{JOB_HOME}/repo/.git",
    ], result.stderr
    assert result.exit_code == 0


def test_curl_and_ping_are_refused_and_reported(client: Client) -> None:
    """curl (exit 7) and ping (its ping socket) to a blocked address fail, each with one event."""
    curl = client.run(["curl", "-sS", "http://203.0.113.9/"], stdio="capture")
    ping = client.run(["ping", "-c1", "-W2", "203.0.113.9"], stdio="capture")
    assert curl.exit_code == 7
    assert ping.exit_code == 1
    assert ping.stderr == b"ping: sendmsg: Operation not permitted\n"
    events = [(e.verdict, e.proto, e.dst, e.port, e.uid) for e in curl.events + ping.events]
    assert events == [
        ("blocked", "tcp", "203.0.113.9", 80, curl.report.uid),
        ("blocked", "icmp", "203.0.113.9", None, ping.report.uid),
    ]


def test_fork_bomb_without_options_stops_at_the_shipped_pids_limit(client: Client) -> None:
    """A job that forks until refused gets EAGAIN at 4096 tasks, far below pid_max; all die."""
    code = OUTCOME + textwrap.dedent(
        """
        import time
        children = []
        def bomb():
            while True:
                if os.fork() == 0:
                    time.sleep(1000)
                children.append(1)
        refused = outcome(bomb)
        print(len(children), refused)
        """
    )
    result = client.run([PY, "-c", code], stdio="capture", timeout_s=60)
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    # The init and the command count as two of the 4096.
    assert (result.exit_code, text(result)) == (0, f"{DEFAULT_PIDS - 2} EAGAIN\n")
    assert result.report.limits is not None
    assert result.report.limits.pids == DEFAULT_PIDS < pid_max // 4
    assert result.report.pids_peak == (DEFAULT_PIDS if kernel_has_pids_peak() else None)
    assert processes_of_jobs({result.job}) == []


def shmem_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Shmem:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no Shmem line in /proc/meminfo")


def test_filling_tmp_gets_enospc_and_the_space_is_freed(client: Client) -> None:
    """/tmp fills at the shipped 256 MiB (ENOSPC), charged to the job; the host gets it back."""
    code = OUTCOME + textwrap.dedent(
        """
        def fill():
            with open("/tmp/fill", "wb", buffering=0) as f:
                while True:
                    f.write(bytes(1 << 20))
        print(outcome(fill), os.stat("/tmp/fill").st_size)
        """
    )
    before = shmem_bytes()
    result = client.run([PY, "-c", code], stdio="capture")
    assert (result.exit_code, text(result)) == (0, f"ENOSPC {TMP_SIZE}\n"), result.stderr
    assert result.report.memory_peak_bytes is not None
    assert result.report.memory_peak_bytes >= TMP_SIZE
    deadline = time.monotonic() + 10
    while client.ps() or shmem_bytes() - before > TMP_SIZE // 4:
        assert time.monotonic() < deadline, f"still {shmem_bytes() - before} bytes more shmem"
        time.sleep(0.05)
