"""The deep jail's kernel side end to end, without the daemon: jailinit's choreography, its
PID 1, and rootfs's private file system, in a network namespace each test makes and deletes.

Jobs are started as the fork server starts them: a single-threaded helper process that is a
child subreaper calls ``spawn_job``, reaps the init and reports how the job ended. Each job's
stdout and stderr go to files, read once it ended (or polled, while it runs, for a line).
"""

from __future__ import annotations

import contextlib
import errno
import os
import pty
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import msgspec
import pytest

from netjail.kernel import jailinit, netns, rootfs, seccomp, syscalls
from netjail.kernel.fsplan import (
    JOB_HOME,
    Bind,
    FdSource,
    MiB,
    PathSource,
    TmpfsSizes,
    build_fs_plan,
)
from netjail.kernel.jailinit import ExecHook
from netjail.kernel.jobplan import JobExit, JobPlan, SpawnFailure

JOB_UID = 65534
HOSTNAME = "netjail-kerneltest"
#: Where the test's own server listens inside the jail.
JAIL_PORT = 8080
PATH = "/usr/local/bin:/usr/bin:/bin"
TIMEOUT = 20


@dataclass
class Jail:
    """A jail netns (configured like the daemon's), its HOME directory, and a listener in it."""

    name: str
    home: str
    listener: socket.socket

    @property
    def path(self) -> str:
        return netns.netns_path(self.name)


def _set_up_jail() -> socket.socket:
    netns.configure_jail_interfaces()
    # Only in this netns: the ping socket for every gid, as a host admin would allow it.
    with open("/proc/sys/net/ipv4/ping_group_range", "w") as f:
        f.write("0 2147483647")
    listener = socket.create_server(("127.0.0.1", JAIL_PORT))
    listener.settimeout(TIMEOUT)
    return listener


def _mount_points() -> set[str]:
    """The host's mount points that are this suite's (njk-…): a job's own mounts never are."""
    with open("/proc/self/mountinfo") as f:
        return {point for line in f if "njk-" in (point := line.split()[4])}


@pytest.fixture
def jail() -> Iterator[Jail]:
    """A fresh jail netns and HOME; afterwards no netns, mount or HOME of it is left."""
    name = f"njk-{secrets.token_hex(4)}"
    listener = netns.run_in_new_netns(name, _set_up_jail).result(TIMEOUT)
    # The netns thread must be gone before anything forks: a fork copies only its caller.
    deadline = time.monotonic() + TIMEOUT
    while threading.active_count() > 1 and time.monotonic() < deadline:
        time.sleep(0.001)
    home = tempfile.mkdtemp(prefix="njk-home-")
    os.chown(home, JOB_UID, JOB_UID)
    try:
        yield Jail(name, home, listener)
    finally:
        listener.close()
        netns.delete_netns(name)
        shutil.rmtree(home, ignore_errors=True)
    assert not os.path.exists(netns.netns_path(name))
    assert _mount_points() == set()


# ---------------------------------------------------------------- running jobs


class _Started(msgspec.Struct, tag="started"):
    pid: int


class _NotStarted(msgspec.Struct, tag="failed"):
    failure: SpawnFailure


class _Ended(msgspec.Struct, tag="ended"):
    exit_code: int | None
    signal: int | None


_events = msgspec.json.Decoder(_Started | _NotStarted | _Ended)


def _serve_one(
    plan: JobPlan, stdio: list[int], sources: Sequence[int], hooks: Sequence[ExecHook], out: int
) -> NoReturn:
    """The helper: a one-job fork server."""
    try:
        syscalls.prctl(syscalls.PR_SET_CHILD_SUBREAPER, 1)
        outcome = jailinit.spawn_job(plan, stdio, sources, hooks)
        if isinstance(outcome, SpawnFailure):
            os.write(out, msgspec.json.encode(_NotStarted(outcome)) + b"\n")
            os._exit(0)
        os.write(out, msgspec.json.encode(_Started(outcome.init_pid)) + b"\n")
        while True:
            pid, status = os.waitpid(-1, 0)
            if pid == outcome.init_pid:
                break
        ended = jailinit.read_job_exit(outcome.status_fd, status)
        os.write(out, msgspec.json.encode(_Ended(ended.exit_code, ended.signal)) + b"\n")
    finally:
        os._exit(0)


