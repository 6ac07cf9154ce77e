"""Unit tests for netjail.daemon.upstream: the upstream guard, its words, the host's addresses.

The guard is pure and goes through a table of addresses; nothing here connects anywhere.
"""

from __future__ import annotations

import ipaddress
import socket

import pytest

from netjail.daemon.upstream import (
    HostAddresses,
    Origin,
    Refusal,
    Upstream,
    describe_forbidden,
    read_host_addresses,
    refuse_upstream,
    upstream_socket,
)
from netjail.ipaddr import IPAddress
from netjail.policy import Policy


def ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


#: The daemon host's addresses, as the guard is given them in these tests.
HOST = frozenset({ip("192.0.2.2"), ip("8.8.4.4"), ip("2a00:1450::7")})
POLICY = Policy.parse(
    ["pkgs.example", "10.9.9.0/24:5432", "[fd00:1::/64]:443", "8.8.4.4/32:22"],
    ["1.1.1.0/24:443", "[2606:4700::/32]:*"],
)

# (address, origin, port, what the guard says: None = may connect)
GUARD = [
    # Ordinary global unicast, from DNS.
    ("8.8.8.8", "dns", 443, None),
    ("2606:4701::1", "dns", 443, None),
    ("::ffff:8.8.8.8", "dns", 443, None),
    ("64:ff9b::808:808", "dns", 443, None),
    # Special-purpose, from DNS or the daemon's hosts table: refused with the reason.
    ("127.0.0.1", "dns", 443, "127.0.0.1, a loopback address"),
    ("::ffff:127.0.0.1", "dns", 443, "127.0.0.1, a loopback address"),
    ("169.254.169.254", "hosts", 80, "169.254.169.254, the cloud metadata address"),
    ("fd00:ec2::254", "dns", 80, "fd00:ec2::254, the cloud metadata address"),
    ("192.0.0.9", "dns", 443, "192.0.0.9, an IETF protocol assignment"),
    ("100.64.1.1", "dns", 443, "100.64.1.1, a shared (CGNAT) address"),
    ("203.0.113.80", "dns", 443, "203.0.113.80, a documentation address"),
    ("198.18.0.7", "dns", 443, "198.18.0.7, a benchmarking address (netjail's synthetic pool)"),
    ("224.0.0.1", "dns", 443, "224.0.0.1, a multicast address"),
    (
        "64:ff9b::a09:907",
        "dns",
        443,
        "64:ff9b::a09:907, a NAT64 address of 10.9.9.7, a private address",
    ),
    (
        "2002:a09:907::1",
        "dns",
        443,
        "2002:a09:907::1, a 6to4 address of 10.9.9.7, a private address",
    ),
    # A CIDR rule opens its range on its ports only (issue 11, item 4).
    ("10.9.9.7", "dns", 5432, None),
    ("10.9.9.7", "dns", 443, "10.9.9.7, a private address"),
    ("10.9.9.7", "dns", 80, "10.9.9.7, a private address"),
    ("::ffff:10.9.9.7", "dns", 5432, None),
    ("fd00:1::5", "dns", 443, None),
    ("fd00:1::5", "dns", 80, "fd00:1::5, a unique local address"),
    # The rule is on the address connected, not on the form it came in.
    (
        "64:ff9b::a09:907",
        "dns",
        5432,
        "64:ff9b::a09:907, a NAT64 address of 10.9.9.7, a private address",
    ),
    # The daemon host's own addresses, even global ones, unless a rule names them and the port.
    ("8.8.4.4", "dns", 443, "8.8.4.4, an address of the daemon host"),
    ("::ffff:8.8.4.4", "hosts", 443, "8.8.4.4, an address of the daemon host"),
    ("2a00:1450::7", "dns", 443, "2a00:1450::7, an address of the daemon host"),
    ("8.8.4.4", "dns", 22, None),
    ("192.0.2.2", "dns", 443, "192.0.2.2, a documentation address"),  # the more telling name
    # The job's --add-host is the requester's own choice: it goes, whatever it is.
    ("127.0.0.1", "add-host", 8080, None),
    ("8.8.4.4", "add-host", 443, None),
    ("169.254.169.254", "add-host", 80, None),
    # A deny CIDR rule refuses anything, --add-host included.
    ("1.1.1.1", "dns", 443, "1.1.1.1, which a --deny rule covers on port 443"),
    ("1.1.1.1", "add-host", 443, "1.1.1.1, which a --deny rule covers on port 443"),
    ("1.1.1.1", "dns", 80, None),
    ("2606:4700::1", "dialled", 22, "2606:4700::1, which a --deny rule covers on port 22"),
    # The address a job dialled through a CIDR rule: allowed by that rule.
    ("10.9.9.8", "dialled", 5432, None),
]


@pytest.mark.parametrize(("address", "origin", "port", "why"), GUARD)
def test_upstream_guard(address: str, origin: Origin, port: int, why: str | None) -> None:
    """The guard refuses exactly the addresses no rule or --add-host names, saying why."""
    refusal = refuse_upstream(Upstream(ip(address), origin), port, POLICY, HOST)
    assert (refusal.why if refusal is not None else None) == why


