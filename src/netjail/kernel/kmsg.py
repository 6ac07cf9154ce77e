"""LOG + /dev/kmsg: the operator's alternative to NFLOG, for existing kernel-log pipelines.

The jail's ruleset logs with LOG (the ``KernelLog`` strategy of netjail.kernel.rules, rendered
by either firewall backend) with the job's prefix and the socket owner's UID; the kernel prints
one line per rejected packet to its log, and ``KmsgReader`` reads those lines from /dev/kmsg.

Parsers are pure and unit-tested on lines captured from this kernel: ``parse_kmsg_record`` (the
/dev/kmsg record format, Documentation/ABI/testing/dev-kmsg), ``parse_log_message`` (the text
nf_log_syslog prints) and ``parse_logged_packet``, the one trust boundary: only records with the
kernel facility (0) are believed. Userspace cannot write such records: /dev/kmsg gives every
write facility LOG_USER (1) unless it names another non-zero one ("it is not possible to inject
messages from userspace with the facility number LOG_KERN (0)", dev-kmsg ABI; verified here:
"<0>…" and "<4>…" come back with priorities 8 and 12). A job cannot write /dev/kmsg anyway (root
only, and it runs unprivileged); this keeps a host process from forging a job's events too.
Kernel lines that quote job-chosen text (a process name, a path) do not parse either: a line
must have the exact shape nf_log prints, from the prefix on (see ``_LOG_LINE``).

Costs of this backend (why NFLOG is the default): LOG in a non-initial netns prints nothing
unless the host-global sysctl net.netfilter.nf_log_all_netns is 1, which exists only in the
initial netns, so a daemon in a container cannot set it; every line goes to the shared kernel
log; reading /dev/kmsg needs CAP_SYSLOG when kernel.dmesg_restrict=1.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
from dataclasses import dataclass, field
from types import TracebackType

from netjail import hostns
from netjail.errors import KmsgError, map_os_errors
from netjail.kernel.nflog import PacketSource, PacketSummary, SequenceTracker

KMSG_PATH = "/dev/kmsg"
NF_LOG_ALL_NETNS = hostns.NF_LOG_ALL_NETNS

#: The kernel's syslog facility; userspace writes to /dev/kmsg can never carry it.
LOG_KERN = 0
#: One read() returns one whole record; the kernel fails it with EINVAL if the buffer is
#: smaller than the record (at most 8 KiB with headers and properties on any kernel).
_RECORD_MAX = 16384
#: Records handled per read_records() call, so a flooded kernel log cannot starve the caller.
_READ_BATCH = 1024


@dataclass(frozen=True)
class KmsgRecord:
    """One record of the kernel log as /dev/kmsg gives it."""

    facility: int
    level: int
    seq: int
    usec: int  # microseconds since boot
    flags: str  # "-", or "c" for a fragment of a line
    message: str  # as the kernel escaped it: printable ASCII, "\\xNN" for anything else
    properties: dict[str, str] = field(default_factory=dict)  # " KEY=value" lines

    @property
    def from_kernel(self) -> bool:
        """Written by the kernel itself, not injected by a process through /dev/kmsg."""
        return self.facility == LOG_KERN


@dataclass(frozen=True)
class LoggedPacket:
    """A packet the jail's ruleset logged to the kernel log, as the daemon reports it."""

    job_id: str
    prefix: str  # "netjail <job> ", or with a mark: "netjail <job> dns " (see rules.LogPrefix)
    family: int  # 4 or 6
    proto: str | int  # "tcp", "udp", "icmp", "icmpv6" or the protocol number
    dst: str
    port: int | None
    uid: int | None  # None: no UID= (the kernel's own packets, which have no socket)
    gid: int | None
    src: str | None = None
    sport: int | None = None

    @property
    def summary(self) -> PacketSummary:
        """The same summary NFLOG's parse_ip_packet gives, so both backends make one event."""
        return PacketSummary(self.family, self.proto, self.dst, self.port)

    @property
    def source(self) -> PacketSource | None:
        """Where it was sent from, as NFLOG's parse_ip_source gives it."""
        return None if self.src is None else PacketSource(self.src, self.sport)


# --------------------------------------------------------------------------- parsers

_HEADER = re.compile(rb"([0-9]{1,10}),([0-9]{1,20}),([0-9]{1,20}),([^,;]*)(?:,[^;]*)?")
_PROPERTY = re.compile(r"([A-Z0-9_]{1,64})=(.*)")