class Job:
    """A job started through the helper; its output in files, its init's host pid."""

    def __init__(
        self, plan: JobPlan, stdin: int, sources: Sequence[int], hooks: Sequence[ExecHook]
    ) -> None:
        self._dir = tempfile.mkdtemp(prefix="njk-out-")
        self.stdout_path = os.path.join(self._dir, "stdout")
        self.stderr_path = os.path.join(self._dir, "stderr")
        out = os.open(self.stdout_path, os.O_WRONLY | os.O_CREAT, 0o644)
        err = os.open(self.stderr_path, os.O_WRONLY | os.O_CREAT, 0o644)
        read_fd, write_fd = os.pipe()
        self.helper = os.fork()
        if self.helper == 0:
            os.close(read_fd)
            _serve_one(plan, [stdin, out, err], sources, hooks, write_fd)
        os.close(write_fd)
        os.close(out)
        os.close(err)
        self._events = os.fdopen(read_fd, "rb")
        first = _events.decode(self._events.readline())
        self.init_pid = first.pid if isinstance(first, _Started) else None
        self.failure = first.failure if isinstance(first, _NotStarted) else None

    def wait(self) -> JobExit:
        """Until the job ended; how it did."""
        try:
            if self.init_pid is None:
                raise AssertionError(f"the job did not start: {self.failure}")
            last = _events.decode(self._events.readline())
            assert isinstance(last, _Ended), last
            return JobExit(last.exit_code, last.signal)
        finally:
            self.close()

    def close(self) -> None:
        if self.helper:
            self._events.close()
            os.waitpid(self.helper, 0)
            self.helper = 0

    def stdout(self) -> str:
        return Path(self.stdout_path).read_text()

    def stderr(self) -> str:
        return Path(self.stderr_path).read_text()

    def wait_for_output(self, text: str) -> None:
        """Until ``text`` is on the job's stdout (or fail after TIMEOUT)."""
        deadline = time.monotonic() + TIMEOUT
        while text not in self.stdout():
            assert time.monotonic() < deadline, f"no {text!r} in {self.stdout()!r}"
            time.sleep(0.01)

    def remove_output(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)


def make_plan(
    jail: Jail,
    argv: list[str],
    *,
    binds: Sequence[Bind] = (),
    files: Sequence[Bind] = (),
    sizes: TmpfsSizes = TmpfsSizes(),  # noqa: B008 - frozen
    uid: int = JOB_UID,
    cwd: str = JOB_HOME,
    cgroup_procs: Sequence[str] = (),
) -> JobPlan:
    return JobPlan(
        argv=argv,
        env={"PATH": PATH, "HOME": JOB_HOME, "LANG": "C.UTF-8"},
        cwd=cwd,
        uid=uid,
        gid=uid,
        netns_path=jail.path,
        cgroup_procs=list(cgroup_procs),
        hostname=HOSTNAME,
        fs=build_fs_plan(
            host=rootfs.read_host_layout(),
            home=PathSource(jail.home),
            binds=binds,
            files=files,
            sizes=sizes,
        ),
    )


@contextlib.contextmanager
def started(
    plan: JobPlan,
    *,
    stdin: int | None = None,
    sources: Sequence[int] = (),
    hooks: Sequence[ExecHook] = (),
) -> Iterator[Job]:
    """A running job; it is killed and reaped if the test leaves early."""
    null = os.open("/dev/null", os.O_RDONLY)
    job = Job(plan, null if stdin is None else stdin, sources, hooks)
    os.close(null)
    try:
        yield job
    finally:
        if job.helper and job.init_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(job.init_pid, signal.SIGKILL)
        job.close()
        job.remove_output()


@dataclass
class Result:
    exit: JobExit
    stdout: str
    stderr: str


def run(plan: JobPlan) -> Result:
    """Run a job to its end."""
    with started(plan) as job:
        ended = job.wait()
        return Result(ended, job.stdout(), job.stderr())


