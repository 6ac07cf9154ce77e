"""Tests for netjail.kernel.kmsg: /dev/kmsg records and LOG lines captured from this kernel."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from netjail import hostns
from netjail.errors import KmsgError
from netjail.kernel import kmsg
from netjail.kernel.kmsg import (
    KmsgReader,
    KmsgRecord,
    LoggedPacket,
    enable_nf_log_all_netns,
    nf_log_all_netns_enabled,
    parse_kmsg_record,
    parse_log_message,
    parse_logged_packet,
)
from netjail.kernel.nflog import PacketSource, PacketSummary, SequenceTracker

# Read from /dev/kmsg on kernel 6.18 with nf_log_all_netns=1, the nftables kernel-log ruleset
# (JailFirewall.for_backends("nftables", "kmsg")) of j-0123abcd in a jail, as uid 65534: curl
# to 203.0.113.9:80 and [2001:db8::9]:8443, a UDP send to 198.51.100.7:53, ping 198.51.100.7
# and 2001:db8::5.
V4_TCP = (
    b"4,2119,1537392374,-;netjail j-0123abcd IN= OUT=nj0 SRC=169.254.77.1 DST=203.0.113.9 "
    b"LEN=60 TOS=0x00 PREC=0x00 TTL=64 ID=11283 DF PROTO=TCP SPT=47704 DPT=80 WINDOW=64240 "
    b"RES=0x00 SYN URGP=0 UID=65534 GID=65534 \n"
)
V6_TCP = (
    b"4,2120,1537407491,-;netjail j-0123abcd IN= OUT=nj0 "
    b"SRC=fd6e:6a00:0000:0000:0000:0000:0000:0001 DST=2001:0db8:0000:0000:0000:0000:0000:0009 "
    b"LEN=80 TC=0 HOPLIMIT=64 FLOWLBL=719954 PROTO=TCP SPT=53244 DPT=8443 WINDOW=64800 "
    b"RES=0x00 SYN URGP=0 UID=65534 GID=65534 \n"
)
V4_UDP = (
    b"4,2121,1537457381,-;netjail j-0123abcd IN= OUT=nj0 SRC=169.254.77.1 DST=198.51.100.7 "
    b"LEN=29 TOS=0x00 PREC=0x00 TTL=64 ID=39444 DF PROTO=UDP SPT=38422 DPT=53 LEN=9 "
    b"UID=65534 GID=65534 \n"
)
V4_ICMP = (
    b"4,2122,1537472758,-;netjail j-0123abcd IN= OUT=nj0 SRC=169.254.77.1 DST=198.51.100.7 "
    b"LEN=84 TOS=0x00 PREC=0x00 TTL=64 ID=62647 DF PROTO=ICMP TYPE=8 CODE=0 ID=60107 SEQ=1 "
    b"UID=65534 GID=65534 \n"
)
V6_ICMP = (
    b"4,2123,1538480958,-;netjail j-0123abcd IN= OUT=nj0 "
    b"SRC=fd6e:6a00:0000:0000:0000:0000:0000:0001 DST=2001:0db8:0000:0000:0000:0000:0000:0005 "
    b"LEN=104 TC=0 HOPLIMIT=64 FLOWLBL=763676 PROTO=ICMPv6 TYPE=128 CODE=0 ID=60108 SEQ=1 "
    b"UID=65534 GID=65534 \n"
)
# Written by root through /dev/kmsg with "<4>" and "<0>": the kernel made them LOG_USER.
FORGED_WARN = (
    b"12,2124,1542768824,-;netjail j-0123abcd IN= OUT=nj0 SRC=169.254.77.1 DST=203.0.113.9 "
    b"PROTO=TCP SPT=1 DPT=443 UID=0 GID=0 \n"
)
FORGED_KERN = b"8,2125,1542768832,-;netjail j-0123abcd forged-as-kern? \\x5c \\x01 end\n"


def _message(record: bytes) -> str:
    return record.split(b";", 1)[1].rstrip(b"\n").decode()


# --------------------------------------------------------------------------- records


def test_parse_kmsg_record_fields() -> None:
    """A record's priority splits into facility and level; seq, usec, flags and text kept."""
    assert parse_kmsg_record(V4_TCP) == KmsgRecord(
        facility=0,
        level=4,
        seq=2119,
        usec=1537392374,
        flags="-",
        message=_message(V4_TCP),
    )


