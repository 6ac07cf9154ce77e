"""A job's transparent proxy: the only way a jailed TCP connection reaches anything.

The jail's firewall redirects TCP to the synthetic pool (and to CIDR-rule ranges) to this
proxy's in-jail listener. For each connection it finds where the job was going
(SO_ORIGINAL_DST), hence which *name* (the synthetic address stands for exactly one), and
checks the port. Then, unless a ``tcp://`` rule makes the port raw TCP, it reads the first
bytes and relays only a TLS ClientHello whose SNI is that name or an HTTP/1.x request whose
Host is (see :func:`check_first_bytes`); anything else, or nothing complete before
:data:`FIRST_BYTES_WAIT_S`, is blocked. It resolves the real name on the host side, refuses
special-purpose and daemon-host addresses unless a rule names them (:func:`refuse_upstream`),
connects from the daemon's own netns and relays both ways with backpressure.

What the first-bytes check cannot see: later requests on a kept-alive HTTP connection, a second
ClientHello, and the inner name of an Encrypted Client Hello. For the names a job intercepts,
the connection goes to netjail.daemon.interception instead, which checks every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from netjail import sniff
from netjail.daemon.attribution import OwnerLookup, peer_end, unknown_owner
from netjail.daemon.events import rfc3339
from netjail.daemon.intercept import RequestRecord, UpstreamRefused
from netjail.daemon.interception import Interception, request_event, serve_intercepted
from netjail.daemon.upstream import (
    Refusal,
    Upstream,
    daemon_host_addresses,
    describe_forbidden,
    refuse_upstream,
    upstream_socket,
)
from netjail.dnsanswer import SyntheticPool
from netjail.ipaddr import IPAddress
from netjail.kernel.listeners import original_destination
from netjail.kernel.splice import splice_relay
from netjail.policy import Policy
from netjail.protocol import Event, EventProcess, Verdict

#: How long a job has to send its ClientHello or request head before it is blocked (no_hello).
FIRST_BYTES_WAIT_S = 5.0
CONNECT_TIMEOUT_S = 10.0
_MAX_CONNECTIONS = 256

#: Why the proxy refused a connection: the event's ``reason``.
BlockReason = Literal[
    "not_allowed",  # an address no CIDR rule allows on this port
    "port_not_allowed",  # an allowed name, on a port no rule allows
    "no_hello",  # no complete ClientHello or request head before the deadline or the close
    "unparsed",  # the first bytes are not a strict TLS ClientHello or HTTP/1.x request head
    "sni_mismatch",  # the ClientHello names another host, or none
    "host_mismatch",  # the request names another host, or none
    "h2c_refused",  # HTTP/2 in cleartext: the preface or Upgrade: h2c
    "client_reset",  # the job reset the connection before it was checked
    "upstream_unresolvable",
    "upstream_forbidden",  # every address is special-purpose or the daemon host's, unnamed
    "upstream_unreachable",
    "tls_refused",  # an intercepted name: the job did not complete TLS with netjail's certificate
]


class Blocked(Exception):  # noqa: N818 - a verdict carried up the call stack, not an error
    """The connection is refused: ``reason`` for the event, and ``detail``, one line for
    the user saying what was seen and, where there is one, the fix."""

    def __init__(self, reason: BlockReason, detail: str | None = None) -> None:
        super().__init__(reason)
        self.reason: BlockReason = reason
        self.detail = detail


def check_first_bytes(data: bytes, domain: str, port: int) -> sniff.NeedMore | None:
    """None if ``data`` starts a TLS ClientHello or HTTP/1.x request for ``domain``: relay it.

    NeedMore: read more and ask again with everything read. Raises Blocked otherwise.
    """
    tls = sniff.parse_tls_sni(data)
    match tls:
        case sniff.NeedMore():
            return tls
        case sniff.ServerName(host=host):
            if host != domain:
                raise Blocked("sni_mismatch", f"the TLS ClientHello names {host}, not {domain}")
            return None
        case sniff.NoSni():
            raise Blocked("sni_mismatch", f"the TLS ClientHello names no server, not {domain}")
        case sniff.Malformed(reason=why):
            raise _unparsed(f"a broken TLS ClientHello ({why})", domain, port)
        case sniff.TooLarge(limit=limit):
            raise _unparsed(f"a TLS ClientHello over {limit} bytes", domain, port)
    return _check_http(sniff.parse_http_host(data), domain, port)


def _check_http(http: sniff.HostResult, domain: str, port: int) -> sniff.NeedMore | None:
    match http:
        case sniff.NeedMore():
            return http
        case sniff.HttpHost(host=host):
            if host != domain:
                raise Blocked("host_mismatch", f"the HTTP request is for {host}, not {domain}")
            return None
        case sniff.NoHost():
            raise Blocked("host_mismatch", f"the HTTP request names no host, not {domain}")
        case sniff.H2c():
            raise Blocked(
                "h2c_refused",
                "HTTP/2 in cleartext (h2c) could carry requests for other hosts;"
                " use HTTPS, or HTTP/1.1",
            )
        case sniff.Malformed(reason=why):
            raise _unparsed(f"an HTTP request head servers may read two ways ({why})", domain, port)
        case sniff.TooLarge(limit=limit):
            raise _unparsed(f"an HTTP request head over {limit} bytes", domain, port)
    raise _unparsed("neither a TLS ClientHello nor an HTTP/1.x request", domain, port)


def _unparsed(what: str, domain: str, port: int) -> Blocked:
    return Blocked(
        "unparsed",
        f"the first bytes to {domain}:{port} are {what}; if that is another protocol"
        f" (SSH, PostgreSQL…): --allow tcp://{domain}:{port}",
    )


@dataclass(frozen=True, slots=True)
class _Route:
    """What to relay: the first bytes already read, and where to."""

    first: bytes
    upstreams: list[Upstream]
    access: Literal["checked", "unverified", "address"]


#: Where a connection was going: the address dialled, its port, and the name it stands for.
_Where = tuple[IPAddress, int, str]


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
        host_addresses: Callable[[], frozenset[IPAddress]] = daemon_host_addresses,
        interception: Interception | None = None,
        owner_of: OwnerLookup = unknown_owner,
    ) -> None:
        self._job_id = job_id
        self._uid = uid
        self._policy = policy
        self._pool = pool
        self._job_hosts = job_hosts
        self._daemon_hosts = daemon_hosts
        self._record = record
        self._host_addresses = host_addresses
        self._interception = interception
        self._owner_of = owner_of
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
        self,
        verdict: Verdict,
        dst: IPAddress,
        port: int,
        domain: str | None,
        *,
        reason: str | None = None,
        detail: str | None = None,
        bytes_out: int | None = None,
        bytes_in: int | None = None,
        process: EventProcess | None = None,
    ) -> None:
        event = Event(
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
            reason=reason,
            bytes_out=bytes_out,
            bytes_in=bytes_in,
            detail=detail,
            process=process,
        )
        self._record(event)

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
            owner = _Owner(lambda: self._look_up_owner(conn, dst, port))
            interception = self._interception
            intercepted = (
                interception is not None
                and domain is not None
                and interception.http.intercepts(domain)
            )
            if not intercepted:
                # Looked up now: by the time an allowed connection is reported (when it
                # closes), the job's socket may be gone.
                owner.get()
            try:
                route = await self._route(conn, dst, port, domain)
                if (
                    interception is not None
                    and domain is not None
                    and intercepted
                    and route.access == "checked"
                ):
                    await self._intercept(interception, conn, route, (dst, port, domain), owner)
                    return
                upstream = await self._connect(route, port, domain or str(dst))
                if route.first:
                    try:
                        await asyncio.get_running_loop().sock_sendall(upstream, route.first)
                    except OSError:
                        # Reset or closed by the upstream before taking the first bytes.
                        raise Blocked("upstream_unreachable") from None
            except Blocked as blocked:
                self._event(
                    "blocked",
                    dst,
                    port,
                    domain,
                    reason=blocked.reason,
                    detail=blocked.detail,
                    process=owner.get(),
                )
                _reset(conn)
                return
            sent, received = await splice_relay(conn, upstream)
            self._event(
                "allowed",
                dst,
                port,
                domain,
                # A tcp:// rule's connection: relayed, but nothing showed it was for the name.
                reason="unverified" if route.access == "unverified" else None,
                bytes_out=sent + len(route.first),
                bytes_in=received,
                process=owner.get(),
            )
        finally:
            conn.close()
            if upstream is not None:
                upstream.close()

    async def _intercept(
        self,
        interception: Interception,
        conn: socket.socket,
        route: _Route,
        where: _Where,
        owner: _Owner,
    ) -> None:
        """The connection's requests, each checked (netjail.daemon.interception). Its owner
        is looked up while the upstream's early connect is out, before netjail's handshake
        flight: the job's socket is open then (it waits for that flight)."""
        dst, port, domain = where

        async def connect() -> socket.socket | UpstreamRefused:
            try:
                return await self._connect(route, port, domain)
            except Blocked as blocked:
                return UpstreamRefused(blocked.reason, blocked.detail)

        def record(request: RequestRecord) -> None:
            event = request_event(
                request, job_id=self._job_id, uid=self._uid, dst=dst, port=port, domain=domain
            )
            event.process = owner.get()
            self._record(event)

        refused = await serve_intercepted(
            interception,
            conn,
            route.first,
            domain,
            port,
            connect=connect,
            record=record,
            meanwhile=owner.get,
        )
        if refused is not None:
            raise Blocked("tls_refused", refused.detail)

    def _look_up_owner(self, conn: socket.socket, dst: IPAddress, port: int) -> EventProcess | None:
        try:
            peer = conn.getpeername()
        except OSError:
            return None  # reset by the job already
        return self._owner_of(peer_end("tcp", peer, (str(dst), port)))

    async def _route(
        self, conn: socket.socket, dst: IPAddress, port: int, domain: str | None
    ) -> _Route:
        """The first bytes (checked, to forward) and the upstreams to try, or Blocked."""
        if domain is None:
            # Not a synthetic address: a CIDR rule's range, redirected here by the firewall.
            if not self._policy.allows_address(dst, port):
                raise Blocked("not_allowed")
            return _Route(b"", [Upstream(dst, "dialled")], "address")
        access = self._policy.access(domain, port)
        if access == "denied":
            raise Blocked("port_not_allowed")
        interception = self._interception
        if (
            access == "unverified"
            and interception is not None
            and interception.http.intercepts(domain)
        ):
            # A tcp:// rule lets the port through; it never switches off the request rules,
            # redactions and injections of a name the interception covers.
            access = "checked"
        first = b""
        if access == "checked":
            first = await read_first_bytes(conn, domain, port, FIRST_BYTES_WAIT_S)
        return _Route(first, await self._resolve(domain, port), access)

    async def _resolve(self, domain: str, port: int) -> list[Upstream]:
        if domain in self._job_hosts:
            return [Upstream(self._job_hosts[domain], "add-host")]
        if domain in self._daemon_hosts:
            return [Upstream(self._daemon_hosts[domain], "hosts")]
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(domain, port, type=socket.SOCK_STREAM), CONNECT_TIMEOUT_S
            )
        except (OSError, TimeoutError):
            raise Blocked("upstream_unresolvable") from None
        found: dict[IPAddress, None] = {}
        for info in infos:
            with contextlib.suppress(ValueError):
                found[ipaddress.ip_address(info[4][0])] = None
        return [Upstream(address, "dns") for address in found]

    async def _connect(self, route: _Route, port: int, name: str) -> socket.socket:
        """A connected non-blocking socket to the first upstream that may be used and answers.

        Made here, on the loop's thread: in the daemon's own network namespace, not the jail's.
        The guard runs now, on the very addresses connected to, with the host's addresses as
        they are now.
        """
        try:
            host_addresses = self._host_addresses()
        except OSError as exc:
            raise Blocked(
                "upstream_forbidden",
                f"the daemon host's own addresses could not be listed ({exc.strerror or exc})",
            ) from None
        loop = asyncio.get_running_loop()
        refused: list[Refusal] = []
        tried = False
        for upstream in route.upstreams:
            refusal = refuse_upstream(upstream, port, self._policy, host_addresses)
            if refusal is not None:
                refused.append(refusal)
                continue
            tried = True
            try:
                sock = upstream_socket(upstream.address)
            except OSError:
                continue  # no socket (out of descriptors…): counts as unreachable, like a refusal
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):  # no task per call, as wait_for
                    await loop.sock_connect(sock, (str(upstream.address), port))
            except (OSError, TimeoutError):
                sock.close()
                continue
            return sock
        if refused and not tried:
            raise Blocked("upstream_forbidden", describe_forbidden(name, refused))
        raise Blocked("upstream_unreachable")