def run_ok(plan: JobPlan) -> str:
    """Run a job that must exit 0; its stdout."""
    result = run(plan)
    assert result.exit == JobExit(0, None), result
    return result.stdout


def python(code: str) -> list[str]:
    return ["/usr/bin/python3", "-c", code]


# ---------------------------------------------------------------- namespaces


def test_proc_shows_only_the_jobs_processes(jail: Jail) -> None:
    """/proc lists PID 1 (the init) and the command only; ps sees the same."""
    code = "import os; print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))"
    out = run_ok(make_plan(jail, python(code)))
    assert out == "[1, 2]\n"
    ps = run_ok(make_plan(jail, ["ps", "-e", "-o", "pid="]))
    assert ps.split() == ["1", "2"]


def test_the_command_holds_only_its_stdio(jail: Jail) -> None:
    """No fd of the fork server, the init or the set-up reaches the command: only 0, 1 and 2."""
    code = "import os; print(sorted(int(fd) for fd in os.listdir('/proc/self/fd')))"
    # 3 is the directory listdir itself opened.
    assert run_ok(make_plan(jail, python(code))) == "[0, 1, 2, 3]\n"


def test_the_job_has_its_own_hostname(jail: Jail) -> None:
    """The job sees the plan's hostname; the host's is unchanged."""
    before = socket.gethostname()
    assert run_ok(make_plan(jail, ["hostname"])) == f"{HOSTNAME}\n"
    assert socket.gethostname() == before


def test_the_job_has_its_own_ipc_namespace(jail: Jail) -> None:
    """A host SysV message queue is not in the job's view, which has no queue at all."""
    made = subprocess.run(["ipcmk", "-Q"], check=True, capture_output=True, text=True).stdout
    queue = made.split(":")[1].strip()
    try:
        host = subprocess.run(["ipcs", "-q"], check=True, capture_output=True, text=True).stdout
        assert f" {queue} " in host  # the host sees it: the check below can fail
        job = run_ok(make_plan(jail, ["ipcs", "-q"]))
        assert [line for line in job.splitlines() if line.startswith("0x")] == []
    finally:
        subprocess.run(["ipcrm", "-q", queue], check=True)


def test_the_job_sees_only_the_jails_network(jail: Jail) -> None:
    """`ip link`, /sys/class/net and /proc/1/net/tcp show the jail's netns, not the host's."""
    host_listener = socket.create_server(("127.0.0.1", 0))
    try:
        host_port = host_listener.getsockname()[1]
        links = run_ok(make_plan(jail, ["ip", "-o", "link", "show"]))
        names = {line.split(":")[1].strip().split("@")[0] for line in links.splitlines()}
        assert names == {"lo", netns.JAIL_IF}
        assert run_ok(make_plan(jail, ["ls", "/sys/class/net"])).split() == sorted(names)
        tcp = run_ok(make_plan(jail, ["cat", "/proc/1/net/tcp"]))
        assert f"0100007F:{JAIL_PORT:04X}" in tcp
        assert f"0100007F:{host_port:04X}" not in tcp
    finally:
        host_listener.close()


