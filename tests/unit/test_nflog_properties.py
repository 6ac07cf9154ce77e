"""Properties of the NFLOG parsers (netjail.kernel.nflog) on hostile and generated input: any
datagram parses without raising, generated NFLOG messages parse back exactly, and IPv4/IPv6
packets give their destination, protocol and port."""

from __future__ import annotations

import ipaddress
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from netjail.kernel import nflog

PACKET_TYPE = (nflog.NFNL_SUBSYS_ULOG << 8) | nflog.NFULNL_MSG_PACKET


def attribute(kind: int, value: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    length = 4 + len(value)
    return struct.pack("=HH", length, kind) + value + b"\0" * (-length % 4)


def message(kind: int, body: bytes, seq: int = 0) -> bytes:
    """One netlink message, padded to 4 bytes."""
    length = 16 + len(body)
    return struct.pack("=IHHII", length, kind, 0, seq, 0) + body + b"\0" * (-length % 4)


@st.composite
def nflog_packets(draw: st.DrawFn) -> tuple[bytes, nflog.NflogPacket]:
    """An NFULNL_MSG_PACKET message and the packet it describes."""
    family = draw(st.sampled_from([2, 10]) | st.integers(0, 255))
    prefix = draw(st.text(st.characters(min_codepoint=1, max_codepoint=127), max_size=60))
    uid, gid, seq = (draw(st.none() | st.integers(0, 2**32 - 1)) for _ in range(3))
    payload = draw(st.binary(max_size=80))
    attrs = [attribute(nflog.NFULA_PREFIX, prefix.encode() + b"\0")]
    for kind, value in ((nflog.NFULA_UID, uid), (nflog.NFULA_GID, gid), (nflog.NFULA_SEQ, seq)):
        if value is not None:
            attrs.append(attribute(kind, struct.pack(">I", value)))
    attrs.append(attribute(nflog.NFULA_PAYLOAD, payload))
    order = draw(st.permutations(attrs))
    nfgenmsg = struct.pack("=BBH", family, 0, 0)
    wire = message(PACKET_TYPE, nfgenmsg + b"".join(order))
    return wire, nflog.NflogPacket(family, prefix, uid, gid, seq, payload)


@settings(max_examples=300)
@given(st.lists(nflog_packets(), max_size=5), st.lists(st.integers(-200, 200), max_size=3))
def test_generated_nflog_messages_parse_back_exactly(
    packets: list[tuple[bytes, nflog.NflogPacket]], errors: list[int]
) -> None:
    """A datagram of packet and error messages gives those packets and errnos, in order."""
    wire = b"".join(w for w, _ in packets)
    wire += b"".join(message(nflog.NLMSG_ERROR, struct.pack("=i", -e) + b"\0" * 16) for e in errors)
    batch = nflog.parse_netlink_messages(wire)
    assert batch.packets == [packet for _, packet in packets]
    assert batch.errors == errors
    assert batch.overrun is False


@settings(max_examples=500)
@given(
    st.binary(max_size=300)
    | st.builds(bytes.__add__, nflog_packets().map(lambda p: p[0]), st.binary(max_size=40))
)
def test_any_datagram_parses_without_raising(data: bytes) -> None:
    """Hostile bytes give a batch (possibly empty) and every packet's fields are in range."""
    batch = nflog.parse_netlink_messages(data)
    for packet in batch.packets:
        assert 0 <= packet.family <= 255
        for value in (packet.uid, packet.gid, packet.seq):
            assert value is None or 0 <= value < 2**32
        assert "\0" not in packet.prefix


@st.composite
def ip_packets(draw: st.DrawFn) -> tuple[bytes, nflog.PacketSummary]:
    """An IPv4 or IPv6 packet (the header and a transport header) and its summary."""
    proto = draw(st.sampled_from([6, 17, 1, 58, 132, 47]))
    port = draw(st.integers(0, 65535))
    transport = struct.pack(">HH", draw(st.integers(0, 65535)), port) + draw(st.binary(max_size=16))
    names = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}
    ported = proto in (6, 17, 132)
    if draw(st.booleans()):
        dst = ipaddress.IPv4Address(draw(st.integers(0, 2**32 - 1)))
        options = draw(st.integers(0, 10))
        header = struct.pack(
            ">BBHHHBBH4s4s",
            0x45 + options,
            0,
            20 + 4 * options + len(transport),
            0,
            0,
            64,
            proto,
            0,
            bytes(4),
            dst.packed,
        )
        wire = header + bytes(4 * options) + transport
        return wire, nflog.PacketSummary(
            4, names.get(proto, proto), str(dst), port if ported else None
        )
    dst6 = ipaddress.IPv6Address(draw(st.integers(0, 2**128 - 1)))
    header = struct.pack(
        ">IHBB16s16s", 0x60000000, len(transport), proto, 64, bytes(16), dst6.packed
    )
    return header + transport, nflog.PacketSummary(
        6, names.get(proto, proto), str(dst6), port if ported else None
    )


@settings(max_examples=300)
@given(ip_packets())
def test_ip_packets_give_their_destination_protocol_and_port(
    packet: tuple[bytes, nflog.PacketSummary],
) -> None:
    """A generated IPv4 or IPv6 packet summarises to its own destination, protocol and port."""
    wire, summary = packet
    assert nflog.parse_ip_packet(wire) == summary


@settings(max_examples=500)
@given(st.binary(max_size=120) | ip_packets().map(lambda p: p[0][: len(p[0]) // 2]))
def test_any_payload_summarises_or_is_none(payload: bytes) -> None:
    """Hostile or cut payloads give None or a summary whose address parses, never an error."""
    summary = nflog.parse_ip_packet(payload)
    if summary is not None:
        assert summary.family in (4, 6)
        assert ipaddress.ip_address(summary.dst).version == summary.family
        assert summary.port is None or 0 <= summary.port <= 65535