def test_parse_kmsg_record_continuation_lines_become_properties() -> None:
    """ " KEY=value" lines after the message are the record's properties, not its text."""
    record = parse_kmsg_record(
        b"6,339,5140900,-,caller=T1;pci_root PNP0A03:00: host bridge\n"
        b" SUBSYSTEM=acpi\n DEVICE=+acpi:PNP0A03:00\n"
    )
    assert record is not None
    assert record.message == "pci_root PNP0A03:00: host bridge"
    assert record.properties == {"SUBSYSTEM": "acpi", "DEVICE": "+acpi:PNP0A03:00"}
    assert (record.facility, record.level, record.seq) == (0, 6, 339)


def test_parse_kmsg_record_keeps_kernel_escapes() -> None:
    """The kernel's \\xNN escapes stay escaped: the message is always printable."""
    record = parse_kmsg_record(FORGED_KERN)
    assert record is not None
    assert record.message == "netjail j-0123abcd forged-as-kern? \\x5c \\x01 end"


@pytest.mark.parametrize(
    "line",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"hello world\n", id="no-header"),
        pytest.param(b"4,12;short header\n", id="short-header"),
        pytest.param(b"x,1,2,-;bad prio\n", id="bad-prio"),
        pytest.param(b"4,1,2,-\n", id="no-semicolon"),
        pytest.param(b"4,1,2,-;msg\nnot a continuation\n", id="bad-continuation"),
        pytest.param(b"4,-1,2,-;negative seq\n", id="negative-seq"),
    ],
)
def test_parse_kmsg_record_rejects_garbage(line: bytes) -> None:
    """Anything that is not a /dev/kmsg record parses as None, never raises."""
    assert parse_kmsg_record(line) is None


def test_user_facility_records_are_not_kernel_records() -> None:
    """Records injected through /dev/kmsg carry LOG_USER (1), even when "<0>" was asked for."""
    forged = parse_kmsg_record(FORGED_WARN)
    forged_kern = parse_kmsg_record(FORGED_KERN)
    assert forged is not None
    assert forged_kern is not None
    assert (forged.facility, forged.level, forged.from_kernel) == (1, 4, False)
    assert (forged_kern.facility, forged_kern.level, forged_kern.from_kernel) == (1, 0, False)


# --------------------------------------------------------------------------- LOG lines


@pytest.mark.parametrize(
    ("record", "shape"),
    [
        pytest.param(V4_TCP, (4, "tcp", "203.0.113.9", 80, "169.254.77.1", 47704), id="v4-tcp"),
        pytest.param(V4_UDP, (4, "udp", "198.51.100.7", 53, "169.254.77.1", 38422), id="v4-udp"),
        pytest.param(
            V4_ICMP, (4, "icmp", "198.51.100.7", None, "169.254.77.1", None), id="v4-icmp"
        ),
        pytest.param(V6_TCP, (6, "tcp", "2001:db8::9", 8443, "fd6e:6a00::1", 53244), id="v6-tcp"),
        pytest.param(
            V6_ICMP, (6, "icmpv6", "2001:db8::5", None, "fd6e:6a00::1", None), id="v6-icmpv6"
        ),
    ],
)
def test_parse_log_message_captured_lines(
    record: bytes, shape: tuple[int, str, str, int | None, str, int | None]
) -> None:
    """Each captured line gives job, family, protocol, short-form addresses, ports, uid."""
    family, proto, dst, port, src, sport = shape
    assert parse_log_message(_message(record)) == LoggedPacket(
        job_id="j-0123abcd",
        prefix="netjail j-0123abcd ",
        family=family,
        proto=proto,
        dst=dst,
        port=port,
        uid=65534,
        gid=65534,
        src=src,
        sport=sport,
    )


