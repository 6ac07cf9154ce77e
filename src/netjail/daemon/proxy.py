"""A job's transparent proxy: the only way a jailed TCP connection reaches anything.

The jail's firewall redirects TCP to the synthetic pool (and to CIDR-rule ranges) to this
proxy's in-jail listener. For each connection it finds where the job was going
(SO_ORIGINAL_DST), hence which *name* (the synthetic address stands for exactly one), checks
the port, and for TLS checks that the ClientHello's SNI is that same name (HTTP: the Host
header). Then it resolves the real name on the host side, refuses non-global upstream
addresses (loopback, link-local/metadata, private, ULA…) unless the job's --add-host or a CIDR
rule names them, connects from the daemon's own netns and relays both ways with backpressure.

What the first-bytes check cannot see: later requests on a kept-alive HTTP connection, and the
inner name of an Encrypted Client Hello. A server-speaks-first protocol (SSH, SMTP) sends
nothing to check; after a short wait the connection is relayed on the port check alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
import time
from collections.abc import Callable, Mapping

from netjail import sniff
from netjail.daemon.events import rfc3339
from netjail.dnsanswer import SyntheticPool
from netjail.kernel.listeners import original_destination
from netjail.kernel.splice import splice_relay
from netjail.policy import Policy
from netjail.protocol import Event

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: How long to wait for a client's first bytes before treating it as server-speaks-first.
FIRST_BYTES_WAIT_S = 2.0
CONNECT_TIMEOUT_S = 10.0
_MAX_CONNECTIONS = 256


class Blocked(Exception):  # noqa: N818 - a verdict carried up the call stack, not an error
    """The connection is refused; ``reason`` is a fixed token for the event."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def forbidden_upstream(address: IPAddress) -> bool:
    """Loopback, link-local (cloud metadata), private, ULA, shared, reserved: not global."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return not address.is_global


def check_first_bytes(data: bytes, domain: str) -> None:
    """Raise Blocked unless the TLS SNI / HTTP Host in ``data`` names ``domain``.

    Bytes that are neither TLS nor HTTP pass: the port was allowed explicitly for that name.
    """
    tls = sniff.parse_tls_sni(data)
    if isinstance(tls, sniff.ServerName):
        if tls.host != domain:
            raise Blocked("sni_mismatch")
        return
    if isinstance(tls, sniff.NoSni | sniff.Malformed | sniff.TooLarge):
        raise Blocked("sni_mismatch")
    if isinstance(tls, sniff.NeedMore):
        raise Blocked("sni_mismatch")  # the caller only asks once the data stopped coming
    http = sniff.parse_http_host(data)
    if isinstance(http, sniff.HttpHost):
        if http.host != domain:
            raise Blocked("host_mismatch")
        return
    if isinstance(http, sniff.NoHost | sniff.Malformed | sniff.TooLarge | sniff.NeedMore):
        raise Blocked("host_mismatch")


class Proxy:
    """Serves one job's proxy listeners on the running loop."""

    def __init__(
        self,
        *,
        job_id: str,
        uid: int,
        policy: Policy,
        pool: SyntheticPool,
        job_hosts: Mapping[str, IPAddress],
        daemon_hosts: Mapping[str, IPAddress],
        record: Callable[[Event], None],
    ) -> None:
        self._job_id = job_id
        self._uid = uid
        self._policy = policy
        self._pool = pool
        self._job_hosts = job_hosts
        self._daemon_hosts = daemon_hosts
        self._record = record
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, listeners: list[socket.socket]) -> None:
        loop = asyncio.get_running_loop()
        for listener in listeners:
            self._track(loop.create_task(self._accept(listener)))

    def close(self) -> None:
        """Stop accepting and end every relay (the jail is going away)."""
        for task in list(self._tasks):
            task.cancel()

    def _track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _event(
        self, verdict: str, dst: IPAddress, port: int, domain: str | None, **extra: object
    ) -> None:
        self._record(
            Event(
                job=self._job_id,
                time=rfc3339(time.time()),
                kind="egress",
                verdict=verdict,
                proto="tcp",
                family=dst.version,
                dst=str(dst),
                port=port,
                uid=self._uid,
                count=1,
                via="proxy",
                domain=domain,
                **extra,  # type: ignore[arg-type]
            )
        )

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError:
                return  # the listener was closed with the jail
            conn.setblocking(False)
            if len(self._tasks) >= _MAX_CONNECTIONS:
                _reset(conn)
                continue
            self._track(loop.create_task(self._serve(conn)))

    async def _serve(self, conn: socket.socket) -> None:
        upstream: socket.socket | None = None
        try:
            try:
                dst, port = original_destination(conn)
            except OSError:
                _reset(conn)
                return
            domain = self._pool.name_for(dst)
            try:
                first, target = await self._decide(conn, dst, port, domain)
                upstream = await self._connect(target, port)
                if first:
                    try:
                        await asyncio.get_running_loop().sock_sendall(upstream, first)
                    except OSError:
                        # Reset or closed by the upstream before taking the first bytes.
                        raise Blocked("upstream_unreachable") from None
            except Blocked as blocked:
                self._event("blocked", dst, port, domain, reason=blocked.reason)
                _reset(conn)
                return
            sent, received = await splice_relay(conn, upstream)
            self._event(
                "allowed", dst, port, domain, bytes_out=sent + len(first), bytes_in=received
            )
        finally:
            conn.close()
            if upstream is not None:
                upstream.close()

    async def _decide(
        self, conn: socket.socket, dst: IPAddress, port: int, domain: str | None
    ) -> tuple[bytes, list[IPAddress]]:
        """The first bytes read (to forward) and the upstream addresses to try, or Blocked.

        Non-global upstreams are refused unless named explicitly: by a CIDR rule (the redirect
        that brought a non-synthetic address here, or ``explicit_cidr_allows``) or by the job's
        --add-host.
        """
        if domain is None:
            # Not a synthetic address: a CIDR rule's range, redirected here by the firewall.
            if not self._policy.allows_address(dst, port):
                raise Blocked("not_allowed")
            return b"", [dst]
        if not self._policy.allows(domain, port):
            raise Blocked("port_not_allowed")
        first = await _first_bytes(conn)
        if first:
            check_first_bytes(first, domain)
        return first, await self._resolve(domain, port)

    async def _resolve(self, domain: str, port: int) -> list[IPAddress]:
        if domain in self._job_hosts:
            return [self._job_hosts[domain]]
        if domain in self._daemon_hosts:
            addresses = [self._daemon_hosts[domain]]
        else:
            loop = asyncio.get_running_loop()
            try:
                infos = await asyncio.wait_for(
                    loop.getaddrinfo(domain, port, type=socket.SOCK_STREAM), CONNECT_TIMEOUT_S
                )
            except (OSError, TimeoutError):
                raise Blocked("upstream_unresolvable") from None
            addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
        allowed = [
            a
            for a in addresses
            if not forbidden_upstream(a) or self._policy.explicit_cidr_allows(a)
        ]
        if not allowed:
            raise Blocked("upstream_forbidden")
        return allowed

    async def _connect(self, addresses: list[IPAddress], port: int) -> socket.socket:
        """A connected non-blocking socket to the first upstream address that answers.

        Made here, on the loop's thread: in the daemon's own network namespace, not the jail's.
        """
        loop = asyncio.get_running_loop()
        for address in addresses:
            try:
                sock = upstream_socket(address)
            except OSError:
                continue  # no socket (out of descriptors…): counts as unreachable, like a refusal
            try:
                await asyncio.wait_for(
                    loop.sock_connect(sock, (str(address), port)), CONNECT_TIMEOUT_S
                )
            except (OSError, TimeoutError):
                sock.close()
                continue
            return sock
        raise Blocked("upstream_unreachable")


