"""Tests for netjail.kernel.nflog's parsers, on real captured datagrams and built packets."""

from __future__ import annotations

import json
import socket
import struct
from dataclasses import replace
from pathlib import Path

import pytest

from netjail.kernel import nflog
from netjail.kernel.nflog import (
    NflogPacket,
    PacketSummary,
    SequenceTracker,
    build_config_message,
    parse_ip_packet,
    parse_netlink_messages,
)

CAPTURE = Path(__file__).parent / "data" / "nflog_capture.json"
PREFIX = "netjail j-test "
NOBODY = 65534


def _captured() -> list[bytes]:
    return [bytes.fromhex(h) for h in json.loads(CAPTURE.read_text())]


# The five datagrams in nflog_capture.json, in order: (family, summary).
EXPECTED = [
    (socket.AF_INET, PacketSummary(4, "tcp", "203.0.113.9", 443)),
    (socket.AF_INET6, PacketSummary(6, "tcp", "2001:db8::1", 8080)),
    (socket.AF_INET, PacketSummary(4, "icmp", "198.51.100.7", None)),
    (socket.AF_INET, PacketSummary(4, "udp", "8.8.8.8", 53)),
    (socket.AF_INET6, PacketSummary(6, "icmpv6", "2001:db8::5", None)),
]


def test_capture_holds_five_datagrams() -> None:
    """The captured data set is the five datagrams the tests below describe."""
    assert len(_captured()) == len(EXPECTED) == 5


@pytest.mark.parametrize("index", range(5))
def test_parse_captured_datagram(index: int) -> None:
    """Each real kernel datagram gives one packet with its prefix, uid, gid, seq and family."""
    batch = parse_netlink_messages(_captured()[index])
    family, _summary = EXPECTED[index]
    assert batch.errors == []
    assert batch.overrun is False
    assert len(batch.packets) == 1
    packet = batch.packets[0]
    assert (packet.family, packet.prefix, packet.uid, packet.gid, packet.seq) == (
        family,
        PREFIX,
        NOBODY,
        NOBODY,
        index,
    )


@pytest.mark.parametrize("index", range(5))
def test_parse_captured_payload(index: int) -> None:
    """Each captured payload parses to the destination, protocol and port that was sent."""
    packet = parse_netlink_messages(_captured()[index]).packets[0]
    assert parse_ip_packet(packet.payload) == EXPECTED[index][1]


def test_parse_concatenated_datagrams() -> None:
    """Several messages in one datagram are all returned, in order."""
    batch = parse_netlink_messages(b"".join(_captured()))
    assert [p.seq for p in batch.packets] == [0, 1, 2, 3, 4]
    assert [parse_ip_packet(p.payload) for p in batch.packets] == [s for _, s in EXPECTED]


@pytest.mark.parametrize("cut", [0, 1, 15, 16, 17, 40, 100])
def test_truncated_datagram_does_not_raise(cut: int) -> None:
    """A datagram cut anywhere before its end yields no packet and no exception."""
    data = _captured()[0]
    batch = parse_netlink_messages(data[:cut])
    assert batch.packets == []
    assert batch.errors == []


def test_truncated_second_message_keeps_the_first() -> None:
    """A whole message followed by a cut one yields just the whole one."""
    first, second = _captured()[:2]
    batch = parse_netlink_messages(first + second[:50])
    assert [p.seq for p in batch.packets] == [0]


def _nlmsg(kind: int, body: bytes, flags: int = 0, seq: int = 0) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body


@pytest.mark.parametrize("length", [0, 1, 15])
def test_netlink_header_with_impossible_length_stops_parsing(length: int) -> None:
    """A header whose length is below the header size ends parsing instead of looping."""
    data = struct.pack("=IHHII", length, nflog.NLMSG_ERROR, 0, 0, 0) + b"\0" * 20
    batch = parse_netlink_messages(data)
    assert (batch.packets, batch.errors) == ([], [])


