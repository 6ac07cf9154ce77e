"""sock_diag requests and replies, /proc parsers, and real lookups of this process's sockets."""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from collections.abc import Iterator

import pytest

from netjail.kernel import sockowner
from netjail.kernel.sockowner import SocketEnd, find_socket_inode

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address
LOCALHOST = V4("127.0.0.1")


@pytest.fixture
def diag() -> Iterator[socket.socket]:
    """A sock_diag socket in this process's own netns (no privilege needed to ask it)."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, sockowner.NETLINK_SOCK_DIAG) as sock:
        sock.setblocking(False)
        yield sock


def _inode(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


def test_a_tcp_request_names_the_socket_by_its_own_end_first() -> None:
    """TCP: the socket's own end is the request's source, its peer the destination."""
    end = SocketEnd("tcp", V4("169.254.77.1"), 40000, V4("203.0.113.9"), 443)
    request = sockowner.build_diag_request(end, socket.AF_INET, seq=7)
    length, kind, flags, seq, _ = struct.unpack_from("=IHHII", request)
    assert (length, kind, flags, seq) == (len(request), 20, 1, 7)
    assert request[16:18] == bytes([socket.AF_INET, socket.IPPROTO_TCP])
    assert struct.unpack_from(">HH", request, 24) == (40000, 443)
    assert request[28:32] == V4("169.254.77.1").packed
    assert request[44:48] == V4("203.0.113.9").packed


def test_a_udp_request_swaps_the_ends_as_the_kernel_expects() -> None:
    """UDP: udp_diag looks up with source and destination swapped, so the socket's own end is
    the destination; an IPv4 end asked as IPv6 is in its mapped form."""
    end = SocketEnd("udp", V4("169.254.77.1"), 40000)
    request = sockowner.build_diag_request(end, socket.AF_INET6)
    assert struct.unpack_from(">HH", request, 24) == (0, 40000)
    assert request[28:44] == bytes(16)
    assert request[44:60] == V6("::ffff:169.254.77.1").packed


def test_parse_diag_reply_takes_the_inode_and_refuses_errors() -> None:
    """A socket message gives its inode; an error message, or a short one, gives None."""
    body = bytearray(72)
    struct.pack_into("=I", body, 68, 4711)
    reply = struct.pack("=IHHII", 16 + len(body), 20, 0, 1, 0) + bytes(body)
    assert sockowner.parse_diag_reply(reply) == 4711
    error = struct.pack("=IHHII", 36, 2, 0, 1, 0) + struct.pack("=i", -2) + bytes(16)
    assert sockowner.parse_diag_reply(error) is None
    assert sockowner.parse_diag_reply(reply[:40]) is None


def test_the_kernel_finds_udp_and_tcp_sockets_by_their_ends(diag: socket.socket) -> None:
    """Real lookups: an unconnected wildcard UDP socket by its port, a connected one by both
    ends, an IPv6 dual-stack one by its IPv4 form, and a connected TCP socket."""
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as wild,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as connected,
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as dual,
        socket.socket() as listener,
        socket.socket() as client,
    ):
        wild.bind(("0.0.0.0", 0))  # noqa: S104 - a wildcard bind is what is looked up
        port = wild.getsockname()[1]
        sent_to = SocketEnd("udp", V4("169.254.77.1"), port, V4("192.0.2.1"), 9)
        assert find_socket_inode(diag, sent_to) == _inode(wild)
        connected.connect(("127.0.0.1", 9))
        own = connected.getsockname()[1]
        assert find_socket_inode(diag, SocketEnd("udp", LOCALHOST, own, LOCALHOST, 9)) == _inode(
            connected
        )
        dual.bind(("::", 0))
        dual_port = dual.getsockname()[1]
        assert find_socket_inode(diag, SocketEnd("udp", LOCALHOST, dual_port)) == _inode(dual)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        client.connect(listener.getsockname())
        end = SocketEnd(
            "tcp", LOCALHOST, client.getsockname()[1], LOCALHOST, listener.getsockname()[1]
        )
        assert find_socket_inode(diag, end) == _inode(client)
        assert find_socket_inode(diag, SocketEnd("tcp", LOCALHOST, 1, LOCALHOST, 2)) is None


def test_parse_ns_pid_takes_the_innermost_namespace() -> None:
    """NSpid lists the pid from the outermost namespace in; the job's is the last."""
    assert sockowner.parse_ns_pid("Name:\tcurl\nNSpid:\t81234\t7\n") == 7
    assert sockowner.parse_ns_pid("Name:\tcurl\nNSpid:\t81234\n") == 81234
    assert sockowner.parse_ns_pid("Name:\tcurl\n") is None


def test_parse_cmdline_splits_on_nul_and_replaces_undecodable_bytes() -> None:
    """The command line is split at NULs; bytes that are not UTF-8 are replaced, not raised."""
    assert sockowner.parse_cmdline(b"curl\0-s\0\xff\0") == ["curl", "-s", "\ufffd"]
    assert sockowner.parse_cmdline(b"") == []


def test_this_process_is_read_from_proc(diag: socket.socket) -> None:
    """This process's own socket is among its descriptors' inodes, and /proc names it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        assert _inode(sock) in set(sockowner.socket_inodes(os.getpid(), 4096)) - {None}
    me = sockowner.read_process(os.getpid())
    assert me is not None
    assert me.ns_pid == os.getpid()
    assert me.exe is not None
    assert os.path.samefile(me.exe, "/proc/self/exe")


def test_a_gone_process_reads_as_none() -> None:
    """A pid that is not there has no table, no sockets and no identity."""
    gone = 2**22 + 1  # above pid_max's largest value
    assert list(sockowner.socket_inodes(gone, 10)) == []
    assert sockowner.read_process(gone) is None
