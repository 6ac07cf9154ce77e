"""Per-job network namespaces: create, configure, enter, delete.

A namespace is created by a dedicated thread that ``unshare(CLONE_NEWNET)``s itself (network
namespaces are per thread), bind-mounts its own ``ns/net`` at /run/netns/<name> (the place
``ip netns`` uses, so operators can see and enter jails), does the in-jail work it is given —
interfaces, firewall, the daemon's per-job sockets — and exits. No fork is needed, which matters
because the daemon is multi-threaded (pyroute2's own ``netns.create`` forks a helper).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

from pyroute2 import IPRoute

from netjail.errors import NetnsError
from netjail.kernel import syscalls

NETNS_DIR = "/run/netns"
NETNS_PREFIX = "netjail-"

#: The jail's only interface besides lo: a veth pair whose both ends live in the jail. It exists
#: so that every connect()/sendto() to any address finds a route and emits a packet netfilter
#: sees (and logs), instead of failing silently with ENETUNREACH.
JAIL_IF = "nj0"
JAIL_PEER_IF = "nj1"
JAIL_ADDR4 = "169.254.77.1"
JAIL_ADDR6 = "fd6e:6a00::1"

T = TypeVar("T")

_IFA_F_NODAD = 0x02
_RT_SCOPE_LINK = 253


def netns_path(name: str) -> str:
    return os.path.join(NETNS_DIR, name)


def _ensure_netns_dir() -> None:
    os.makedirs(NETNS_DIR, mode=0o755, exist_ok=True)


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
    """In the current thread's netns: lo up, the veth pair up, addresses and default routes."""
    try:
        with IPRoute() as ip:
            ip.link("set", index=1, state="up")
            ip.link("add", ifname=JAIL_IF, kind="veth", peer=JAIL_PEER_IF)
            (index,) = ip.link_lookup(ifname=JAIL_IF)
            (peer,) = ip.link_lookup(ifname=JAIL_PEER_IF)
            ip.link("set", index=peer, state="up")
            ip.link("set", index=index, state="up")
            ip.addr("add", index=index, address=JAIL_ADDR4, prefixlen=30)
            # No duplicate address detection: nothing else is on this link, and DAD would delay
            # the address being usable as a source for IPv6 connects.
            ip.addr("add", index=index, address=JAIL_ADDR6, prefixlen=64, flags=_IFA_F_NODAD)
            ip.route("add", dst="0.0.0.0/0", oif=index, scope=_RT_SCOPE_LINK)
            ip.route("add", dst="::/0", oif=index, family=10)
    except Exception as e:
        raise NetnsError(f"cannot configure the jail's interfaces: {e}") from e


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
