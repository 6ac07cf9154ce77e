"""The asyncio twin of netjail.client: the same requests, types and errors, awaited.

    from netjail import AsyncClient
    results = await asyncio.gather(*(AsyncClient().run(["/bin/true"]) for _ in range(50)))

Framing, decoding and the daemon's errors come from netjail.session, as for the sync client;
this module only moves bytes, on the running loop's non-blocking socket calls. Each ``run`` is
a connection of its own (the daemon's replies are not numbered). Cancelling a ``run`` closes
its connection, and the daemon kills a job whose client went away.
"""

from __future__ import annotations

import array
import asyncio
import socket as socket_module
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Literal

from netjail import protocol as p
from netjail import session
from netjail.client import JobResult
from netjail.errors import ProtocolError


class _AsyncConnection:
    """One greeted connection to the daemon, read and written on the running loop."""

    def __init__(self, sock: socket_module.socket, timeout: float | None) -> None:
        self.sock = sock
        #: Seconds ``recv`` waits for a message; None once a job runs.
        self.timeout = timeout
        self.replies = session.ReplyReader()
        self._loop = asyncio.get_running_loop()

    @classmethod
    async def open(cls, path: str, timeout: float | None) -> _AsyncConnection:
        sock = socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM)
        sock.setblocking(False)
        conn = cls(sock, timeout)
        try:
            try:
                async with asyncio.timeout(timeout):
                    await conn._loop.sock_connect(sock, path)
            except TimeoutError:
                raise session.timeout_error() from None
            except (OSError, ValueError) as e:
                # ValueError: a path with a NUL byte, which no socket can have.
                raise session.connect_error(path, e) from None
            await conn.send_frame(session.hello_frame("netjail-python-asyncio"))
            session.expect(await conn.recv(), p.HelloReply, "hello")
        except BaseException:
            sock.close()
            raise
        return conn

    async def send(self, message: p.Request, fds: Sequence[int] = ()) -> None:
        await self.send_frame(p.encode_request(message), fds)

    async def send_frame(self, data: bytes, fds: Sequence[int] = ()) -> None:
        try:
            if fds:
                data = data[await self._send_fds(data, fds) :]
            if data:
                await self._loop.sock_sendall(self.sock, data)
        except OSError as e:
            raise session.lost_error(e) from None

    async def _send_fds(self, data: bytes, fds: Sequence[int]) -> int:
        """Send the start of ``data`` with ``fds`` (SCM_RIGHTS) on one sendmsg; bytes sent.

        asyncio has no sendmsg, so this waits for the socket to be writable itself.
        """
        ancillary = [(socket_module.SOL_SOCKET, socket_module.SCM_RIGHTS, array.array("i", fds))]
        while True:
            try:
                return self.sock.sendmsg([data], ancillary)
            except (BlockingIOError, InterruptedError):
                writable: asyncio.Future[None] = self._loop.create_future()
                self._loop.add_writer(self.sock.fileno(), writable.set_result, None)
                try:
                    await writable
                finally:
                    self._loop.remove_writer(self.sock.fileno())

    async def recv(self) -> p.Reply:
        """The next message, waiting at most ``timeout`` for it."""
        while not self.replies.buffered:
            await self._read()
        return self.replies.next_reply()

    async def receive(self) -> list[p.Reply]:
        """The messages one read brings, as the sync client's ``receive``."""
        if not self.replies.buffered:
            await self._read()
        return self.replies.take_replies()

    async def _read(self) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                data = await self._loop.sock_recv(self.sock, session.RECV_BYTES)
        except TimeoutError:
            raise session.timeout_error() from None
        except OSError as e:
            raise session.lost_error(e) from None
        self.replies.feed(data)

    def close(self) -> None:
        self.sock.close()