def test_logged_packet_summary_matches_nflog_shape() -> None:
    """The summary is the PacketSummary NFLOG's parser would give for the same packet."""
    packet = parse_log_message(_message(V6_TCP))
    assert packet is not None
    assert packet.summary == PacketSummary(6, "tcp", "2001:db8::9", 8443)
    assert packet.source == PacketSource("fd6e:6a00::1", 53244)


def test_parse_log_message_without_uid() -> None:
    """A packet with no socket (the kernel's own) has no UID= and gives uid None."""
    line = (
        "netjail j-1 IN= OUT=nj0 SRC=169.254.77.1 DST=203.0.113.9 LEN=40 TOS=0x00 PREC=0x00 "
        "TTL=64 ID=0 DF PROTO=TCP SPT=1 DPT=443 WINDOW=0 RES=0x00 RST URGP=0 "
    )
    packet = parse_log_message(line)
    assert packet is not None
    assert (packet.job_id, packet.port, packet.uid, packet.gid) == ("j-1", 443, None, None)


def test_parse_log_message_dns_redirect_mark() -> None:
    """A line logged by the DNS redirect keeps its marked prefix, as NFLOG's prefix does."""
    line = (
        "netjail j-0123abcd dns IN= OUT=nj0 SRC=169.254.77.1 DST=198.51.100.53 LEN=56 "
        "TOS=0x00 PREC=0x00 TTL=64 ID=1 DF PROTO=UDP SPT=40000 DPT=53 LEN=36 UID=65534 "
        "GID=65534 "
    )
    packet = parse_log_message(line)
    assert packet is not None
    assert (packet.job_id, packet.prefix) == ("j-0123abcd", "netjail j-0123abcd dns ")
    assert packet.summary == PacketSummary(4, "udp", "198.51.100.53", 53)


def test_parse_log_message_unknown_protocol_number() -> None:
    """An unnamed protocol (PROTO=47, GRE) is reported by number, without a port."""
    line = (
        "netjail j-1 IN= OUT=nj0 SRC=169.254.77.1 DST=198.51.100.1 LEN=24 TOS=0x00 "
        "PREC=0x00 TTL=64 ID=1 PROTO=47 UID=0 GID=0 "
    )
    packet = parse_log_message(line)
    assert packet is not None
    assert (packet.proto, packet.port, packet.uid) == (47, None, 0)


def test_parse_log_message_udplite_is_numbered_with_port() -> None:
    """UDPLITE is reported as protocol 136 with its port, as the NFLOG parser does."""
    line = (
        "netjail j-1 IN= OUT=nj0 SRC=169.254.77.1 DST=198.51.100.1 LEN=28 TOS=0x00 "
        "PREC=0x00 TTL=64 ID=1 PROTO=UDPLITE SPT=5 DPT=6 LEN=8 UID=7 GID=7 "
    )
    packet = parse_log_message(line)
    assert packet is not None
    assert packet.summary == PacketSummary(4, 136, "198.51.100.1", 6)


def test_parse_log_message_fragment_has_no_port() -> None:
    """A non-first fragment has no ports in the line: port None."""
    line = (
        "netjail j-1 IN= OUT=nj0 SRC=169.254.77.1 DST=203.0.113.9 LEN=1500 TOS=0x00 "
        "PREC=0x00 TTL=64 ID=9 FRAG:185 PROTO=UDP UID=1 GID=1 "
    )
    packet = parse_log_message(line)
    assert packet is not None
    assert (packet.proto, packet.port) == ("udp", None)