async def read_first_bytes(conn: socket.socket, domain: str, port: int, wait_s: float) -> bytes:
    """What the job sends first, once :func:`check_first_bytes` passes it; Blocked otherwise.

    Bounded in size (:data:`sniff.MAX_FIRST_BYTES`, where every parser has decided) and in time
    (``wait_s``). The bytes are parsed again only when they can have changed the answer: past
    the length a TLS parse asked for, or on a new line of an HTTP head, so that a job sending a
    byte at a time cannot make the daemon parse quadratically.
    """
    loop = asyncio.get_running_loop()
    data = b""
    need: sniff.NeedMore | None = sniff.NeedMore(1)
    # One deadline for every read, and no task per read (as wait_for makes one): bytes already
    # there are taken without a turn of the loop.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout_at(loop.time() + wait_s):
            while need is not None:
                try:
                    chunk = await loop.sock_recv(conn, sniff.MAX_FIRST_BYTES - len(data))
                except OSError:
                    # The job reset the connection before it could be checked: nothing to relay.
                    raise Blocked("client_reset") from None
                if not chunk:
                    break
                data += chunk
                if (
                    len(data) >= sniff.MAX_FIRST_BYTES
                    or (need.needed is None and b"\n" in chunk)
                    or (need.needed is not None and len(data) >= need.needed)
                ):
                    need = check_first_bytes(data, domain, port)
    if need is not None and check_first_bytes(data, domain, port) is not None:
        raise Blocked(
            "no_hello",
            f"no complete TLS ClientHello or HTTP/1.x request head for {domain} arrived"
            f" within {wait_s:g} s (got {len(data)} bytes); if the server speaks first"
            f" (SSH, SMTP, MySQL…): --allow tcp://{domain}:{port}",
        )
    return data


class _Owner:
    """The process behind one connection, looked up once, when first asked for."""

    def __init__(self, look_up: Callable[[], EventProcess | None]) -> None:
        self._look_up: Callable[[], EventProcess | None] | None = look_up
        self._process: EventProcess | None = None

    def get(self) -> EventProcess | None:
        if self._look_up is not None:
            look_up, self._look_up = self._look_up, None
            self._process = look_up()
        return self._process


def _reset(conn: socket.socket) -> None:
    """Close with a TCP reset, so the job's client fails at once instead of waiting."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()