def test_netlink_header_longer_than_datagram_stops_parsing() -> None:
    """A header claiming more bytes than the datagram has is ignored."""
    data = struct.pack("=IHHII", 1000, nflog.NLMSG_ERROR, 0, 0, 0) + b"\0" * 20
    batch = parse_netlink_messages(data)
    assert (batch.packets, batch.errors, batch.overrun) == ([], [], False)


def test_nlmsg_error_ack() -> None:
    """An NLMSG_ERROR with error 0 is an ack, reported as errno 0."""
    original = struct.pack("=IHHII", 28, 0x0401, 5, 1, 0)
    data = _nlmsg(nflog.NLMSG_ERROR, struct.pack("=i", 0) + original)
    batch = parse_netlink_messages(data)
    assert batch.errors == [0]
    assert batch.packets == []


def test_nlmsg_error_code_is_a_positive_errno() -> None:
    """An NLMSG_ERROR carrying -EPERM is reported as EPERM (1)."""
    original = struct.pack("=IHHII", 28, 0x0401, 5, 1, 0)
    data = _nlmsg(nflog.NLMSG_ERROR, struct.pack("=i", -1) + original)
    assert parse_netlink_messages(data).errors == [1]


def test_ack_and_error_in_one_datagram() -> None:
    """Several NLMSG_ERROR messages in one datagram are reported in order."""
    data = _nlmsg(nflog.NLMSG_ERROR, struct.pack("=i", 0)) + _nlmsg(
        nflog.NLMSG_ERROR, struct.pack("=i", -16)
    )
    assert parse_netlink_messages(data).errors == [0, 16]


def test_nlmsg_error_with_short_body_is_ignored() -> None:
    """An NLMSG_ERROR too short to hold an errno is skipped, not misread."""
    assert parse_netlink_messages(_nlmsg(nflog.NLMSG_ERROR, b"\0\0")).errors == []


def test_nlmsg_overrun_is_flagged() -> None:
    """An NLMSG_OVERRUN message sets overrun."""
    assert parse_netlink_messages(_nlmsg(nflog.NLMSG_OVERRUN, b"")).overrun is True


def test_packet_message_without_attributes() -> None:
    """A packet message with no attributes gives a packet of empty and unknown fields."""
    body = struct.pack(">BBH", socket.AF_INET, 0, 1)
    batch = parse_netlink_messages(_nlmsg(0x0400, body))
    assert batch.packets == [NflogPacket(socket.AF_INET, "", None, None, None, b"")]


def test_packet_message_with_truncated_attribute() -> None:
    """An attribute running past the message end is dropped, earlier ones kept."""
    prefix = b"netjail j-1 \0"
    attrs = struct.pack("=HH", 4 + len(prefix), nflog.NFULA_PREFIX) + prefix + b"\0" * 3
    attrs += struct.pack("=HH", 200, nflog.NFULA_PAYLOAD) + b"\x45\0"
    body = struct.pack(">BBH", socket.AF_INET, 0, 1) + attrs
    packet = parse_netlink_messages(_nlmsg(0x0400, body)).packets[0]
    assert packet.prefix == "netjail j-1 "
    assert packet.payload == b""


# --- parse_ip_packet on hand-built packets -------------------------------------------------


def _ipv4(
    proto: int,
    dst: bytes,
    l4: bytes,
    *,
    options: bytes = b"",
    frag: int = 0,
) -> bytes:
    ihl = (20 + len(options)) // 4
    header = struct.pack(
        ">BBHHHBBH4s4s",
        0x40 | ihl,
        0,
        20 + len(options) + len(l4),
        0x1234,
        frag,
        64,
        proto,
        0,
        bytes([10, 0, 0, 2]),
        dst,
    )
    return header + options + l4


def _ports(src: int, dst: int) -> bytes:
    return struct.pack(">HH", src, dst) + b"\0" * 16


V6_SRC = socket.inet_pton(socket.AF_INET6, "fd00::2")
V6_DST = socket.inet_pton(socket.AF_INET6, "2001:db8::1")


