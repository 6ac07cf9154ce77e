"""Where a job's proxied connection may go: the upstream guard and the upstream sockets.

The guard is pure (:func:`refuse_upstream`, on exact addresses); what it needs from the host,
the daemon host's own addresses, is read by :class:`HostAddresses`, briefly cached.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import psutil  # type: ignore[import-untyped]  # psutil ships no type information

from netjail.ipaddr import IPAddress
from netjail.policy import Policy
from netjail.special import find_special

#: How long the list of the daemon host's own addresses is reused before it is read again.
HOST_ADDRESSES_TTL_S = 1.0
#: Most refused addresses an upstream_forbidden detail names one by one.
_NAMED_REFUSALS = 3

#: Where an upstream address came from: the job's --add-host, the daemon's [hosts] table, the
#: host's resolver, or the address the job dialled (a CIDR rule's range).
Origin = Literal["add-host", "hosts", "dns", "dialled"]


@dataclass(frozen=True, slots=True)
class Upstream:
    """An address the proxy may connect a job's connection to, and where it came from."""

    address: IPAddress
    origin: Origin


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why the proxy will not connect to an upstream."""

    upstream: Upstream
    #: The address and what it is: "192.0.2.7, a documentation address".
    why: str
    #: "denied": a deny rule covers it, there is no fix to offer; else it was merely not named.
    cause: Literal["denied", "special", "daemon_host"]


def refuse_upstream(
    upstream: Upstream, port: int, policy: Policy, host_addresses: frozenset[IPAddress]
) -> Refusal | None:
    """Why the proxy must not connect to ``upstream`` on ``port``, or None if it may.

    A deny CIDR rule refuses any address. The job's --add-host, and any address an allow CIDR
    rule names on this port, are the requester's own choice and go. Anything else must be
    ordinary global unicast and not one of the daemon host's own addresses.
    """
    address = _plain(upstream.address)
    if policy.denies_address(address, port):
        return Refusal(upstream, f"{address}, which a --deny rule covers on port {port}", "denied")
    if upstream.origin == "add-host" or policy.allows_address(address, port):
        return None
    special = find_special(address)
    if special is not None:
        return Refusal(upstream, special.describe(), "special")
    if address in host_addresses:
        return Refusal(upstream, f"{address}, an address of the daemon host", "daemon_host")
    return None


def describe_forbidden(domain: str, refused: list[Refusal]) -> str:
    """The upstream_forbidden detail: which addresses, why, and the fix if there is one.

    ``pkgs.example resolved to 203.0.113.80, a documentation address; if that is intended:
    --add-host pkgs.example:203.0.113.80``.
    """
    first = refused[0]
    if first.upstream.origin == "hosts":
        text = f"{domain} is {first.why}, in the daemon's [hosts] table"
    elif first.upstream.origin == "dns":
        text = f"{domain} resolved to {first.why}"
    else:
        text = f"{domain} is {first.why}"
    text += "".join(f"; and to {other.why}" for other in refused[1:_NAMED_REFUSALS])
    if len(refused) > _NAMED_REFUSALS:
        text += f"; and {len(refused) - _NAMED_REFUSALS} more refused addresses"
    if first.cause != "denied":
        address = _plain(first.upstream.address)
        shown = f"[{address}]" if address.version == 6 else str(address)
        text += f"; if that is intended: --add-host {domain}:{shown}"
    return text


class HostAddresses:
    """The daemon host's own addresses, read at most every ``ttl_s`` seconds.

    Read in the netns of the thread that calls (the event loop's: the daemon's own), where the
    proxy's upstream sockets are made.
    """

    def __init__(
        self,
        read: Callable[[], frozenset[IPAddress]],
        *,
        ttl_s: float = HOST_ADDRESSES_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read = read
        self._ttl_s = ttl_s
        self._clock = clock
        self._cached: tuple[float, frozenset[IPAddress]] | None = None

    def __call__(self) -> frozenset[IPAddress]:
        """The addresses; raises OSError if they cannot be read (the caller fails closed)."""
        now = self._clock()
        if self._cached is None or now - self._cached[0] >= self._ttl_s:
            self._cached = (now, self._read())
        return self._cached[1]


def read_host_addresses() -> frozenset[IPAddress]:
    """Every address on this netns's interfaces (getifaddrs), without IPv6 zones."""
    found: set[IPAddress] = set()
    for addresses in psutil.net_if_addrs().values():
        for entry in addresses:
            if entry.family in (socket.AF_INET, socket.AF_INET6):
                with contextlib.suppress(ValueError):
                    found.add(_plain(ipaddress.ip_address(entry.address.partition("%")[0])))
    return frozenset(found)


#: Shared by every job's proxy: the host's addresses are the same for all of them.
daemon_host_addresses = HostAddresses(read_host_addresses)


def upstream_socket(address: IPAddress) -> socket.socket:
    """A non-blocking TCP socket for connecting to ``address``, in the caller's netns.

    An upstream on loopback (named by --add-host or a CIDR rule) is a local hop like the job's
    hop to the proxy, so it gets reno as the jail does (see kernel.host._unpaced_tcp): a pacing
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


def _plain(address: IPAddress) -> IPAddress:
    """IPv4-mapped IPv6 as the IPv4 address it is, and IPv6 without its zone."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.scope_id is not None:
            return ipaddress.IPv6Address(address.packed)
    return address
