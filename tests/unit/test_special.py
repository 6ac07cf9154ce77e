"""Unit tests for netjail.special: which addresses are special-purpose, and what to call them.

No address here is ever connected to: these are pure table look-ups.
"""

from __future__ import annotations

import ipaddress

import pytest

from netjail.special import IPV4_SPECIAL, IPV6_SPECIAL, find_special

# Every special-purpose case the guard must refuse, with the exact words its event uses.
SPECIAL = [
    ("0.0.0.0", "0.0.0.0, a 'this network' address"),  # noqa: S104 - looked up, never bound
    ("0.1.2.3", "0.1.2.3, a 'this network' address"),
    ("10.9.9.7", "10.9.9.7, a private address"),
    ("100.64.0.1", "100.64.0.1, a shared (CGNAT) address"),
    ("100.100.100.200", "100.100.100.200, a shared (CGNAT) address"),
    ("127.0.0.1", "127.0.0.1, a loopback address"),
    ("127.255.255.254", "127.255.255.254, a loopback address"),
    ("169.254.1.1", "169.254.1.1, a link-local address"),
    ("169.254.169.254", "169.254.169.254, the cloud metadata address"),
    ("172.31.255.255", "172.31.255.255, a private address"),
    ("192.0.0.9", "192.0.0.9, an IETF protocol assignment"),
    ("192.0.0.170", "192.0.0.170, an IETF protocol assignment"),
    ("192.0.2.1", "192.0.2.1, a documentation address"),
    ("192.31.196.1", "192.31.196.1, an AS112 anycast address"),
    ("192.52.193.1", "192.52.193.1, an AMT anycast address"),
    ("192.88.99.1", "192.88.99.1, a deprecated 6to4 relay anycast address"),
    ("192.168.1.1", "192.168.1.1, a private address"),
    ("192.175.48.6", "192.175.48.6, an AS112 anycast address"),
    ("198.18.0.2", "198.18.0.2, a benchmarking address (netjail's synthetic pool)"),
    ("198.19.255.254", "198.19.255.254, a benchmarking address (netjail's synthetic pool)"),
    ("198.51.100.250", "198.51.100.250, a documentation address"),
    ("203.0.113.80", "203.0.113.80, a documentation address"),
    ("224.0.0.251", "224.0.0.251, a multicast address"),
    ("239.255.255.250", "239.255.255.250, a multicast address"),
    ("240.0.0.1", "240.0.0.1, a reserved address"),
    ("255.255.255.255", "255.255.255.255, the broadcast address"),
    ("::", "::, the unspecified address"),
    ("::1", "::1, a loopback address"),
    ("::2", "::2, an IPv4-compatible address of 0.0.0.2, a 'this network' address"),
    ("100::1", "100::1, a discard-only address"),
    ("100:0:0:1::1", "100:0:0:1::1, a dummy address"),
    ("2001:1::1", "2001:1::1, an IETF protocol assignment"),
    ("2001:2::1", "2001:2::1, a benchmarking address"),
    ("2001:db8::1", "2001:db8::1, a documentation address"),
    ("2620:4f:8000::1", "2620:4f:8000::1, an AS112 anycast address"),
    ("3fff::1", "3fff::1, a documentation address"),
    ("5f00::1", "5f00::1, a segment routing address"),
    ("fc00::1", "fc00::1, a unique local address"),
    ("fd00::2", "fd00::2, a unique local address"),
    ("fd00:ec2::254", "fd00:ec2::254, the cloud metadata address"),
    ("fe80::1", "fe80::1, a link-local address"),
    ("fe80::1%eth0", "fe80::1, a link-local address"),
    ("fec0::1", "fec0::1, a deprecated site-local address"),
    ("ff02::1", "ff02::1, a multicast address"),
    ("4000::1", "4000::1, a reserved address (outside 2000::/3)"),
    ("e000::1", "e000::1, a reserved address (outside 2000::/3)"),
    # IPv6 forms of IPv4 addresses are judged by the IPv4 address they carry.
    (
        "::ffff:127.0.0.1",
        "::ffff:7f00:1, an IPv4-mapped address of 127.0.0.1, a loopback address",
    ),
    (
        "::ffff:192.0.0.9",
        "::ffff:c000:9, an IPv4-mapped address of 192.0.0.9, an IETF protocol assignment",
    ),
    ("::10.0.0.1", "::a00:1, an IPv4-compatible address of 10.0.0.1, a private address"),
    ("::8.8.8.8", "::808:808, a reserved address"),  # deprecated: refused whatever it carries
    ("64:ff9b::a00:1", "64:ff9b::a00:1, a NAT64 address of 10.0.0.1, a private address"),
    (
        "64:ff9b::169.254.169.254",
        "64:ff9b::a9fe:a9fe, a NAT64 address of 169.254.169.254, the cloud metadata address",
    ),
    (
        "64:ff9b:1::c0a8:101",
        "64:ff9b:1::c0a8:101, a local-use NAT64 address of 192.168.1.1, a private address",
    ),
    (
        "64:ff9b:1:2::808:808",
        "64:ff9b:1:2::808:808, a local-use NAT64 address outside 64:ff9b:1::/96",
    ),
    ("2002:a00:1::1", "2002:a00:1::1, a 6to4 address of 10.0.0.1, a private address"),
    (
        "2002:7f00:1::",
        "2002:7f00:1::, a 6to4 address of 127.0.0.1, a loopback address",
    ),
    # Teredo: the client address is stored inverted in the last 32 bits (~c0.00.02.2d).
    (
        "2001:0:808:808:8000:63bf:3fff:fdd2",
        "2001:0:808:808:8000:63bf:3fff:fdd2, a Teredo address of 192.0.2.45,"
        " a documentation address",
    ),
    (
        "2001:0:a00:1:8000:63bf:f7f7:f7f7",
        "2001:0:a00:1:8000:63bf:f7f7:f7f7, a Teredo address of 10.0.0.1, a private address",
    ),
]