def parse_kmsg_record(line: bytes) -> KmsgRecord | None:
    """Parse one /dev/kmsg record: "<prio>,<seq>,<usec>,<flags>[,…];<message>\\n" followed by
    optional " KEY=value\\n" continuation lines. None if it is not one."""
    header, sep, rest = line.partition(b";")
    match = _HEADER.fullmatch(header)
    if not sep or match is None:
        return None
    prio = int(match[1])
    text = rest.decode("ascii", "replace")
    if text.endswith("\n"):
        text = text[:-1]
    message, *continuation = text.split("\n")
    properties: dict[str, str] = {}
    for extra in continuation:
        if not extra.startswith(" "):
            return None  # a record is one line plus " KEY=value" lines, nothing else
        prop = _PROPERTY.fullmatch(extra[1:])
        if prop is not None:
            properties.setdefault(prop[1], prop[2])
    return KmsgRecord(
        facility=prio >> 3,
        level=prio & 7,
        seq=int(match[2]),
        usec=int(match[3]),
        flags=match[4].decode("ascii", "replace"),
        message=message,
        properties=properties,
    )


# The kernel writes "<prefix>IN=<if> OUT=<if> " (nf_log_dump_packet_common), then for output
# packets directly "SRC=… DST=… " (a MAC= only for input). The prefix may carry a mark after
# the job id (rules.DNS_REDIRECT_MARK: a DNS packet the nat chain redirected to the stub).
# Interface names have no white space, '/' or ':'. Matching this shape, not just the fields,
# keeps unrelated kernel lines (which may quote process names or paths) from parsing as
# packets.
_LOG_LINE = re.compile(
    r"(?P<prefix>netjail (?P<job>[a-z0-9-]{1,32}) (?:[a-z]{1,8} )?)"
    r"IN=[^\s/:]{0,15} OUT=[^\s/:]{0,15} "
    r"(?:PHYSIN=\S{1,15} )?(?:PHYSOUT=\S{1,15} )?(?:MAC=\S* )?"
    r"SRC=(?P<src>[0-9a-f.:]{2,39}) DST=(?P<dst>[0-9a-f.:]{2,39}) (?P<rest>.*)"
)
_PROTOCOLS: dict[str, str | int] = {
    "TCP": "tcp",
    "UDP": "udp",
    "ICMP": "icmp",
    "ICMPv6": "icmpv6",
    "UDPLITE": 136,
    "AH": 51,
    "ESP": 50,
}
_NUMBERED: dict[int, str] = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}
_PORTED = {"tcp", "udp", 136}
_UNKNOWN_EXT = re.compile(r"Unknown Ext Hdr ([0-9]{1,3})")


def _top_level_fields(text: str) -> dict[str, str]:
    """KEY=value words outside brackets; the first of each key wins.

    An ICMP error quotes the packet it is about inside "[…]", with its own SRC/DST/PROTO/
    ports; "INCOMPLETE [N bytes]" brackets too. Those must not be read as the logged packet.
    """
    fields: dict[str, str] = {}
    depth = 0
    for word in text.split(" "):
        opening = depth == 0 and not word.startswith("[")
        depth = max(0, depth + word.count("[") - word.count("]"))
        if opening and depth == 0:
            key, sep, value = word.partition("=")
            if sep and key not in fields:
                fields[key] = value
    return fields


_DECIMAL = re.compile(r"[0-9]{1,10}")


def _number(value: str | None, maximum: int) -> int | None:
    if value is None or not _DECIMAL.fullmatch(value):
        return None
    number = int(value)
    return number if number <= maximum else None


def parse_log_message(message: str) -> LoggedPacket | None:
    """Parse a netfilter LOG line of a jail ("netjail <job> IN= OUT=nj0 SRC=… DST=… … PROTO=…
    SPT=… DPT=… … UID=… GID=…"); None if it is not one.

    IPv6 addresses, which the kernel prints in full ("2001:0db8:0000:…"), come back in their
    short form, as NFLOG events have them. Only the trust-checking ``parse_logged_packet``
    should be given kernel-log records.
    """
    match = _LOG_LINE.fullmatch(message)
    if match is None:
        return None
    try:
        dst = ipaddress.ip_address(match["dst"])
        src = ipaddress.ip_address(match["src"])
    except ValueError:
        return None
    fields = _top_level_fields(match["rest"])
    proto: str | int
    name = fields.get("PROTO")
    if name is not None:
        if name in _PROTOCOLS:
            proto = _PROTOCOLS[name]
        else:
            number = _number(name, 255)
            if number is None:
                return None
            proto = _NUMBERED.get(number, number)
    else:
        # An IPv6 packet with an extension header the logger does not walk: no PROTO= word.
        unknown = _UNKNOWN_EXT.search(match["rest"])
        if unknown is None or int(unknown[1]) > 255:
            return None
        proto = int(unknown[1])
    # No DPT= (a fragment, a truncated header): no port, as NFLOG's parser says then too.
    port = _number(fields.get("DPT"), 0xFFFF) if proto in _PORTED else None
    return LoggedPacket(
        job_id=match["job"],
        prefix=match["prefix"],
        family=dst.version,
        proto=proto,
        dst=str(dst),
        port=port,
        uid=_number(fields.get("UID"), 0xFFFFFFFF),
        gid=_number(fields.get("GID"), 0xFFFFFFFF),
        src=str(src),
        sport=_number(fields.get("SPT"), 0xFFFF) if proto in _PORTED else None,
    )


