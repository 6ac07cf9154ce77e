"""The deep jail end to end, through a real daemon: each way out of it fails."""

from __future__ import annotations

import contextlib
import os
import pwd
import select
import shutil
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
from netjail.errors import NetjailError
from netjail.kernel.fsplan import JOB_HOME
from netjail.kernel.rules import DNS_PORT, PROXY_PORT
from netjail.protocol import BindMount, Exit, RunRequest

from .conftest import Daemon, processes_of_jobs
from .jailtools import (
    OUTCOME,
    PY,
    as_user,
    cli_run,
    cwd_note,
    run_as_user,
    text,
    user_sleeper,
)

pytestmark = pytest.mark.usefixtures("no_leaks")

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
        # The job can print before this client has handled its "started".
        deadline = time.monotonic() + 10
        while not started and time.monotonic() < deadline:
            time.sleep(0.01)
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


def test_the_jobs_init_shows_the_fork_servers_command_line_not_the_daemons(
    client: Client, daemon: Daemon
) -> None:
    """/proc/1/cmdline in a job is the lean fork server's (python -s -P -m
    netjail.kernel.forkserver), with none of the daemon's arguments: no config, socket or state
    path."""
    result = client.run(["cat", "/proc/1/cmdline"], stdio="capture")
    assert result.stdout is not None
    assert result.stdout.split(b"\0") == [
        sys.executable.encode(),
        b"-s",
        b"-P",
        b"-m",
        b"netjail.kernel.forkserver",
        b"",
    ]
    for secret in (daemon.socket, daemon.state_dir):
        assert secret.encode() not in result.stdout


def test_a_jobs_init_holds_nothing_of_the_daemons_files(client: Client, daemon: Daemon) -> None:
    """The job's init (the job's uid) holds no descriptor of the daemon's log or state."""
    job = client.start(
        RunRequest(argv=["sh", "-c", "sleep 2"], cwd="/", stdio="null", events=False)
    )
    try:
        time.sleep(0.3)
        base = os.path.dirname(daemon.state_dir)
        held: dict[str, str] = {}
        for pid in processes_of_jobs({job.job}):
            for name in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{name}")
                    if link.startswith(base):
                        held[f"{pid}/{name}"] = link
        while not any(isinstance(m, Exit) for m in job.receive()):
            pass
    finally:
        job.close()
    assert held == {}


def test_network_view_is_the_jails_only(client: Client) -> None:
    """ip link and /sys/class/net list lo and nj0 (an ifb); /proc/1/net/tcp has only the jail's
    sockets."""
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
    assert sorted(line.split(": ")[1].split("@")[0] for line in links) == ["lo", "nj0"]
    assert sysfs == ["lo", "nj0"]
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
    # What is left there is the warm pool's: HOMEs made ahead for jobs not asked for yet.
    homes = set(os.listdir(os.path.join(daemon.state_dir, "homes")))
    assert homes & {first.job, second.job} == set()
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