# Ordinary global unicast, and IPv6 forms of it: not special.
GLOBAL = [
    "8.8.8.8",
    "1.1.1.1",
    "100.63.255.255",  # just below CGNAT
    "100.128.0.0",  # just above CGNAT
    "172.32.0.1",  # just above 172.16.0.0/12
    "192.0.1.255",  # just below 192.0.0.0/24's neighbour
    "198.17.255.255",  # just below the benchmarking range
    "198.20.0.0",  # just above it
    "223.255.255.255",  # just below multicast
    "2606:4700::1111",
    "2a00:1450:4001::1",
    "2001:200::1",  # just above 2001::/23
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",
    "64:ff9b:1::808:808",
    "2002:808:808::1",
    "2001:0:808:808:8000:63bf:f7f7:f7f7",  # Teredo: server and client both 8.8.8.8
]


@pytest.mark.parametrize(("text", "described"), SPECIAL)
def test_special_addresses_are_found_and_named(text: str, described: str) -> None:
    """Each special-purpose address is found, and described in the words its event uses."""
    found = find_special(ipaddress.ip_address(text))
    assert found is not None
    assert found.describe() == described


@pytest.mark.parametrize("text", GLOBAL)
def test_global_addresses_are_not_special(text: str) -> None:
    """Ordinary global unicast, and IPv6 forms that carry it, are not special."""
    assert find_special(ipaddress.ip_address(text)) is None


def test_embedded_address_and_carrier_are_kept() -> None:
    """For a NAT64 address, the IPv4 address it carries and the range that holds it are kept."""
    found = find_special(ipaddress.ip_address("64:ff9b::c000:9"))
    assert found is not None
    assert found.embedded == ipaddress.IPv4Address("192.0.0.9")
    assert found.carrier == "a NAT64 address"
    assert found.range.network == ipaddress.IPv4Network("192.0.0.0/24")


def test_most_specific_range_wins() -> None:
    """The metadata address is named as such, not as its enclosing link-local range."""
    found = find_special(ipaddress.ip_address("169.254.169.254"))
    assert found is not None
    assert found.range.network == ipaddress.IPv4Network("169.254.169.254/32")


def test_tables_are_ordered_most_specific_first() -> None:
    """The look-up takes the first match, so longer prefixes come first."""
    for table in (IPV4_SPECIAL, IPV6_SPECIAL):
        lengths = [entry.network.prefixlen for entry in table]
        assert lengths == sorted(lengths, reverse=True)


def test_every_iana_ipv4_entry_is_covered() -> None:
    """Each IANA IPv4 special-purpose block (2024 registry) lies inside a table entry."""
    registry = [
        "0.0.0.0/8",
        "0.0.0.0/32",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.0.0/29",
        "192.0.0.8/32",
        "192.0.0.9/32",
        "192.0.0.10/32",
        "192.0.0.170/32",
        "192.0.0.171/32",
        "192.0.2.0/24",
        "192.31.196.0/24",
        "192.52.193.0/24",
        "192.88.99.0/24",
        "192.168.0.0/16",
        "192.175.48.0/24",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "240.0.0.0/4",
        "255.255.255.255/32",
    ]
    for block in map(ipaddress.IPv4Network, registry):
        assert any(block.subnet_of(e.network) for e in IPV4_SPECIAL), block  # type: ignore[arg-type]
