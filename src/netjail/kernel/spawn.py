"""The fork server: the only process that forks jobs.

Why a fork server: the daemon is multi-threaded (namespace builder threads), and forking a
multi-threaded process then running Python before exec can deadlock on locks other threads held
at fork time. So ``ForkServer.start`` forks one helper at daemon start-up, before any thread
exists; that helper stays single-threaded and forks every job. Each job child enters the jail's
netns, gets a private mount namespace (daemon paths hidden), joins its cgroups, starts a new
session, drops every capability and supplementary group, sets uid/gid and no_new_privs, and
execs. A failure at any step is reported back with the step's name; the job never runs.

The helper is also a child subreaper, so processes a job orphans (double fork, setsid) are
re-parented to it and reaped: zombies never pile up. It reports every job exit with its
rusage; the daemon holds a pidfd per job, so signals never reach a recycled pid.

Messages are typed msgspec structs (``_ToServer``, ``_FromServer``), one per datagram of a
SOCK_SEQPACKET socketpair (message boundaries kept, fds passed with SCM_RIGHTS). Both ends are
ours: the daemon validated everything before it got here.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import os
import selectors
import signal
import socket
import threading
from dataclasses import dataclass

import msgspec

from netjail.errors import ExecError, SpawnError
from netjail.kernel import syscalls

_MAX_MESSAGE = 1 << 21
#: Signals the job gets back at their default disposition (Python ignores SIGPIPE, and the
#: daemon handles INT/TERM/HUP); the job must not inherit either choice.
_RESET_SIGNALS = (
    signal.SIGPIPE,
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGCHLD,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)


class SpawnRequest(msgspec.Struct, frozen=True):
    """Everything the fork server needs to start one job."""

    argv: list[str]
    env: dict[str, str]
    cwd: str
    uid: int
    gid: int
    netns_path: str
    hide_paths: list[str] = []
    #: (source file, target path) read-only bind mounts, e.g. a per-job resolv.conf.
    bind_files: list[tuple[str, str]] = []
    cgroup_procs: list[str] = []


class ExitStatus(msgspec.Struct, frozen=True):
    """How a job's main process ended, and its resource usage (its reaped children included)."""

    exit_code: int | None
    signal: int | None
    cpu_user_s: float
    cpu_system_s: float
    max_rss_bytes: int


class SpawnFailure(msgspec.Struct, frozen=True):
    """Which step of a job child's set-up failed, and why (written by the child before exit)."""

    stage: str
    errno: int
    detail: str


class _Spawn(msgspec.Struct, frozen=True, tag="spawn"):
    id: int
    request: SpawnRequest


class _Spawned(msgspec.Struct, frozen=True, tag="spawned"):
    """The job runs; its pidfd comes with this message (SCM_RIGHTS)."""

    id: int
    pid: int


class _SpawnFailed(msgspec.Struct, frozen=True, tag="failed"):
    id: int
    failure: SpawnFailure


class _Exited(msgspec.Struct, frozen=True, tag="exited"):
    pid: int
    status: ExitStatus


_ToServer = _Spawn
_FromServer = _Spawned | _SpawnFailed | _Exited
_to_server = msgspec.msgpack.Decoder(_ToServer)
_from_server = msgspec.msgpack.Decoder(_FromServer)
_failure = msgspec.msgpack.Decoder(SpawnFailure)
_encode = msgspec.msgpack.encode


def _send(sock: socket.socket, message: msgspec.Struct, fds: list[int] | None = None) -> None:
    data = _encode(message)
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.send(data)


def _recv(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One datagram and the fds that came with it; b"" when the other end closed."""
    fds = array.array("i")
    data, ancdata, _flags, _addr = sock.recvmsg(_MAX_MESSAGE, socket.CMSG_SPACE(8 * fds.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % fds.itemsize
            fds.frombytes(payload[:usable])
    return data, list(fds)


# ---------------------------------------------------------------- the fork server process


def _enter_jail(request: SpawnRequest, stage: list[str]) -> None:
    """Join the jail's netns, a private mount namespace (daemon paths hidden) and the cgroups."""
    stage[0] = "network namespace"
    ns_fd = os.open(request.netns_path, os.O_RDONLY | os.O_CLOEXEC)
    syscalls.setns(ns_fd, syscalls.CLONE_NEWNET)
    os.close(ns_fd)
    stage[0] = "mount namespace"
    syscalls.unshare(syscalls.CLONE_NEWNS)
    # Private first, so nothing we mount propagates back to the host.
    syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
    # Bind first: a source may live in a directory that is hidden next.
    for source, target in request.bind_files:
        stage[0] = f"mounting {target}"
        syscalls.mount(source, target, None, syscalls.MS_BIND)
        syscalls.mount(
            None, target, None, syscalls.MS_BIND | syscalls.MS_REMOUNT | syscalls.MS_RDONLY
        )
    for path in request.hide_paths:
        stage[0] = f"hiding {path}"
        syscalls.mount(
            "netjail",
            path,
            "tmpfs",
            syscalls.MS_RDONLY | syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC,
            "size=4k,mode=755",
        )
    stage[0] = "cgroup"
    for procs in request.cgroup_procs:
        with open(procs, "w") as f:
            f.write("0")


def _drop_privileges(request: SpawnRequest) -> None:
    """No capabilities, no supplementary groups, the job's uid/gid, no_new_privs."""
    syscalls.lock_out_capabilities()
    os.setgroups([])
    os.setresgid(request.gid, request.gid, request.gid)
    os.setresuid(request.uid, request.uid, request.uid)
    syscalls.clear_capability_sets()
    syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)


