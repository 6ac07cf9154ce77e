"""Special-purpose IP addresses: the table the proxy's upstream guard refuses by default (pure).

An allowed *name* may resolve to anything its DNS says, and a job whose rules allow a wildcard
can often choose that DNS. So the proxy refuses to connect a name to any address that is not
ordinary global unicast, unless a rule names that address and port (see docs/POLICY.md). This
module says which addresses those are, and why, in words fit for the event that refuses one.

The table follows the IANA IPv4 and IPv6 Special-Purpose Address Registries (RFC 6890 and
successors), plus multicast, the IPv4 class E and broadcast space, and, for IPv6, everything
outside 2000::/3 (the only space the IANA IPv6 Address Space registry gives to global unicast).
Entries that IANA lists as globally reachable but that no web client needs (PCP and TURN
anycast in 192.0.0.0/24, AS112, AMT) are refused too: fail closed costs nothing there.

IPv6 forms that stand for an IPv4 address are judged by that IPv4 address, because that is
what the packets reach: IPv4-mapped (``::ffff:a.b.c.d``, which a dual-stack socket connects
over IPv4), IPv4-compatible (``::a.b.c.d``, deprecated, so refused in any case), NAT64
(``64:ff9b::/96``; the local-use ``64:ff9b:1::/48`` only in its ``/96`` layout, as any other
layout could hide a different IPv4 address), 6to4 (``2002::/16``) and Teredo (``2001::/32``:
both the server and the client address).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Final, Literal

from netjail.ipaddr import IPAddress, IPNetwork


@dataclass(frozen=True, slots=True)
class SpecialRange:
    """One special-purpose range and what to call an address in it."""

    network: IPNetwork
    #: A noun phrase, e.g. "a documentation address".
    kind: str


@dataclass(frozen=True, slots=True)
class SpecialAddress:
    """Why ``address`` is not ordinary global unicast."""

    address: IPAddress
    range: SpecialRange
    #: For an IPv6 form of an IPv4 address: that IPv4 address, which ``range`` holds.
    embedded: ipaddress.IPv4Address | None = None
    #: For an IPv6 form of an IPv4 address: what the form is, e.g. "a NAT64 address".
    carrier: str | None = None

    def describe(self) -> str:
        """``203.0.113.80, a documentation address``, or with the IPv4 address it stands for:
        ``64:ff9b::a00:1, a NAT64 address of 10.0.0.1, a private address``."""
        if self.embedded is None:
            return f"{self.address}, {self.range.kind}"
        return f"{self.address}, {self.carrier} of {self.embedded}, {self.range.kind}"


def _ranges(*entries: tuple[str, str]) -> tuple[SpecialRange, ...]:
    ranges = [SpecialRange(ipaddress.ip_network(net), kind) for net, kind in entries]
    # Most specific first, so that 169.254.169.254 is "the cloud metadata address" and not
    # just "a link-local address".
    return tuple(sorted(ranges, key=lambda r: r.network.prefixlen, reverse=True))


_PRIVATE = "a private address"
_DOCUMENTATION = "a documentation address"
_METADATA = "the cloud metadata address"

IPV4_SPECIAL: Final = _ranges(
    ("0.0.0.0/8", "a 'this network' address"),  # connecting to 0.0.0.0 reaches this host
    ("10.0.0.0/8", _PRIVATE),
    ("100.64.0.0/10", "a shared (CGNAT) address"),
    ("127.0.0.0/8", "a loopback address"),
    ("169.254.0.0/16", "a link-local address"),
    ("169.254.169.254/32", _METADATA),
    ("172.16.0.0/12", _PRIVATE),
    # DS-Lite, PCP and TURN anycast (192.0.0.9, .10), NAT64 discovery (.170, .171)…
    ("192.0.0.0/24", "an IETF protocol assignment"),
    ("192.0.2.0/24", _DOCUMENTATION),
    ("192.31.196.0/24", "an AS112 anycast address"),
    ("192.52.193.0/24", "an AMT anycast address"),
    ("192.88.99.0/24", "a deprecated 6to4 relay anycast address"),
    ("192.168.0.0/16", _PRIVATE),
    ("192.175.48.0/24", "an AS112 anycast address"),
    ("198.18.0.0/15", "a benchmarking address (netjail's synthetic pool)"),
    ("198.51.100.0/24", _DOCUMENTATION),
    ("203.0.113.0/24", _DOCUMENTATION),
    ("224.0.0.0/4", "a multicast address"),
    ("240.0.0.0/4", "a reserved address"),
    ("255.255.255.255/32", "the broadcast address"),
)

IPV6_SPECIAL: Final = _ranges(
    ("::/128", "the unspecified address"),  # connecting to :: reaches this host
    ("::1/128", "a loopback address"),
    ("::/8", "a reserved address"),  # also IPv4-compatible and SIIT forms
    ("64:ff9b:1::/48", "a local-use NAT64 address outside 64:ff9b:1::/96"),
    ("100::/64", "a discard-only address"),
    ("100:0:0:1::/64", "a dummy address"),
    ("2001::/23", "an IETF protocol assignment"),  # PCP/TURN anycast, AMT, AS112, ORCHID…
    ("2001:2::/48", "a benchmarking address"),
    ("2001:db8::/32", _DOCUMENTATION),
    ("2620:4f:8000::/48", "an AS112 anycast address"),
    ("3fff::/20", _DOCUMENTATION),
    ("5f00::/16", "a segment routing address"),
    ("fc00::/7", "a unique local address"),
    ("fd00:ec2::254/128", _METADATA),  # the AWS IPv6 instance metadata service
    ("fe80::/10", "a link-local address"),
    ("fec0::/10", "a deprecated site-local address"),
    ("ff00::/8", "a multicast address"),
)

_GLOBAL_UNICAST: Final = ipaddress.IPv6Network("2000::/3")
_OUTSIDE_GLOBAL_UNICAST: Final = SpecialRange(
    ipaddress.IPv6Network("::/0"), "a reserved address (outside 2000::/3)"
)
_NAT64: Final = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL_96: Final = ipaddress.IPv6Network("64:ff9b:1::/96")
_TEREDO: Final = ipaddress.IPv6Network("2001::/32")
_COMPATIBLE: Final = ipaddress.IPv6Network("::/96")
#: Forms that carry an IPv4 address in their last 32 bits. IPv4-compatible addresses are
#: deprecated (RFC 4291 §2.5.5.1): the ::/8 entry refuses them whatever they embed.
_LAST_32_BITS: Final[tuple[tuple[ipaddress.IPv6Network, str, Literal["global", "table"]], ...]] = (
    (_NAT64, "a NAT64 address", "global"),
    (_NAT64_LOCAL_96, "a local-use NAT64 address", "global"),
    (_COMPATIBLE, "an IPv4-compatible address", "table"),
)


def find_special(address: IPAddress) -> SpecialAddress | None:
    """Why ``address`` is special-purpose, or None for ordinary global unicast."""
    if isinstance(address, ipaddress.IPv4Address):
        found = _lookup(address, IPV4_SPECIAL)
        return None if found is None else SpecialAddress(address, found)
    if address.scope_id is not None:
        # A scoped address is link-local in practice; judge the address without its zone.
        address = ipaddress.IPv6Address(address.packed)
    embedding = _embedding(address)
    if embedding is not None:
        for ipv4 in embedding.addresses:
            found = _lookup(ipv4, IPV4_SPECIAL)
            if found is not None:
                return SpecialAddress(address, found, ipv4, embedding.carrier)
        if embedding.when_global == "global":
            return None  # the IPv4 address it stands for is global, and so is the way there
    found = _lookup(address, IPV6_SPECIAL)
    if found is None and address not in _GLOBAL_UNICAST:
        found = _OUTSIDE_GLOBAL_UNICAST
    return None if found is None else SpecialAddress(address, found)


@dataclass(frozen=True, slots=True)
class _Embedding:
    """An IPv6 form of IPv4 addresses: what it is called and which addresses it stands for."""

    carrier: str
    addresses: tuple[ipaddress.IPv4Address, ...]
    #: What a global IPv4 address makes of the IPv6 one: global, or judged by the IPv6 table.
    when_global: Literal["global", "table"]


def _embedding(address: ipaddress.IPv6Address) -> _Embedding | None:
    if address.ipv4_mapped is not None:
        return _Embedding("an IPv4-mapped address", (address.ipv4_mapped,), "global")
    if address.sixtofour is not None:
        return _Embedding("a 6to4 address", (address.sixtofour,), "global")
    if address in _TEREDO and address.teredo is not None:
        server, client = address.teredo
        return _Embedding("a Teredo address", (client, server), "global")
    last32 = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    for network, carrier, when_global in _LAST_32_BITS:
        # :: and ::1 are the unspecified and loopback addresses, not IPv4-compatible ones.
        if address in network and int(address) > 1:
            return _Embedding(carrier, (last32,), when_global)
    return None


def _lookup(address: IPAddress, table: tuple[SpecialRange, ...]) -> SpecialRange | None:
    for entry in table:
        if address in entry.network:
            return entry
    return None
