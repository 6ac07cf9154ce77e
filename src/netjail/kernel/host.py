"""The seam under the job pipeline: everything a job needs from the kernel, behind one protocol.

``JailHost`` is what the daemon's orchestration (netjail.daemon.pipeline, .jobs, .recovery)
talks to. ``KernelJailHost`` is the real thing, a thin layer over the facility modules in this
package. The unit tests drive the orchestration over a fake of the same protocol
(tests/unit/fakehost.py), the way httpcore tests its connection logic over ``_backends/mock``.

Calls fall in three groups:
- cgroups and namespaces, blocking (the pipeline runs them on worker threads);
- *in-jail* calls (``configure_jail``, ``apply_rules``, ``open_*``), which must run on the
  thread ``in_new_netns`` gives its work: a socket keeps the netns it was made in for ever,
  and libnftables' netlink socket, too, belongs to the calling thread's netns;
- the job's process (async): a cold spawn through the fork server, or a pool jail's standby
  init forked ahead by it (``prefork``) and given its job later, by the daemon directly
  (``start_standby``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol, TypeVar

from netjail.errors import JailError, SpawnError, map_os_errors
from netjail.kernel import cgroup as cgroups
from netjail.kernel import firewall, listeners, netns, nflog, pathcheck, rootfs, syscalls
from netjail.kernel.backends import FirewallBackend, LogBackend
from netjail.kernel.fsplan import FsPlan, HostLayout
from netjail.kernel.jobplan import JobExit, JobPlan
from netjail.kernel.peer import pids_in_netns
from netjail.kernel.spawn import ExitStatus, ForkServer, ForkServerHealth, SpawnedJob
from netjail.protocol import BindAccess

T = TypeVar("T")


class JobCgroupHandle(Protocol):
    """A job's cgroup, as the pipeline uses it."""

    @property
    def procs_files(self) -> tuple[str, ...]: ...

    def pids(self) -> list[int]: ...

    def holds_other_than(self, pid: int) -> bool: ...

    def kill_all(self, timeout: float = 2.0) -> None: ...

    def usage(self) -> cgroups.ResourceUsage: ...

    def remove(self) -> None: ...

    def fits(self, limits: cgroups.Limits) -> bool: ...

    def apply_limits(self, limits: cgroups.Limits) -> None: ...


class JobProcess(Protocol):
    """A running job's main process."""

    @property
    def pid(self) -> int: ...

    def send_signal(self, sig: int) -> bool: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class JailListeners:
    """The daemon's per-job sockets made inside the jail: DNS stub (UDP, TCP) and proxy."""

    dns_udp: tuple[socket.socket, ...]
    dns_tcp: tuple[socket.socket, ...]
    proxy: tuple[socket.socket, ...]

    def close(self) -> None:
        for sock in (*self.dns_udp, *self.dns_tcp, *self.proxy):
            sock.close()


class JailHost(Protocol):
    """Everything the job pipeline needs from the kernel."""

    # cgroups (blocking)
    def create_cgroup(self, job_id: str, limits: cgroups.Limits) -> JobCgroupHandle: ...

    def leftover_cgroups(self) -> list[str]: ...

    def remove_leftover_cgroup(self, job_id: str) -> None: ...

    def in_job_cgroup(self, proc_cgroup_text: str) -> bool: ...

    # network namespaces
    def in_new_netns(self, name: str, work: Callable[[], T]) -> Future[T]: ...

    def in_netns(self, name: str, work: Callable[[], T]) -> Future[T]: ...

    def netns_inode(self, name: str) -> int: ...

    def delete_netns(self, name: str) -> None: ...

    def leftover_netns(self) -> list[str]: ...

    def kill_netns_processes(self, name: str) -> None: ...

    # in-jail (call only from the work given to in_new_netns)
    def configure_jail(self) -> None: ...

    def apply_rules(self, rules: firewall.JailRules) -> None: ...

    def replace_rules(self, rules: firewall.JailRules) -> None: ...

    def open_log_socket(self) -> socket.socket: ...

    def open_listeners(self) -> JailListeners: ...

    # the job's file system
    def host_layout(self) -> HostLayout: ...

    def make_home(self, path: str, uid: int, gid: int, size_bytes: int) -> None: ...

    def remove_home(self, path: str) -> None: ...

    def open_bind_source(
        self, path: str, creds: pathcheck.Credentials, access: BindAccess
    ) -> pathcheck.BindSource: ...

    # the job's process
    async def spawn(self, plan: JobPlan, stdio: list[int], source_fds: list[int]) -> JobProcess: ...

    async def prefork(
        self, netns_name: str, cgroup: JobCgroupHandle, base: FsPlan
    ) -> JobProcess: ...

    async def start_standby(
        self, standby: JobProcess, plan: JobPlan, stdio: list[int], source_fds: list[int]
    ) -> None: ...

    async def wait(self, pid: int) -> ExitStatus: ...

    async def wait_end(self, pid: int) -> JobExit: ...

    def fork_server_health(self) -> ForkServerHealth: ...


