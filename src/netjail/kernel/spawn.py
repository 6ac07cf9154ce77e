"""The fork server: the only process that forks jobs.

Why a fork server: the daemon is multi-threaded (namespace builder threads), and forking a
multi-threaded process then running Python before exec can deadlock on locks other threads held
at fork time. So ``ForkServer.start`` forks one helper at daemon start-up, before any thread
exists; that helper stays single-threaded and starts every job with ``jailinit.spawn_job``: the
job's init, PID 1 of a new PID namespace, enters the jail's netns and cgroups, builds the job's
file system in new mount, IPC and UTS namespaces, drops privileges, loads the seccomp filter
(compiled here once, before the first job) and spawns the command. A failure at any step is
reported back with the step's name; the job never runs.

The helper is also a child subreaper, so whatever leaves a job's namespaces is re-parented to
it and reaped: zombies never pile up. It reports every init's exit with the command's status
(read from the init's status pipe) and the rusage; the daemon holds a pidfd per job, so
signals never reach a recycled pid.

Messages are typed msgspec structs (``_ToServer``, ``_FromServer``), one per datagram of a
SOCK_SEQPACKET socketpair (message boundaries kept, fds passed with SCM_RIGHTS). Both ends are
ours: the daemon validated everything before it got here. A job's plan, which carries its argv
and env (up to the protocol's bound), travels in a sealed memfd passed with the datagram
(``netjail.kernel.fdpass``), so every datagram is a few bytes and many jobs started at once
never fill the socket; should they still, a spawn waits in an outbox until the socket is
writable again, in order, rather than fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import selectors
import signal
import socket
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec

from netjail.errors import ExecError, SpawnError, map_os_errors
from netjail.kernel import syscalls
from netjail.kernel.fdpass import read_payload, recv_with_fds, sealed_payload, send_with_fds
from netjail.kernel.jailinit import ExecHook, StartedJob, read_job_exit, spawn_job
from netjail.kernel.jobplan import JobPlan, SpawnFailure
from netjail.kernel.seccomp import load_job_filter, prepare_job_filter
from netjail.protocol import MAX_BINDS

#: Every datagram is small: what may be large (a job's plan) comes in a memfd.
_MAX_MESSAGE = 1 << 16
#: The largest plan the fork server reads: argv and env are bounded at 120 KiB by the protocol,
#: the binds' paths by MAX_BINDS; this leaves ample room and still bounds a reader's memory.
_MAX_PLAN = 16 << 20
#: Fds one spawn message may carry: the plan's memfd, the job's stdio and one per bind source.
_MAX_SPAWN_FDS = 1 + 3 + MAX_BINDS + 8


class ExitStatus(msgspec.Struct, frozen=True):
    """How a job's main process ended, and its resource usage (its reaped children included)."""

    exit_code: int | None
    signal: int | None
    cpu_user_s: float
    cpu_system_s: float
    max_rss_bytes: int


class _Spawn(msgspec.Struct, frozen=True, tag="spawn"):
    """Start a job. The message's fds: a sealed memfd holding its ``JobPlan`` (msgpack), the
    job's stdio (3), then its bind sources."""

    id: int


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
_plans = msgspec.msgpack.Decoder(JobPlan)
_encode = msgspec.msgpack.encode


def _send(sock: socket.socket, message: msgspec.Struct, fds: Sequence[int] = ()) -> None:
    send_with_fds(sock, _encode(message), fds)


