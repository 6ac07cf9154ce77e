"""One client connection: framing in, the requests it serves, and its outbox drained out.

Reading uses ``recvmsg`` directly (asyncio streams cannot carry SCM_RIGHTS). Writing goes
through the connection's outbox (``daemon/outbox.py``), drained by its own task: a client that
stops reading only fills its own bounded queue; one whose outbox overflows is disconnected
(with a warning in the log), and what was queued for it is freed.

A connection that sends no hello within ``HELLO_TIMEOUT_S`` is closed, and so is a greeted one
that has been idle — no request, no job of its running, no ``events --follow`` — for
``IDLE_TIMEOUT_S``: neither holds an fd for ever.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import dataclasses
import os
import socket
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from netjail import protocol as p
from netjail._version import __version__
from netjail.daemon.decisions import Question
from netjail.daemon.events import rfc3339
from netjail.daemon.jobs import may_see
from netjail.daemon.outbox import Outbox, OutFrame, close_gracefully
from netjail.daemon.pipeline import Job
from netjail.daemon.spec import job_spec
from netjail.errors import ExecError, NetjailError, NotFoundError, ProtocolError, ShutdownError
from netjail.kernel.peer import PeerCred

if TYPE_CHECKING:
    from netjail.daemon.server import Server

#: How long a new connection may take to send hello.
HELLO_TIMEOUT_S = 10.0
#: How long a greeted connection may sit with no request, no running job and no follow.
IDLE_TIMEOUT_S = 60.0
_RECV_BYTES = 65536


class HeldEvents:
    """A job's event stream to its client, held until ``release``.

    Events can come before ``started`` is sent (the job runs as soon as it is spawned); they
    wait here, so that ``started`` is always the first reply, and then go out in order.
    """

    def __init__(self, send: Callable[[p.Event], None]) -> None:
        self._send = send
        self._held: list[p.Event] = []
        self._released = False

    def __call__(self, event: p.Event) -> None:
        if self._released:
            self._send(event)
        else:
            self._held.append(event)

    def release(self) -> None:
        self._released = True
        held, self._held = self._held, []
        for event in held:
            self._send(event)


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
        #: When the client last sent something or a job of its ended (for the idle timeout).
        self._active_at = self._loop.time()
        #: Whether the ``shutdown`` error was sent (the daemon is stopping).
        self.told_shutdown = False
        #: Live decisions asked and not yet answered, by question id.
        self._questions: dict[int, asyncio.Future[bool]] = {}
        self._question_ids = 0

    def send(
        self, message: msgspec.Struct, *, droppable: bool = False, fds: Sequence[int] = ()
    ) -> None:
        """Queue ``message`` (with ``fds``, which are then the outbox's to close)."""
        if self.outbox.closed:
            for fd in fds:
                os.close(fd)
            return
        frame = p.encode_message(message)
        self.outbox.put(frame, droppable=droppable, fds=fds)
        if self.outbox.overflowed:
            self.server.log(
                "warning",
                "disconnected a client that does not read its replies",
                pid=self.peer.pid,
                uid=self.peer.uid,
                limit_bytes=self.outbox.max_bytes,
                reply_bytes=len(frame),
            )
            # Ends the read loop (recv sees end of file) and any send in progress.
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)

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
                try:
                    await self.server.jobs.kill(job, 9)
                except Exception as e:
                    # The rest of the clean-up must still happen; the job's own supervisor
                    # kills its cgroup again when the main process ends.
                    self.server.log(
                        "error", "cannot kill a gone client's job", job=job.id, error=str(e)
                    )
            self.outbox.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer, 5)
            writer.cancel()
            self.outbox.discard()
            for task in self._tasks:
                task.cancel()
            for follow in self._follows:
                self.server.intake.followers.remove(follow)
            await close_gracefully(self.sock)

    async def _write_loop(self) -> None:
        while (frame := await self.outbox.get()) is not None:
            try:
                if frame.fds:
                    await self._send_with_fds(frame)
                else:
                    await self._loop.sock_sendall(self.sock, frame.data)
            except OSError:
                self.outbox.close()
                return
            finally:
                frame.close_fds()

    async def _send_with_fds(self, frame: OutFrame) -> None:
        """The frame's first bytes with its fds attached (asyncio has no sendmsg), the rest
        as any frame's."""
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", frame.fds))]
        while True:
            try:
                sent = self.sock.sendmsg([frame.data], ancillary)
                break
            except (BlockingIOError, InterruptedError):
                await self._ready(self._loop.add_writer, self._loop.remove_writer)
        if sent < len(frame.data):
            await self._loop.sock_sendall(self.sock, frame.data[sent:])

    async def _ready(
        self,
        watch: Callable[[int, Callable[[None], None], None], object],
        unwatch: Callable[[int], object],
    ) -> None:
        """Until the socket is ready as ``watch`` (the loop's add_reader or add_writer) says."""
        ready: asyncio.Future[None] = self._loop.create_future()
        watch(self.sock.fileno(), ready.set_result, None)
        try:
            await ready
        finally:
            unwatch(self.sock.fileno())

    async def _recv(self) -> tuple[bytes, list[int]]:
        while True:
            try:
                fds = array.array("i")
                data, ancdata, _flags, _addr = self.sock.recvmsg(
                    _RECV_BYTES, socket.CMSG_SPACE(p.MAX_FDS * fds.itemsize)
                )
            except (BlockingIOError, InterruptedError):
                await self._ready(self._loop.add_reader, self._loop.remove_reader)
                continue
            except OSError:
                return b"", []
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    usable = len(payload) - len(payload) % fds.itemsize
                    fds.frombytes(payload[:usable])
            return data, list(fds)

    async def _next(self) -> tuple[bytes, list[int]]:
        """The next data from the client; b"" when it hung up, or was silent for too long."""
        while True:
            left = self._silence_left()
            if left is not None and left <= 0:
                self.send_error(ProtocolError(self._silence_message()))
                return b"", []
            try:
                # A busy connection has no deadline: look again in a while. No task per read
                # (as wait_for makes one): a request already there is read at once.
                async with asyncio.timeout(IDLE_TIMEOUT_S if left is None else left):
                    return await self._recv()
            except TimeoutError:
                continue

    def _silence_left(self) -> float | None:
        """Seconds before this connection's silence ends it; None while a job of its runs or
        it follows events. Only whole requests count as activity, so trickling bytes does not
        keep a connection open."""
        since = self._loop.time() - self._active_at
        if not self._greeted:
            return HELLO_TIMEOUT_S - since
        if self._runs or self._follows:
            return None
        return IDLE_TIMEOUT_S - since

    def _silence_message(self) -> str:
        if not self._greeted:
            return f"no hello within {HELLO_TIMEOUT_S:g} s; closing the connection"
        return f"no request for {IDLE_TIMEOUT_S:g} s and nothing running; closing the connection"

    async def _read_loop(self) -> None:
        while True:
            data, fds = await self._next()
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
                # Let the writer move replies to the socket between pipelined requests, so that
                # a client reading as it sends is not taken for one that does not read.
                await asyncio.sleep(0)
            if frames and self._greeted:
                self._active_at = self._loop.time()

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
            case p.DecisionRequest():
                # A late answer (after the timeout) or an unknown id changes nothing.
                question = self._questions.pop(request.id, None)
                if question is not None and not question.done():
                    question.set_result(request.allow)

    def _events(self, request: p.EventsRequest) -> None:
        intake = self.server.intake
        if request.job is not None and not may_see(self.peer, intake.owner_of(request.job)):
            # The same answer for another user's job as for none: ids are not disclosed.
            raise NotFoundError(f"no such job: {request.job}")

        def wanted(owner_uid: int, event: p.Event) -> bool:
            if request.job is not None and event.job != request.job:
                return False
            return may_see(self.peer, owner_uid)

        for seen in list(intake.history):
            if wanted(seen.owner_uid, seen.event):
                self.send(p.EventMessage(event=seen.event), droppable=True)
        if not request.follow:
            self.send(p.EventsEnd(lost_events=self.outbox.dropped))
            return

        def follow(event: p.Event) -> None:
            owner = intake.owner_of(event.job)
            if owner is not None and wanted(owner, event):
                self.send(p.EventMessage(event=event), droppable=True)

        intake.followers.append(follow)
        self._follows.append(follow)

    async def _ask(self, asked: Question) -> bool:
        """A live decision: ask this connection's client, wait for its answer."""
        question: asyncio.Future[bool] = self._loop.create_future()
        number = self._question_ids
        self._question_ids += 1
        self._questions[number] = question
        try:
            self.send(
                p.DecideQuestion(
                    job=asked.job,
                    id=number,
                    domain=asked.domain,
                    request=asked.request,
                    timeout_s=asked.timeout_s,
                )
            )
            return await question
        finally:
            self._questions.pop(number, None)

    async def _run(self, request: p.RunRequest, fds: list[int]) -> None:
        spec = job_spec(request, self.peer, self.server.config)
        if self.server.stopping is not None:
            # A job started now would outlive the stop, which ends only the jobs it found.
            raise ShutdownError(self.server.stopping)
        if request.decide:
            spec = dataclasses.replace(spec, ask=self._ask)
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
            stdio = []  # captured, or a pty the job's init makes
        stream = HeldEvents(self.send_event)
        job = await self.server.jobs.start(spec, stdio, stream if request.events else None)
        self._runs.add(job)
        moved = job.cwd if job.cwd != spec.cwd else None
        # The client's own copy of the pty's master; the job's stays until its teardown.
        terminal = [os.dup(job.terminal)] if job.terminal is not None else []
        self.send(p.Started(job=job.id, pid=job.process.pid, cwd=moved), fds=terminal)
        stream.release()
        task = asyncio.ensure_future(self._report_when_done(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def send_event(self, event: p.Event) -> None:
        self.send(p.EventMessage(event=event), droppable=True)

    async def wait_for_reports(self) -> None:
        """Until every report this connection is owed has been queued (or failed)."""
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _report_when_done(self, job: Job) -> None:
        try:
            # shield: this task is cancelled when the client goes; the job's future is shared.
            report = await asyncio.shield(job.finished)
        except NetjailError as e:
            self.send_error(e)
        else:
            stopping = self.server.stopping is not None
            self.send(p.Exit(report=report, dropped_events=self.outbox.dropped, shutdown=stopping))
        finally:
            self._runs.discard(job)
            self._active_at = self._loop.time()
        if self.server.stopping is not None and not self._runs:
            # Straight after the last report: the client need not wait to learn why its job
            # ended.
            self.say_shutdown(self.server.stopping)

    def say_shutdown(self, reason: str) -> None:
        """Send the ``shutdown`` error (once), and nothing after it."""
        if self.told_shutdown:
            return
        self.told_shutdown = True
        self.send(p.ErrorMessage(code="shutdown", message=reason))
        self.outbox.close()


def _job_info(job: Job) -> p.JobInfo:
    return p.JobInfo(
        job=job.id,
        argv=job.spec.argv,
        uid=job.uid,
        gid=job.gid,
        pid=job.process.pid,
        owner_uid=job.spec.owner.uid,
        started=rfc3339(job.started_wall),
        events=len(job.feed.events.events),
    )
