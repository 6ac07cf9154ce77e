"""Unit tests for the proxy end to end, over loopback TCP, with no jail.

The job's side is a loopback connection; SO_ORIGINAL_DST, which only a jail's redirect sets,
is replaced by the address the test says the job dialled. Upstreams are listeners on
127.0.0.1 reached through --add-host (the only way the guard lets loopback through) or
refused by the guard; nothing leaves the host's loopback.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable, Iterator

import pytest

from netjail.daemon import proxy as proxy_module
from netjail.daemon.proxy import Proxy
from netjail.dnsanswer import SyntheticPool
from netjail.ipaddr import IPAddress
from netjail.policy import Policy
from netjail.protocol import Event

API = "api.example.test"
LOOPBACK = ipaddress.ip_address("127.0.0.1")


@pytest.fixture
def upstream() -> Iterator[socket.socket]:
    """A listener on the host's loopback, standing for the upstream server."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        yield listener


class Jail:
    """One job's proxy, with a way to open connections to it as if from the jail."""

    def __init__(
        self,
        monkeypatch: pytest.MonkeyPatch,
        policy: Policy,
        *,
        job_hosts: dict[str, IPAddress] | None = None,
        daemon_hosts: dict[str, IPAddress] | None = None,
    ) -> None:
        self.pool = SyntheticPool()
        self.events: list[Event] = []
        self.proxy = Proxy(
            job_id="j-0123456789ab",
            uid=65534,
            policy=policy,
            pool=self.pool,
            job_hosts=job_hosts or {},
            daemon_hosts=daemon_hosts or {},
            record=self.events.append,
            host_addresses=lambda: frozenset({LOOPBACK}),
        )
        self._dialled: dict[int, tuple[IPAddress, int]] = {}
        monkeypatch.setattr(proxy_module, "original_destination", self._original_destination)

    def dial(self, job: socket.socket, dst: IPAddress, port: int) -> None:
        """Make the proxy see ``job``'s connection as one the job made to dst:port."""
        self._dialled[job.getsockname()[1]] = (dst, port)

    def _original_destination(self, conn: socket.socket) -> tuple[IPAddress, int]:
        return self._dialled[conn.getpeername()[1]]

    async def connect(self, dst: IPAddress, port: int) -> tuple[socket.socket, asyncio.Task[None]]:
        """A job-side socket 'dialled' to dst:port, and the task serving it."""
        loop = asyncio.get_running_loop()
        with socket.create_server(("127.0.0.1", 0)) as listener:
            job = socket.create_connection(listener.getsockname())
            job.setblocking(False)
            self.dial(job, dst, port)
            conn, _ = listener.accept()
        conn.setblocking(False)
        return job, loop.create_task(self.proxy._serve(conn))


async def serve_once(upstream: socket.socket, answer: Callable[[bytes], bytes]) -> bytes:
    """Accept one connection on ``upstream``, read what comes, answer, close; what came."""
    loop = asyncio.get_running_loop()
    conn, _ = await loop.sock_accept(upstream)
    with conn:
        conn.setblocking(False)
        data = await loop.sock_recv(conn, 65536)
        await loop.sock_sendall(conn, answer(data))
    return data


async def exchange(job: socket.socket, data: bytes) -> bytes:
    """Send ``data`` from the job, half-close, and read everything back ("reset" on RST)."""
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(job, data)
    job.shutdown(socket.SHUT_WR)
    received = b""
    try:
        while chunk := await loop.sock_recv(job, 65536):
            received += chunk
    except ConnectionResetError:
        return b"reset"
    finally:
        job.close()
    return received


def test_a_request_for_the_name_is_relayed_and_reported(
    monkeypatch: pytest.MonkeyPatch, upstream: socket.socket
) -> None:
    """A GET for the allowed name reaches the upstream; the event has the bytes both ways."""
    port = upstream.getsockname()[1]
    jail = Jail(monkeypatch, Policy.parse([f"{API}:{port}"]), job_hosts={API: LOOPBACK})
    request = f"GET / HTTP/1.1\r\nHost: {API}\r\n\r\n".encode()

    async def scenario() -> tuple[bytes, bytes]:
        job, served = await jail.connect(jail.pool.address_for(API), port)
        seen, reply = await asyncio.gather(
            serve_once(upstream, lambda _: b"HTTP/1.1 200 OK\r\n\r\nhi"), exchange(job, request)
        )
        await served
        return seen, reply

    assert asyncio.run(scenario()) == (request, b"HTTP/1.1 200 OK\r\n\r\nhi")
    [event] = jail.events
    assert (event.verdict, event.domain, event.port, event.reason) == ("allowed", API, port, None)
    assert (event.bytes_out, event.bytes_in) == (len(request), 21)


