"""The Unix-socket server: one asyncio task pair per connection, isolated from the others.

Reading uses ``recvmsg`` directly (asyncio streams cannot carry SCM_RIGHTS). Writing goes
through a per-connection outbox drained by its own task: a client that stops reading only
fills its own bounded queue — streamed events beyond the bound are dropped and counted for
that client (they all stay in the job's report), replies are never dropped.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import grp
import ipaddress
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import msgspec

from netjail import protocol as p
from netjail._version import __version__
from netjail.daemon.config import Config
from netjail.daemon.events import rfc3339
from netjail.daemon.jobs import (
    DEFAULT_PATH,
    NOBODY,
    Job,
    JobManager,
    JobSpec,
    applied_limits,
    may_see,
)
from netjail.daemon.proxy import IPAddress
from netjail.errors import (
    ExecError,
    NetjailError,
    NotFoundError,
    PermissionDeniedError,
    ProtocolError,
    RequestError,
)
from netjail.kernel.peer import PeerCred, namespace_inode, peer_credentials, peer_groups
from netjail.policy import Policy, canonical_name
from netjail.text import sanitize

#: Streamed events queued for one client before further ones are dropped (and counted).
MAX_QUEUED_EVENTS = 1000
_RECV_BYTES = 65536
_LINGER_S = 1.0
_LINGER_BYTES = 4 << 20


async def close_gracefully(sock: socket.socket) -> None:
    """Half-close, discard what the peer still sends (bounded in time and bytes), close.

    Closing a socket with unread input makes the kernel send a reset, which can destroy our
    last message (the error explaining why we hang up) before the peer reads it.
    """
    loop = asyncio.get_running_loop()
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
    budget = _LINGER_BYTES
    deadline = loop.time() + _LINGER_S
    while budget > 0:
        try:
            chunk = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            if loop.time() >= deadline:
                break
            await asyncio.sleep(0.01)
            continue
        except OSError:
            break
        if not chunk:
            break
        budget -= len(chunk)
    sock.close()


class Outbox:
    """A connection's queue of frames to send, bounded for droppable frames."""

    def __init__(self) -> None:
        self._frames: deque[tuple[bytes, bool]] = deque()
        self._droppable = 0
        self.dropped = 0
        self._wake = asyncio.Event()
        self.closed = False

    def put(self, frame: bytes, *, droppable: bool = False) -> None:
        if self.closed:
            return
        if droppable:
            if self._droppable >= MAX_QUEUED_EVENTS:
                self.dropped += 1
                return
            self._droppable += 1
        self._frames.append((frame, droppable))
        self._wake.set()

    async def get(self) -> bytes | None:
        while not self._frames:
            if self.closed:
                return None
            self._wake.clear()
            await self._wake.wait()
        frame, droppable = self._frames.popleft()
        if droppable:
            self._droppable -= 1
        return frame

    def close(self) -> None:
        self.closed = True
        self._wake.set()


