"""Socket tables and /proc parsers of the process lookup, and the lookup on this process."""

from __future__ import annotations

import ipaddress
import os
import socket

from hypothesis import given
from hypothesis import strategies as st

from netjail.kernel import sockowner
from netjail.kernel.sockowner import SocketEntry, find_socket, parse_address, parse_socket_table

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address
#: Lines as the kernel prints them (little-endian words, as on x86_64 and aarch64).
TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:0035 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 153 1 0
   1: 014DFEA9:9C40 0A7100CB:01BB 02 00000001:00000000 01:00000064 00000002 61184 0 4711 1 0
   2: 014DFEA9:8E6C 0100007F:8135 06 00000000:00000000 03:00001610 00000000     0        0 0 3 0
garbage line
"""
_ZERO6 = "0" * 32
_TAIL = " 07 00000000:00000000 00:00000000 00000000     0        0"
UDP6 = (
    "  sl  local_address                         remote_address                        st\n"
    f" 2014: {_ZERO6}:9FF4 {_ZERO6}:0000{_TAIL} 99 2 0 0\n"
    f" 2015: 0000000000000000FFFF00000100007F:A000 {_ZERO6}:0000{_TAIL} 98 2 0 0\n"
)


def test_parse_address_reads_the_kernels_host_order_words() -> None:
    """IPv4 and IPv6 table addresses become the addresses and ports they stand for."""
    assert parse_address("0100007F:0035") == (V4("127.0.0.1"), 53)
    assert parse_address("0000000000000000FFFF00000100007F:A000") == (
        V6("::ffff:127.0.0.1"),
        0xA000,
    )


def test_parse_socket_table_keeps_entries_and_skips_garbage() -> None:
    """Every well-formed line gives its entry (inode included); the header and garbage do not."""
    entries = parse_socket_table(TCP)
    assert entries[1] == SocketEntry(V4("169.254.77.1"), 0x9C40, V4("203.0.113.10"), 443, 4711)
    assert [e.inode for e in entries] == [153, 4711, 0]


def test_find_socket_prefers_the_exact_socket_and_skips_inode_zero() -> None:
    """A connecting socket is found by its local end and peer; TIME_WAIT (inode 0) is never."""
    entries = parse_socket_table(TCP)
    assert find_socket(entries, V4("169.254.77.1"), 0x9C40, V4("203.0.113.10"), 443) == 4711
    assert find_socket(entries, V4("169.254.77.1"), 0x9C40, V4("203.0.113.11"), 443) is None
    assert find_socket(entries, V4("169.254.77.1"), 0x8E6C) is None
    assert find_socket(entries, V4("169.254.77.1"), 1) is None


def test_find_socket_matches_wildcard_and_mapped_udp_sockets() -> None:
    """An unconnected UDP socket bound to :: matches any local address of its port; a dual-stack
    socket's IPv4-mapped address matches its IPv4 form."""
    entries = parse_socket_table(UDP6)
    assert find_socket(entries, V4("169.254.77.1"), 0x9FF4, V4("192.0.2.1"), 9) == 99
    assert find_socket(entries, V4("127.0.0.1"), 0xA000) == 98
    assert find_socket(entries, V4("127.0.0.2"), 0xA000) is None


def test_parse_ns_pid_takes_the_innermost_namespace() -> None:
    """NSpid lists the pid from the outermost namespace in; the job's is the last."""
    assert sockowner.parse_ns_pid("Name:\tcurl\nNSpid:\t81234\t7\n") == 7
    assert sockowner.parse_ns_pid("Name:\tcurl\nNSpid:\t81234\n") == 81234
    assert sockowner.parse_ns_pid("Name:\tcurl\n") is None


def test_parse_cmdline_splits_on_nul_and_replaces_undecodable_bytes() -> None:
    """The command line is split at NULs; bytes that are not UTF-8 are replaced, not raised."""
    assert sockowner.parse_cmdline(b"curl\0-s\0\xff\0") == ["curl", "-s", "\ufffd"]
    assert sockowner.parse_cmdline(b"") == []


@given(st.text(max_size=2000))
def test_parse_socket_table_never_raises(text: str) -> None:
    """Whatever the table holds, parsing gives entries and never raises."""
    assert isinstance(parse_socket_table(text), list)


def test_this_process_holds_its_own_socket() -> None:
    """A socket this process binds is in its netns's table, and its descriptors name its inode."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        table = sockowner.read_socket_table(os.getpid(), "udp", 4)
        assert table is not None
        inode = find_socket(table, V4("127.0.0.1"), port)
        assert inode == os.fstat(sock.fileno()).st_ino
        assert inode in set(sockowner.socket_inodes(os.getpid(), 4096))
    me = sockowner.read_process(os.getpid())
    assert me is not None
    assert me.ns_pid == os.getpid()
    assert me.exe is not None
    assert os.path.samefile(me.exe, "/proc/self/exe")


def test_a_gone_process_reads_as_none() -> None:
    """A pid that is not there has no table, no sockets and no identity."""
    gone = 2**22 + 1  # above pid_max's largest value
    assert sockowner.read_socket_table(gone, "tcp", 4) is None
    assert list(sockowner.socket_inodes(gone, 10)) == []
    assert sockowner.read_process(gone) is None