def test_host_unix_sockets_are_unreachable(jail: Jail) -> None:
    """World-connectable host sockets in /tmp, /run and /dev/shm cannot be reached."""
    tag = secrets.token_hex(4)
    paths = [f"/tmp/njk-{tag}.sock", f"/run/njk-{tag}.sock", f"/dev/shm/njk-{tag}.sock"]
    servers = []
    try:
        for path in paths:
            server = socket.socket(socket.AF_UNIX)
            server.bind(path)
            server.listen()
            os.chmod(path, 0o777)  # noqa: S103 - the attack: anyone may connect
            servers.append(server)
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(path)  # reachable from the host: the check below can fail
        code = (
            "import socket, sys\n"
            "for path in sys.argv[1:]:\n"
            "    s = socket.socket(socket.AF_UNIX)\n"
            "    try:\n"
            "        s.connect(path)\n"
            "        print('connected', path)\n"
            "    except OSError as e:\n"
            "        print(type(e).__name__, path)\n"
        )
        out = run_ok(make_plan(jail, [*python(code), *paths]))
        assert out.splitlines() == [f"FileNotFoundError {path}" for path in paths]
    finally:
        for server in servers:
            server.close()
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def test_the_job_is_born_in_its_cgroup(jail: Jail) -> None:
    """The cgroup.procs files of the plan hold the job's init and command from their start."""
    parent = "/sys/fs/cgroup/pids"
    if not os.path.isdir(parent):
        pytest.skip("no cgroup v1 pids hierarchy")
    group = os.path.join(parent, f"njk-{secrets.token_hex(4)}")
    os.mkdir(group)
    try:
        procs = [os.path.join(group, "cgroup.procs")]
        out = run_ok(make_plan(jail, ["cat", "/proc/self/cgroup"], cgroup_procs=procs))
        assert f":pids:/{os.path.basename(group)}\n" in out
    finally:
        os.rmdir(group)


# ---------------------------------------------------------------- the file system


def test_the_root_is_the_allow_list(jail: Jail) -> None:
    """/ holds the system binds, links and the jail's own mounts, and nothing else; read-only."""
    out = run_ok(make_plan(jail, ["ls", "-A", "/"]))
    expected = {"dev", "etc", "home", "proc", "run", "sys", "tmp", "usr", "var"}
    expected |= {os.path.basename(e.path) for e in rootfs.read_host_layout().entries}
    assert set(out.split()) == expected
    assert "/root" not in out
    denied = run(make_plan(jail, ["sh", "-c", "touch /x"], uid=0, cwd="/"))
    assert denied.exit.exit_code != 0
    assert "Read-only file system" in denied.stderr


def test_dev_is_private(jail: Jail) -> None:
    """/dev has bubblewrap's --dev entries only, and the devices work."""
    out = run_ok(make_plan(jail, ["ls", "-A", "/dev"]))
    assert set(out.split()) == {
        "fd", "full", "null", "ptmx", "pts", "random", "shm",
        "stderr", "stdin", "stdout", "tty", "urandom", "zero",
    }  # fmt: skip
    code = (
        "import os\n"
        "open('/dev/null', 'w').write('x')\n"
        "print(len(open('/dev/urandom', 'rb').read(8)), open('/dev/zero', 'rb').read(2))\n"
        "fd, name = os.openpty()\n"
        "print(os.ttyname(name))\n"
    )
    lines = run_ok(make_plan(jail, python(code))).splitlines()
    assert lines == ["8 b'\\x00\\x00'", "/dev/pts/0"]


def test_proc_sys_is_read_only_even_for_uid_0(jail: Jail) -> None:
    """A uid-0 job (no capabilities) cannot write a sysctl: /proc/sys is covered read-only."""
    result = run(
        make_plan(jail, ["sh", "-c", "echo x > /proc/sys/kernel/domainname"], uid=0, cwd="/")
    )
    assert result.exit.exit_code != 0
    assert "Read-only file system" in result.stderr


def test_writes_to_tmp_and_home_do_not_outlive_the_job(jail: Jail) -> None:
    """/tmp, /var/tmp and /dev/shm are the job's own; HOME is the host directory bound rw."""
    marker = f"njk-{secrets.token_hex(4)}"
    script = (
        f"echo t > /tmp/{marker} && echo v > /var/tmp/{marker} && echo s > /dev/shm/{marker}"
        f" && echo h > $HOME/{marker} && pwd"
    )
    assert run_ok(make_plan(jail, ["sh", "-c", script])) == f"{JOB_HOME}\n"
    for host_dir in ("/tmp", "/var/tmp", "/dev/shm"):
        assert not os.path.exists(os.path.join(host_dir, marker))
    assert Path(jail.home, marker).read_text() == "h\n"
    os.unlink(os.path.join(jail.home, marker))  # the daemon removes HOME after a job
    after = run_ok(make_plan(jail, ["ls", "-A", "/tmp", "/var/tmp", "/dev/shm", JOB_HOME]))
    assert marker not in after