def _ipv6(next_header: int, rest: bytes) -> bytes:
    return struct.pack(">IHBB", 0x60000000, len(rest), next_header, 64) + V6_SRC + V6_DST + rest


def test_ipv4_with_options() -> None:
    """With IHL 6 (4 bytes of options) the port is read after the options."""
    packet = _ipv4(6, bytes([203, 0, 113, 9]), _ports(40000, 443), options=b"\x01\x01\x01\x00")
    assert packet[0] == 0x46
    assert parse_ip_packet(packet) == PacketSummary(4, "tcp", "203.0.113.9", 443)


def test_ipv4_first_fragment_has_a_port() -> None:
    """The first fragment (offset 0, more-fragments set) still carries the UDP header."""
    packet = _ipv4(17, bytes([8, 8, 8, 8]), _ports(5353, 53), frag=0x2000)
    assert parse_ip_packet(packet) == PacketSummary(4, "udp", "8.8.8.8", 53)


def test_ipv4_non_first_fragment_has_no_port() -> None:
    """A non-first fragment has no transport header, so no port is made up."""
    packet = _ipv4(17, bytes([8, 8, 8, 8]), _ports(5353, 53), frag=0x2000 | 185)
    assert parse_ip_packet(packet) == PacketSummary(4, "udp", "8.8.8.8", None)


def test_ipv4_unknown_protocol_is_reported_by_number() -> None:
    """A protocol without a name (GRE, 47) is reported as its number, without a port."""
    packet = _ipv4(47, bytes([192, 0, 2, 1]), b"\0" * 8)
    assert parse_ip_packet(packet) == PacketSummary(4, 47, "192.0.2.1", None)


def test_ipv4_sctp_has_a_port() -> None:
    """SCTP (132) is reported by number, with its destination port."""
    packet = _ipv4(132, bytes([192, 0, 2, 1]), _ports(1, 3868))
    assert parse_ip_packet(packet) == PacketSummary(4, 132, "192.0.2.1", 3868)


def test_ipv4_with_bad_ihl_has_no_port() -> None:
    """An IHL below 5 is nonsense: destination reported, no port."""
    packet = bytearray(_ipv4(6, bytes([192, 0, 2, 1]), _ports(1, 443)))
    packet[0] = 0x44
    assert parse_ip_packet(bytes(packet)) == PacketSummary(4, "tcp", "192.0.2.1", None)


def test_ipv4_truncated_transport_header_has_no_port() -> None:
    """A snapshot cut inside the transport header yields no port, not an exception."""
    packet = _ipv4(6, bytes([192, 0, 2, 1]), _ports(1, 443))[:22]
    assert parse_ip_packet(packet) == PacketSummary(4, "tcp", "192.0.2.1", None)


def test_ipv6_with_hop_by_hop_header_before_tcp() -> None:
    """The hop-by-hop extension header is skipped to find TCP and its port."""
    hop_by_hop = bytes([6, 0]) + b"\x01\x04\0\0\0\0"  # next TCP, 8 bytes, PadN option
    packet = _ipv6(0, hop_by_hop + _ports(40000, 8080))
    assert parse_ip_packet(packet) == PacketSummary(6, "tcp", "2001:db8::1", 8080)


def test_ipv6_with_chained_extension_headers() -> None:
    """Hop-by-hop then destination options (16 bytes) are both skipped."""
    hop_by_hop = bytes([60, 0]) + b"\0" * 6
    dest_opts = bytes([17, 1]) + b"\0" * 14
    packet = _ipv6(0, hop_by_hop + dest_opts + _ports(1, 53))
    assert parse_ip_packet(packet) == PacketSummary(6, "udp", "2001:db8::1", 53)


