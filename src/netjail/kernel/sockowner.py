"""Which process owns a socket: the jail's socket tables and the job's descriptor tables.

``/proc/<pid>/net/{tcp,udp}{,6}`` of any process in a jail list the sockets of the jail's
network namespace (not the reader's), each with its inode; the links in
``/proc/<pid>/fd`` name the inode of every socket a process holds (``socket:[123]``). A socket
that is closed, or a TCP socket that a reset already moved to CLOSE (unhashed), is in no
table: its owner cannot be known.

The parsers are pure; the readers are thin and bounded (a table read stops at
``MAX_TABLE_BYTES``, a descriptor scan at the limit it is given), and every OSError means
"gone": the process exited, or never was.
"""

from __future__ import annotations

import ipaddress
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from netjail.ipaddr import IPAddress

SocketProto = Literal["tcp", "udp"]

#: Most bytes read of one socket table: a job that opens 10,000 sockets only makes its own
#: lookups miss, never the daemon slow.
MAX_TABLE_BYTES = 1 << 20
#: Most bytes read of a process's command line.
MAX_CMDLINE_BYTES = 4096
_SOCKET_LINK = "socket:["
_WORD = struct.Struct("=I")


@dataclass(frozen=True)
class SocketEntry:
    """One socket of a table: where it is bound, where it is connected (unspecified: not),
    and its inode (0: no owner, e.g. TIME_WAIT)."""

    local: IPAddress
    local_port: int
    remote: IPAddress
    remote_port: int
    inode: int


@dataclass(frozen=True)
class ProcessIdentity:
    """What /proc says of a process, raw (the caller sanitises): its pid in its innermost PID
    namespace, its short name, its executable and its command line."""

    ns_pid: int
    comm: str
    exe: str | None
    argv: list[str]


def parse_address(text: str) -> tuple[IPAddress, int]:
    """``0100007F:0035`` (the kernel's host-order hex words) as (127.0.0.1, 53); ValueError
    when malformed."""
    hex_address, _, hex_port = text.partition(":")
    if len(hex_address) not in (8, 32) or not hex_port:
        raise ValueError(f"not a socket address: {text!r}")
    raw = b"".join(
        _WORD.pack(int(hex_address[i : i + 8], 16)) for i in range(0, len(hex_address), 8)
    )
    address: IPAddress = ipaddress.IPv4Address(raw) if len(raw) == 4 else ipaddress.IPv6Address(raw)
    return address, int(hex_port, 16)


def parse_socket_table(text: str) -> list[SocketEntry]:
    """The entries of a /proc/net/{tcp,udp}{,6} table; malformed lines are skipped."""
    entries = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10:
            continue
        try:
            local, local_port = parse_address(fields[1])
            remote, remote_port = parse_address(fields[2])
            inode = int(fields[9])
        except ValueError:
            continue
        entries.append(SocketEntry(local, local_port, remote, remote_port, inode))
    return entries


def _same(entry_address: IPAddress, address: IPAddress) -> bool:
    """Whether a table's address is ``address``, also as an IPv4-mapped IPv6 one (a dual-stack
    socket talking IPv4)."""
    if entry_address == address:
        return True
    return (
        isinstance(entry_address, ipaddress.IPv6Address)
        and entry_address.ipv4_mapped is not None
        and entry_address.ipv4_mapped == address
    )


def find_socket(
    entries: list[SocketEntry],
    local: IPAddress,
    local_port: int,
    remote: IPAddress | None = None,
    remote_port: int | None = None,
) -> int | None:
    """The inode of the socket that sent from ``local:local_port`` (to ``remote:remote_port``
    when known), or None.

    A socket bound to the unspecified address, or not connected (a UDP socket that uses
    sendto), matches too, but one that names the exact addresses wins.
    """
    best: tuple[int, int] | None = None
    for entry in entries:
        if entry.inode == 0 or entry.local_port != local_port:
            continue
        score = 0
        if _same(entry.local, local):
            score += 2
        elif not entry.local.is_unspecified:
            continue
        if remote is not None and remote_port is not None and entry.remote_port != 0:
            if entry.remote_port != remote_port or not _same(entry.remote, remote):
                continue
            score += 1
        if best is None or score > best[0]:
            best = (score, entry.inode)
    return None if best is None else best[1]


def parse_ns_pid(status: str) -> int | None:
    """The pid in the innermost PID namespace, from /proc/<pid>/status's ``NSpid:`` line."""
    for line in status.splitlines():
        if line.startswith("NSpid:"):
            fields = line.split()[1:]
            return int(fields[-1]) if fields and fields[-1].isdigit() else None
    return None


def parse_cmdline(data: bytes) -> list[str]:
    """/proc/<pid>/cmdline (NUL-separated, maybe cut short) as strings, undecodable bytes
    replaced."""
    if not data:
        return []
    return [part.decode(errors="replace") for part in data.rstrip(b"\0").split(b"\0")]


def read_socket_table(pid: int, proto: SocketProto, family: int) -> list[SocketEntry] | None:
    """The socket table of the network namespace ``pid`` is in, or None if it is gone."""
    name = proto if family == 4 else f"{proto}6"
    try:
        with open(f"/proc/{pid}/net/{name}", "rb") as table:
            data = table.read(MAX_TABLE_BYTES)
    except OSError:
        return None
    return parse_socket_table(data.decode("ascii", errors="replace"))


def socket_inodes(pid: int, limit: int) -> Iterator[int]:
    """The inodes of the sockets process ``pid`` holds, from at most ``limit`` descriptors;
    nothing once it is gone."""
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return
    for name in names[:limit]:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue  # closed meanwhile
        if link.startswith(_SOCKET_LINK) and link.endswith("]"):
            inode = link[len(_SOCKET_LINK) : -1]
            if inode.isdigit():
                yield int(inode)


def read_process(pid: int) -> ProcessIdentity | None:
    """Who process ``pid`` is now, or None if it is gone (or a zombie: no command line)."""
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8", errors="replace") as status:
            ns_pid = parse_ns_pid(status.read(8192))
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as comm:
            name = comm.read(64).rstrip("\n")
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            argv = parse_cmdline(cmdline.read(MAX_CMDLINE_BYTES))
    except OSError:
        return None
    if ns_pid is None:
        return None
    try:
        exe: str | None = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        exe = None  # a kernel thread, or exiting
    return ProcessIdentity(ns_pid=ns_pid, comm=name, exe=exe, argv=argv)
