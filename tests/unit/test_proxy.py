"""Unit tests for the proxy's decisions: the first-bytes check on exact byte strings, the
reading of those bytes over a socketpair, and the upstream guard as the proxy applies it.

Nothing here needs root or a jail; the only sockets are socketpairs and unconnected ones.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from collections.abc import Callable, Iterator

import pytest

from netjail import sniff
from netjail.daemon.proxy import (
    FIRST_BYTES_WAIT_S,
    Blocked,
    Proxy,
    _Route,
    check_first_bytes,
    read_first_bytes,
)
from netjail.daemon.upstream import Upstream
from netjail.dnsanswer import SyntheticPool
from netjail.ipaddr import IPAddress
from netjail.policy import Policy

from .test_sniff import handshake, hello_body, record, sni_extension

API = "api.example.test"


def client_hello(name: bytes) -> bytes:
    return record(handshake(hello_body(sni_extension(name))))


HELLO = client_hello(API.encode())
GET = f"GET / HTTP/1.1\r\nHost: {API}\r\n\r\n".encode()

# (first bytes, reason) for everything the proxy must block; each is a bypass of issue 11.
BLOCKED = [
    (client_hello(b"attacker.example"), "sni_mismatch"),
    (record(handshake(hello_body(None))), "sni_mismatch"),
    (b"GET / HTTP/1.1\r\nHost: other.example.test\r\n\r\n", "host_mismatch"),
    (b"GET / HTTP/1.0\r\n\r\n", "host_mismatch"),
    (b"\r\nGET / HTTP/1.1\r\nHost: other.example.test\r\n\r\n", "unparsed"),
    (b"GET  / HTTP/1.1\r\nHost: other.example.test\r\n\r\n", "unparsed"),
    (b"GET\t/\tHTTP/1.1\r\nHost: other.example.test\r\n\r\n", "unparsed"),
    (b"GET / HTTP/1.2\r\nHost: other.example.test\r\n\r\n", "unparsed"),
    (b"GET / http/1.1\r\nHost: other.example.test\r\n\r\n", "unparsed"),
    (b"GET / HTTP/1.1\nHost: other.example.test\n\n", "unparsed"),
    (
        b"\r\nCONNECT other.example.test:443 HTTP/1.1\r\nHost: other.example.test:443\r\n\r\n"
        b"GET / HTTP/1.1\r\nHost: other.example.test\r\n\r\n",
        "unparsed",
    ),
    (b"CONNECT other.example.test:443 HTTP/1.1\r\nHost: other.example.test\r\n\r\n", "unparsed"),
    (
        b"\x17\x03\x03\x00\x05hello" + b"GET / HTTP/1.1\r\nHost: other.example.test\r\n\r\n",
        "unparsed",
    ),
    (b"\x15\x03\x03\x00\x02\x02\x28" + HELLO, "unparsed"),  # an alert record first
    (b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00", "unparsed"),  # a ServerHello, not a Client one
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "h2c_refused"),
    (GET[:-2] + b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\r\n", "h2c_refused"),
    (b"SSH-2.0-OpenSSH_9.2p1\r\n", "unparsed"),
    (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", "unparsed"),  # PostgreSQL's SSLRequest
    (b"\x16\x03\x01\x7f\xff\x01\xff\xff\xff", "unparsed"),  # a ClientHello over the bound
]


@pytest.mark.parametrize(("data", "reason"), BLOCKED)
def test_first_bytes_that_do_not_prove_the_name_are_blocked(data: bytes, reason: str) -> None:
    """Each lax, foreign or mismatched opening is blocked, with its reason and a detail."""
    with pytest.raises(Blocked) as info:
        check_first_bytes(data, API, 443)
    assert info.value.reason == reason
    assert info.value.detail


@pytest.mark.parametrize(
    "data",
    [
        HELLO,
        HELLO + b"\x17\x03\x03\x00\x05early",
        GET,
        GET + b"body",
        f"POST http://{API}/x HTTP/1.1\r\nHost: {API}:80\r\nContent-Length: 2\r\n\r\nhi".encode(),
        f"GET /ws HTTP/1.1\r\nHost: {API.upper()}.\r\nUpgrade: websocket\r\n\r\n".encode(),
    ],
)
def test_first_bytes_that_name_the_domain_pass(data: bytes) -> None:
    """A ClientHello with the name as SNI, or a request for the name, is relayed."""
    assert check_first_bytes(data, API, 443) is None


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", sniff.NeedMore(5)),
        (HELLO[:3], sniff.NeedMore(5)),
        (HELLO[:7], sniff.NeedMore(9)),
        (HELLO[:-1], sniff.NeedMore(len(HELLO))),
        (GET[:-1], sniff.NeedMore(None)),
        (b"GET / HTTP/1.1\r\nHo", sniff.NeedMore(None)),
    ],
)
def test_incomplete_first_bytes_ask_for_more(data: bytes, expected: sniff.NeedMore) -> None:
    """Nothing is decided on an incomplete ClientHello or head: the proxy reads on."""
    assert check_first_bytes(data, API, 443) == expected


def test_details_say_what_was_seen_and_the_fix() -> None:
    """The detail names the other host, or the tcp:// rule that would let a protocol through."""
    with pytest.raises(Blocked) as mismatch:
        check_first_bytes(client_hello(b"attacker.example"), API, 443)
    assert mismatch.value.detail == f"the TLS ClientHello names attacker.example, not {API}"
    with pytest.raises(Blocked) as foreign:
        check_first_bytes(b"SSH-2.0-OpenSSH_9.2p1\r\n", "git.example", 22)
    assert foreign.value.detail == (
        "the first bytes to git.example:22 are neither a TLS ClientHello nor an HTTP/1.x"
        " request; if that is another protocol (SSH, PostgreSQL…): --allow tcp://git.example:22"
    )


