"""The daemon's handle on its fork server (``netjail.kernel.forkserver``): start it, hand it
jobs, and, when it ends, say so and start another.

``ForkServer.start`` execs the server at daemon start-up and waits for its ``Ready``: a server
that cannot compile the jobs' seccomp filter fails the start, closed. From then on the server
is watched through its pidfd and its socket. When it ends:

- one log line says how it ended (killed by SIGKILL, exited with status 1…);
- every job in flight fails closed with an error that names the fork server: spawns not yet
  answered, and running jobs, whose exit status it alone could report (their cgroups are
  killed by the daemon's teardown as for any job that failed);
- a new server is exec'd after a back-off (``restart_delay``), so a server that dies at once
  does not make the daemon spin; until it is up, a job is refused at once with the reason;
- ``health()`` tells ``status`` all of that.

Spawns are sent in order; should the socket be full, they wait in an outbox until it drains
rather than fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import time
from collections.abc import Sequence
from typing import Any, Protocol

import msgspec

from netjail.errors import ExecError, SpawnError, map_os_errors
from netjail.kernel.fdpass import recv_with_fds, sealed_payload, send_with_fds
from netjail.kernel.forkserver import (
    MAX_FDS,
    MAX_MESSAGE,
    Ended,
    Exited,
    ExitStatus,
    FromServer,
    PreforkRequest,
    Ready,
    Spawned,
    SpawnFailed,
    SpawnRequest,
    StartFailed,
    encode,
    from_server,
)
from netjail.kernel.fsplan import FsPlan
from netjail.kernel.helperproc import describe_exit, helper_command
from netjail.kernel.jobplan import JobExit, JobPlan, SpawnFailure, decode_job_exit
from netjail.kernel.serverproc import (
    READY_TIMEOUT_S,
    ForkServerHealth,
    ForkServerState,
    Outgoing,
    ServerProcess,
    SpawnedJob,
    launch_server,
    restart_delay,
    wait_ready,
)
from netjail.kernel.standbylink import StandbyLink, start_standby_job

__all__ = ["ExitStatus", "ForkServer", "ForkServerHealth", "SpawnedJob", "spawn_error"]


class _Log(Protocol):
    def __call__(self, level: str, message: str, **fields: Any) -> None: ...


class ForkServer:
    """The daemon's handle on the fork server process, restarted whenever it ends."""

    def __init__(self, server: ServerProcess, command: Sequence[str]) -> None:
        self._server: ServerProcess | None = server
        self._command = list(command)
        self._next_id = 0
        self._owners: dict[int, ServerProcess] = {}  # a running job's pid -> its server
        self._loop: asyncio.AbstractEventLoop | None = None
        self._log: _Log | None = None
        self._restarts = 0
        self._last_exit: str | None = None
        self._delay_s: float | None = None
        self._restart: asyncio.TimerHandle | None = None
        self._closed = False

    @classmethod
    def start(
        cls, command: Sequence[str] | None = None, timeout: float = READY_TIMEOUT_S
    ) -> ForkServer:
        """Exec the fork server and wait until it is ready; SpawnError if it cannot serve (the
        jobs' seccomp filter cannot be compiled, say): the daemon must not start then."""
        command = list(command) if command is not None else helper_command(_SERVER_MODULE)
        server = launch_server(command)
        try:
            wait_ready(server, timeout)
        except BaseException:
            server.process.kill()
            server.release()
            raise
        return cls(server, command)

    @property
    def pid(self) -> int | None:
        """The running fork server's pid, if one runs."""
        return self._server.process.pid if self._server is not None else None

    def health(self) -> ForkServerHealth:
        """The fork server's state, restarts and last end, for ``status``."""
        server = self._server
        state: ForkServerState = "down"
        if server is not None:
            state = "up" if server.ready else "starting"
        return ForkServerHealth(state=state, restarts=self._restarts, last_exit=self._last_exit)

    def attach(self, loop: asyncio.AbstractEventLoop, log: _Log) -> None:
        """Start reading the server's messages from ``loop``; ``log`` hears of its ends."""
        self._loop, self._log = loop, log
        if self._server is not None:
            self._watch(loop, self._server)

    def _watch(self, loop: asyncio.AbstractEventLoop, server: ServerProcess) -> None:
        server.sock.setblocking(False)
        loop.add_reader(server.sock.fileno(), self._on_readable, server)
        loop.add_reader(server.pidfd, self._on_ended, server)
        server.reading = True

    # ------------------------------------------------------------------ messages

    def _on_readable(self, server: ServerProcess) -> None:
        while True:
            try:
                data, fds = recv_with_fds(server.sock, MAX_MESSAGE, MAX_FDS)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, fds = b"", []
            if not data:
                # It closed its end: it is ending. Its pidfd says how, and then it is replaced.
                self._stop_reading(server)
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(server.pidfd, signal.SIGKILL)
                return
            try:
                message = from_server.decode(data)
            except msgspec.DecodeError:
                for fd in fds:
                    os.close(fd)
                continue
            self._dispatch(server, message, fds)

    def _dispatch(self, server: ServerProcess, message: FromServer, fds: list[int]) -> None:
        if isinstance(message, Ended):
            self._job_ended(server, message.pid, JobExit(message.exit_code, message.signal))
            return
        if isinstance(message, Exited):
            status = message.status
            if message.pid in server.status_fds:
                # A standby's pipe, read here: a record was written before the init exited.
                self._on_status(server, message.pid)
                self._close_status(server, message.pid)
            ended = server.ends.get(message.pid)
            if ended is None:
                # No record came ahead (the init was killed): its reaping is the job's end.
                self._job_ended(server, message.pid, JobExit(status.exit_code, status.signal))
            else:
                # The record's, not the init's own end (the fork server's, for a standby whose
                # pipe is read here; for the others the fork server said the same).
                status = msgspec.structs.replace(
                    status, exit_code=ended.exit_code, signal=ended.signal
                )
            waiter = server.waiters.pop(message.pid, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(status)
            else:
                server.exits[message.pid] = status
            return
        if isinstance(message, Ready):
            server.ready = True
            if self._log is not None and self._restarts:
                self._log("info", "a new fork server is up", pid=server.process.pid)
            return
        if isinstance(message, StartFailed):
            server.refusal = message.detail
            return
        self._dispatch_spawned(server, message, fds)

    def _watch_status(self, server: ServerProcess, pid: int, status_fd: int) -> None:
        """Read standby ``pid``'s status pipe from the loop: its record is its job's end."""
        server.status_fds[pid] = status_fd
        os.set_blocking(status_fd, False)
        if self._loop is not None:
            self._loop.add_reader(status_fd, self._on_status, server, pid)

    def _on_status(self, server: ServerProcess, pid: int) -> None:
        """The pipe is readable: with a record, the job ended (say so now); at EOF alone, the
        init was killed, and its reaping (``Exited``) says how."""
        status_fd = server.status_fds.get(pid)
        if status_fd is None:
            return
        try:
            record = os.read(status_fd, 8)
        except BlockingIOError:
            return
        except OSError:
            record = b""
        self._close_status(server, pid)
        if len(record) == 4:
            self._job_ended(server, pid, decode_job_exit(record, 0))

    def _close_status(self, server: ServerProcess, pid: int) -> None:
        status_fd = server.status_fds.pop(pid, None)
        if status_fd is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(status_fd)
        os.close(status_fd)

    def _close_statuses(self, server: ServerProcess) -> None:
        """The server is gone or closing: no record it would reap is read any more."""
        for pid in list(server.status_fds):
            self._close_status(server, pid)

    @staticmethod
    def _job_ended(server: ServerProcess, pid: int, ended: JobExit) -> None:
        if pid in server.ends:
            return  # told once already
        server.ends[pid] = ended
        waiter = server.end_waiters.pop(pid, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(ended)

    def _dispatch_spawned(
        self, server: ServerProcess, message: Spawned | SpawnFailed, fds: list[int]
    ) -> None:
        future = server.pending.pop(message.id, None)
        if future is None or future.done() or isinstance(message, SpawnFailed) or not fds:
            for fd in fds:
                os.close(fd)  # a standby's channel among them: it ends unused
        if future is None or future.done():
            return
        if isinstance(message, SpawnFailed):
            future.set_exception(spawn_error(message.failure))
        elif not fds:
            future.set_exception(SpawnError("fork server sent no pidfd"))
        else:
            pidfd, *rest = fds
            link = StandbyLink.from_fds(*rest[:2]) if len(rest) in (2, 3) else None
            if link is None:
                for fd in rest:
                    os.close(fd)
            elif len(rest) == 3:
                self._watch_status(server, message.pid, rest[2])
            self._owners[message.pid] = server
            future.set_result(SpawnedJob(pid=message.pid, pidfd=pidfd, link=link))

    def _stop_reading(self, server: ServerProcess) -> None:
        if server.reading and self._loop is not None:
            self._loop.remove_reader(server.sock.fileno())
            if server.outbox:
                self._loop.remove_writer(server.sock.fileno())
        server.reading = False

    # ------------------------------------------------------------------ its end, and the next

    def _on_ended(self, server: ServerProcess) -> None:
        """The server's pidfd is readable: it has ended. Read what it sent before, fail what
        is still in flight, say so, and start another after the back-off."""
        loop = self._loop
        if loop is None:  # pragma: no cover - only registered once attached
            return
        loop.remove_reader(server.pidfd)
        if server.reading:
            self._on_readable(server)  # its last Exited and Spawned messages
            self._stop_reading(server)
        ended = describe_exit(server.release())
        if server.refusal is not None:
            ended = f"{ended} ({server.refusal})"
        self._last_exit = ended
        spawning, running = len(server.pending), len(server.waiters)
        self._fail_in_flight(server, ended)
        if self._server is server:
            self._server = None
        if self._closed:
            return
        self._delay_s = restart_delay(self._delay_s, time.monotonic() - server.started)
        if self._log is not None:
            self._log(
                "error",
                f"the fork server {ended}; the jobs in flight failed, a new one starts shortly",
                pid=server.process.pid,
                spawning=spawning,
                running=running,
                restart_in_s=round(self._delay_s, 3),
            )
        self._restart = loop.call_later(self._delay_s, self._start_again)

    def _fail_in_flight(self, server: ServerProcess, ended: str) -> None:
        """Fail ``server``'s unanswered spawns and its running jobs' waits, closed."""
        refused = SpawnError(f"the fork server {ended}; the job was not started")
        for request in server.outbox:
            if not request.sent.done():
                request.sent.set_exception(refused)
        for future in server.pending.values():
            if not future.done():
                future.set_exception(refused)
        for waiter in server.waiters.values():
            if not waiter.done():
                waiter.set_exception(_lost_exit(ended))
        for end_waiter in server.end_waiters.values():
            if not end_waiter.done():
                end_waiter.set_exception(_lost_exit(ended))
        server.end_waiters.clear()
        self._close_statuses(server)
        server.outbox.clear()
        server.pending.clear()
        server.waiters.clear()
        for pid in [pid for pid, owner in self._owners.items() if owner is server]:
            del self._owners[pid]

    def _start_again(self) -> None:
        self._restart = None
        if self._closed or self._loop is None:
            return
        try:
            server = launch_server(self._command)
        except SpawnError as e:
            self._delay_s = restart_delay(self._delay_s, 0.0)
            if self._log is not None:
                self._log("error", "cannot start a new fork server", error=str(e))
            self._restart = self._loop.call_later(self._delay_s, self._start_again)
            return
        self._restarts += 1
        self._server = server
        self._watch(self._loop, server)

    # ------------------------------------------------------------------ jobs

    async def spawn(
        self, plan: JobPlan, stdio: list[int], source_fds: Sequence[int] = ()
    ) -> SpawnedJob:
        """Start a job; raise SpawnError naming the failed step if it could not be started.

        ``stdio`` are the job's fds 0-2, ``source_fds`` those the plan's bind sources index.
        """
        if self._loop is None:
            raise SpawnError("fork server not attached to the event loop")
        server = self._server
        if server is None:
            raise SpawnError(
                f"the fork server {self._last_exit or 'ended'} and a new one is starting; "
                "the job was not started, try again shortly"
            )
        with map_os_errors(SpawnError, "cannot hand the job's plan to the fork server"):
            plan_fd = sealed_payload("netjail-plan", encode(plan))
        try:
            self._next_id += 1
            spawn_id = self._next_id
            request = Outgoing(
                data=encode(SpawnRequest(id=spawn_id)),
                fds=[plan_fd, *stdio, *source_fds],
                sent=self._loop.create_future(),
            )
            future: asyncio.Future[SpawnedJob] = self._loop.create_future()
            server.pending[spawn_id] = future
            try:
                await self._deliver(self._loop, server, request)
            except BaseException:
                server.pending.pop(spawn_id, None)
                raise
        finally:
            os.close(plan_fd)
        return await future

    async def prefork(
        self, netns_path: str, cgroup_procs: Sequence[str], base: FsPlan
    ) -> SpawnedJob:
        """A standby init in the jail at ``netns_path`` and ``cgroup_procs``, once it is there
        waiting for its job (``start_standby``); SpawnError naming the failed step otherwise.
        Its end is awaited with ``wait``, as a job's."""
        loop, server = self._serving("the pool jail was not made")
        self._next_id += 1
        request_id = self._next_id
        message = PreforkRequest(
            id=request_id, netns_path=netns_path, cgroup_procs=list(cgroup_procs), base=base
        )
        request = Outgoing(data=encode(message), fds=[], sent=loop.create_future())
        future: asyncio.Future[SpawnedJob] = loop.create_future()
        server.pending[request_id] = future
        try:
            await self._deliver(loop, server, request)
        except BaseException:
            server.pending.pop(request_id, None)
            raise
        return await future

    async def start_standby(
        self, standby: SpawnedJob, plan: JobPlan, stdio: list[int], source_fds: Sequence[int] = ()
    ) -> None:
        """Give ``standby`` its job, directly down its channel (``standbylink``); returns once
        the command exec'd. SpawnError naming the failed step otherwise (the standby then
        ends), or if its fork server, which alone can report its end, is gone."""
        self._serving("the job was not started")
        if self._owners.get(standby.pid) is not self._server:
            raise SpawnError("the pool jail's standby init belongs to a fork server that ended")
        if standby.link is None:
            raise SpawnError("the pool jail's standby init has no channel")
        failure = await start_standby_job(standby.link, plan, stdio, source_fds)
        if failure is not None:
            raise spawn_error(failure)

    def _serving(self, outcome: str) -> tuple[asyncio.AbstractEventLoop, ServerProcess]:
        """The loop and the fork server serving now; SpawnError (ending in ``outcome``) if
        there is none."""
        if self._loop is None:
            raise SpawnError("fork server not attached to the event loop")
        if self._server is None:
            raise SpawnError(
                f"the fork server {self._last_exit or 'ended'} and a new one is starting; "
                f"{outcome}, try again shortly"
            )
        return self._loop, self._server

    async def _deliver(
        self, loop: asyncio.AbstractEventLoop, server: ServerProcess, request: Outgoing
    ) -> None:
        """Send now, or, when the socket is full, queue behind earlier spawns until it drains.

        The caller keeps the fds open until this returns; a cancelled wait never sends them.
        """
        if not server.outbox:
            try:
                send_with_fds(server.sock, request.data, request.fds)
                return
            except BlockingIOError:
                pass
            except OSError as e:
                raise SpawnError(f"cannot reach the fork server: {e.strerror}") from None
            loop.add_writer(server.sock.fileno(), self._flush, server)
        server.outbox.append(request)
        await request.sent

    def _flush(self, server: ServerProcess) -> None:
        while server.outbox:
            request = server.outbox[0]
            if not request.sent.done():  # else its spawn was cancelled: its fds may be closed
                try:
                    send_with_fds(server.sock, request.data, request.fds)
                except BlockingIOError:
                    return
                except OSError as e:
                    request.sent.set_exception(
                        SpawnError(f"cannot reach the fork server: {e.strerror}")
                    )
                else:
                    request.sent.set_result(None)
            server.outbox.popleft()
        if self._loop is not None:
            self._loop.remove_writer(server.sock.fileno())

    async def wait(self, pid: int) -> ExitStatus:
        """Wait for job ``pid`` to exit."""
        server = self._owners.get(pid)
        if server is None:
            raise _lost_exit(self._last_exit or "ended")
        if pid in server.exits:
            self._forget(server, pid)
            return server.exits.pop(pid)
        if self._loop is None:
            raise SpawnError("fork server not attached to the event loop")
        future: asyncio.Future[ExitStatus] = self._loop.create_future()
        server.waiters[pid] = future
        try:
            status = await future
        except asyncio.CancelledError:
            # A waiter that gave up (the pool's watch of a standby, at its claim): whoever
            # waits next still gets the exit.
            if server.waiters.get(pid) is future:
                del server.waiters[pid]
            raise
        except BaseException:
            self._forget(server, pid)
            raise
        self._forget(server, pid)
        return status

    def _forget(self, server: ServerProcess, pid: int) -> None:
        """Job ``pid`` was reaped and its reaping collected: nothing more comes of it."""
        self._owners.pop(pid, None)
        server.ends.pop(pid, None)
        self._close_status(server, pid)

    async def wait_end(self, pid: int) -> JobExit:
        """Wait for job ``pid``'s command to end, with nothing else of its PID namespace left:
        at its init's status record, without waiting for the init's own exit (or at its
        reaping, if it was killed first). ``wait`` collects the reaping after."""
        server = self._owners.get(pid)
        if server is None:
            raise _lost_exit(self._last_exit or "ended")
        if pid in server.ends:
            return server.ends[pid]
        if self._loop is None:
            raise SpawnError("fork server not attached to the event loop")
        future = server.end_waiters.get(pid)
        if future is None:
            future = self._loop.create_future()
            server.end_waiters[pid] = future
        # Shielded: a waiter that gives up (a timeout) ends no other's wait.
        return await asyncio.shield(future)

    def close(self) -> None:
        """Stop: no new server; close our end, so the running one exits; reap it."""
        self._closed = True
        if self._restart is not None:
            self._restart.cancel()
            self._restart = None
        server, self._server = self._server, None
        if server is None:
            return
        self._stop_reading(server)
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(server.pidfd)
        self._close_statuses(server)
        server.release()


_SERVER_MODULE = "netjail.kernel.forkserver"


def _lost_exit(ended: str) -> SpawnError:
    return SpawnError(f"the fork server {ended}, and with it the job's exit status")


def spawn_error(failure: SpawnFailure) -> SpawnError:
    """The error a client gets for a job child's failed set-up step."""
    if failure.stage == "exec":
        # As a shell reports it: 127 command not found, 126 found but not executable.
        code = 127 if failure.errno == errno.ENOENT else 126
        return ExecError(f"cannot execute {failure.detail}", code)
    return SpawnError(f"cannot start the job ({failure.stage}): {failure.detail}")