def test_parse_log_message_ignores_the_quoted_packet_of_an_icmp_error() -> None:
    """An ICMP error quotes another packet in [...]; its ports and addresses are not used."""
    line = (
        "netjail j-1 IN= OUT=nj0 SRC=169.254.77.1 DST=203.0.113.9 LEN=56 TOS=0x00 PREC=0xC0 "
        "TTL=64 ID=3 PROTO=ICMP TYPE=3 CODE=3 [SRC=203.0.113.9 DST=169.254.77.1 LEN=28 "
        "TOS=0x00 PREC=0x00 TTL=64 ID=2 PROTO=UDP SPT=53 DPT=4000 LEN=8 UID=9 ] UID=5 GID=5 "
    )
    packet = parse_log_message(line)
    assert packet is not None
    assert (packet.proto, packet.dst, packet.port, packet.uid) == ("icmp", "203.0.113.9", None, 5)


def test_parse_log_message_incomplete_header() -> None:
    """A truncated TCP header ("INCOMPLETE [N bytes]") gives no port but the uid after it."""
    line = (
        "netjail j-1 IN= OUT=nj0 SRC=169.254.77.1 DST=203.0.113.9 LEN=24 TOS=0x00 PREC=0x00 "
        "TTL=64 ID=3 PROTO=TCP INCOMPLETE [4 bytes] UID=3 GID=3 "
    )
    packet = parse_log_message(line)
    assert packet is not None
    assert (packet.port, packet.uid) == (None, 3)


def test_parse_log_message_ipv6_unknown_extension_header() -> None:
    """IPv6 with an extension header the logger stops at is reported by its number."""
    line = (
        "netjail j-1 IN= OUT=nj0 SRC=fd6e:6a00:0000:0000:0000:0000:0000:0001 "
        "DST=2001:0db8:0000:0000:0000:0000:0000:0001 LEN=60 TC=0 HOPLIMIT=64 FLOWLBL=0 "
        "Unknown Ext Hdr 139"
    )
    packet = parse_log_message(line)
    assert packet is not None
    assert (packet.family, packet.proto, packet.dst, packet.port) == (6, 139, "2001:db8::1", None)


@pytest.mark.parametrize(
    "line",
    [
        pytest.param("", id="empty"),
        pytest.param("NET: Registered PF_INET6 protocol family", id="other-kernel-line"),
        pytest.param(
            "other j-1 IN= OUT=nj0 SRC=1.2.3.4 DST=5.6.7.8 PROTO=TCP SPT=1 DPT=2 ",
            id="other-prefix",
        ),
        pytest.param(
            "netjail J-1 IN= OUT=nj0 SRC=1.2.3.4 DST=5.6.7.8 PROTO=TCP SPT=1 DPT=2 ",
            id="bad-job-id",
        ),
        pytest.param(
            "netjail j-0 IN=[1234]: segfault at 0 ip 0 sp 0 error 4 in "
            "x SRC=1.2.3.4 DST=5.6.7.8 PROTO=TCP DPT=443[55+1000]",
            id="process-name-and-path-in-a-kernel-line",
        ),
        pytest.param(
            "netjail j-1 IN= OUT=nj0 SRC=1.2.3.4 DST=999.6.7.8 PROTO=TCP SPT=1 DPT=2 ",
            id="bad-address",
        ),
        pytest.param(
            "netjail j-1 IN= OUT=nj0 SRC=1.2.3.4 DST=5.6.7.8 LEN=20 TTL=64 ",
            id="no-protocol",
        ),
        pytest.param(
            "netjail j-1 IN= OUT=nj0 SRC=1.2.3.4 DST=5.6.7.8 PROTO=BOGUS ",
            id="unknown-protocol-name",
        ),
        pytest.param(
            "netjail j-1 IN= OUT=nj0 SRC=1.2.3.4 DST=5.6.7.8 PROTO=300 ",
            id="protocol-out-of-range",
        ),
    ],
)
def test_parse_log_message_rejects_other_lines(line: str) -> None:
    """Lines that are not a jail's LOG line (or are malformed) parse as None."""
    assert parse_log_message(line) is None


