"""Upstream TLS sessions: a job's next connection to an upstream resumes the last one's."""

from __future__ import annotations

import asyncio
import socket
import ssl
import tempfile

from netjail.daemon.certauthority import JobCA
from netjail.daemon.interception import (
    MAX_SESSIONS,
    UpstreamRefused,
    UpstreamSessions,
    open_tls_upstream,
)
from netjail.daemon.tlsstream import TlsStream

NAME = "api.example.test"


async def exchange(
    ca: JobCA, cafile: str, sessions: UpstreamSessions, listener: socket.socket, name: str
) -> bool | UpstreamRefused:
    """One connection over loopback: the proxy's side opened by open_tls_upstream, a server
    with the CA's leaf answering one line; whether the proxy's side resumed a session."""
    loop = asyncio.get_running_loop()
    client = socket.socket()
    client.setblocking(False)
    await loop.sock_connect(client, listener.getsockname())
    accepted, _ = await loop.sock_accept(listener)
    accepted.setblocking(False)
    server = TlsStream.server(accepted, ca.server_context(NAME), b"")

    async def serve() -> None:
        await server.handshake()
        await server.send(b"hello\n")
        await server.recv()  # until the client closes
        await server.close()

    served = asyncio.ensure_future(serve())
    stream = await open_tls_upstream(client, name, cafile, sessions)
    if isinstance(stream, UpstreamRefused):
        served.cancel()
        accepted.close()
        return stream
    assert isinstance(stream, TlsStream)
    assert await stream.recv() == b"hello\n"
    resumed = stream._tls.session_reused
    await stream.close()
    await served
    return resumed


def test_the_second_connection_resumes_and_another_name_does_not() -> None:
    """A job's first connection to an upstream verifies its certificate in full, the next one
    resumes that session; a name the certificate does not cover gets no session to resume
    and is still refused."""
    ca = JobCA("j-1")
    with tempfile.NamedTemporaryFile(suffix=".pem") as f:
        f.write(ca.cert_pem)
        f.flush()
        sessions = UpstreamSessions()

        async def scenario() -> list[bool | UpstreamRefused]:
            with socket.create_server(("127.0.0.1", 0)) as listener:
                listener.setblocking(False)
                return [
                    await exchange(ca, f.name, sessions, listener, NAME),
                    await exchange(ca, f.name, sessions, listener, NAME),
                    await exchange(ca, f.name, sessions, listener, "other.example.test"),
                ]

        first, second, other = asyncio.run(scenario())
    assert first is False
    assert second is True
    assert isinstance(other, UpstreamRefused)
    assert other.reason == "upstream_unverified"


def test_sessions_are_bounded_least_recently_used_first() -> None:
    """A job that reaches many upstreams keeps at most MAX_SESSIONS sessions."""
    sessions = UpstreamSessions()
    marker = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # any object: the cache does not look
    for i in range(MAX_SESSIONS + 5):
        sessions.put((f"n{i}.test", "192.0.2.1", 443), marker)  # type: ignore[arg-type]
    assert sessions.get(("n0.test", "192.0.2.1", 443)) is None
    assert sessions.get((f"n{MAX_SESSIONS + 4}.test", "192.0.2.1", 443)) is marker
    assert len(sessions._sessions) == MAX_SESSIONS