def test_a_request_for_another_host_is_blocked_reset_and_reported(
    monkeypatch: pytest.MonkeyPatch, upstream: socket.socket
) -> None:
    """Host: another name: the job gets a reset, the upstream nothing, the event the reason."""
    port = upstream.getsockname()[1]
    jail = Jail(monkeypatch, Policy.parse([f"{API}:{port}"]), job_hosts={API: LOOPBACK})

    async def scenario() -> bytes:
        job, served = await jail.connect(jail.pool.address_for(API), port)
        reply = await exchange(job, b"GET / HTTP/1.1\r\nHost: other.example.test\r\n\r\n")
        await served
        return reply

    assert asyncio.run(scenario()) == b"reset"
    [event] = jail.events
    assert (event.verdict, event.reason) == ("blocked", "host_mismatch")


def test_a_tcp_rule_relays_any_bytes_and_says_unverified(
    monkeypatch: pytest.MonkeyPatch, upstream: socket.socket
) -> None:
    """Under tcp://NAME:PORT the first bytes are not read for a name; the event says so."""
    port = upstream.getsockname()[1]
    jail = Jail(monkeypatch, Policy.parse([f"tcp://{API}:{port}"]), job_hosts={API: LOOPBACK})

    async def scenario() -> tuple[bytes, bytes]:
        job, served = await jail.connect(jail.pool.address_for(API), port)
        seen, reply = await asyncio.gather(
            serve_once(upstream, lambda data: data.upper()), exchange(job, b"ssh-2.0-x\r\n")
        )
        await served
        return seen, reply

    assert asyncio.run(scenario()) == (b"ssh-2.0-x\r\n", b"SSH-2.0-X\r\n")
    [event] = jail.events
    assert (event.verdict, event.reason, event.bytes_out, event.bytes_in) == (
        "allowed",
        "unverified",
        11,
        11,
    )


@pytest.mark.parametrize(
    ("policy", "dialled", "port", "reason"),
    [
        ([f"{API}:443"], "synthetic", 80, "port_not_allowed"),
        ([f"{API}:443"], "198.51.100.7", 443, "not_allowed"),
        (["198.51.100.0/24:443"], "198.51.100.7", 80, "not_allowed"),
    ],
)
def test_ports_and_addresses_no_rule_allows_are_blocked(
    monkeypatch: pytest.MonkeyPatch, policy: list[str], dialled: str, port: int, reason: str
) -> None:
    """The port check comes first, and an address only a CIDR rule can open needs its port."""
    jail = Jail(monkeypatch, Policy.parse(policy))

    async def scenario() -> bytes:
        dst = (
            jail.pool.address_for(API) if dialled == "synthetic" else ipaddress.ip_address(dialled)
        )
        job, served = await jail.connect(dst, port)
        reply = await exchange(job, b"GET / HTTP/1.1\r\n\r\n")
        await served
        return reply

    assert asyncio.run(scenario()) == b"reset"
    assert [(e.verdict, e.reason) for e in jail.events] == [("blocked", reason)]


def test_a_name_the_hosts_table_puts_on_loopback_is_upstream_forbidden(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The daemon's [hosts] entries go through the guard: loopback is refused."""
    jail = Jail(monkeypatch, Policy.parse([API]), daemon_hosts={API: LOOPBACK})

    async def scenario() -> bytes:
        job, served = await jail.connect(jail.pool.address_for(API), 80)
        reply = await exchange(job, f"GET / HTTP/1.1\r\nHost: {API}\r\n\r\n".encode())
        await served
        return reply

    assert asyncio.run(scenario()) == b"reset"
    assert [(e.verdict, e.reason) for e in jail.events] == [("blocked", "upstream_forbidden")]


def test_listeners_are_served_until_closed(
    monkeypatch: pytest.MonkeyPatch, upstream: socket.socket
) -> None:
    """start() serves each listener's connections; close() ends every task it made."""
    port = upstream.getsockname()[1]
    jail = Jail(monkeypatch, Policy.parse([f"{API}:{port}"]), job_hosts={API: LOOPBACK})
    request = f"GET / HTTP/1.1\r\nHost: {API}\r\n\r\n".encode()

    async def scenario() -> tuple[bytes, int]:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            listener.setblocking(False)
            await jail.proxy.start([listener])
            job = socket.create_connection(listener.getsockname())
            job.setblocking(False)
            jail.dial(job, jail.pool.address_for(API), port)
            _, reply = await asyncio.gather(
                serve_once(upstream, lambda _: b"ok"), exchange(job, request)
            )
            while not jail.events:
                await asyncio.sleep(0.01)
            jail.proxy.close()
            for _ in range(3):
                await asyncio.sleep(0)
            return reply, len(jail.proxy._tasks)

    assert asyncio.run(scenario()) == (b"ok", 0)
    assert [e.verdict for e in jail.events] == ["allowed"]


def test_a_name_resolving_to_loopback_is_upstream_forbidden(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A name the host's resolver puts on loopback (localhost, from /etc/hosts) is refused."""
    jail = Jail(monkeypatch, Policy.parse(["localhost"]))

    async def scenario() -> bytes:
        job, served = await jail.connect(jail.pool.address_for("localhost"), 80)
        reply = await exchange(job, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        await served
        return reply

    assert asyncio.run(scenario()) == b"reset"
    assert [(e.verdict, e.domain, e.reason) for e in jail.events] == [
        ("blocked", "localhost", "upstream_forbidden")
    ]
