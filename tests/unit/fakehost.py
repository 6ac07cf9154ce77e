"""A fake ``JailHost``: the job pipeline's seam without the kernel, for unit tests.

Like httpcore's ``_backends/mock.py``, it implements the real interface. It keeps a journal of
what was made and undone, can fail at any named operation, and hands out real (unprivileged)
sockets where the daemon serves them: a datagram socketpair stands in for the NFLOG socket
(tests write NFLOG datagrams into its other end), and the DNS and proxy listeners are bound to
127.0.0.1 on ephemeral ports.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TypeVar

from netjail.kernel import cgroup as cgroups
from netjail.kernel.firewall import JailRules
from netjail.kernel.fsplan import FsPlan, HostDir, HostLayout, HostLink, split_fs_plan
from netjail.kernel.host import JailListeners, JobCgroupHandle
from netjail.kernel.jobplan import JobExit, JobPlan
from netjail.kernel.pathcheck import BindSource, Credentials
from netjail.kernel.spawn import ExitStatus, ForkServerHealth
from netjail.protocol import BindAccess

T = TypeVar("T")

#: Every operation the fake can be told to fail at, in the order a job's build calls them.
BUILD_OPERATIONS = (
    "create_cgroup",
    "in_new_netns",
    "configure_jail",
    "apply_rules",
    "open_log_socket",
    "open_listeners",
    "netns_inode",
    "make_home",
    "open_bind_source",
    "spawn",
)
#: The operations of a pool jail's build, in order (its job's start_standby comes later).
POOL_BUILD_OPERATIONS = (
    "create_cgroup",
    "in_new_netns",
    "configure_jail",
    "apply_rules",
    "open_log_socket",
    "open_listeners",
    "make_home",
    "prefork",
    "netns_inode",
)
#: The operations of claiming a pool jail and starting its job, in order.
CLAIM_OPERATIONS = (
    "apply_limits",
    "in_netns",
    "replace_rules",
    "make_home",
    "open_bind_source",
    "start_standby",
)


class InjectedError(OSError):
    """The failure a test asked the fake to raise."""


def exited(code: int | None = 0, sig: int | None = None) -> ExitStatus:
    """An ExitStatus as the fork server reports it."""
    return ExitStatus(
        exit_code=code, signal=sig, cpu_user_s=0.01, cpu_system_s=0.02, max_rss_bytes=4096
    )


@dataclass
class FakeCgroup:
    host: FakeJailHost
    job_id: str
    limits: cgroups.Limits
    members: list[int] = field(default_factory=list)
    usage_result: cgroups.ResourceUsage | Exception = field(
        default_factory=lambda: cgroups.ResourceUsage(
            cpu_user_s=0.5,
            cpu_system_s=0.25,
            memory_peak_bytes=1 << 20,
            pids_peak=3,
            oom_killed=False,
        )
    )

    @property
    def procs_files(self) -> tuple[str, ...]:
        return (f"/fake/cgroup/{self.job_id}/cgroup.procs",)

    def pids(self) -> list[int]:
        return list(self.members)

    def holds_other_than(self, pid: int) -> bool:
        return any(member != pid for member in self.members)

    def kill_all(self, timeout: float = 2.0) -> None:
        self.host.journal.append(f"kill_all {self.job_id}")
        self.members.clear()
        self.host.end_all(self.job_id, exited(None, signal.SIGKILL))

    def usage(self) -> cgroups.ResourceUsage:
        self.host.journal.append(f"usage {self.job_id}")
        if isinstance(self.usage_result, Exception):
            raise self.usage_result
        return self.usage_result

    def remove(self) -> None:
        self.host.undone(f"cgroup {self.job_id}")

    def fits(self, limits: cgroups.Limits) -> bool:
        # As a hybrid host's: a cgroup made without a CPU limit is not in the cpu hierarchy.
        return limits.cpus is None or self.limits.cpus is not None

    def apply_limits(self, limits: cgroups.Limits) -> None:
        self.host._maybe_fail("apply_limits")
        self.limits = limits


@dataclass
class FakeProcess:
    host: FakeJailHost
    pid: int
    job_id: str
    #: How the journal names it: "process <job>", or "standby <jail>" for a pool jail's.
    what: str
    signals: list[int] = field(default_factory=list)
    closed: bool = False

    def send_signal(self, sig: int) -> bool:
        """As a pidfd's: False once the process has ended and been collected."""
        self.signals.append(sig)
        future = self.host.exit_future(self.pid)
        if future is not None and future.done():
            return False
        if sig in self.host.fatal_signals:
            self.host.end(self.pid, exited(None, sig))
        return True

    def close(self) -> None:
        self.closed = True
        self.host.undone(self.what)