def test_parse_log_message_out_of_range_numbers_are_dropped() -> None:
    """A port or uid that does not fit its field is reported as unknown, not trusted."""
    line = (
        "netjail j-1 IN= OUT=nj0 SRC=1.2.3.4 DST=5.6.7.8 PROTO=TCP SPT=1 DPT=70000 "
        "UID=99999999999 GID=1 "
    )
    packet = parse_log_message(line)
    assert packet is not None
    assert (packet.port, packet.uid, packet.gid) == (None, None, 1)


def test_parse_logged_packet_trusts_only_kernel_records() -> None:
    """A kernel record gives its packet; the same text injected as LOG_USER gives None."""
    kernel = parse_kmsg_record(V4_TCP)
    forged = parse_kmsg_record(FORGED_WARN)
    assert kernel is not None
    assert forged is not None
    assert parse_log_message(forged.message) is not None  # the text alone would pass
    assert parse_logged_packet(forged) is None
    packet = parse_logged_packet(kernel)
    assert packet is not None
    assert (packet.dst, packet.port, packet.uid) == ("203.0.113.9", 80, 65534)


# --------------------------------------------------------------------------- losses


def test_sequence_tracker_counts_gaps() -> None:
    """Consecutive records lose nothing; a jump of the sequence number counts the gap."""
    tracker = SequenceTracker()
    assert [tracker.record(s) for s in (10, 11, 15, 16)] == [0, 0, 3, 0]


def test_sequence_tracker_does_not_count_an_overrun_twice() -> None:
    """An EPIPE counts one at once; the gap that follows adds only the rest."""
    tracker = SequenceTracker()
    assert tracker.record(10) == 0
    assert tracker.overrun() == 1
    assert tracker.record(20) == 8  # 9 lost in all: 1 counted at EPIPE
    assert tracker.overrun() == 1
    assert tracker.record(21) == 0  # no gap measured: the EPIPE's 1 stands


class _ScriptedReader(KmsgReader):
    """A KmsgReader whose reads come from a script instead of /dev/kmsg."""

    def __init__(self, script: list[bytes | OSError]) -> None:
        self._fd = -1
        self._tracker = SequenceTracker()
        self.script = script

    def _read_one(self) -> bytes:
        if not self.script:
            raise BlockingIOError(errno.EAGAIN, "no more")
        item = self.script.pop(0)
        if isinstance(item, OSError):
            raise item
        return item


def _rec(seq: int, text: str = "x", prio: int = 4) -> bytes:
    return f"{prio},{seq},1,-;{text}\n".encode()


def test_read_records_counts_epipe_and_gaps_and_continues() -> None:
    """EPIPE and sequence gaps are counted as lost; reading goes on after them."""
    reader = _ScriptedReader(
        [_rec(5), _rec(6), BrokenPipeError(errno.EPIPE, "overrun"), _rec(12), _rec(14)]
    )
    records, lost = reader.read_records()
    assert [r.seq for r in records] == [5, 6, 12, 14]
    assert lost == 5 + 1  # 7..11 (EPIPE's 1 included), then 13


def test_read_records_returns_every_facility_and_skips_garbage() -> None:
    """All parseable records are returned (trust is parse_logged_packet's job)."""
    reader = _ScriptedReader([_rec(1, prio=12), b"garbage", _rec(2)])
    records, lost = reader.read_records()
    assert [(r.seq, r.facility) for r in records] == [(1, 1), (2, 0)]
    assert lost == 0


def test_read_records_when_nothing_is_there() -> None:
    """Nothing to read: no records, nothing lost, no blocking."""
    assert _ScriptedReader([]).read_records() == ([], 0)


def test_read_records_reports_other_errors() -> None:
    """Errors other than EAGAIN/EPIPE are not swallowed: they end the read as a KmsgError."""
    reader = _ScriptedReader([OSError(errno.EIO, "Input/output error")])
    with pytest.raises(KmsgError, match=r"^cannot read the kernel log: Input/output error$"):
        reader.read_records()