def test_bind_is_read_write_and_ro_bind_read_only(jail: Jail) -> None:
    """A client's --bind source is writable in the job, a --ro-bind one is not."""
    base = tempfile.mkdtemp(prefix="njk-binds-")
    try:
        rw_dir, ro_dir = os.path.join(base, "rw"), os.path.join(base, "ro")
        for d in (rw_dir, ro_dir):
            os.mkdir(d)
            os.chown(d, JOB_UID, JOB_UID)
        Path(ro_dir, "given").write_text("from the host\n")
        # As pathcheck.open_bind_source hands them over: O_PATH fds, opened on the host side.
        fds = [os.open(d, os.O_PATH | os.O_CLOEXEC) for d in (rw_dir, ro_dir)]
        binds = [Bind(FdSource(0), "/data/rw", "rw"), Bind(FdSource(1), "/data/ro", "ro")]
        script = "echo made > /data/rw/new; cat /data/ro/given; echo no > /data/ro/new"
        try:
            with started(make_plan(jail, ["sh", "-c", script], binds=binds), sources=fds) as job:
                ended = job.wait()
                stdout, stderr = job.stdout(), job.stderr()
        finally:
            for fd in fds:
                os.close(fd)
        assert ended.exit_code != 0
        assert stdout == "from the host\n"
        assert "Read-only file system" in stderr
        assert Path(rw_dir, "new").read_text() == "made\n"
        assert not os.path.exists(os.path.join(ro_dir, "new"))
    finally:
        shutil.rmtree(base)


def test_a_file_bind_replaces_the_hosts_file(jail: Jail) -> None:
    """A daemon file bind (resolv.conf) shows its source at the target, read-only."""
    with tempfile.NamedTemporaryFile("w", suffix=".conf", delete=False) as f:
        f.write("nameserver 127.0.0.1\n")
    try:
        files = [Bind(PathSource(f.name), "/etc/resolv.conf", "ro")]
        script = "cat /etc/resolv.conf; echo x >> /etc/resolv.conf"
        result = run(make_plan(jail, ["sh", "-c", script], uid=0, cwd="/", files=files))
        assert result.stdout == "nameserver 127.0.0.1\n"
        assert "Read-only file system" in result.stderr
    finally:
        os.unlink(f.name)


def test_filling_tmp_gets_enospc(jail: Jail) -> None:
    """Writing past the /tmp size limit fails with ENOSPC."""
    code = (
        "import errno\n"
        "try:\n"
        "    with open('/tmp/fill', 'wb') as f:\n"
        "        f.write(bytes(8 << 20))\n"
        "except OSError as e:\n"
        "    print(errno.errorcode[e.errno])\n"
    )
    out = run_ok(make_plan(jail, python(code), sizes=TmpfsSizes(tmp=4 * MiB)))
    assert out == "ENOSPC\n"


# ---------------------------------------------------------------- programs


TOOLS = [
    (python("import sys; print(sys.version_info[0])"), "3\n"),
    (["bash", "-c", "echo $((6 * 7))"], "42\n"),
    (["git", "--version"], "git version"),
    (["ping", "-c1", "-W5", "127.0.0.1"], "1 received"),
]
if shutil.which("node"):
    TOOLS.append((["node", "-e", "console.log(6 * 7)"], "42\n"))


@pytest.mark.parametrize(("argv", "expected"), TOOLS, ids=[t[0][0] for t in TOOLS])
def test_tools_work(jail: Jail, argv: list[str], expected: str) -> None:
    """Everyday tools run in the jail as an unprivileged uid."""
    assert expected in run_ok(make_plan(jail, argv))


def test_curl_reaches_a_jail_local_server(jail: Jail) -> None:
    """curl connects to a server listening inside the jail's netns."""
    url = f"http://127.0.0.1:{JAIL_PORT}/"
    with started(make_plan(jail, ["curl", "-sS", "--max-time", "15", url])) as job:
        conn, _ = jail.listener.accept()
        with conn:
            conn.settimeout(TIMEOUT)
            request = conn.recv(4096)
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 6\r\n\r\njailed")
        ended = job.wait()
        assert request.startswith(b"GET / HTTP/1.1")
        assert (ended, job.stdout()) == (JobExit(0, None), "jailed")


