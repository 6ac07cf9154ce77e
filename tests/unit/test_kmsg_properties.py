"""Properties of the kernel-log parsers (netjail.kernel.kmsg) on hostile and generated input:
any record or line parses to a value or None, never an error; generated /dev/kmsg records and
netfilter LOG lines parse back to what they were made of."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from netjail.kernel import kmsg

#: What the kernel puts in a message: printable ASCII (it escapes the rest as \\xNN).
PRINTABLE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80)


@st.composite
def records(draw: st.DrawFn) -> tuple[bytes, kmsg.KmsgRecord]:
    """A /dev/kmsg record (header, message, " KEY=value" lines) and what it says."""
    facility, level = draw(st.integers(0, 23)), draw(st.integers(0, 7))
    seq, usec = draw(st.integers(0, 2**63)), draw(st.integers(0, 2**63))
    flags = draw(st.sampled_from(["-", "c", "+"]))
    message = draw(PRINTABLE)
    keys = st.from_regex(r"[A-Z0-9_]{1,12}", fullmatch=True)
    properties = draw(st.dictionaries(keys, PRINTABLE, max_size=3))
    line = f"{facility * 8 + level},{seq},{usec},{flags};{message}\n"
    line += "".join(f" {key}={value}\n" for key, value in properties.items())
    return line.encode(), kmsg.KmsgRecord(facility, level, seq, usec, flags, message, properties)


@settings(max_examples=300)
@given(records())
def test_generated_records_parse_back(record: tuple[bytes, kmsg.KmsgRecord]) -> None:
    """A record the kernel could write parses to its priority, sequence, time, flags, message
    and properties."""
    line, expected = record
    assert kmsg.parse_kmsg_record(line) == expected


@settings(max_examples=500)
@given(st.binary(max_size=200) | records().map(lambda r: r[0][: len(r[0]) - 3] + b"\xff\n"))
def test_any_bytes_give_a_record_or_none(line: bytes) -> None:
    """Hostile bytes parse to None or to a record with its fields in range."""
    record = kmsg.parse_kmsg_record(line)
    if record is not None:
        assert 0 <= record.level <= 7
        assert record.facility >= 0
        assert "\n" not in record.message


JOB_IDS = st.from_regex(r"j-[0-9a-f]{8}", fullmatch=True)


def full_form(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """How the kernel prints an address: IPv6 in full, with every zero."""
    return address.exploded if address.version == 6 else str(address)


@st.composite
def log_lines(draw: st.DrawFn) -> tuple[str, kmsg.LoggedPacket]:
    """A netfilter LOG line of a jail, as the kernel prints it, and the packet it reports."""
    job = draw(JOB_IDS)
    mark = draw(st.sampled_from(["", "dns "]))
    version = draw(st.sampled_from([4, 6]))
    size = 32 if version == 4 else 128
    src = ipaddress.ip_address(
        draw(st.integers(0, 2**size - 1)) if version == 6 else "169.254.77.1"
    )
    dst_int = draw(st.integers(0, 2**size - 1))
    dst = ipaddress.IPv4Address(dst_int) if version == 4 else ipaddress.IPv6Address(dst_int)
    proto, word = draw(
        st.sampled_from([("tcp", "TCP"), ("udp", "UDP"), ("icmp", "ICMP"), ("icmpv6", "ICMPv6")])
    )
    port = draw(st.integers(0, 65535))
    uid, gid = draw(st.none() | st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**32 - 1))
    transport = f"SPT=40000 DPT={port} " if proto in ("tcp", "udp") else "TYPE=8 CODE=0 "
    owner = f"UID={uid} GID={gid} " if uid is not None else ""
    line = (
        f"netjail {job} {mark}IN= OUT=nj0 SRC={full_form(src)} DST={full_form(dst)} "
        f"LEN=60 TTL=64 ID=0 DF PROTO={word} {transport}{owner}".rstrip()
    )
    packet = kmsg.LoggedPacket(
        job_id=job,
        prefix=f"netjail {job} {mark}",
        family=version,
        proto=proto,
        dst=str(dst),
        port=port if proto in ("tcp", "udp") else None,
        uid=uid,
        gid=gid if uid is not None else None,
        src=str(src),
        sport=40000 if proto in ("tcp", "udp") else None,
    )
    return line, packet


@settings(max_examples=300)
@given(log_lines())
def test_generated_log_lines_parse_to_their_packet(line: tuple[str, kmsg.LoggedPacket]) -> None:
    """A LOG line of a jail gives its job, prefix, family, protocol, short-form destination,
    port and owner."""
    text, packet = line
    assert kmsg.parse_log_message(text) == packet


@settings(max_examples=500)
@given(
    st.text(max_size=200)
    | log_lines().map(lambda line: line[0][: len(line[0]) * 2 // 3])
    | log_lines().map(lambda line: line[0].replace("DST=", "DST=[", 1))
)
def test_any_text_gives_a_packet_or_none(text: str) -> None:
    """Hostile or damaged lines give None or a packet whose address and numbers are valid."""
    packet = kmsg.parse_log_message(text)
    if packet is not None:
        assert ipaddress.ip_address(packet.dst).version == packet.family
        assert packet.port is None or 0 <= packet.port <= 65535
        assert packet.prefix.startswith(f"netjail {packet.job_id} ")


@given(records(), st.integers(1, 23))
def test_records_not_from_the_kernel_are_never_packets(
    record: tuple[bytes, kmsg.KmsgRecord], facility: int
) -> None:
    """Only facility 0 (the kernel) may report a packet: anything a process wrote is ignored."""
    _, parsed = record
    forged = kmsg.KmsgRecord(
        facility,
        parsed.level,
        parsed.seq,
        parsed.usec,
        parsed.flags,
        "netjail j-00000001 IN= OUT=nj0 SRC=169.254.77.1 DST=192.0.2.1 PROTO=TCP DPT=80",
    )
    assert kmsg.parse_log_message(forged.message) is not None
    assert kmsg.parse_logged_packet(forged) is None