def test_reader_on_a_missing_device_is_a_kmsg_error(tmp_path: Path) -> None:
    """A kernel log that cannot be opened is a KmsgError saying what is needed."""
    path = tmp_path / "kmsg"
    with pytest.raises(KmsgError) as caught:
        KmsgReader(str(path))
    assert str(caught.value) == (
        f"cannot read the kernel log {path}: No such file or directory; "
        "netjaild needs root (CAP_SYSLOG) for the kmsg log backend"
    )


def test_reader_that_cannot_seek_closes_what_it_opened(tmp_path: Path) -> None:
    """A log that cannot seek to its end (a FIFO) is a KmsgError, and its descriptor is closed."""
    fifo = tmp_path / "kmsg"
    os.mkfifo(fifo)
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(KmsgError) as caught:
        KmsgReader(str(fifo))
    assert str(caught.value) == f"cannot seek to the end of {fifo}: Illegal seek"
    assert set(os.listdir("/proc/self/fd")) == before


# --------------------------------------------------------------------------- sysctl


def test_nf_log_all_netns_enabled_reads_the_value(tmp_path: Path) -> None:
    """1 is enabled, 0 is not, and an unreadable sysctl counts as not enabled."""
    path = tmp_path / "nf_log_all_netns"
    path.write_text("1\n")
    assert nf_log_all_netns_enabled(str(path)) is True
    path.write_text("0\n")
    assert nf_log_all_netns_enabled(str(path)) is False
    assert nf_log_all_netns_enabled(str(tmp_path / "missing")) is False


def test_enable_nf_log_all_netns_writes_1(tmp_path: Path) -> None:
    """Enabling writes 1 and checks it reads back."""
    path = tmp_path / "nf_log_all_netns"
    path.write_text("0\n")
    enable_nf_log_all_netns(str(path))
    assert path.read_text() == "1\n"


def test_enable_outside_the_initial_netns_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Missing sysctl in a non-initial netns: the message says to set it on the host."""
    monkeypatch.setattr(hostns, "in_initial_netns", lambda: False)
    with pytest.raises(KmsgError) as caught:
        enable_nf_log_all_netns(str(tmp_path / "missing" / "nf_log_all_netns"))
    assert str(caught.value) == (
        "net.netfilter.nf_log_all_netns can only be set from the initial network namespace "
        "(not inside a container): set it on the host "
        "(sysctl -w net.netfilter.nf_log_all_netns=1) or use NFLOG"
    )


def test_enable_without_netfilter_logging_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Missing sysctl where the netns is not known to be a container's: no LOG support."""
    monkeypatch.setattr(hostns, "in_initial_netns", lambda: None)
    with pytest.raises(KmsgError, match="no netfilter LOG support"):
        enable_nf_log_all_netns(str(tmp_path / "missing" / "nf_log_all_netns"))


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (errno.EROFS, "/proc/sys is read-only (this is not the initial network namespace)"),
        (errno.EACCES, "needs root in the initial user and network namespaces"),
        (errno.EPERM, "needs root in the initial user and network namespaces"),
        (errno.EIO, "(Input/output error)"),
    ],
)
def test_enable_write_errors_are_explained(
    code: int, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read-only /proc/sys, permission and other errors each get a one-line explanation."""
    monkeypatch.setattr(hostns, "in_initial_netns", lambda: False)

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise OSError(code, "refused")

    monkeypatch.setattr(kmsg, "open", refuse, raising=False)
    with pytest.raises(KmsgError) as caught:
        enable_nf_log_all_netns(str(tmp_path / "nf_log_all_netns"))
    assert expected in str(caught.value)
    assert "sysctl -w net.netfilter.nf_log_all_netns=1" in str(caught.value)


def test_parse_log_message_non_ascii_digits_are_not_numbers() -> None:
    """Only ASCII digits count: "²" or "٣" in a number field is no number, and no crash."""
    line = "netjail j-1 IN= OUT=nj0 SRC=1.2.3.4 DST=5.6.7.8 PROTO=TCP SPT=1 DPT=4\u00b2 UID=\u0663 "
    packet = parse_log_message(line)
    assert packet is not None
    assert (packet.port, packet.uid) == (None, None)