def upstream_socket(address: IPAddress) -> socket.socket:
    """A non-blocking TCP socket for connecting to ``address``, in the caller's netns.

    An upstream on loopback (named by --add-host or a CIDR rule) is a local hop like the job's
    hop to the proxy, so it gets reno as the jail does (see jobs._unpaced_tcp): a pacing
    default such as bbr would halve it. Any other upstream keeps the host's default.
    """
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if address.is_loopback:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"reno")
    except OSError:
        sock.close()
        raise
    return sock


async def _first_bytes(conn: socket.socket) -> bytes:
    """What the client sends first, until it is enough to decide (bounded in size and time)."""
    loop = asyncio.get_running_loop()
    data = b""
    deadline = loop.time() + FIRST_BYTES_WAIT_S
    while len(data) < sniff.MAX_CLIENT_HELLO:
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        try:
            chunk = await asyncio.wait_for(
                loop.sock_recv(conn, sniff.MAX_CLIENT_HELLO - len(data)), remaining
            )
        except TimeoutError:
            break
        except OSError:
            # The job reset the connection before it could be checked: nothing to relay.
            raise Blocked("client_reset") from None
        if not chunk:
            break
        data += chunk
        if _decidable(data):
            break
    return data


def _decidable(data: bytes) -> bool:
    """True once the bytes are a whole ClientHello, a whole HTTP head, or clearly neither."""
    tls = sniff.parse_tls_sni(data)
    http = sniff.parse_http_host(data)
    if not isinstance(tls, sniff.NeedMore | sniff.NotTls):
        return True  # TLS, decided (a name, no name, or broken)
    if not isinstance(http, sniff.NeedMore | sniff.NotHttp):
        return True  # HTTP, decided
    return isinstance(tls, sniff.NotTls) and isinstance(http, sniff.NotHttp)


def _reset(conn: socket.socket) -> None:
    """Close with a TCP reset, so the job's client fails at once instead of waiting."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()
