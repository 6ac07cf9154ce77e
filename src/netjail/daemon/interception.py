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
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from netjail.daemon.certauthority import JobCA, upstream_context
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


@dataclass(frozen=True, slots=True)
class Interception:
    """What a job that intercepts gives its proxy: its rules, its CA, the upstreams' CA file."""

    http: HttpPolicy
    ca: JobCA
    upstream_ca: str | None


@dataclass(frozen=True, slots=True)
class HandshakeRefused:
    """The job did not complete TLS with netjail's certificate."""

    detail: str


async def serve_intercepted(
    interception: Interception,
    conn: socket.socket,
    first: bytes,
    domain: str,
    port: int,
    *,
    connect: Callable[[], Awaitable[socket.socket | UpstreamRefused]],
    record: Callable[[RequestRecord], None],
) -> HandshakeRefused | None:
    """Serve the connection's requests; HandshakeRefused if TLS with the job failed."""
    tls = first[:1] == _TLS_HANDSHAKE_RECORD
    job: Stream = PlainStream(conn, first)
    if tls:
        server = TlsStream.server(conn, interception.ca.server_context(domain), first)
        try:
            await asyncio.wait_for(server.handshake(), HANDSHAKE_S)
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            why = getattr(exc, "reason", None) or type(exc).__name__
            return HandshakeRefused(
                f"the job did not accept netjail's certificate for {domain} ({why}): it may"
                " pin certificates or keep a trust store of its own (see docs/POLICY.md)"
            )
        job = server

    async def open_upstream() -> Stream | UpstreamRefused:
        sock = await connect()
        if isinstance(sock, UpstreamRefused):
            return sock
        if not tls:
            return PlainStream(sock)
        return await open_tls_upstream(sock, domain, interception.upstream_ca)

    relay = HttpRelay(
        job=job,
        domain=domain,
        port=port,
        policy=interception.http,
        connect=open_upstream,
        record=record,
    )
    await relay.serve()
    return None


async def open_tls_upstream(
    sock: socket.socket, domain: str, cafile: str | None
) -> Stream | UpstreamRefused:
    """TLS to the upstream, its certificate verified for ``domain``; the socket is closed when
    that fails."""
    try:
        stream = TlsStream.client(sock, upstream_context(cafile), domain)
        await asyncio.wait_for(stream.handshake(), HANDSHAKE_S)
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
