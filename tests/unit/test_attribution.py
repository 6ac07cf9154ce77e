"""The per-job process lookup: found, gone, unsupported, over budget, and sanitised."""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterator

import pytest

from netjail.daemon import attribution
from netjail.daemon.attribution import (
    LOOKUP_BURST,
    MAX_FDS_PER_LOOKUP,
    MAX_FDS_SCANNED,
    NoSocket,
    SocketEnd,
    SocketOwners,
    peer_end,
    socket_end,
)
from netjail.kernel import sockowner

LOCALHOST = ipaddress.IPv4Address("127.0.0.1")


def _diag_here(_pid: int) -> socket.socket:
    """The diag socket in the test's own netns (the daemon's enters the jail's)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, sockowner.NETLINK_SOCK_DIAG)
    sock.setblocking(False)
    return sock


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_socket_of_this_process_is_attributed_to_it() -> None:
    """The lookup finds the process holding the socket (here, the test's own) and names it."""
    owners = SocketOwners(list_pids=lambda: [os.getpid()], open_diag=_diag_here)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        process = owners.owner_of(SocketEnd("udp", LOCALHOST, sock.getsockname()[1]))
    assert process is not None
    assert process.pid == os.getpid()
    assert process.exe is not None
    assert os.path.samefile(process.exe, "/proc/self/exe")
    with open("/proc/self/comm") as comm:
        assert process.comm == comm.read().strip()
    assert (owners.attributed, owners.unattributed) == (1, 0)


def test_a_socket_no_job_process_holds_is_gone() -> None:
    """A socket outside the job's processes, or none at all, is a counted miss, not a guess."""
    owners = SocketOwners(list_pids=lambda: [os.getpid()], open_diag=_diag_here)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert owners.owner_of(SocketEnd("udp", LOCALHOST, port)) is None
    assert SocketOwners(open_diag=_diag_here).owner_of(SocketEnd("udp", LOCALHOST, port)) is None
    assert owners.misses == {"gone": 1}


def test_what_names_no_socket_is_unsupported() -> None:
    """ICMP, or a packet without ports, cannot name a socket: counted as unsupported."""
    owners = SocketOwners(list_pids=lambda: [os.getpid()], open_diag=_diag_here)
    assert socket_end("icmp", "169.254.77.1", None) == NoSocket()
    assert socket_end("udp", "not an address", 1) == NoSocket()
    assert peer_end("tcp", "/a/unix/path") == NoSocket()
    assert owners.owner_of(NoSocket()) is None
    assert owners.misses == {"unsupported": 1}


def test_lookups_beyond_the_burst_wait_for_the_budget() -> None:
    """A burst beyond LOOKUP_BURST is counted over budget, until time refills it."""
    clock = Clock()
    owners = SocketOwners(list_pids=lambda: [], clock=clock, open_diag=_diag_here)
    end = SocketEnd("tcp", LOCALHOST, 1)
    for _ in range(LOOKUP_BURST + 5):
        owners.owner_of(end)
    assert owners.misses == {"gone": LOOKUP_BURST, "budget": 5}
    clock.now = 1.0
    owners.owner_of(end)
    assert owners.misses == {"gone": LOOKUP_BURST + 1, "budget": 5}


def test_what_the_job_controls_is_sanitised_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """comm, exe and argv come from the job: control characters replaced, lengths bounded."""
    hostile = sockowner.ProcessIdentity(
        ns_pid=7,
        comm="evil\x1b[31mname-longer-than-15",
        exe="/tmp/\nfake",
        argv=["a\x07", "x" * 1000, *(["y"] * 100)],
    )
    monkeypatch.setattr(attribution.sockowner, "read_process", lambda pid: hostile)
    owners = SocketOwners(list_pids=lambda: [os.getpid()], open_diag=_diag_here)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        process = owners.owner_of(peer_end("udp", sock.getsockname()))
    assert process is not None
    assert process.pid == 7
    assert "\x1b" not in process.comm
    assert len(process.comm) <= 16
    assert process.exe == "/tmp/?fake"
    assert process.argv[0] == "a?"
    assert len(process.argv) == attribution.MAX_ARGS
    assert all(len(arg) <= attribution.MAX_ARG_CHARS + 1 for arg in process.argv)


def test_one_lookup_reads_a_bounded_number_of_descriptors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A job of many processes full of descriptors makes one lookup read at most
    MAX_FDS_PER_LOOKUP descriptors in all, counted as over budget, and then waits for more."""
    read = 0

    def socket_inodes(_pid: int, limit: int) -> Iterator[int | None]:
        nonlocal read
        # Each process holds more descriptors than the limit, none of them the socket looked
        # for (it is in flight in an SCM_RIGHTS message, or held by the newest process).
        for _ in range(limit):
            read += 1
            yield None

    monkeypatch.setattr(sockowner, "socket_inodes", socket_inodes)
    monkeypatch.setattr(sockowner, "find_socket_inode", lambda _sock, _end: 12345)
    clock = Clock()
    diag = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    owners = SocketOwners(
        list_pids=lambda: list(range(1, MAX_FDS_SCANNED + 1)),
        clock=clock,
        open_diag=lambda _p: diag,
    )
    end = SocketEnd("udp", ipaddress.IPv4Address("10.0.0.2"), 40000)
    try:
        assert owners.owner_of(end) is None
        assert read == MAX_FDS_PER_LOOKUP
        for _ in range(attribution.FDS_BURST // MAX_FDS_PER_LOOKUP + 2):
            owners.owner_of(end)
    finally:
        owners.close()
    assert read == attribution.FDS_BURST
    assert owners.misses["budget"] == attribution.FDS_BURST // MAX_FDS_PER_LOOKUP + 3
