"""Per-job network namespaces: create, configure, enter, delete.

A namespace is created by a dedicated thread that ``unshare(CLONE_NEWNET)``s itself (network
namespaces are per thread), bind-mounts its own ``ns/net`` at /run/netns/<name> (the place
``ip netns`` uses, so operators can see and enter jails), does the in-jail work it is given —
interfaces, firewall, the daemon's per-job sockets — and exits. No fork is needed, which matters
because the daemon is multi-threaded (pyroute2's own ``netns.create`` forks a helper).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Literal, TypeVar

from pyroute2 import IPBatch

from netjail.errors import NetnsError
from netjail.kernel import syscalls

NETNS_DIR = "/run/netns"
NETNS_PREFIX = "netjail-"

#: The jail's only interface besides lo. It exists so that every connect()/sendto() to any
#: address finds a route and emits a packet netfilter sees (and logs), instead of failing
#: silently with ENETUNREACH; nothing sent through it goes anywhere. It is an ``ifb`` device: an
#: Ethernet-like device that drops what it is given, made and freed with the netns for ~4.7 ms
#: less CPU a jail than a veth pair one at a time, 3-5% more jobs/s under load (ARCHITECTURE.md,
#: "The jail's link is an ifb device"). A kernel without ifb gets the veth pair ``nj0``/``nj1``,
#: both ends in the jail, instead. Not lo itself: an ICMP error for a packet routed through lo
#: has the packet's foreign destination as its source, which the kernel will not send from, so
#: ping would get no "filtered" answer.
JAIL_IF = "nj0"
JAIL_PEER_IF = "nj1"
JAIL_ADDR4 = "169.254.77.1"
JAIL_ADDR6 = "fd6e:6a00::1"
#: The kinds of device the jail's link can be, in the order they are tried.
LinkKind = Literal["ifb", "veth"]

T = TypeVar("T")

_IFA_F_NODAD = 0x02
_RT_SCOPE_LINK = 253
_NLMSG_ERROR = 2
#: nlmsghdr: length, type, flags, sequence number, port id.
_NLMSG_HEADER = struct.Struct("=IHHII")
_NETLINK_BUFFER = 1 << 16
#: The kernel answers within the write; this only bounds a thread against the unexpected.
_NETLINK_TIMEOUT_S = 5.0


def netns_path(name: str) -> str:
    return os.path.join(NETNS_DIR, name)


_netns_dir_lock = threading.Lock()


def _ensure_netns_dir() -> None:
    """/run/netns, made a shared mount point of its own, as ``ip netns add`` makes it; once a
    process (at the first jail's build, after the start's recovery).

    Left a plain directory, the first ``ip netns`` command run beside the daemon would bind it
    over itself, hiding the namespace mounts of the jails made before: their files could no
    longer be unmounted or removed (EBUSY), and every jail alive at that moment would leak.
    """
    with _netns_dir_lock:  # two first builds at once would bind it twice
        _make_netns_dir()


@functools.cache  # once it worked; a failure is tried again by the next build
def _make_netns_dir() -> None:
    os.makedirs(NETNS_DIR, mode=0o755, exist_ok=True)
    shared = syscalls.MS_SHARED | syscalls.MS_REC
    try:
        syscalls.mount("none", NETNS_DIR, None, shared)
    except OSError as e:
        if e.errno != errno.EINVAL:  # EINVAL: not a mount point yet
            raise
        syscalls.mount(NETNS_DIR, NETNS_DIR, None, syscalls.MS_BIND | syscalls.MS_REC)
        syscalls.mount("none", NETNS_DIR, None, shared)


def run_in_new_netns(name: str, work: Callable[[], T]) -> Future[T]:
    """Create netns ``name`` and run ``work`` inside it on a fresh thread.

    The namespace stays (bind-mounted at /run/netns/<name>) until ``delete_netns``; if ``work``
    raises, the namespace is deleted before the future fails. The future resolves when the
    thread is done; call from any thread.
    """
    future: Future[T] = Future()

    def thread_main() -> None:
        path = netns_path(name)
        created = False
        try:
            _ensure_netns_dir()
            # O_EXCL: a name already in use is an error, never a jail shared with another job.
            fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o444)
            os.close(fd)
            created = True
            syscalls.unshare(syscalls.CLONE_NEWNET)
            syscalls.mount(
                f"/proc/self/task/{threading.get_native_id()}/ns/net",
                path,
                None,
                syscalls.MS_BIND,
            )
            result = work()
        except BaseException as e:
            if created:
                delete_netns(name)
            future.set_exception(e if isinstance(e, Exception) else NetnsError(str(e)))
            return
        future.set_result(result)

    # The thread ends right after, taking its namespace membership with it: no thread of the
    # daemon ever goes back to serving anything else from inside a jail.
    threading.Thread(target=thread_main, name=f"netns-{name}", daemon=True).start()
    return future


def run_in_netns(name: str, work: Callable[[], T]) -> Future[T]:
    """Run ``work`` on a fresh thread inside the existing netns ``name``.

    As with ``run_in_new_netns``, the thread ends right after: no thread of the daemon goes
    back to serving anything else from inside a jail.
    """
    future: Future[T] = Future()

    def thread_main() -> None:
        try:
            fd = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
            try:
                syscalls.setns(fd, syscalls.CLONE_NEWNET)
            finally:
                os.close(fd)
            result = work()
        except BaseException as e:
            future.set_exception(e if isinstance(e, Exception) else NetnsError(str(e)))
            return
        future.set_result(result)

    threading.Thread(target=thread_main, name=f"netns-{name}", daemon=True).start()
    return future


def configure_jail_interfaces() -> None:
    """In the current thread's netns: lo up, the jail's link up, addresses and default routes.

    Two batches, each one write and its acks: lo up and the link made up, then, with the
    link's index, the addresses and the routes (and a veth pair's peer up). The requests are
    the same for every jail, so pyroute2 encodes them once (``IPBatch``). Sent one at a time
    through ``IPRoute`` they cost ~4.5 ms a jail on the test VM, nearly all of it pyroute2's
    Python around each request, and under load that was the daemon's largest use of the GIL.
    A kernel that does not know ifb (EOPNOTSUPP) makes this, and every later jail, use veth.
    """
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
            sock.settimeout(_NETLINK_TIMEOUT_S)
            kind = jail_link_kind()
            refusal = _refusal_of(sock, _link_requests(kind))
            if refusal is not None and refusal == (_link_step(kind), errno.EOPNOTSUPP):
                kind = _fall_back_to_veth(kind)
                refusal = _refusal_of(sock, _link_requests(kind))
            _raise_refusal(refusal)
            index = socket.if_nametoindex(JAIL_IF)
            peer = socket.if_nametoindex(JAIL_PEER_IF) if kind == "veth" else None
            _send_batch(sock, _address_requests(index, peer))
    except NetnsError:
        raise
    except Exception as e:
        raise NetnsError(f"cannot configure the jail's interfaces: {e}") from e


_link_kinds: list[LinkKind] = ["ifb", "veth"]
_link_kinds_lock = threading.Lock()


def jail_link_kind() -> LinkKind:
    """The kind of device new jails get as their link: ifb, until the kernel refused one."""
    return _link_kinds[0]


def _fall_back_to_veth(refused: LinkKind) -> LinkKind:
    with _link_kinds_lock:
        if _link_kinds[0] == refused and len(_link_kinds) > 1:
            del _link_kinds[0]
        return _link_kinds[0]


@dataclass(frozen=True)
class _Batch:
    """Encoded rtnetlink requests, and what each one does, by its sequence number."""

    data: bytes
    steps: tuple[tuple[int, str], ...]


def _encoded(build: Callable[[IPBatch], None], labels: Sequence[str]) -> _Batch:
    batch = IPBatch()
    try:
        build(batch)
        data = bytes(batch.batch)
    finally:
        batch.close()
    seqs = [seq for _offset, _kind, seq in _netlink_messages(data)]
    if len(seqs) != len(labels):
        raise NetnsError(f"pyroute2 encoded {len(seqs)} requests for {len(labels)} steps")
    return _Batch(data, tuple(zip(seqs, labels, strict=True)))


def _link_step(kind: LinkKind) -> str:
    return f"{kind} {JAIL_IF}" if kind == "ifb" else f"veth {JAIL_IF}/{JAIL_PEER_IF}"


@functools.cache
def _link_requests(kind: LinkKind) -> _Batch:
    def build(ip: IPBatch) -> None:
        ip.link("set", index=1, state="up")
        if kind == "ifb":
            ip.link("add", ifname=JAIL_IF, kind="ifb", state="up")
        else:
            ip.link("add", ifname=JAIL_IF, kind="veth", peer=JAIL_PEER_IF, state="up")

    return _encoded(build, ["lo up", _link_step(kind)])


@functools.lru_cache(maxsize=8)
def _address_requests(index: int, peer: int | None) -> _Batch:
    def build(ip: IPBatch) -> None:
        if peer is not None:
            ip.link("set", index=peer, state="up")
        ip.addr("add", index=index, address=JAIL_ADDR4, prefixlen=30)
        # No duplicate address detection: nothing else is on this link, and DAD would delay
        # the address being usable as a source for IPv6 connects.
        ip.addr("add", index=index, address=JAIL_ADDR6, prefixlen=64, flags=_IFA_F_NODAD)
        ip.route("add", dst="0.0.0.0/0", oif=index, scope=_RT_SCOPE_LINK)
        ip.route("add", dst="::/0", oif=index, family=socket.AF_INET6)

    labels = ["IPv4 address", "IPv6 address", "IPv4 route", "IPv6 route"]
    return _encoded(build, ([f"{JAIL_PEER_IF} up"] if peer is not None else []) + labels)


def _send_batch(sock: socket.socket, batch: _Batch) -> None:
    """Send ``batch`` in one write and check every request's ack (the kernel handles each
    request of a batch, and acks it, within the write)."""
    _raise_refusal(_refusal_of(sock, batch))


def _raise_refusal(refusal: tuple[str, int] | None) -> None:
    if refusal is not None:
        step, error = refusal
        raise NetnsError(f"cannot configure the jail's interfaces: {step}: {os.strerror(error)}")


def _refusal_of(sock: socket.socket, batch: _Batch) -> tuple[str, int] | None:
    """Send ``batch`` in one write and read every request's ack: the first refused step and
    its errno, or None when the kernel did them all."""
    sock.send(batch.data)
    pending = dict(batch.steps)
    refusal: tuple[str, int] | None = None
    while pending:
        data = sock.recv(_NETLINK_BUFFER)
        for offset, kind, seq in _netlink_messages(data):
            if kind != _NLMSG_ERROR or seq not in pending:
                continue
            if offset + _NLMSG_HEADER.size + 4 > len(data):
                raise NetnsError("a malformed rtnetlink answer")
            step = pending.pop(seq)
            (error,) = struct.unpack_from("=i", data, offset + _NLMSG_HEADER.size)
            if error and refusal is None:
                refusal = (step, -error)
    return refusal


def _netlink_messages(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(offset, type, sequence number) of each netlink message in ``data``."""
    offset = 0
    while offset + _NLMSG_HEADER.size <= len(data):
        length, kind, _flags, seq, _pid = _NLMSG_HEADER.unpack_from(data, offset)
        if length < _NLMSG_HEADER.size:
            raise NetnsError("a malformed rtnetlink answer")
        yield offset, kind, seq
        offset += (length + 3) & ~3


def delete_netns(name: str) -> None:
    """Unmount and remove /run/netns/<name>; idempotent.

    The kernel frees the namespace (and its interfaces and rules) once no process or socket
    holds it any more.
    """
    path = netns_path(name)
    with contextlib.suppress(FileNotFoundError, OSError):
        syscalls.umount2(path, syscalls.MNT_DETACH)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def list_netns(prefix: str = NETNS_PREFIX) -> list[str]:
    """Names under /run/netns that start with ``prefix``."""
    try:
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def netns_inode(path: str) -> int:
    """The inode identifying the network namespace at ``path`` (a ns file or /proc/PID/ns/net)."""
    return os.stat(path).st_ino