class Connection:
    """One client connection."""

    def __init__(self, server: Server, sock: socket.socket, peer: PeerCred) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self.outbox = Outbox()
        self._frames = p.FrameBuffer()
        self._fds: list[int] = []
        self._greeted = False
        self._runs: set[Job] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        #: This connection's `events --follow` subscriptions, dropped when it closes.
        self._follows: list[Callable[[p.Event], None]] = []
        self._loop = asyncio.get_running_loop()

    def send(self, message: msgspec.Struct, *, droppable: bool = False) -> None:
        self.outbox.put(p.encode_message(message), droppable=droppable)

    def send_error(self, error: NetjailError) -> None:
        exit_code = error.exit_code if isinstance(error, ExecError) else None
        self.send(p.ErrorMessage(code=error.code, message=str(error), exit_code=exit_code))

    async def serve(self) -> None:
        writer = asyncio.ensure_future(self._write_loop())
        try:
            await self._read_loop()
        finally:
            for fd in self._fds:
                os.close(fd)
            self._fds.clear()
            for job in list(self._runs):
                # The client that ran the job went away: nobody is left to report to.
                self.server.log("info", "client gone, killing its job", job=job.id)
                await self.server.jobs.kill(job, 9)
            self.outbox.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer, 5)
            writer.cancel()
            for task in self._tasks:
                task.cancel()
            for follow in self._follows:
                self.server.jobs.followers.remove(follow)
            await close_gracefully(self.sock)

    async def _write_loop(self) -> None:
        while (frame := await self.outbox.get()) is not None:
            try:
                await self._loop.sock_sendall(self.sock, frame)
            except OSError:
                self.outbox.close()
                return

    async def _recv(self) -> tuple[bytes, list[int]]:
        while True:
            try:
                fds = array.array("i")
                data, ancdata, _flags, _addr = self.sock.recvmsg(
                    _RECV_BYTES, socket.CMSG_SPACE(p.MAX_FDS * fds.itemsize)
                )
            except (BlockingIOError, InterruptedError):
                ready: asyncio.Future[None] = self._loop.create_future()
                self._loop.add_reader(self.sock.fileno(), ready.set_result, None)
                try:
                    await ready
                finally:
                    self._loop.remove_reader(self.sock.fileno())
                continue
            except OSError:
                return b"", []
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    usable = len(payload) - len(payload) % fds.itemsize
                    fds.frombytes(payload[:usable])
            return data, list(fds)

    async def _read_loop(self) -> None:
        while True:
            data, fds = await self._recv()
            self._fds.extend(fds)
            if len(self._fds) > p.MAX_FDS:
                self.send_error(ProtocolError(f"more than {p.MAX_FDS} file descriptors sent"))
                return
            if not data:
                return
            try:
                frames = self._frames.feed(data)
            except ProtocolError as e:
                self.send_error(e)
                return
            for frame in frames:
                fds_for_frame, self._fds = self._fds, []
                try:
                    await self._handle(frame, fds_for_frame)
                except NetjailError as e:
                    self.send_error(e)
                finally:
                    for fd in fds_for_frame:
                        with contextlib.suppress(OSError):
                            os.close(fd)

    async def _handle(self, frame: bytes, fds: list[int]) -> None:
        request = p.decode_request(frame)
        if not self._greeted:
            if not isinstance(request, p.Hello):
                raise ProtocolError("the first message must be hello")
            if request.version != p.PROTOCOL_VERSION:
                raise ProtocolError(
                    f"unsupported protocol version {request.version}; "
                    f"this daemon speaks {p.PROTOCOL_VERSION}"
                )
            self._greeted = True
            self.send(p.HelloReply(version=p.PROTOCOL_VERSION, daemon=__version__))
            return
        match request:
            case p.Hello():
                raise ProtocolError("hello was already sent")
            case p.RunRequest():
                await self._run(request, fds)
            case p.KillRequest():
                job = self.server.jobs.find(request.job, self.peer)
                await self.server.jobs.kill(job, request.signal)
                self.send(p.Killed(job=job.id))
            case p.PsRequest():
                self.send(
                    p.PsReply(jobs=[_job_info(j) for j in self.server.jobs.visible_jobs(self.peer)])
                )
            case p.StatusRequest():
                self.send(self.server.status())
            case p.EventsRequest():
                self._events(request)

    def _visible(self, event: p.Event, job_filter: str | None) -> bool:
        if job_filter is not None and event.job != job_filter:
            return False
        return may_see(self.peer, self.server.job_owner.get(event.job))

    def _events(self, request: p.EventsRequest) -> None:
        owner = self.server.job_owner.get(request.job) if request.job is not None else None
        if request.job is not None and (owner is None or not may_see(self.peer, owner)):
            # The same answer for another user's job as for none: ids are not disclosed.
            raise NotFoundError(f"no such job: {request.job}")
        for event in list(self.server.jobs.history):
            if self._visible(event, request.job):
                self.send(p.EventMessage(event=event), droppable=True)
        if not request.follow:
            self.send(p.EventsEnd(lost_events=self.outbox.dropped))
            return

        def follow(event: p.Event) -> None:
            if self._visible(event, request.job):
                self.send(p.EventMessage(event=event), droppable=True)

        self.server.jobs.followers.append(follow)
        self._follows.append(follow)

    async def _run(self, request: p.RunRequest, fds: list[int]) -> None:
        spec = self.server.job_spec(request, self.peer)
        if request.stdio == "fds":
            if len(fds) != 3:
                raise ProtocolError(
                    f'stdio "fds" needs exactly 3 file descriptors with the frame, got {len(fds)}'
                )
            stdio = list(fds)
        elif request.stdio == "null":
            null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            fds.append(null)  # closed by the caller with the others
            stdio = [null, null, null]
        else:
            stdio = []
        # Events can come before `started` is sent (the job runs as soon as it is spawned):
        # hold them back until then, so `started` is always the first reply.
        early: list[p.Event] | None = []

        def sink(event: p.Event) -> None:
            if early is not None:
                early.append(event)
            else:
                self.send(p.EventMessage(event=event), droppable=True)

        job = await self.server.jobs.start(spec, stdio, sink if request.events else None)
        self.server.job_owner[job.id] = self.peer.uid
        self._runs.add(job)
        pid = job.process.pid if job.process is not None else 0
        self.send(p.Started(job=job.id, pid=pid))
        held, early = early or [], None
        for event in held:
            self.send(p.EventMessage(event=event), droppable=True)
        task = asyncio.ensure_future(self._report_when_done(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _report_when_done(self, job: Job) -> None:
        if job.finished is None:
            return
        try:
            # shield: this task is cancelled when the client goes; the job's future is shared.
            report = await asyncio.shield(job.finished)
        except NetjailError as e:
            self.send_error(e)
        else:
            self.send(p.Exit(report=report, dropped_events=self.outbox.dropped))
        finally:
            self._runs.discard(job)


def _job_info(job: Job) -> p.JobInfo:
    return p.JobInfo(
        job=job.id,
        argv=job.spec.argv,
        uid=job.spec.uid,
        gid=job.spec.gid,
        pid=job.process.pid if job.process else None,
        owner_uid=job.spec.owner.uid,
        started=rfc3339(job.started_wall),
        events=len(job.events.events),
    )


class Server:
    """Accepts connections and holds what they share."""

    def __init__(
        self,
        *,
        listener: socket.socket,
        jobs: JobManager,
        log: Callable[..., None],
        cgroup_mode: str | None,
        config: Config,
    ) -> None:
        self.listener = listener
        self.config = config
        #: The configuration file's own values, before command-line overrides (for reloads).
        self.file_config = config
        self.jobs = jobs
        self.log = log
        self.cgroup_mode = cgroup_mode
        self.started = time.monotonic()
        self.own_netns = namespace_inode(os.getpid(), "net")
        #: job id → uid of the client that ran it, kept after the job ends for `events`.
        self.job_owner: dict[str, int] = {}
        self.connections: set[Connection] = set()
        # Strong references: the loop keeps only weak ones to running tasks.
        self._connection_tasks: set[asyncio.Task[None]] = set()

    def status(self) -> p.StatusReply:
        return p.StatusReply(
            version=__version__,
            pid=os.getpid(),
            uptime_s=round(time.monotonic() - self.started, 3),
            jobs_running=len(self.jobs.jobs),
            jobs_total=self.jobs.jobs_total,
            events_seen=self.jobs.events_seen,
            events_lost=self.jobs.events_lost,
            cgroup_mode=self.cgroup_mode,
        )

    def job_spec(self, request: p.RunRequest, peer: PeerCred) -> JobSpec:
        """Validate a run request against who is asking; RequestError says what is wrong."""
        if peer.uid == 0:
            uid = request.uid if request.uid is not None else NOBODY
            gid = (
                request.gid
                if request.gid is not None
                else (uid if request.uid is not None else NOBODY)
            )
        else:
            if request.uid not in (None, peer.uid) or request.gid not in (None, peer.gid):
                raise PermissionDeniedError("only root may choose the job's uid or gid")
            uid, gid = peer.uid, peer.gid
        for text in [*request.argv, *request.env, *request.env.values(), request.cwd or ""]:
            if "\0" in text:
                raise RequestError("argv, env and cwd must not contain NUL bytes")
        for key in request.env:
            if "=" in key:
                raise RequestError(f"invalid environment variable name {key!r}")
        if request.cwd is not None and not request.cwd.startswith("/"):
            raise RequestError("cwd must be an absolute path")
        env = {"PATH": DEFAULT_PATH, "HOME": "/", "LANG": "C.UTF-8"}
        env.update(request.env)
        policy, job_hosts = self._policy(request)
        limits = applied_limits(
            self.jobs.limits,
            memory=request.memory_bytes,
            cpus=request.cpus,
            pids=request.pids,
            timeout=request.timeout_s,
            kill_grace=request.kill_grace_s,
        )
        return JobSpec(
            argv=list(request.argv),
            env=env,
            cwd=request.cwd or "/",
            uid=uid,
            gid=gid,
            owner=peer,
            limits=limits,
            capture_bytes=request.capture_bytes if request.stdio == "capture" else None,
            policy=policy,
            job_hosts=job_hosts,
            blocked_dns_answer=self.config.policy.blocked_dns_answer,
        )

    def _policy(self, request: p.RunRequest) -> tuple[Policy, dict[str, IPAddress]]:
        """The job's rules: its own allow rules (else the daemon's default), plus every deny.

        The operator's default_deny always applies, so a client cannot allow it back.
        """
        allow = request.allow or list(self.config.policy.default_allow)
        deny = [*request.deny, *self.config.policy.default_deny]
        policy = Policy.parse(allow, deny)
        job_hosts: dict[str, IPAddress] = {}
        for entry in request.add_hosts:
            name, sep, address = entry.rpartition(":")
            canonical = canonical_name(name) if sep else None
            try:
                ip = ipaddress.ip_address(address.strip("[]"))
            except ValueError:
                ip = None
            if canonical is None or ip is None:
                raise RequestError(
                    f"invalid --add-host {sanitize(entry)!r}: use NAME:IP, "
                    "e.g. api.example.test:192.0.2.10"
                )
            job_hosts[canonical] = ip
        return policy, job_hosts

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        self.listener.setblocking(False)
        while True:
            sock, _ = await loop.sock_accept(self.listener)
            task = loop.create_task(self._serve_connection(sock))
            self._connection_tasks.add(task)
            task.add_done_callback(self._connection_tasks.discard)

    def apply_config(self, config: Config) -> None:
        """Use a reloaded configuration for connections and jobs from now on."""
        self.config = config
        self.jobs.limits = config.limits
        self.jobs.daemon_hosts = config.hosts

    async def close_connections(self, reason: str) -> None:
        """Tell every connected client why it is being disconnected, then disconnect it."""
        for connection in list(self.connections):
            connection.send(p.ErrorMessage(code="shutdown", message=reason))
            connection.outbox.close()
        tasks = list(self._connection_tasks)
        # Cancelled, each connection's own clean-up still flushes its outbox (the message
        # above included) and half-closes before closing.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def allowed(self, peer: PeerCred) -> bool:
        """Root always; others when no allow-list is set, or when their uid or a group is on it."""
        if peer.uid == 0 or not (self.config.allowed_uids or self.config.allowed_groups):
            return True
        if peer.uid in self.config.allowed_uids:
            return True
        wanted = set()
        for name in self.config.allowed_groups:
            with contextlib.suppress(KeyError):
                wanted.add(grp.getgrnam(name).gr_gid)
        return bool(wanted & peer_groups(peer.pid, peer.gid))

    @staticmethod
    async def _refuse(sock: socket.socket, code: str, message: str) -> None:
        with contextlib.suppress(OSError):
            sock.send(p.encode_message(p.ErrorMessage(code=code, message=message)))
        await close_gracefully(sock)

    async def _serve_connection(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        try:
            peer = peer_credentials(sock)
        except OSError:
            sock.close()
            return
        if not self.allowed(peer):
            self.log("warning", "refused a client not in allowed_uids/allowed_groups", uid=peer.uid)
            await self._refuse(
                sock, "permission", "this user may not use netjail (allowed_uids/allowed_groups)"
            )
            return
        netns_inode = namespace_inode(peer.pid, "net")
        if netns_inode == self.own_netns:
            jailed = False  # the common case: a client on the host, in our own netns
        else:
            jailed = self.jobs.is_jailed(peer.pid, netns_inode)
        if jailed:
            self.log(
                "warning", "refused a connection from inside a jail", pid=peer.pid, uid=peer.uid
            )
            await self._refuse(sock, "permission", "connections from inside a jail are refused")
            return
        connection = Connection(self, sock, peer)
        self.connections.add(connection)
        try:
            await connection.serve()
        except Exception as e:
            self.log("error", "connection failed", pid=peer.pid, error=repr(e))
        finally:
            self.connections.discard(connection)