class KernelJailHost:
    """``JailHost`` on the real kernel: cgroup manager, netns threads, rules, fork server."""

    def __init__(
        self,
        *,
        forkserver: ForkServer,
        cgroups: cgroups.CgroupManager,
        firewall_backend: FirewallBackend,
        log_backend: LogBackend,
    ) -> None:
        self._forkserver = forkserver
        self._cgroups = cgroups
        # What of /usr, /bin, /lib… the host has, read once: every job's system binds.
        self._host_layout = rootfs.read_host_layout()
        self._firewall = firewall.JailFirewall.for_backends(firewall_backend, log_backend)

    # ------------------------------------------------------------------ cgroups

    def create_cgroup(self, job_id: str, limits: cgroups.Limits) -> JobCgroupHandle:
        return self._cgroups.create_job(job_id, limits)

    def leftover_cgroups(self) -> list[str]:
        return self._cgroups.leftover_job_ids()

    def remove_leftover_cgroup(self, job_id: str) -> None:
        leftover = self._cgroups.open_job(job_id)
        leftover.kill_all()
        leftover.remove()

    def in_job_cgroup(self, proc_cgroup_text: str) -> bool:
        """Whether a /proc/PID/cgroup text puts its process in one of our job cgroups."""
        return self._cgroups.in_job_cgroup(proc_cgroup_text)

    # ------------------------------------------------------------------ netns

    def in_new_netns(self, name: str, work: Callable[[], T]) -> Future[T]:
        return netns.run_in_new_netns(name, work)

    def in_netns(self, name: str, work: Callable[[], T]) -> Future[T]:
        return netns.run_in_netns(name, work)

    def netns_inode(self, name: str) -> int:
        with map_os_errors(JailError, f"cannot stat the jail's netns {name}"):
            return netns.netns_inode(netns.netns_path(name))

    def delete_netns(self, name: str) -> None:
        netns.delete_netns(name)

    def leftover_netns(self) -> list[str]:
        return netns.list_netns()

    def kill_netns_processes(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            for pid in pids_in_netns(netns.netns_inode(netns.netns_path(name))):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    # ------------------------------------------------------------------ in the jail

    def configure_jail(self) -> None:
        netns.configure_jail_interfaces()
        with map_os_errors(JailError, "cannot set the jail's sysctls"):
            _allow_ping_sockets()
            _unpaced_tcp()

    def apply_rules(self, rules: firewall.JailRules) -> None:
        # libnftables' context, or iptables-restore exec'd from here: either way in this netns.
        self._firewall.apply(rules)

    def replace_rules(self, rules: firewall.JailRules) -> None:
        self._firewall.replace(rules)

    def open_log_socket(self) -> socket.socket:
        strategy = self._firewall.nflog
        if strategy is None:
            raise JailError('no NFLOG socket with log_backend = "kmsg"')
        with map_os_errors(JailError, "cannot receive NFLOG events", "is nfnetlink_log available?"):
            return nflog.open_nflog_socket(strategy.group, strategy.snaplen)

    def open_listeners(self) -> JailListeners:
        with map_os_errors(JailError, "cannot open the jail's DNS stub or proxy sockets"):
            dns_udp, dns_tcp = listeners.open_dns_sockets()
            try:
                proxy = listeners.open_proxy_listeners()
            except BaseException:
                for sock in dns_udp + dns_tcp:
                    sock.close()
                raise
        return JailListeners(dns_udp=tuple(dns_udp), dns_tcp=tuple(dns_tcp), proxy=tuple(proxy))

    # ------------------------------------------------------------------ file system

    def host_layout(self) -> HostLayout:
        return self._host_layout

    def make_home(self, path: str, uid: int, gid: int, size_bytes: int) -> None:
        """A per-job HOME: a directory with a tmpfs of its own, so a job filling it fills only
        its own, and removing it frees the space at once."""
        with map_os_errors(JailError, f"cannot make the job's HOME {path}"):
            os.mkdir(path, 0o700)
            try:
                syscalls.mount(
                    "netjail-home",
                    path,
                    "tmpfs",
                    syscalls.MS_NOSUID | syscalls.MS_NODEV,
                    f"size={size_bytes},mode=700,uid={uid},gid={gid}",
                )
            except BaseException:
                os.rmdir(path)
                raise

    def remove_home(self, path: str) -> None:
        with map_os_errors(JailError, f"cannot remove the job's HOME {path}"):
            with contextlib.suppress(OSError):
                syscalls.umount2(path, syscalls.MNT_DETACH)
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(path)

    def open_bind_source(
        self, path: str, creds: pathcheck.Credentials, access: BindAccess
    ) -> pathcheck.BindSource:
        return pathcheck.open_bind_source(path, creds, access)

    # ------------------------------------------------------------------ processes

    async def spawn(self, plan: JobPlan, stdio: list[int], source_fds: list[int]) -> JobProcess:
        return await self._forkserver.spawn(plan, stdio, source_fds)

    async def prefork(self, netns_name: str, cgroup: JobCgroupHandle, base: FsPlan) -> JobProcess:
        path = netns.netns_path(netns_name)
        return await self._forkserver.prefork(path, cgroup.procs_files, base)

    async def start_standby(
        self, standby: JobProcess, plan: JobPlan, stdio: list[int], source_fds: list[int]
    ) -> None:
        if not isinstance(standby, SpawnedJob):
            raise SpawnError("the pool jail's init is not one of this fork server's standbys")
        await self._forkserver.start_standby(standby, plan, stdio, source_fds)

    async def wait(self, pid: int) -> ExitStatus:
        return await self._forkserver.wait(pid)

    async def wait_end(self, pid: int) -> JobExit:
        return await self._forkserver.wait_end(pid)

    def fork_server_health(self) -> ForkServerHealth:
        return self._forkserver.health()


def _allow_ping_sockets() -> None:
    # Unprivileged ICMP echo sockets, per netns: the job has no CAP_NET_RAW (and no_new_privs
    # voids ping's file capability), so without this `ping` fails before sending anything and
    # the attempt would go unlogged. With it, the echo is sent, rejected and reported.
    with open("/proc/sys/net/ipv4/ping_group_range", "w") as f:
        f.write("0 2147483647")


def _unpaced_tcp() -> None:
    # Every TCP connection in a jail is local: the job's own loopback traffic, or the hop to the
    # proxy's in-jail listener (the real upstream leg is made in the daemon's netns and keeps
    # the host's default). A new netns inherits the host's default congestion control; if that
    # is bbr, its pacing throttles this hop to about half of what loopback carries. Reno is
    # always built in and may be any netns's default. Set before the listeners are made, so
    # the sockets they accept inherit it, as do the job's own sockets.
    with open("/proc/sys/net/ipv4/tcp_congestion_control", "w") as f:
        f.write("reno")
