"""An intercepted connection, from the proxy's check to the HTTP relay.

The proxy has checked the connection's first bytes (a ClientHello whose SNI is the name, or an
HTTP/1.x head whose Host is). For a name the job intercepts, it hands the connection here:
TLS is terminated with a leaf of the job's CA (ALPN offers ``http/1.1`` only, so HTTP/2
clients fall back to HTTP/1.1), and :class:`netjail.daemon.intercept.HttpRelay` serves the
requests. An upstream is connected when a request needs one, and for TLS verified fully for
the name against the host's trust store or ``[proxy] upstream_ca``.

Per-job state (the rules, the CA) is given to the proxy as one :class:`Interception` when the
job's proxy is made, not with its listeners.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from netjail.daemon.certauthority import JobCA, upstream_context
from netjail.daemon.decisions import RequestDecisions
from netjail.daemon.events import rfc3339
from netjail.daemon.intercept import HttpRelay, RequestRecord, UpstreamRefused
from netjail.daemon.tlsstream import PlainStream, Stream, TlsStream
from netjail.httppolicy import HttpPolicy
from netjail.ipaddr import IPAddress
from netjail.protocol import Event

#: Longest TLS handshake, with the job or with an upstream.
HANDSHAKE_S = 10.0
#: The first byte of checked first bytes that are a ClientHello (a TLS handshake record), not
#: an HTTP request head.
_TLS_HANDSHAKE_RECORD = b"\x16"
#: Upstream TLS sessions one job keeps to resume (by name, address and port).
MAX_SESSIONS = 256
#: Most names whose leaf is made ahead, at the job's start.
MAX_WARM_LEAVES = 16


class UpstreamSessions:
    """One job's TLS sessions with its upstreams, to resume the next connection to each.

    A resumed handshake skips the certificate's verification, the costliest part of the
    proxy's handshake with the upstream (about 0.5 ms of the 0.7 here): the session was made
    by a handshake that verified it, for that name, with the job's one upstream context. Kept
    per job, so that no upstream can tell two jobs' connections apart from one job's.
    """

    def __init__(self) -> None:
        self._sessions: OrderedDict[tuple[str, str, int], ssl.SSLSession] = OrderedDict()

    def get(self, key: tuple[str, str, int]) -> ssl.SSLSession | None:
        session = self._sessions.get(key)
        if session is not None:
            self._sessions.move_to_end(key)
        return session

    def put(self, key: tuple[str, str, int], session: ssl.SSLSession) -> None:
        self._sessions[key] = session
        self._sessions.move_to_end(key)
        if len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)


@dataclass(frozen=True, slots=True)
class Interception:
    """What a job that intercepts gives its proxy: its rules, its CA, the upstreams' CA file,
    and, when its client decides live, the decisions on requests no rule allows."""

    http: HttpPolicy
    ca: JobCA
    upstream_ca: str | None
    decisions: RequestDecisions | None = None
    sessions: UpstreamSessions = field(default_factory=UpstreamSessions)


@dataclass(frozen=True, slots=True)
class HandshakeRefused:
    """The job did not complete TLS with netjail's certificate."""

    detail: str


async def warm_leaves(interception: Interception) -> None:
    """Make the leaves of the names the job intercepts exactly, in a thread, one after the
    other, so that the first connection to each does not wait for one on the loop."""
    ca = interception.ca
    for name in interception.http.exact_intercepts()[:MAX_WARM_LEAVES]:
        try:
            context = await asyncio.to_thread(ca.make_leaf, name)
        except (ssl.SSLError, OSError, ValueError):
            return  # the first connection makes its own, and fails closed there if it must
        ca.keep_leaf(name, context)