def _recv(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One datagram and the fds that came with it; b"" when the other end closed."""
    return recv_with_fds(sock, _MAX_MESSAGE, _MAX_SPAWN_FDS)


def _start_job(message: _Spawn, fds: list[int]) -> StartedJob | SpawnFailure:
    """Read the plan from the message's memfd and start the job with the fds after it."""
    if len(fds) < 4:
        detail = f"expected a plan and 3 stdio fds, got {len(fds)} fds"
        return SpawnFailure(stage="plan", errno=0, detail=detail)
    try:
        plan = _plans.decode(read_payload(fds[0], _MAX_PLAN))
    except (ValueError, msgspec.DecodeError) as e:
        return SpawnFailure(stage="plan", errno=0, detail=f"unreadable plan: {e}")
    return spawn_job(plan, fds[1:4], fds[4:], _HOOKS)


# ---------------------------------------------------------------- the fork server process

#: The steps a job's init runs last before its command is spawned.
_HOOKS = (ExecHook(stage="seccomp filter", run=load_job_filter),)


def _reap(sock: socket.socket, jobs: dict[int, int]) -> None:
    """Reap every exited child; report jobs' inits with how their command ended."""
    while True:
        try:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        status_fd = jobs.pop(pid, None)
        if status_fd is None:
            continue  # not a job's init: nothing to report
        ended = read_job_exit(status_fd, status)
        os.close(status_fd)
        exit_status = ExitStatus(
            exit_code=ended.exit_code,
            signal=ended.signal,
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
    prepare_job_filter()  # compiled already: the inits only load it
    jobs: dict[int, int] = {}  # init pid -> its status pipe
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
                outcome = _start_job(message, fds)
            finally:
                for fd in fds:
                    os.close(fd)
            if isinstance(outcome, SpawnFailure):
                _send(sock, _SpawnFailed(id=message.id, failure=outcome))
            else:
                jobs[outcome.init_pid] = outcome.status_fd
                pidfd = os.pidfd_open(outcome.init_pid)
                _send(sock, _Spawned(id=message.id, pid=outcome.init_pid), [pidfd])
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


@dataclass(frozen=True)
class _Outgoing:
    """A spawn request waiting for room in the socket; ``sent`` is done once it was sent."""

    data: bytes
    fds: list[int]
    sent: asyncio.Future[None]


class ForkServer:
    """The daemon's handle on the fork server process."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self._sock = sock
        self._next_id = 0
        self._pending: dict[int, asyncio.Future[SpawnedJob]] = {}
        self._exits: dict[int, ExitStatus] = {}
        self._waiters: dict[int, asyncio.Future[ExitStatus]] = {}
        self._outbox: deque[_Outgoing] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def start(cls) -> ForkServer:
        """Fork the server. Must be called while the daemon still has a single thread."""
        if threading.active_count() != 1:
            raise RuntimeError("ForkServer.start() must run before any thread is started")
        # Fail closed here, before serving: a daemon whose jobs cannot get their seccomp
        # filter must not start (SpawnError names the reason).
        prepare_job_filter()
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
        if self._outbox and self._loop is not None:
            self._loop.remove_writer(self._sock.fileno())
        futures: list[
            asyncio.Future[None] | asyncio.Future[SpawnedJob] | asyncio.Future[ExitStatus]
        ]
        futures = [request.sent for request in self._outbox]
        futures += [*self._pending.values(), *self._waiters.values()]
        for future in futures:
            if not future.done():
                future.set_exception(error)
        self._outbox.clear()
        self._pending.clear()
        self._waiters.clear()

    async def spawn(
        self, plan: JobPlan, stdio: list[int], source_fds: Sequence[int] = ()
    ) -> SpawnedJob:
        """Start a job; raise SpawnError naming the failed step if it could not be started.

        ``stdio`` are the job's fds 0-2, ``source_fds`` those the plan's bind sources index.
        """
        if self._loop is None:
            raise SpawnError("fork server not attached to the event loop")
        with map_os_errors(SpawnError, "cannot hand the job's plan to the fork server"):
            plan_fd = sealed_payload("netjail-plan", _encode(plan))
        try:
            self._next_id += 1
            spawn_id = self._next_id
            request = _Outgoing(
                data=_encode(_Spawn(id=spawn_id)),
                fds=[plan_fd, *stdio, *source_fds],
                sent=self._loop.create_future(),
            )
            future: asyncio.Future[SpawnedJob] = self._loop.create_future()
            self._pending[spawn_id] = future
            try:
                await self._deliver(self._loop, request)
            except BaseException:
                self._pending.pop(spawn_id, None)
                raise
        finally:
            os.close(plan_fd)
        return await future

    async def _deliver(self, loop: asyncio.AbstractEventLoop, request: _Outgoing) -> None:
        """Send now, or, when the socket is full, queue behind earlier spawns until it drains.

        The caller keeps the fds open until this returns; a cancelled wait never sends them.
        """
        if not self._outbox:
            try:
                send_with_fds(self._sock, request.data, request.fds)
                return
            except BlockingIOError:
                pass
            except OSError as e:
                raise SpawnError(f"cannot reach the fork server: {e.strerror}") from None
        if not self._outbox:
            loop.add_writer(self._sock.fileno(), self._flush)
        self._outbox.append(request)
        await request.sent

    def _flush(self) -> None:
        while self._outbox:
            request = self._outbox[0]
            if not request.sent.done():  # else its spawn was cancelled: its fds may be closed
                try:
                    send_with_fds(self._sock, request.data, request.fds)
                except BlockingIOError:
                    return
                except OSError as e:
                    request.sent.set_exception(
                        SpawnError(f"cannot reach the fork server: {e.strerror}")
                    )
                else:
                    request.sent.set_result(None)
            self._outbox.popleft()
        if self._loop is not None:
            self._loop.remove_writer(self._sock.fileno())

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
