"""The proxy's upstream sockets (real sockets, never connected: no privilege needed)."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from netjail.daemon.proxy import upstream_socket


def congestion_control(sock: socket.socket) -> str:
    name = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16)
    return name.rstrip(b"\0").decode()


@pytest.mark.parametrize("address", ["127.0.0.1", "127.3.4.5", "::1"])
def test_loopback_upstream_is_not_paced(address: str) -> None:
    with upstream_socket(ipaddress.ip_address(address)) as sock:
        assert congestion_control(sock) == "reno"
        assert sock.getblocking() is False
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


@pytest.mark.parametrize("address", ["203.0.113.7", "2001:db8::7"])
def test_other_upstreams_keep_the_hosts_default(address: str) -> None:
    with open("/proc/sys/net/ipv4/tcp_congestion_control") as f:
        default = f.read().strip()
    parsed = ipaddress.ip_address(address)
    with upstream_socket(parsed) as sock:
        assert congestion_control(sock) == default
        assert sock.family == (socket.AF_INET if parsed.version == 4 else socket.AF_INET6)
