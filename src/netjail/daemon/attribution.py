"""Which of a job's processes sent an event: socket → inode → process, cheaply and bounded.

The kernel says who sent a logged packet only by uid, and every process of a job shares it.
So the daemon looks, when the event comes: the sending socket's inode, asked of sock_diag in
the jail's netns (netjail.kernel.sockowner; one netlink socket per job, made at the first
lookup), then the job's process that holds it, searched in the job's cgroup only, the
processes that owned sockets lately first. It runs on the loop, so it is
bounded: at most ``LOOKUP_BURST`` lookups at once, refilled at ``LOOKUPS_PER_S``; at most
``MAX_FDS_SCANNED`` descriptors per process and ``MAX_FDS_PER_LOOKUP`` in all for one lookup,
drawn from a second bucket of ``FDS_BURST`` descriptors refilled at ``FDS_PER_S``, since the job
chooses how many processes and descriptors it holds; a cache of the socket inodes seen (a
lookup is about 20 µs, a scan about 6 µs a descriptor). Whatever cannot be attributed is
counted by why (``Miss``), never guessed: a scan that spends its descriptors first is
``budget``.

What can be known: the DNS stub and the proxy see the job's end of each query and connection
while its socket is open, so those are attributed as long as the process waits for the answer.
A logged UDP datagram is attributed while its socket is still open (the REJECT makes sendto
fail with EPERM, and many programs exit on it). A REJECTed TCP connect mostly is not: the
reset reaches the socket at once, which leaves the kernel's tables (CLOSE) before the daemon
reads the log, so only a socket still connecting (SYN_SENT) is found.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from netjail.errors import CgroupError, JailError
from netjail.kernel import sockowner
from netjail.kernel.sockowner import SocketEnd
from netjail.protocol import EventProcess
from netjail.text import sanitize

#: Lookups one job may make at once, and how many it gets back per second.
LOOKUP_BURST = 64
LOOKUPS_PER_S = 128.0
#: Descriptors read per process in one lookup.
MAX_FDS_SCANNED = 4096
#: Descriptors read in all in one lookup (about 0.1 s of the loop at most), and the job's
#: bucket of descriptor reads they are drawn from (about 0.2 s of the loop a second).
MAX_FDS_PER_LOOKUP = 16384
FDS_BURST = 4 * MAX_FDS_PER_LOOKUP
FDS_PER_S = 32768.0
#: Socket inodes remembered per job (then the cache starts again).
MAX_CACHED_SOCKETS = 8192
#: How long a listing of the job's processes is used before it is read again (a process that
#: is not in it yet makes one more listing).
PIDS_TTL_S = 0.1
#: What an event shows of a command line.
MAX_ARGS = 16
MAX_ARG_CHARS = 128
_COMM_CHARS = 15

#: Why an event names no process: its socket or process was gone, the job's lookup budget was
#: spent, or the protocol has no socket table netjail reads (ICMP, SCTP…).
Miss = Literal["gone", "budget", "unsupported"]


@dataclass(frozen=True)
class NoSocket:
    """What was seen names no socket netjail can look up (ICMP, a fragment without ports)."""


#: Where an event came from, as far as the daemon can tell.
Origin = SocketEnd | NoSocket


def socket_end(
    proto: str | int | None,
    src: str | None,
    sport: int | None,
    dst: str | None = None,
    dport: int | None = None,
) -> Origin:
    """The socket end of what was seen, or NoSocket when it cannot name one."""
    if src is None or sport is None:
        return NoSocket()
    if proto == "tcp":
        kind: sockowner.SocketProto = "tcp"
    elif proto == "udp":
        kind = "udp"
    else:
        return NoSocket()
    try:
        local = ipaddress.ip_address(src)
        remote = ipaddress.ip_address(dst) if dst is not None else None
    except ValueError:
        return NoSocket()
    return SocketEnd(kind, local, sport, remote, dport)


def peer_end(proto: sockowner.SocketProto, peer: object, toward: object = None) -> Origin:
    """The job's end of a query or connection the stub or proxy took, from its peer address
    (``(host, port)``, or ``(host, port, flow, scope)`` for IPv6), and where the job's socket
    is connected to (``toward``, same form), when known: a connected socket is found only by
    both ends."""
    own = _host_port(peer)
    if own is None:
        return NoSocket()
    remote = _host_port(toward)
    if remote is None:
        return socket_end(proto, own[0], own[1])
    return socket_end(proto, own[0], own[1], remote[0], remote[1])


def _host_port(address: object) -> tuple[str, int] | None:
    if not isinstance(address, tuple) or len(address) < 2:
        return None
    host, port = address[0], address[1]
    if not isinstance(host, str) or not isinstance(port, int):
        return None
    return host.partition("%")[0], port


#: What the stub and the proxy are given to name the process behind a query or connection.
OwnerLookup = Callable[[Origin], EventProcess | None]


def unknown_owner(_origin: Origin) -> EventProcess | None:
    """No lookup at all (a stub or proxy outside a job, as in unit tests)."""
    return None


def _no_pids() -> list[int]:
    return []


@dataclass(eq=False)
class SocketOwners:
    """One job's socket-owner lookups, with their cache, their budget and their misses."""

    #: The host pids of the job's processes (its cgroup's), set once the cgroup exists.
    list_pids: Callable[[], list[int]] = _no_pids
    clock: Callable[[], float] = time.monotonic
    #: Makes the sock_diag socket inside the netns of a job's process (given its host pid).
    open_diag: Callable[[int], socket.socket] = sockowner.open_diag_socket
    attributed: int = 0
    misses: dict[Miss, int] = field(default_factory=dict)
    _tokens: float = LOOKUP_BURST
    _refilled: float | None = None
    _fd_tokens: float = FDS_BURST
    _fds_refilled: float | None = None
    _pids: list[int] = field(default_factory=list)
    _pids_read: float | None = None
    _inode_pid: dict[int, int] = field(default_factory=dict)
    _recent: list[int] = field(default_factory=list)
    _diag: socket.socket | None = None

    @property
    def unattributed(self) -> int:
        return sum(self.misses.values())

    def owner_of(self, end: Origin) -> EventProcess | None:
        """The process holding the socket ``end`` names, or None (the miss counted)."""
        if isinstance(end, NoSocket):
            return self._miss("unsupported")
        if not self._spend():
            return self._miss("budget")
        pids = self._job_pids(fresh=False)
        inode = self._inode(pids, end)
        if inode is None:
            return self._miss("gone")
        pid = self._holder(pids, inode)
        if pid == "budget":
            return self._miss("budget")
        identity = sockowner.read_process(pid) if pid is not None else None
        if identity is None:
            return self._miss("gone")
        self.attributed += 1
        return EventProcess(
            pid=identity.ns_pid,
            comm=sanitize(identity.comm, _COMM_CHARS),
            exe=sanitize(identity.exe) if identity.exe is not None else None,
            argv=[sanitize(arg, MAX_ARG_CHARS) for arg in identity.argv[:MAX_ARGS]],
        )

    def _miss(self, why: Miss) -> EventProcess | None:
        """Count a lookup that found nobody; None, what the lookup returns then."""
        self.misses[why] = self.misses.get(why, 0) + 1
        return None

    def _spend(self) -> bool:
        now = self.clock()
        if self._refilled is not None:
            self._tokens = min(LOOKUP_BURST, self._tokens + (now - self._refilled) * LOOKUPS_PER_S)
        self._refilled = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def _job_pids(self, *, fresh: bool) -> list[int]:
        now = self.clock()
        if fresh or self._pids_read is None or now - self._pids_read > PIDS_TTL_S:
            try:
                self._pids = self.list_pids()
            except CgroupError:  # being removed: nobody is left to name
                self._pids = []
            self._pids_read = now
        return self._pids

    def close(self) -> None:
        """The job is over: close its sock_diag socket."""
        if self._diag is not None:
            self._diag.close()
            self._diag = None

    def _inode(self, pids: list[int], end: SocketEnd) -> int | None:
        """The inode of the socket, asked in the jail's netns (made through any process of the
        job: all of them are in it)."""
        if self._diag is None:
            for pid in pids:
                try:
                    self._diag = self.open_diag(pid)
                    break
                except JailError:
                    continue  # this process is gone: try the next one
            else:
                return None
        return sockowner.find_socket_inode(self._diag, end)

    def _holder(self, pids: list[int], inode: int) -> int | Literal["budget"] | None:
        """The job's process that holds socket ``inode``: the cache, then the processes that
        owned sockets lately, then the rest, then those started since the listing; "budget"
        when the descriptors this lookup may read ran out first."""
        cached = self._inode_pid.get(inode)
        if cached is not None and cached in pids:
            return cached
        allowance = self._fd_allowance()
        listed = set(pids)
        order = [pid for pid in self._recent if pid in listed]
        seen = set(order)
        order += [pid for pid in pids if pid not in seen]
        seen.update(order)
        found, read = self._scan(order, inode, allowance)
        if found is None and read < allowance:
            newer = [pid for pid in self._job_pids(fresh=True) if pid not in seen]
            found, more = self._scan(newer, inode, allowance - read)
            read += more
        self._fd_tokens -= read
        if found is None:
            return "budget" if read >= allowance else None
        self._recent = [found, *(pid for pid in self._recent if pid != found)][:8]
        return found

    def _fd_allowance(self) -> int:
        """How many descriptors this lookup may read: the bucket refilled, at most
        ``MAX_FDS_PER_LOOKUP``."""
        now = self.clock()
        if self._fds_refilled is not None:
            self._fd_tokens = min(
                FDS_BURST, self._fd_tokens + (now - self._fds_refilled) * FDS_PER_S
            )
        self._fds_refilled = now
        return max(0, min(MAX_FDS_PER_LOOKUP, int(self._fd_tokens)))

    def _scan(self, pids: list[int], inode: int, allowance: int) -> tuple[int | None, int]:
        """The process among ``pids`` holding ``inode``, reading at most ``allowance``
        descriptors in all; and how many were read."""
        read = 0
        for pid in pids:
            if read >= allowance:
                break
            for held in sockowner.socket_inodes(pid, min(MAX_FDS_SCANNED, allowance - read)):
                read += 1
                if held is None:
                    continue
                if len(self._inode_pid) >= MAX_CACHED_SOCKETS:
                    self._inode_pid.clear()
                self._inode_pid[held] = pid
                if held == inode:
                    return pid, read
        return None, read