# --- reading the first bytes -----------------------------------------------------------------


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(the proxy's end, the job's end) of a connected stream pair."""
    proxy_end, job_end = socket.socketpair()
    proxy_end.setblocking(False)
    with proxy_end, job_end:
        yield proxy_end, job_end


def read(conn: socket.socket, wait_s: float = FIRST_BYTES_WAIT_S) -> bytes:
    return asyncio.run(read_first_bytes(conn, API, 443, wait_s))


def test_first_bytes_arriving_in_pieces_are_put_together(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """A ClientHello sent a few bytes at a time is read whole, then passed."""
    proxy_end, job_end = pair

    async def scenario() -> bytes:
        reader = asyncio.create_task(read_first_bytes(proxy_end, API, 443, FIRST_BYTES_WAIT_S))
        for start in range(0, len(HELLO), 7):
            job_end.send(HELLO[start : start + 7])
            await asyncio.sleep(0)
        return await reader

    assert asyncio.run(scenario()) == HELLO


def test_silence_until_the_deadline_is_no_hello(pair: tuple[socket.socket, socket.socket]) -> None:
    """Nothing at all before the deadline: blocked (no_hello), never relayed unchecked."""
    proxy_end, _ = pair
    with pytest.raises(Blocked) as info:
        read(proxy_end, wait_s=0.05)
    assert info.value.reason == "no_hello"
    assert info.value.detail is not None
    assert "--allow tcp://api.example.test:443" in info.value.detail


def test_half_a_hello_at_the_deadline_is_no_hello(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """Part of a ClientHello, then silence: no_hello."""
    proxy_end, job_end = pair
    job_end.send(HELLO[:20])
    with pytest.raises(Blocked) as info:
        read(proxy_end, wait_s=0.05)
    assert info.value.reason == "no_hello"


def test_a_close_before_a_whole_hello_is_no_hello(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """The job closes its side before the hello is whole: no_hello, at once."""
    proxy_end, job_end = pair
    job_end.send(GET[:10])
    job_end.shutdown(socket.SHUT_WR)
    with pytest.raises(Blocked) as info:
        read(proxy_end)
    assert info.value.reason == "no_hello"


def test_a_partial_head_already_wrong_is_unparsed_at_the_deadline(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """An incomplete head that is already malformed is blocked for that, not as no_hello."""
    proxy_end, job_end = pair
    job_end.send(b"GET  /")
    with pytest.raises(Blocked) as info:
        read(proxy_end, wait_s=0.05)
    assert info.value.reason == "unparsed"


def test_a_reset_before_the_check_is_client_reset() -> None:
    """The job resets the connection mid-hello (TCP on loopback): client_reset."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        job_end = socket.create_connection(listener.getsockname())
        proxy_end, _ = listener.accept()
        with proxy_end:
            proxy_end.setblocking(False)
            job_end.send(HELLO[:20])
            job_end.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            job_end.close()
            with pytest.raises(Blocked) as info:
                read(proxy_end)
    assert info.value.reason == "client_reset"