def test_ipv6_first_fragment_has_a_port() -> None:
    """A fragment header with offset 0 is skipped and the port read after it."""
    fragment = struct.pack(">BBHI", 17, 0, 0x0001, 0xABCD)  # offset 0, more fragments
    packet = _ipv6(44, fragment + _ports(1, 53))
    assert parse_ip_packet(packet) == PacketSummary(6, "udp", "2001:db8::1", 53)


def test_ipv6_non_first_fragment_has_no_port() -> None:
    """A fragment header with a non-zero offset means no transport header: no port."""
    fragment = struct.pack(">BBHI", 17, 0, (185 << 3) | 1, 0xABCD)
    packet = _ipv6(44, fragment + _ports(1, 53))
    assert parse_ip_packet(packet) == PacketSummary(6, "udp", "2001:db8::1", None)


def test_ipv6_unknown_protocol_is_reported_by_number() -> None:
    """An IPv6 packet carrying GRE (47) is reported by number, without a port."""
    assert parse_ip_packet(_ipv6(47, b"\0" * 8)) == PacketSummary(6, 47, "2001:db8::1", None)


def test_ipv6_truncated_extension_header_has_no_port() -> None:
    """An extension header cut short yields a summary without a port, not an exception."""
    packet = _ipv6(0, bytes([6, 4]) + b"\0" * 6)  # claims 40 bytes, has 8
    assert parse_ip_packet(packet) == PacketSummary(6, "tcp", "2001:db8::1", None)


def test_ipv6_endless_extension_chain_is_bounded() -> None:
    """The extension-header walk stops after eight headers: a port behind a ninth is not read."""
    hop_by_hop = bytes([0, 0]) + b"\0" * 6  # next header: hop-by-hop again
    last = bytes([6, 0]) + b"\0" * 6  # next header: TCP
    chain = hop_by_hop * 8 + last + _ports(1, 53)
    assert parse_ip_packet(_ipv6(0, chain)) == PacketSummary(6, 0, "2001:db8::1", None)
    assert parse_ip_packet(_ipv6(0, hop_by_hop * 7 + last + _ports(1, 53))) == PacketSummary(
        6, "tcp", "2001:db8::1", 53
    )


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x45", id="one-byte"),
        pytest.param(b"\x45" + b"\0" * 18, id="ipv4-19-bytes"),
        pytest.param(b"\x60" + b"\0" * 38, id="ipv6-39-bytes"),
        pytest.param(b"\x00" * 60, id="version-0"),
        pytest.param(b"\xff" * 60, id="version-15"),
        pytest.param(b"GET / HTTP/1.1\r\n", id="text"),
    ],
)
def test_unparseable_payload_is_none(payload: bytes) -> None:
    """Payloads too short or not IPv4/IPv6 give None rather than raising."""
    assert parse_ip_packet(payload) is None


# What each captured payload needs before the parser can say more, in capture order: (payload
# length, IP header length, end of the destination port's two bytes or None when the protocol
# has no port). The UDP datagram is one byte of data; the ICMP echoes carry their usual padding.
PAYLOAD_SHAPES = [(60, 20, 24), (80, 40, 44), (84, 20, None), (29, 20, 24), (104, 40, None)]


@pytest.mark.parametrize("index", range(5))
def test_every_prefix_of_a_captured_payload_parses_to_what_it_holds(index: int) -> None:
    """A cut payload is None until its IP header is whole, then the summary, port once it fits."""
    payload = parse_netlink_messages(_captured()[index]).packets[0].payload
    length, header, port_end = PAYLOAD_SHAPES[index]
    summary = EXPECTED[index][1]
    assert len(payload) == length
    expected = [
        None
        if cut < header
        else replace(summary, port=None if port_end is None or cut < port_end else summary.port)
        for cut in range(length + 1)
    ]
    assert [parse_ip_packet(payload[:cut]) for cut in range(length + 1)] == expected


# --- build_config_message ------------------------------------------------------------------