# ---------------------------------------------------------------- the init


def test_sigterm_to_init_reaches_the_whole_tree(jail: Jail) -> None:
    """SIGTERM sent to the init reaches the command and its children."""
    script = (
        'trap "echo parent-TERM" TERM\n'
        "sh -c 'trap \"echo child-TERM; exit 0\" TERM; echo child-ready; sleep 100 & wait' &\n"
        "echo parent-ready\n"
        "wait; wait\n"
    )
    with started(make_plan(jail, ["sh", "-c", script])) as job:
        job.wait_for_output("child-ready")
        job.wait_for_output("parent-ready")
        assert job.init_pid is not None
        os.kill(job.init_pid, signal.SIGTERM)
        ended = job.wait()
        assert ended == JobExit(0, None)
        assert {"parent-TERM", "child-TERM"} <= set(job.stdout().splitlines())


def test_sigint_to_init_reaches_the_command(jail: Jail) -> None:
    """SIGINT sent to the init reaches the command, whose exit code becomes the job's."""
    script = 'trap "echo got-INT; exit 5" INT; echo ready; sleep 100 & wait'
    with started(make_plan(jail, ["sh", "-c", script])) as job:
        job.wait_for_output("ready")
        assert job.init_pid is not None
        os.kill(job.init_pid, signal.SIGINT)
        assert job.wait() == JobExit(5, None)
        assert "got-INT" in job.stdout()


def test_exit_code_propagates(jail: Jail) -> None:
    """The command's exit code is the job's."""
    assert run(make_plan(jail, ["sh", "-c", "exit 7"])).exit == JobExit(7, None)


def test_the_killing_signal_propagates(jail: Jail) -> None:
    """A command killed by a signal is reported as killed by it, not as exit 128+N."""
    assert run(make_plan(jail, ["sh", "-c", "kill -TERM $$"])).exit == JobExit(None, signal.SIGTERM)
    assert run(make_plan(jail, ["sh", "-c", "kill -KILL $$"])).exit == JobExit(None, signal.SIGKILL)


#: Starts ``sleep MARKER`` in a session of its own (so not in the command's process group), and
#: prints "ready" once it runs: a process the command leaves behind.
LEAVE_A_SLEEPER = (
    "import os, subprocess, sys\n"
    "marker = sys.argv[1]\n"
    "child = subprocess.Popen(['sleep', marker], start_new_session=True)\n"
    "while marker.encode() not in open(f'/proc/{child.pid}/cmdline', 'rb').read():\n"
    "    pass\n"
    "print('ready', flush=True)\n"
    "if sys.argv[2] == 'stay':\n"
    "    os.execvp('sleep', ['sleep', marker])\n"
    "os._exit(3)\n"
)


def _marker() -> str:
    return f"1000.{secrets.randbelow(10**6):06d}"


def test_sigkill_to_init_ends_the_job(jail: Jail) -> None:
    """SIGKILL from outside ends the init and, with it, every process of the job."""
    marker = _marker()
    with started(make_plan(jail, [*python(LEAVE_A_SLEEPER), marker, "stay"])) as job:
        job.wait_for_output("ready")
        assert job.init_pid is not None
        assert len(_processes_with_arg(marker)) >= 1
        os.kill(job.init_pid, signal.SIGKILL)
        assert job.wait() == JobExit(None, signal.SIGKILL)
    assert _processes_with_arg(marker) == []


def test_orphans_end_with_the_command(jail: Jail) -> None:
    """A process the command leaves running, in a session of its own, ends with the job."""
    marker = _marker()
    result = run(make_plan(jail, [*python(LEAVE_A_SLEEPER), marker, "leave"]))
    assert (result.exit, result.stdout) == (JobExit(3, None), "ready\n")
    assert _processes_with_arg(marker) == []


