"""The netjail client library: talk to netjaild over its Unix socket.

    from netjail import Client
    result = Client().run(["/usr/bin/curl", "-sS", "https://203.0.113.9/"], stdio="capture")
    result.exit_code        # 7: curl could not connect
    result.events[0].dst    # "203.0.113.9"

Synchronous and dependency-light (it never imports the daemon or kernel modules), so it loads
fast and works unprivileged.
"""

from __future__ import annotations

import array
import fcntl
import os
import socket as socket_module
import struct
import termios
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import msgspec

from netjail import protocol as p
from netjail import session
from netjail.errors import ProtocolError
from netjail.session import DEFAULT_SOCKET, SOCKET_ENV, default_socket

__all__ = [
    "DEFAULT_SOCKET",
    "SOCKET_ENV",
    "Client",
    "EventStream",
    "JobResult",
    "RunningJob",
    "default_socket",
]

#: Most file descriptors one read from the daemon takes (it sends one: a job's pty master).
_MAX_RECEIVED_FDS = 4


# A Struct rather than a dataclass: msgspec is loaded anyway, and dataclasses (with copy and
# its other imports) would be one more thing every `netjail run` pays for at start.
class JobResult(msgspec.Struct, frozen=True):
    """What a finished job did: its report, with its main facts at hand."""

    report: p.Report
    #: Events not streamed live because this client read too slowly (all are in ``events``).
    dropped_events: int = 0

    @property
    def job(self) -> str:
        return self.report.job

    @property
    def exit_code(self) -> int | None:
        return self.report.exit_code

    @property
    def signal(self) -> int | None:
        return self.report.signal

    @property
    def events(self) -> list[p.Event]:
        return self.report.events

    @property
    def lost_events(self) -> int:
        return self.report.lost_events

    @property
    def stdout(self) -> bytes | None:
        return self.report.stdout

    @property
    def stderr(self) -> bytes | None:
        return self.report.stderr

    @property
    def timed_out(self) -> bool:
        return self.report.timed_out

    @property
    def oom_killed(self) -> bool:
        return self.report.oom_killed

    @property
    def returncode(self) -> int:
        """As subprocess does: the exit code, or -N when killed by signal N."""
        if self.signal is not None:
            return -self.signal
        return self.exit_code if self.exit_code is not None else -1


class _Connection:
    def __init__(self, path: str, timeout: float | None, first: bytes = b"") -> None:
        """Connect and say hello; ``first``, the frames of a request without fds, goes in the
        same write, before the hello's reply is read: one round trip less (the daemon serves
        a connection's frames in order, and fds sent would go with the hello's)."""
        self.sock = socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except (OSError, ValueError) as e:
            # ValueError: a path with a NUL byte, which no socket can have.
            self.sock.close()
            raise session.connect_error(path, e) from None
        self.replies = session.ReplyReader()
        #: File descriptors the daemon sent (SCM_RIGHTS), not yet taken.
        self.fds: list[int] = []
        try:
            self._send_frame(session.hello_frame("netjail-python") + first)
            session.expect(self.recv(), p.HelloReply, "hello")
        except BaseException:
            self.sock.close()
            raise

    def send(self, message: p.Request, fds: Sequence[int] = ()) -> None:
        self._send_frame(p.encode_request(message), fds)

    def _send_frame(self, data: bytes, fds: Sequence[int] = ()) -> None:
        try:
            if fds:
                ancillary = [
                    (socket_module.SOL_SOCKET, socket_module.SCM_RIGHTS, array.array("i", fds))
                ]
                sent = self.sock.sendmsg([data], ancillary)
                if sent < len(data):
                    self.sock.sendall(data[sent:])
            else:
                self.sock.sendall(data)
        except OSError as e:
            raise session.lost_error(e) from None

    def recv(self) -> p.Reply:
        """The next message, waiting for it as long as the socket's timeout allows."""
        while not self.replies.buffered:
            self._read()
        return self.replies.next_reply()

    def receive(self) -> list[p.Reply]:
        """The messages one read brings (none while a frame is still partial), after those
        already received. A daemon error is raised in its turn: the messages before it are
        returned first, and the error is raised by the next call."""
        if not self.replies.buffered:
            self._read()
        return self.replies.take_replies()

    def _read(self) -> None:
        fds = array.array("i")
        try:
            data, ancdata, _flags, _addr = self.sock.recvmsg(
                session.RECV_BYTES, socket_module.CMSG_SPACE(_MAX_RECEIVED_FDS * fds.itemsize)
            )
        except TimeoutError:
            raise session.timeout_error() from None
        except OSError as e:
            raise session.lost_error(e) from None
        for level, kind, payload in ancdata:
            if level == socket_module.SOL_SOCKET and kind == socket_module.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        self.fds.extend(fds)
        self.replies.feed(data)

    def take_fds(self) -> list[int]:
        """The file descriptors received so far (the caller closes them)."""
        fds, self.fds = self.fds, []
        return fds

    def close(self) -> None:
        for fd in self.take_fds():
            os.close(fd)
        self.sock.close()


