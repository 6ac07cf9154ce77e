"""The daemon's per-job sockets inside a jail: the DNS stub's and the proxy's listeners.

Each is created from the netns thread while it is inside the jail (a socket belongs to the netns
it was created in, for ever), then served by the daemon's asyncio loop like any other socket.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

from netjail.kernel.rules import DNS_PORT, DNS_STUB, PROXY_PORT

# linux/netfilter_ipv4.h and linux/netfilter_ipv6/ip6_tables.h: the pre-NAT destination of a
# redirected TCP connection, from conntrack.
SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
_LOOPBACKS = ((str(DNS_STUB.v4), socket.AF_INET), (str(DNS_STUB.v6), socket.AF_INET6))


def _bound(family: int, kind: int, address: str, port: int) -> socket.socket:
    sock = socket.socket(family, kind)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def open_dns_sockets() -> tuple[list[socket.socket], list[socket.socket]]:
    """UDP sockets and TCP listeners on 127.0.0.1:53 and [::1]:53 of the calling thread's netns."""
    udp: list[socket.socket] = []
    tcp: list[socket.socket] = []
    try:
        for address, family in _LOOPBACKS:
            udp.append(_bound(family, socket.SOCK_DGRAM, address, DNS_PORT))
            tcp.append(_bound(family, socket.SOCK_STREAM, address, DNS_PORT))
    except BaseException:
        for sock in udp + tcp:
            sock.close()
        raise
    return udp, tcp


def open_proxy_listeners() -> list[socket.socket]:
    """TCP listeners for redirected connections on 127.0.0.1 and [::1] of the calling netns."""
    listeners: list[socket.socket] = []
    try:
        for address, family in _LOOPBACKS:
            listeners.append(_bound(family, socket.SOCK_STREAM, address, PROXY_PORT))
    except BaseException:
        for sock in listeners:
            sock.close()
        raise
    return listeners


def original_destination(
    sock: socket.socket,
) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """Where a redirected connection was going before the jail's redirect rule."""
    if sock.family == socket.AF_INET:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port, packed = struct.unpack_from("!2xH4s", raw)
        return ipaddress.IPv4Address(packed), int(port)
    raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28)
    port, packed = struct.unpack_from("!2xH4x16s", raw)
    return ipaddress.IPv6Address(packed), int(port)