def _child(request: SpawnRequest, stdio: list[int], report_fd: int) -> None:
    """Runs in the forked job process: set up the jail side, then exec. Never returns."""
    stage = ["signals"]
    try:
        for sig in _RESET_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        stage[0] = "session"
        os.setsid()
        _enter_jail(request, stage)
        stage[0] = "stdio"
        for target, fd in enumerate(stdio):
            os.dup2(fd, target)
        stage[0] = "privileges"
        _drop_privileges(request)
        stage[0] = "working directory"
        # After the privilege drop, so the job user's own permissions decide.
        os.chdir(request.cwd)
        stage[0] = "exec"
        os.closerange(3, report_fd)
        os.closerange(report_fd + 1, 65536)
        os.execvpe(request.argv[0], request.argv, request.env)  # noqa: S606 - exec is the point
    except OSError as e:
        detail = e.strerror or str(e)
        if stage[0] == "working directory":
            detail = f"{request.cwd}: {detail}"
        elif stage[0] == "exec":
            detail = f"{request.argv[0]}: {detail}"
        _report_failure(report_fd, SpawnFailure(stage=stage[0], errno=e.errno or 0, detail=detail))
    # Anything else must still be reported, not raised.
    except BaseException as e:
        _report_failure(report_fd, SpawnFailure(stage=stage[0], errno=0, detail=repr(e)))
    os._exit(127)


def _report_failure(report_fd: int, failure: SpawnFailure) -> None:
    # One write of at most PIPE_BUF bytes is atomic; the detail is cut to keep it under.
    bounded = SpawnFailure(
        stage=failure.stage[:200], errno=failure.errno, detail=failure.detail[:3000]
    )
    with contextlib.suppress(OSError):
        os.write(report_fd, _encode(bounded))


def _spawn_one(request: SpawnRequest, stdio: list[int]) -> tuple[int, int] | SpawnFailure:
    """Fork a job; wait until it exec'd; (pid, pidfd), or the failure the child reported."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _child(request, stdio, write_fd)
    os.close(write_fd)
    try:
        # EOF without data means exec succeeded (the pipe is close-on-exec).
        chunks = []
        while chunk := os.read(read_fd, 4096):
            chunks.append(chunk)
    finally:
        os.close(read_fd)
    if chunks:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        try:
            return _failure.decode(b"".join(chunks))
        except msgspec.DecodeError:
            return SpawnFailure(stage="set-up", errno=0, detail="unreadable failure report")
    return pid, os.pidfd_open(pid)


def _reap(sock: socket.socket, jobs: set[int]) -> None:
    while True:
        try:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if pid not in jobs:
            continue  # an orphan a job left behind, re-parented to us: reaped, nothing to report
        jobs.discard(pid)
        exit_status = ExitStatus(
            exit_code=os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
            signal=os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            cpu_user_s=usage.ru_utime,
            cpu_system_s=usage.ru_stime,
            max_rss_bytes=usage.ru_maxrss * 1024,
        )
        _send(sock, _Exited(pid=pid, status=exit_status))


def _serve(sock: socket.socket) -> None:
    """The fork server's main loop. Exits when the daemon's end of the socket closes."""
    syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)
    syscalls.prctl(syscalls.PR_SET_CHILD_SUBREAPER, 1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    jobs: set[int] = set()
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select():
            if key.fileobj == wake_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 4096)
                _reap(sock, jobs)
                continue
            try:
                data, fds = _recv(sock)
            except InterruptedError:
                continue
            if not data:
                os._exit(0)
            try:
                message = _to_server.decode(data)
                outcome = _spawn_one(message.request, fds)
            finally:
                for fd in fds:
                    os.close(fd)
            if isinstance(outcome, SpawnFailure):
                _send(sock, _SpawnFailed(id=message.id, failure=outcome))
            else:
                pid, pidfd = outcome
                jobs.add(pid)
                _send(sock, _Spawned(id=message.id, pid=pid), [pidfd])
                os.close(pidfd)
            _reap(sock, jobs)


# ---------------------------------------------------------------- the daemon's side


@dataclass
class SpawnedJob:
    """A running job's main process, as the daemon sees it."""

    pid: int
    pidfd: int

    def send_signal(self, sig: int) -> bool:
        """Signal the main process; False if it has already exited (never hits a reused pid)."""
        try:
            signal.pidfd_send_signal(self.pidfd, sig)
        except ProcessLookupError:
            return False
        return True

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