def test_build_config_message_is_well_formed() -> None:
    """The config request has a correct length, type, flags, seq and big-endian group."""
    message = build_config_message(
        group=0x0102, seq=7, attrs=[(nflog.NFULA_CFG_CMD, struct.pack("B", 1))]
    )
    length, kind, flags, seq, pid = struct.unpack_from("=IHHII", message)
    assert length == len(message)
    assert kind == 0x0401
    assert flags == nflog.NLM_F_REQUEST | nflog.NLM_F_ACK == 0x5
    assert (seq, pid) == (7, 0)
    assert message[16:20] == bytes([socket.AF_UNSPEC, 0, 0x01, 0x02])


def test_build_config_message_pads_attributes_to_four_bytes() -> None:
    """Attributes keep their true length but are padded so the next starts aligned."""
    message = build_config_message(
        group=1,
        seq=2,
        attrs=[
            (nflog.NFULA_CFG_CMD, b"\x01"),
            (nflog.NFULA_CFG_MODE, struct.pack(">IBx", 128, nflog.NFULNL_COPY_PACKET)),
            (nflog.NFULA_CFG_QTHRESH, struct.pack(">I", 1)),
        ],
    )
    assert len(message) % 4 == 0
    assert message[20:28] == struct.pack("=HH", 5, nflog.NFULA_CFG_CMD) + b"\x01\0\0\0"
    assert message[28:38] == struct.pack("=HH", 10, nflog.NFULA_CFG_MODE) + struct.pack(
        ">IBx", 128, 2
    )
    assert message[38:40] == b"\0\0"
    assert message[40:48] == struct.pack("=HH", 8, nflog.NFULA_CFG_QTHRESH) + b"\0\0\0\x01"
    assert len(message) == 48


def test_build_config_message_without_attributes() -> None:
    """A config message with no attributes is just the headers."""
    message = build_config_message(group=1, seq=1, attrs=[])
    assert len(message) == 20
    assert struct.unpack_from("=I", message)[0] == 20


def _sequence_numbers(datagrams: list[bytes]) -> list[int]:
    seqs = []
    for datagram in datagrams:
        for packet in parse_netlink_messages(datagram).packets:
            assert packet.seq is not None
            seqs.append(packet.seq)
    return seqs


def test_a_datagram_missing_from_the_capture_is_counted_as_lost() -> None:
    """Real NFLOG sequence numbers with the second datagram dropped: exactly one lost."""
    datagrams = _captured()
    tracker = SequenceTracker()
    lost = [tracker.record(seq) for seq in _sequence_numbers(datagrams[:1] + datagrams[2:])]
    assert lost == [0, 1, 0, 0]


def test_an_overrun_counts_at_once_and_is_not_counted_twice() -> None:
    """ENOBUFS counts one lost message at once; the gap that follows adds only the rest."""
    tracker = SequenceTracker()
    assert tracker.record(0) == 0
    assert tracker.overrun() == 1
    assert tracker.record(4) == 2  # messages 1, 2 and 3 were lost: one already counted
    assert tracker.record(5) == 0


def test_ipv4_source_gives_address_and_port() -> None:
    """The source of a UDP datagram is its address and source port (what finds its socket)."""
    packet = _ipv4(17, bytes([192, 0, 2, 1]), _ports(40001, 9))
    assert nflog.parse_ip_source(packet) == nflog.PacketSource("10.0.0.2", 40001)


def test_ipv6_source_after_extension_headers() -> None:
    """An IPv6 source port is read after the extension headers, like the destination port."""
    packet = _ipv6(0, bytes([6, 0]) + b"\0" * 6 + _ports(40002, 8080))
    assert nflog.parse_ip_source(packet) == nflog.PacketSource("fd00::2", 40002)


def test_source_of_a_non_first_fragment_has_no_port() -> None:
    """A non-first fragment has no transport header: the source has an address, no port."""
    packet = _ipv4(17, bytes([8, 8, 8, 8]), b"\0" * 8, frag=0x0010)
    assert nflog.parse_ip_source(packet) == nflog.PacketSource("10.0.0.2", None)
    assert nflog.parse_ip_source(b"") is None