def test_another_name_after_a_silence_is_still_checked(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """A silence shorter than the deadline, then another name's hello: sni_mismatch."""
    proxy_end, job_end = pair

    async def scenario() -> bytes:
        reader = asyncio.create_task(read_first_bytes(proxy_end, API, 443, 5.0))
        await asyncio.sleep(0.1)
        job_end.send(client_hello(b"attacker.example"))
        return await reader

    with pytest.raises(Blocked) as info:
        asyncio.run(scenario())
    assert info.value.reason == "sni_mismatch"


# --- the proxy's upstream step ---------------------------------------------------------------


def make_proxy(
    policy: Policy, host_addresses: Callable[[], frozenset[IPAddress]] = frozenset
) -> Proxy:
    return Proxy(
        job_id="j-0123456789ab",
        uid=65534,
        policy=policy,
        pool=SyntheticPool(),
        job_hosts={},
        daemon_hosts={},
        record=lambda event: None,
        host_addresses=host_addresses,
    )


def connect(proxy: Proxy, upstreams: list[Upstream], port: int, name: str) -> socket.socket:
    route = _Route(b"", upstreams, "checked")
    return asyncio.run(proxy._connect(route, port, name))


def test_proxy_refuses_a_name_resolving_to_a_documentation_address() -> None:
    """Every address refused: upstream_forbidden, naming the address and the fix."""
    proxy = make_proxy(Policy.parse(["pkgs.example"]))
    upstreams = [Upstream(ipaddress.ip_address("203.0.113.80"), "dns")]
    with pytest.raises(Blocked) as info:
        connect(proxy, upstreams, 443, "pkgs.example")
    assert info.value.reason == "upstream_forbidden"
    assert info.value.detail == (
        "pkgs.example resolved to 203.0.113.80, a documentation address;"
        " if that is intended: --add-host pkgs.example:203.0.113.80"
    )


def test_proxy_refuses_the_daemon_hosts_own_address_when_connecting() -> None:
    """The host's addresses are asked for at connect time; a global one of them is refused."""
    asked: list[int] = []

    def host_addresses() -> frozenset[IPAddress]:
        asked.append(1)
        return frozenset({ipaddress.ip_address("8.8.4.4")})

    proxy = make_proxy(Policy.parse(["evil.example"]), host_addresses)
    with pytest.raises(Blocked) as info:
        connect(proxy, [Upstream(ipaddress.ip_address("8.8.4.4"), "dns")], 443, "evil.example")
    assert (info.value.reason, asked) == ("upstream_forbidden", [1])
    assert info.value.detail is not None
    assert info.value.detail.startswith(
        "evil.example resolved to 8.8.4.4, an address of the daemon host;"
    )


def test_proxy_fails_closed_when_host_addresses_cannot_be_read() -> None:
    """No list of the host's addresses: no upstream at all."""

    def host_addresses() -> frozenset[IPAddress]:
        raise OSError(24, "Too many open files")

    proxy = make_proxy(Policy.parse(["pkgs.example"]), host_addresses)
    with pytest.raises(Blocked) as info:
        connect(proxy, [Upstream(ipaddress.ip_address("8.8.8.8"), "dns")], 443, "pkgs.example")
    assert info.value.reason == "upstream_forbidden"
    assert info.value.detail == (
        "the daemon host's own addresses could not be listed (Too many open files)"
    )


def test_proxy_connects_an_add_host_loopback_upstream() -> None:
    """--add-host NAME:127.0.0.1 reaches a listener on the host's loopback."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        loopback = frozenset({ip4("127.0.0.1")})
        proxy = make_proxy(Policy.parse([f"web.test:{port}"]), lambda: loopback)
        with connect(proxy, [Upstream(ip4("127.0.0.1"), "add-host")], port, "web.test") as sock:
            assert sock.getpeername() == ("127.0.0.1", port)


def test_proxy_refuses_dns_loopback_but_tries_the_next_address() -> None:
    """A refused address is skipped, not fatal: the next allowed one is connected."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        policy = Policy.parse([f"web.test:{port}", f"127.0.0.1/32:{port}"])
        upstreams = [Upstream(ip4("10.0.0.1"), "dns"), Upstream(ip4("127.0.0.1"), "dns")]
        proxy = make_proxy(policy)
        with connect(proxy, upstreams, port, "web.test") as sock:
            assert sock.getpeername() == ("127.0.0.1", port)


def ip4(text: str) -> IPAddress:
    return ipaddress.ip_address(text)