class _Stream:
    """A connection the daemon sends a stream of messages on, to wait on with selectors."""

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn

    def fileno(self) -> int:
        """The connection's socket, to wait on with select or selectors."""
        return self._conn.sock.fileno()

    @property
    def buffered(self) -> bool:
        """Whether messages were received with earlier ones and not returned yet: the socket
        does not announce them again, but ``receive`` returns them without waiting."""
        return self._conn.replies.buffered

    def _receive(self) -> list[p.Reply]:
        return self._conn.receive()

    def close(self) -> None:
        self._conn.close()


class RunningJob(_Stream):
    """A job the daemon has started, and the connection its events and report come on.

    Closing it (or leaving its ``with`` block) before the report came kills the job: the
    daemon ends a job whose client went away.
    """

    def __init__(self, conn: _Connection, started: p.Started, terminal: int | None = None) -> None:
        super().__init__(conn)
        self.job = started.job
        self.pid = started.pid
        #: Where the job started, when not in the cwd asked for (``cwd_fallback="home"``).
        self.cwd = started.cwd
        #: With stdio "tty": the master of the job's pty (what the job reads comes from
        #: writes to it, what it writes is read from it), closed with this object.
        self.terminal = terminal

    def resize(self, rows: int, cols: int) -> None:
        """Give the job's pty a new size; the kernel sends SIGWINCH to its foreground group."""
        if self.terminal is None:
            raise ProtocolError('resize needs a job with stdio "tty"')
        fcntl.ioctl(self.terminal, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def close(self) -> None:
        if self.terminal is not None:
            os.close(self.terminal)
            self.terminal = None
        super().close()

    def receive(self) -> list[p.EventMessage | p.Exit | p.DecideQuestion]:
        """What the daemon has sent: waits for data, then returns the messages it completed
        (none while a frame is still partial). Raises the error the daemon reported
        (``ShutdownError`` when it stops, after any report it still sent) and
        ``DaemonConnectionError`` when it hangs up. ``DecideQuestion``s come only for a request
        with ``decide``; answer each with ``decide``."""
        messages: list[p.EventMessage | p.Exit | p.DecideQuestion] = []
        for message in self._receive():
            if not isinstance(message, p.EventMessage | p.Exit | p.DecideQuestion):
                raise ProtocolError(f"unexpected {type(message).__name__} during a job")
            messages.append(message)
        return messages

    def decide(self, question: p.DecideQuestion, allow: bool) -> None:
        """Answer a live decision: allow the name (as ``--allow NAME``), or the request
        (``question.request``) for the rest of the job, or deny it."""
        self._conn.send(p.DecisionRequest(id=question.id, allow=allow))

    def __enter__(self) -> RunningJob:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class EventStream(_Stream):
    """The events of ``Client.open_events``: history, then (with ``follow``) new ones."""

    def receive(self) -> list[p.EventMessage | p.EventsEnd]:
        """What the daemon has sent (waiting for data): events, then, without ``follow``, the
        end of the history."""
        messages: list[p.EventMessage | p.EventsEnd] = []
        for message in self._receive():
            if not isinstance(message, p.EventMessage | p.EventsEnd):
                raise ProtocolError(f"unexpected {type(message).__name__} among events")
            messages.append(message)
        return messages

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class Client:
    """A connection factory for one daemon socket."""

    def __init__(self, socket: str | None = None, *, timeout: float | None = 30.0) -> None:
        self.socket = socket or default_socket()
        #: Seconds to wait for any one daemon message outside a running job.
        self.timeout = timeout

    def _connect(self, timeout: float | None = None) -> _Connection:
        return _Connection(self.socket, timeout if timeout is not None else self.timeout)

    def run(
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
        """Run ``argv`` in a jail and wait for it to end.

        ``stdio``: "null" (default: /dev/null), "capture" (stdout/stderr returned in the result,
        at most ``capture_bytes`` each, with a truncated flag in the report), or "fds" (the job
        uses ``fds`` as its stdin, stdout, stderr). ``on_event`` is called for each event as it
        happens; ``on_start`` with the job id and pid once the job runs. ``allow``/``deny`` are
        policy rules ("pypi.org", "*.github.com:443", "10.0.0.0/8:5432"); with none, nothing
        goes out. ``add_hosts`` are "NAME:IP" pairs the proxy uses instead of DNS. ``binds``
        are host paths the job sees (``BindMount``; read-only unless ``access="rw"``), opened
        with this client's credentials. ``cwd_fallback="home"`` starts the job in its HOME when
        ``cwd`` is not in the jail's view, and then calls ``on_cwd`` with where it started.
        ``stdin`` (with ``stdio="capture"``, at most ``protocol.MAX_STDIN_BYTES``) is what the
        job reads on its stdin, then EOF.

        Interception (README, "Seeing inside TLS"): ``intercept`` names whose TLS the proxy
        terminates; ``mocks`` ("METHOD NAME/PATHGLOB=STATUS[:BODY]"), ``deny_requests`` and
        ``allow_requests`` ("METHOD NAME/PATHGLOB"), ``redact`` ("NAME:REGEX",
        "NAME:@secrets") and ``inject_headers`` ("NAME:Header=VALUE", the value as it is: no
        ``$VAR`` or ``@FILE`` expansion here) each intercept their name too.

        ``on_decide(question)`` decides live the names no rule covers, and the requests to
        intercepted names that no ``allow_requests`` rule matches: the job's DNS query for
        ``question.domain`` (``question.request`` None), or its request (``question.request``:
        method and path), waits (``question.timeout_s``, 30 s unless the daemon's config says
        otherwise; then it is denied) until it returns True (allow: the name as ``--allow
        NAME``, or that method and path for the rest of the job) or False. It runs on this
        thread, so events wait while it does.
        """
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
        with self.start(request, fds if stdio == "fds" else ()) as job:
            if on_start is not None:
                on_start(job.job, job.pid)
            if on_cwd is not None and job.cwd is not None:
                on_cwd(job.cwd)
            while True:
                for message in job.receive():
                    if isinstance(message, p.Exit):
                        return JobResult(message.report, message.dropped_events)
                    if isinstance(message, p.DecideQuestion):
                        job.decide(message, on_decide is not None and bool(on_decide(message)))
                    elif on_event is not None:
                        on_event(message.event)

    def start(self, request: p.RunRequest, fds: Sequence[int] = ()) -> RunningJob:
        """Send ``request`` (with ``fds``, its stdio when ``stdio`` is "fds") and return the
        job once the daemon has started it; its events and report come on the RunningJob.

        With ``stdio="tty"`` (and ``window``, the pty's first size) the job's stdin, stdout
        and stderr are a pty made in its jail, and ``RunningJob.terminal`` is its master: the
        caller relays it, and resizes it with ``RunningJob.resize``.

        For callers that wait on more than the daemon (a terminal, a pipe), as the CLI does;
        ``run`` is this and a loop over ``RunningJob.receive``.
        """
        if fds:
            conn = self._connect()
        else:
            conn = _Connection(self.socket, self.timeout, p.encode_request(request))
        try:
            if fds:
                conn.send(request, list(fds))
            started = session.expect(conn.recv(), p.Started, "started")
            received = conn.take_fds()
            terminal = received.pop(0) if request.stdio == "tty" and received else None
            for fd in received:
                os.close(fd)
            if request.stdio == "tty" and terminal is None:
                raise ProtocolError("netjaild sent no terminal with started")
        except BaseException:
            conn.close()
            raise
        # The job may run for as long as it likes: no read timeout from here on.
        conn.sock.settimeout(None)
        return RunningJob(conn, started, terminal)

    def events(self, job: str | None = None, *, follow: bool = False) -> Iterator[p.Event]:
        """Events of the caller's jobs (root: all), oldest first; with ``follow``, forever."""
        with self.open_events(job, follow=follow) as stream:
            while True:
                for message in stream.receive():
                    if isinstance(message, p.EventsEnd):
                        return
                    yield message.event

    def open_events(self, job: str | None = None, *, follow: bool = False) -> EventStream:
        """The stream ``events`` iterates over, for callers that wait on more than it."""
        conn = self._connect()
        try:
            conn.send(p.EventsRequest(job=job, follow=follow))
        except BaseException:
            conn.close()
            raise
        conn.sock.settimeout(None if follow else self.timeout)
        return EventStream(conn)

    def _ask(self, request: p.Request) -> p.Reply:
        conn = self._connect()
        try:
            conn.send(request)
            return conn.recv()
        finally:
            conn.close()

    def ps(self) -> list[p.JobInfo]:
        """Running jobs the caller may see."""
        return session.expect(self._ask(p.PsRequest()), p.PsReply, "ps").jobs

    def status(self) -> p.StatusReply:
        """The daemon's version, uptime and counters."""
        return session.expect(self._ask(p.StatusRequest()), p.StatusReply, "status")

    def kill(self, job: str, signal: int = 15) -> None:
        """Send ``signal`` to a job's main process (SIGKILL: to all its processes)."""
        self._ask(p.KillRequest(job=job, signal=signal))