def test_refusal_says_whether_a_fix_exists() -> None:
    """A deny rule's refusal has no fix to offer; a special address's has."""
    denied = refuse_upstream(Upstream(ip("1.1.1.1"), "dns"), 443, POLICY, HOST)
    special = refuse_upstream(Upstream(ip("10.1.1.1"), "dns"), 443, POLICY, HOST)
    host = refuse_upstream(Upstream(ip("8.8.4.4"), "dns"), 443, POLICY, HOST)
    assert [r.cause if r else None for r in (denied, special, host)] == [
        "denied",
        "special",
        "daemon_host",
    ]


def refused(address: str, origin: Origin = "dns", port: int = 443) -> Refusal:
    refusal = refuse_upstream(Upstream(ip(address), origin), port, POLICY, HOST)
    assert refusal is not None
    return refusal


def test_forbidden_detail_names_the_address_why_and_the_fix() -> None:
    """The issue's own example, word for word."""
    assert describe_forbidden("pkgs.example", [refused("203.0.113.80")]) == (
        "pkgs.example resolved to 203.0.113.80, a documentation address;"
        " if that is intended: --add-host pkgs.example:203.0.113.80"
    )


def test_forbidden_detail_for_the_hosts_table_and_ipv6() -> None:
    """An address from the daemon's [hosts] table says so; an IPv6 fix is bracketed."""
    assert describe_forbidden("meta.example", [refused("fd00:ec2::254", "hosts")]) == (
        "meta.example is fd00:ec2::254, the cloud metadata address, in the daemon's [hosts]"
        " table; if that is intended: --add-host meta.example:[fd00:ec2::254]"
    )


def test_forbidden_detail_names_a_few_addresses_and_counts_the_rest() -> None:
    """Several refused addresses: the first three are named, the rest counted; the fix is for
    the first."""
    many = [refused(f"10.0.0.{n}") for n in range(1, 6)]
    assert describe_forbidden("db.example", many) == (
        "db.example resolved to 10.0.0.1, a private address; and to 10.0.0.2, a private"
        " address; and to 10.0.0.3, a private address; and 2 more refused addresses;"
        " if that is intended: --add-host db.example:10.0.0.1"
    )


def test_forbidden_detail_of_a_deny_rule_offers_no_fix() -> None:
    """What a deny rule refuses gets no --add-host advice."""
    assert describe_forbidden("one.example", [refused("1.1.1.1")]) == (
        "one.example resolved to 1.1.1.1, which a --deny rule covers on port 443"
    )


def test_forbidden_detail_of_an_ipv4_mapped_address_advises_the_ipv4_form() -> None:
    """The fix names the address that is connected: the IPv4 one inside ::ffff:."""
    assert describe_forbidden("x.example", [refused("::ffff:127.0.0.1")]).endswith(
        "--add-host x.example:127.0.0.1"
    )


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_host_addresses_are_cached_briefly() -> None:
    """The host's addresses are read once per TTL, then read again."""
    reads: list[int] = []

    def read() -> frozenset[IPAddress]:
        reads.append(1)
        return frozenset({ip(f"192.0.2.{len(reads)}")})

    clock = FakeClock()
    addresses = HostAddresses(read, ttl_s=1.0, clock=clock)
    assert addresses() == {ip("192.0.2.1")}
    clock.now += 0.5
    assert addresses() == {ip("192.0.2.1")}
    clock.now += 0.5
    assert addresses() == {ip("192.0.2.2")}
    assert len(reads) == 2


def test_host_addresses_fail_loudly() -> None:
    """An error reading them reaches the caller, which fails closed."""

    def read() -> frozenset[IPAddress]:
        raise OSError(24, "Too many open files")

    with pytest.raises(OSError, match="Too many open files"):
        HostAddresses(read)()


def test_read_host_addresses_sees_loopback() -> None:
    """This netns's own addresses include 127.0.0.1 (lo is up in any netns a test runs in)."""
    assert ip("127.0.0.1") in read_host_addresses()
    assert all(a.version == 4 or a.scope_id is None for a in read_host_addresses())


def congestion_control(sock: socket.socket) -> str:
    name = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16)
    return name.rstrip(b"\0").decode()


@pytest.mark.parametrize("address", ["127.0.0.1", "127.3.4.5", "::1"])
def test_loopback_upstream_is_not_paced(address: str) -> None:
    """A loopback upstream socket uses reno, non-blocking, with Nagle off."""
    with upstream_socket(ip(address)) as sock:
        assert congestion_control(sock) == "reno"
        assert sock.getblocking() is False
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


@pytest.mark.parametrize("address", ["203.0.113.7", "2001:db8::7"])
def test_other_upstreams_keep_the_hosts_default(address: str) -> None:
    """Any other upstream socket keeps the host's congestion control (never connected here)."""
    with open("/proc/sys/net/ipv4/tcp_congestion_control") as f:
        default = f.read().strip()
    parsed = ip(address)
    with upstream_socket(parsed) as sock:
        assert congestion_control(sock) == default
        assert sock.family == (socket.AF_INET if parsed.version == 4 else socket.AF_INET6)