def _processes_with_arg(arg: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if arg.encode() in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                found.append(int(pid))
    return found


def test_on_a_terminal_signals_go_to_the_foreground_group(jail: Jail) -> None:
    """With a pty as stdin, the command is its foreground group and gets forwarded SIGINT."""
    leader, follower = pty.openpty()
    script = (
        "import os, signal, sys\n"
        "print(os.tcgetpgrp(0) == os.getpgrp(), flush=True)\n"
        "signal.sigwait([signal.SIGINT])\n"
        "print('got-INT', flush=True)\n"
    )
    try:
        with started(make_plan(jail, python(script)), stdin=follower) as job:
            job.wait_for_output("\n")
            assert job.init_pid is not None
            os.kill(job.init_pid, signal.SIGINT)
            assert job.wait() == JobExit(0, None)
            assert job.stdout() == "True\ngot-INT\n"
    finally:
        os.close(leader)
        os.close(follower)


def test_the_init_serves_under_the_seccomp_filter(jail: Jail) -> None:
    """The job filter, loaded as the last step, binds the init and the command; the init still
    forwards signals and reports the exit."""
    seccomp.prepare_job_filter()  # in the parent, as the fork server does
    hooks = [ExecHook("seccomp filter", seccomp.load_job_filter)]
    script = (
        "grep Seccomp: /proc/1/status /proc/self/status\n"
        "python3 -c 'import socket\ntry: socket.socket(40, 1)\nexcept OSError as e: print(e.errno)'"
        "\n"
        'trap "exit 9" TERM; echo ready; sleep 100 & wait\n'
    )
    with started(make_plan(jail, ["sh", "-c", script]), hooks=hooks) as job:
        job.wait_for_output("ready")
        assert job.init_pid is not None
        os.kill(job.init_pid, signal.SIGTERM)
        assert job.wait() == JobExit(9, None)
        assert job.stdout().splitlines() == [
            "/proc/1/status:Seccomp:\t2",
            "/proc/self/status:Seccomp:\t2",
            str(errno.EAFNOSUPPORT),  # AF_VSOCK (40)
            "ready",
        ]


def test_a_failing_hook_names_its_stage(jail: Jail) -> None:
    """A last step that fails stops the job, reported under the hook's stage name."""

    def refuse() -> None:
        raise OSError(errno.EPERM, "refused")

    with started(make_plan(jail, ["true"]), hooks=[ExecHook("seccomp filter", refuse)]) as job:
        assert job.failure == SpawnFailure("seccomp filter", errno.EPERM, "refused")


# ---------------------------------------------------------------- failures


def test_an_exec_failure_names_the_command(jail: Jail) -> None:
    """A missing command fails the exec step with ENOENT, and no job runs."""
    with started(make_plan(jail, ["no-such-command-njk"])) as job:
        assert job.failure == SpawnFailure(
            stage="exec",
            errno=errno.ENOENT,
            detail="no-such-command-njk: No such file or directory",
        )


def test_a_bad_cwd_names_the_directory(jail: Jail) -> None:
    """A cwd the job cannot enter fails the working-directory step."""
    with started(make_plan(jail, ["true"], cwd="/nonexistent")) as job:
        assert job.failure is not None
        assert (job.failure.stage, job.failure.errno) == ("working directory", errno.ENOENT)
        assert job.failure.detail.startswith("/nonexistent: ")


def test_a_failed_mount_names_the_mount(jail: Jail) -> None:
    """A bind whose mount point cannot be made fails the file-system step, naming it."""
    files = [Bind(PathSource("/etc/passwd"), "/usr/njk-nowhere/file", "ro")]
    with started(make_plan(jail, ["true"], files=files)) as job:
        assert job.failure == SpawnFailure(
            stage="file system",
            errno=errno.EROFS,
            detail="mounting /usr/njk-nowhere/file: Read-only file system",
        )


def test_a_missing_netns_names_the_step(jail: Jail) -> None:
    """A jail whose netns is gone fails the network-namespace step."""
    plan = msgspec.structs.replace(make_plan(jail, ["true"]), netns_path="/run/netns/njk-none")
    with started(plan) as job:
        assert job.failure is not None
        assert (job.failure.stage, job.failure.errno) == ("network namespace", errno.ENOENT)