class ForkServer:
    """The daemon's handle on the fork server process."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self._sock = sock
        self._next_id = 0
        self._pending: dict[int, asyncio.Future[SpawnedJob]] = {}
        self._exits: dict[int, ExitStatus] = {}
        self._waiters: dict[int, asyncio.Future[ExitStatus]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def start(cls) -> ForkServer:
        """Fork the server. Must be called while the daemon still has a single thread."""
        if threading.active_count() != 1:
            raise RuntimeError("ForkServer.start() must run before any thread is started")
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            parent.close()
            try:
                _serve(child)
            finally:
                os._exit(1)
        child.close()
        return cls(pid, parent)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start reading the server's messages from ``loop``."""
        self._loop = loop
        self._sock.setblocking(False)
        loop.add_reader(self._sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        while True:
            try:
                data, fds = _recv(self._sock)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                data, fds = b"", []
                self._fail_all(SpawnError(f"lost the fork server: {e.strerror}"))
            if not data:
                self._fail_all(SpawnError("the fork server exited"))
                if self._loop is not None:
                    self._loop.remove_reader(self._sock.fileno())
                return
            self._dispatch(_from_server.decode(data), fds)

    def _dispatch(self, message: _FromServer, fds: list[int]) -> None:
        if isinstance(message, _Exited):
            waiter = self._waiters.pop(message.pid, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(message.status)
            else:
                self._exits[message.pid] = message.status
            return
        future = self._pending.pop(message.id, None)
        if future is None or future.done():
            for fd in fds:
                os.close(fd)
            return
        if isinstance(message, _SpawnFailed):
            future.set_exception(spawn_error(message.failure))
        elif fds:
            future.set_result(SpawnedJob(pid=message.pid, pidfd=fds[0]))
        else:
            future.set_exception(SpawnError("fork server sent no pidfd"))

    def _fail_all(self, error: Exception) -> None:
        for future in list(self._pending.values()) + list(self._waiters.values()):
            if not future.done():
                future.set_exception(error)
        self._pending.clear()
        self._waiters.clear()

    async def spawn(self, request: SpawnRequest, stdio: list[int]) -> SpawnedJob:
        """Start a job; raise SpawnError naming the failed step if it could not be started."""
        if self._loop is None:
            raise SpawnError("fork server not attached to the event loop")
        self._next_id += 1
        future: asyncio.Future[SpawnedJob] = self._loop.create_future()
        self._pending[self._next_id] = future
        message = _Spawn(id=self._next_id, request=request)
        try:
            _send(self._sock, message, stdio)
        except OSError as e:
            self._pending.pop(self._next_id, None)
            raise SpawnError(f"cannot reach the fork server: {e.strerror}") from None
        return await future

    async def wait(self, pid: int) -> ExitStatus:
        """Wait for job ``pid`` to exit."""
        if pid in self._exits:
            return self._exits.pop(pid)
        if self._loop is None:
            raise SpawnError("fork server not attached to the event loop")
        future: asyncio.Future[ExitStatus] = self._loop.create_future()
        self._waiters[pid] = future
        return await future

    def close(self) -> None:
        """Close our end: the server exits; reap it."""
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._sock.fileno())
        with contextlib.suppress(OSError):
            self._sock.close()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


def spawn_error(failure: SpawnFailure) -> SpawnError:
    """The error a client gets for a job child's failed set-up step."""
    if failure.stage == "exec":
        # As a shell reports it: 127 command not found, 126 found but not executable.
        code = 127 if failure.errno == errno.ENOENT else 126
        return ExecError(f"cannot execute {failure.detail}", code)
    return SpawnError(f"cannot start the job ({failure.stage}): {failure.detail}")