async def serve_intercepted(
    interception: Interception,
    conn: socket.socket,
    first: bytes,
    domain: str,
    port: int,
    *,
    connect: Callable[[], Awaitable[socket.socket | UpstreamRefused]],
    record: Callable[[RequestRecord], None],
    meanwhile: Callable[[], object] = lambda: None,
) -> HandshakeRefused | None:
    """Serve the connection's requests; HandshakeRefused if TLS with the job failed.
    ``meanwhile`` is called once, after the upstream's early connect went out and before
    netjail's handshake flight, so that its work overlaps the upstream's connect."""
    tls = first[:1] == _TLS_HANDSHAKE_RECORD
    # Heads, bodies and handshake messages go out as they are made: with Nagle, a response
    # head sent before its body waits for the job's delayed ACK (40 ms).
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def open_upstream() -> Stream | UpstreamRefused:
        sock = await connect()
        if isinstance(sock, UpstreamRefused):
            return sock
        if not tls:
            return PlainStream(sock)
        return await open_tls_upstream(
            sock, domain, interception.upstream_ca, interception.sessions
        )

    # When no rule can keep a request from the upstream, connect to it while the job's
    # handshake runs (a time to first byte of one handshake, not two in a row). Otherwise
    # the first request that is relayed connects, so a mock answers with the upstream down.
    early = (
        Early(open_upstream)
        if interception.http.relays_every_request(domain)
        and (tls or not interception.http.injections_for(domain))
        else None
    )
    if early is not None:
        # Let the upstream's connect go out before the job's handshake takes the loop: the
        # upstream's handshake is the longer of the two, and only its start can move.
        await asyncio.sleep(0)
    try:
        job: Stream = PlainStream(conn, first)
        # Before netjail's first flight, while the upstream's connect is out: after that
        # flight, a job that refuses the certificate may close its socket before the loop
        # gets back here, and could no longer be named.
        meanwhile()
        if tls:
            server = TlsStream.server(conn, interception.ca.server_context(domain), first)
            try:
                async with asyncio.timeout(HANDSHAKE_S):  # no task per call, as wait_for makes
                    await server.handshake()
            except (ssl.SSLError, OSError, TimeoutError) as exc:
                why = getattr(exc, "reason", None) or type(exc).__name__
                return HandshakeRefused(
                    f"the job did not accept netjail's certificate for {domain} ({why}): it may"
                    " pin certificates or keep a trust store of its own (see docs/POLICY.md)"
                )
            job = server
        relay = HttpRelay(
            job=job,
            domain=domain,
            port=port,
            policy=interception.http,
            connect=early.take if early is not None else open_upstream,
            record=record,
            transport="tls" if tls else "plain",
            decisions=interception.decisions,
        )
        await relay.serve()
    finally:
        if early is not None:
            await early.discard()
    return None


class Early:
    """An upstream connection started ahead of the first request, handed over once."""

    def __init__(self, open_upstream: Callable[[], Awaitable[Stream | UpstreamRefused]]) -> None:
        self._open = open_upstream
        self._task: asyncio.Future[Stream | UpstreamRefused] | None = asyncio.ensure_future(
            open_upstream()
        )

    async def take(self) -> Stream | UpstreamRefused:
        """The early connection the first time, a new one after."""
        task, self._task = self._task, None
        return await task if task is not None else await self._open()

    async def discard(self) -> None:
        """Close the early connection if no request took it."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(BaseException):
            stream = await task
            if not isinstance(stream, UpstreamRefused):
                await stream.close()


async def open_tls_upstream(
    sock: socket.socket, domain: str, cafile: str | None, sessions: UpstreamSessions
) -> Stream | UpstreamRefused:
    """TLS to the upstream, its certificate verified for ``domain`` (or a session of the job's
    with it resumed); the socket is closed when that fails."""
    try:
        host, port = sock.getpeername()[:2]
        key = (domain, str(host), int(port))
        stream = TlsStream.client(
            sock,
            upstream_context(cafile),
            domain,
            session=sessions.get(key),
            on_session=lambda session: sessions.put(key, session),
        )
        async with asyncio.timeout(HANDSHAKE_S):
            await stream.handshake()
    except ssl.SSLCertVerificationError as exc:
        sock.close()
        return UpstreamRefused(
            "upstream_unverified",
            f"the certificate of {domain} does not verify ({exc.verify_message})",
        )
    except (ssl.SSLError, OSError, TimeoutError) as exc:
        sock.close()
        return UpstreamRefused("upstream_unreachable", f"TLS to {domain} failed ({exc})")
    return stream


def request_event(
    request: RequestRecord, *, job_id: str, uid: int, dst: IPAddress, port: int, domain: str
) -> Event:
    """The ``http`` event of one request."""
    return Event(
        job=job_id,
        time=rfc3339(time.time()),
        kind="http",
        verdict=request.verdict,
        proto="tcp",
        family=dst.version,
        dst=str(dst),
        port=port,
        uid=uid,
        count=1,
        via="proxy",
        domain=domain,
        reason=request.reason,
        bytes_out=request.bytes_out,
        bytes_in=request.bytes_in,
        detail=request.detail,
        method=request.method,
        path=request.path,
        status=request.status,
        duration_ms=round(request.duration_s * 1000, 3),
    )