class FakeJailHost:
    """``JailHost`` for unit tests; see the module docstring."""

    def __init__(self) -> None:
        #: What fork_server_health() answers.
        self.fork_server = ForkServerHealth(state="up", restarts=0, last_exit=None)
        self.journal: list[str] = []
        self.made: list[str] = []
        self.undone_order: list[str] = []
        self.fail_at: str | None = None
        self.cgroups: dict[str, FakeCgroup] = {}
        self.netns: set[str] = set()
        self.leftovers_cgroups: list[str] = []
        self.leftovers_netns: list[str] = []
        self.sockets: list[socket.socket] = []
        #: The far end of each jail's fake NFLOG socket, by netns name.
        self.nflog_peers: dict[str, socket.socket] = {}
        self.processes: dict[int, FakeProcess] = {}
        self.requests: list[JobPlan] = []
        self.homes: dict[str, tuple[int, int, int]] = {}
        #: Every HOME made, by path: (uid, gid, size) as it was last made.
        self.homes_made: dict[str, tuple[int, int, int]] = {}
        #: Bind sources opened: (path, credentials, access).
        self.bind_opens: list[tuple[str, Credentials, BindAccess]] = []
        self.source_fds: list[list[int]] = []
        self.rules: list[JailRules] = []
        #: The file-system base each standby was forked to build.
        self.standby_bases: list[FsPlan] = []
        #: Signals after which a fake process is gone (SIGKILL always; tests add SIGTERM).
        self.fatal_signals: set[int] = {signal.SIGKILL}
        #: When set, every spawned process exits at once with this status.
        self.exit_at_once: ExitStatus | None = None
        #: What every spawned process writes to its stdout and stderr before it runs on.
        self.output: tuple[bytes, bytes] = (b"", b"")
        #: Whether a spawned job with a terminal sends a pty master, as its init does.
        self.sends_terminal = True
        self._exits: dict[int, asyncio.Future[ExitStatus]] = {}
        self._next_pid = 1000
        self._current_netns: str | None = None

    # ------------------------------------------------------------------ bookkeeping

    def _maybe_fail(self, operation: str) -> None:
        self.journal.append(operation)
        if self.fail_at == operation:
            raise InjectedError(5, f"injected failure at {operation}")

    def _made(self, what: str) -> None:
        self.made.append(what)

    def undone(self, what: str) -> None:
        self.undone_order.append(what)

    def live(self) -> list[str]:
        """What was made and not undone yet."""
        left = list(self.made)
        for what in self.undone_order:
            if what in left:
                left.remove(what)
        return left

    def open_sockets(self) -> list[socket.socket]:
        return [s for s in self.sockets if s.fileno() != -1]

    def close_all(self) -> None:
        for sock in [*self.sockets, *self.nflog_peers.values()]:
            sock.close()

    # ------------------------------------------------------------------ cgroups

    def create_cgroup(self, job_id: str, limits: cgroups.Limits) -> JobCgroupHandle:
        self._maybe_fail("create_cgroup")
        cgroup = FakeCgroup(self, job_id, limits)
        self.cgroups[job_id] = cgroup
        self._made(f"cgroup {job_id}")
        return cgroup

    def leftover_cgroups(self) -> list[str]:
        return list(self.leftovers_cgroups)

    def remove_leftover_cgroup(self, job_id: str) -> None:
        self._maybe_fail("remove_leftover_cgroup")
        self.leftovers_cgroups.remove(job_id)

    def in_job_cgroup(self, proc_cgroup_text: str) -> bool:
        # As CgroupManager.in_job_cgroup, for the parent cgroup "netjail".
        return any(
            "/netjail/j-" in line.split(":", 2)[-1] + "/" for line in proc_cgroup_text.splitlines()
        )

    # ------------------------------------------------------------------ netns

    def in_new_netns(self, name: str, work: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()
        try:
            self._maybe_fail("in_new_netns")
            self.netns.add(name)
            self._made(f"netns {name}")
            self._current_netns = name
            try:
                future.set_result(work())
            except BaseException:
                self.delete_netns(name)  # as the real one does
                raise
            finally:
                self._current_netns = None
        except Exception as e:
            future.set_exception(e)
        return future

    def in_netns(self, name: str, work: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()
        try:
            self._maybe_fail("in_netns")
            assert name in self.netns, f"no netns {name}"
            self._current_netns = name
            try:
                future.set_result(work())
            finally:
                self._current_netns = None
        except Exception as e:
            future.set_exception(e)
        return future

    def netns_inode(self, name: str) -> int:
        self._maybe_fail("netns_inode")
        return 4026530000 + len(self.made)

    def delete_netns(self, name: str) -> None:
        self.netns.discard(name)
        self.undone(f"netns {name}")

    def leftover_netns(self) -> list[str]:
        return list(self.leftovers_netns)

    def kill_netns_processes(self, name: str) -> None:
        self.journal.append(f"kill_netns_processes {name}")
        if name in self.leftovers_netns:
            self.leftovers_netns.remove(name)

    # ------------------------------------------------------------------ in the jail

    def _inside(self) -> str:
        assert self._current_netns is not None, "in-jail call made outside in_new_netns"
        return self._current_netns

    def configure_jail(self) -> None:
        self._inside()
        self._maybe_fail("configure_jail")

    def apply_rules(self, rules: JailRules) -> None:
        self._inside()
        self._maybe_fail("apply_rules")
        self.rules.append(rules)

    def replace_rules(self, rules: JailRules) -> None:
        self._inside()
        self._maybe_fail("replace_rules")
        self.rules.append(rules)

    def open_log_socket(self) -> socket.socket:
        name = self._inside()
        self._maybe_fail("open_log_socket")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        ours.setblocking(False)
        self.sockets.append(ours)
        self.nflog_peers[name] = theirs
        return ours

    def open_listeners(self) -> JailListeners:
        self._inside()
        self._maybe_fail("open_listeners")
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        udp.setblocking(False)
        made = [udp]
        for _ in range(2):
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.bind(("127.0.0.1", 0))
            tcp.listen(8)
            tcp.setblocking(False)
            made.append(tcp)
        self.sockets.extend(made)
        return JailListeners(dns_udp=(made[0],), dns_tcp=(made[1],), proxy=(made[2],))

    # ------------------------------------------------------------------ file system

    def host_layout(self) -> HostLayout:
        return HostLayout(entries=(HostDir("/usr"), HostDir("/etc"), HostLink("/bin", "usr/bin")))

    def make_home(self, path: str, uid: int, gid: int, size_bytes: int) -> None:
        self._maybe_fail("make_home")
        self.homes[path] = (uid, gid, size_bytes)
        self.homes_made[path] = (uid, gid, size_bytes)
        self._made(f"home {path}")

    def remove_home(self, path: str) -> None:
        self.homes.pop(path, None)
        self.undone(f"home {path}")

    def open_bind_source(self, path: str, creds: Credentials, access: BindAccess) -> BindSource:
        self._maybe_fail("open_bind_source")
        self.bind_opens.append((path, creds, access))
        fd = os.open("/", os.O_PATH | os.O_CLOEXEC)
        self._made(f"bind source {path}")
        host = self

        class _Source(BindSource):
            def close(self) -> None:
                super().close()
                host.undone(f"bind source {path}")

        return _Source(path=path, fd=fd, kind="directory")

    # ------------------------------------------------------------------ processes

    async def spawn(self, plan: JobPlan, stdio: list[int], source_fds: list[int]) -> FakeProcess:
        self._maybe_fail("spawn")
        self._start(plan, stdio, source_fds)
        job_id = plan.netns_path.rsplit("netjail-", 1)[-1]
        process = self._new_process(job_id, f"process {job_id}")
        if self.exit_at_once is not None:
            self.end(process.pid, self.exit_at_once)
        return process

    def _start(self, plan: JobPlan, stdio: list[int], source_fds: list[int]) -> None:
        self.requests.append(plan)
        self.source_fds.append(list(source_fds))
        if plan.terminal is not None:
            if self.sends_terminal:
                master, slave = os.openpty()
                with socket.socket(fileno=os.dup(stdio[0])) as channel:
                    socket.send_fds(channel, [b"pty"], [master])
                os.close(master)
                os.close(slave)
        elif len(stdio) == 3:
            for fd, data in zip(stdio[1:], self.output, strict=True):
                if data:
                    os.write(fd, data)

    def _new_process(self, job_id: str, what: str) -> FakeProcess:
        self._next_pid += 1
        process = FakeProcess(self, self._next_pid, job_id, what)
        self.processes[process.pid] = process
        self._exits[process.pid] = asyncio.get_running_loop().create_future()
        self._made(what)
        return process

    async def prefork(self, netns_name: str, cgroup: JobCgroupHandle, base: FsPlan) -> FakeProcess:
        self._maybe_fail("prefork")
        self.standby_bases.append(base)
        job_id = netns_name.rsplit("netjail-", 1)[-1]
        return self._new_process(job_id, f"standby {job_id}")

    async def start_standby(
        self, standby: FakeProcess, plan: JobPlan, stdio: list[int], source_fds: list[int]
    ) -> None:
        self._maybe_fail("start_standby")
        assert plan.netns_path.endswith(standby.job_id)
        # As the real standby: only the plan whose base it built.
        assert split_fs_plan(plan.fs)[0] in self.standby_bases
        self._start(plan, stdio, source_fds)
        if self.exit_at_once is not None:
            self.end(standby.pid, self.exit_at_once)

    async def wait(self, pid: int) -> ExitStatus:
        # Shielded: as with the fork server's, a waiter that gives up ends no other's wait.
        return await asyncio.shield(self._exits[pid])

    async def wait_end(self, pid: int) -> JobExit:
        # A fake init has no record to send ahead: its job ends when it exits.
        status = await asyncio.shield(self._exits[pid])
        return JobExit(status.exit_code, status.signal)

    def exit_future(self, pid: int) -> asyncio.Future[ExitStatus] | None:
        return self._exits.get(pid)

    def fork_server_health(self) -> ForkServerHealth:
        return self.fork_server

    def end(self, pid: int, status: ExitStatus) -> None:
        """The fake process ``pid`` exits with ``status`` (once)."""
        future = self._exits.get(pid)
        if future is not None and not future.done():
            future.set_result(status)

    def end_all(self, job_id: str, status: ExitStatus) -> None:
        for pid, process in self.processes.items():
            if process.job_id == job_id:
                self.end(pid, status)