class AsyncClient:
    """A connection factory for one daemon socket, for asyncio; see ``netjail.Client``."""

    def __init__(self, socket: str | None = None, *, timeout: float | None = 30.0) -> None:
        self.socket = socket or session.default_socket()
        #: Seconds to wait for any one daemon message outside a running job.
        self.timeout = timeout

    async def _connect(self) -> _AsyncConnection:
        return await _AsyncConnection.open(self.socket, self.timeout)

    async def run(
        self,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        uid: int | None = None,
        gid: int | None = None,
        stdio: Literal["null", "capture", "fds"] = "null",
        fds: Sequence[int] = (0, 1, 2),
        capture_bytes: int = p.DEFAULT_CAPTURE_BYTES,
        memory_bytes: int | None = None,
        cpus: float | None = None,
        pids: int | None = None,
        timeout_s: float | None = None,
        kill_grace_s: float | None = None,
        allow: Sequence[str] = (),
        deny: Sequence[str] = (),
        add_hosts: Sequence[str] = (),
        binds: Sequence[p.BindMount] = (),
        hostname: str | None = None,
        cwd_fallback: Literal["error", "home"] = "error",
        stdin: bytes | None = None,
        intercept: Sequence[str] = (),
        mocks: Sequence[str] = (),
        deny_requests: Sequence[str] = (),
        allow_requests: Sequence[str] = (),
        redact: Sequence[str] = (),
        inject_headers: Sequence[str] = (),
        on_event: Callable[[p.Event], None] | None = None,
        on_start: Callable[[str, int], None] | None = None,
        on_cwd: Callable[[str], None] | None = None,
        on_decide: Callable[[p.DecideQuestion], bool] | None = None,
    ) -> JobResult:
        """Run ``argv`` in a jail and wait for it to end: ``Client.run``'s parameters and
        result. Cancelling the task that awaits this kills the job (SIGKILL, by closing its
        connection)."""
        request = p.RunRequest(
            argv=list(argv),
            env=dict(env or {}),
            cwd=cwd,
            uid=uid,
            gid=gid,
            stdio=stdio,
            capture_bytes=capture_bytes,
            events=on_event is not None,
            memory_bytes=memory_bytes,
            cpus=cpus,
            pids=pids,
            timeout_s=timeout_s,
            kill_grace_s=kill_grace_s,
            allow=list(allow),
            deny=list(deny),
            add_hosts=list(add_hosts),
            binds=list(binds),
            hostname=hostname,
            cwd_fallback=cwd_fallback,
            stdin=stdin,
            intercept=list(intercept),
            mocks=list(mocks),
            deny_requests=list(deny_requests),
            allow_requests=list(allow_requests),
            redact=list(redact),
            inject_headers=list(inject_headers),
            decide=on_decide is not None,
        )
        conn = await self._connect()
        try:
            await conn.send(request, fds if stdio == "fds" else ())
            started = session.expect(await conn.recv(), p.Started, "started")
            if on_start is not None:
                on_start(started.job, started.pid)
            if on_cwd is not None and started.cwd is not None:
                on_cwd(started.cwd)
            # The job may run for as long as it likes: no read timeout from here on.
            conn.timeout = None
            while True:
                for message in await conn.receive():
                    match message:
                        case p.Exit():
                            return JobResult(message.report, message.dropped_events)
                        case p.EventMessage():
                            if on_event is not None:
                                on_event(message.event)
                        case p.DecideQuestion():
                            allowed = on_decide is not None and bool(on_decide(message))
                            await conn.send(p.DecisionRequest(id=message.id, allow=allowed))
                        case _:
                            raise ProtocolError(f"unexpected {type(message).__name__} during a job")
        finally:
            # Also on cancellation: a job whose connection closes is killed by the daemon.
            conn.close()

    async def events(
        self, job: str | None = None, *, follow: bool = False
    ) -> AsyncIterator[p.Event]:
        """Events of the caller's jobs (root: all), oldest first; with ``follow``, forever."""
        conn = await self._connect()
        try:
            await conn.send(p.EventsRequest(job=job, follow=follow))
            if follow:
                conn.timeout = None
            while True:
                for message in await conn.receive():
                    match message:
                        case p.EventsEnd():
                            return
                        case p.EventMessage():
                            yield message.event
                        case _:
                            raise ProtocolError(f"unexpected {type(message).__name__} among events")
        finally:
            conn.close()

    async def _ask(self, request: p.Request) -> p.Reply:
        conn = await self._connect()
        try:
            await conn.send(request)
            return await conn.recv()
        finally:
            conn.close()

    async def ps(self) -> list[p.JobInfo]:
        """Running jobs the caller may see."""
        return session.expect(await self._ask(p.PsRequest()), p.PsReply, "ps").jobs

    async def status(self) -> p.StatusReply:
        """The daemon's version, uptime and counters."""
        return session.expect(await self._ask(p.StatusRequest()), p.StatusReply, "status")

    async def kill(self, job: str, signal: int = 15) -> None:
        """Send ``signal`` to a job's main process (SIGKILL: to all its processes)."""
        await self._ask(p.KillRequest(job=job, signal=signal))