def parse_logged_packet(record: KmsgRecord) -> LoggedPacket | None:
    """The jail packet a kernel-log record reports, or None.

    None for any record not written by the kernel itself (facility 0): that is the check that
    keeps processes from forging events through /dev/kmsg.
    """
    if not record.from_kernel:
        return None
    return parse_log_message(record.message)


# --------------------------------------------------------------------------- reader


class KmsgReader:
    """A non-blocking reader of the kernel log that starts at its end.

    Opening seeks past the last record (SEEK_END), so the log written before is never
    replayed as new events. ``fileno()`` can be watched with select/asyncio's add_reader.
    Needs CAP_SYSLOG when kernel.dmesg_restrict=1 (KmsgError otherwise).
    """

    def __init__(self, path: str = KMSG_PATH) -> None:
        with map_os_errors(
            KmsgError,
            f"cannot read the kernel log {path}",
            "netjaild needs root (CAP_SYSLOG) for the kmsg log backend",
        ):
            self._fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            with map_os_errors(KmsgError, f"cannot seek to the end of {path}"):
                os.lseek(self._fd, 0, os.SEEK_END)
        except KmsgError:
            os.close(self._fd)
            raise
        self._tracker = SequenceTracker()

    def fileno(self) -> int:
        return self._fd

    def _read_one(self) -> bytes:
        return os.read(self._fd, _RECORD_MAX)

    def read_records(self) -> tuple[list[KmsgRecord], int]:
        """Records available now (at most a batch), and how many records were lost.

        Never blocks. Returns every parseable record, from any facility: use
        ``parse_logged_packet`` to keep the kernel's own jail lines. Raises KmsgError for
        errors other than EAGAIN/EPIPE/EINTR.

        Such an error means a bug, not a busy log: devkmsg_read fails otherwise only with
        EINVAL for a buffer smaller than the record (``_RECORD_MAX`` is twice the largest) and
        EFAULT, so in practice only a reader read after ``close`` (EBADF) raises. Retrying
        would fail the same way.
        """
        with map_os_errors(KmsgError, "cannot read the kernel log"):
            return self._read_batch()

    def _read_batch(self) -> tuple[list[KmsgRecord], int]:
        records: list[KmsgRecord] = []
        lost = 0
        for _ in range(_READ_BATCH):
            try:
                data = self._read_one()
            except BlockingIOError:
                break
            except BrokenPipeError:
                lost += self._tracker.overrun()
                continue
            except InterruptedError:
                continue
            if not data:
                break
            record = parse_kmsg_record(data)
            if record is None:
                continue
            lost += self._tracker.record(record.seq)
            records.append(record)
        return records, lost

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> KmsgReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --------------------------------------------------------------------------- sysctl


def nf_log_all_netns_enabled(path: str = NF_LOG_ALL_NETNS) -> bool:
    """Does the kernel print LOG lines from non-initial netns (the jails)?

    False also when it cannot be told: the sysctl exists only in the initial netns, so a
    daemon in a container cannot see the host's value.
    """
    try:
        with open(path) as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def enable_nf_log_all_netns(path: str = NF_LOG_ALL_NETNS) -> None:
    """Set net.netfilter.nf_log_all_netns=1; KmsgError saying why and what to do if not."""
    try:
        with open(path, "w") as f:
            f.write("1\n")
    except OSError as e:
        raise KmsgError(_explain_sysctl_failure(e.errno)) from None
    if not nf_log_all_netns_enabled(path):
        raise KmsgError(
            "net.netfilter.nf_log_all_netns did not stay at 1; "
            "set it on the host: sysctl -w net.netfilter.nf_log_all_netns=1"
        )


def _explain_sysctl_failure(code: int | None) -> str:
    fix = "set it on the host (sysctl -w net.netfilter.nf_log_all_netns=1) or use NFLOG"
    initial = hostns.in_initial_netns()
    if code == errno.ENOENT and initial is False:
        return (
            "net.netfilter.nf_log_all_netns can only be set from the initial network "
            f"namespace (not inside a container): {fix}"
        )
    if code == errno.ENOENT:
        return (
            "net.netfilter.nf_log_all_netns is missing: this kernel has no netfilter LOG "
            "support (nf_log_syslog); use the NFLOG log backend"
        )
    where = " (this is not the initial network namespace)" if initial is False else ""
    if code == errno.EROFS:
        return f"cannot set net.netfilter.nf_log_all_netns: /proc/sys is read-only{where}: {fix}"
    if code in (errno.EACCES, errno.EPERM):
        return (
            "not allowed to set net.netfilter.nf_log_all_netns: it needs root in the initial "
            f"user and network namespaces{where}: {fix}"
        )
    reason = os.strerror(code) if code else "unknown error"
    return f"cannot set net.netfilter.nf_log_all_netns ({reason}){where}: {fix}"
