"""Steps 1-4 of a job: its jail before anything of the job's own is in it.

A jail is a state record, a uid lease, a cgroup, and a network namespace with its ruleset,
its NFLOG socket and the DNS stub's and proxy's listeners inside. ``build_jail_for`` builds
one for a known job (the cold path); ``netjail.daemon.pool`` builds the same jail ahead of any
job, with the base ruleset and no limits, plus a standby init already in its netns and
cgroups, and fits it to the job that claims it. Either way the pipeline
(netjail.daemon.pipeline) gets a ``BuiltJail`` and the undos of everything in it on its stack.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack, ExitStack
from dataclasses import dataclass, field

from netjail.daemon.config import Jail
from netjail.daemon.intake import EventIntake
from netjail.daemon.jobfiles import HomeShape, JobFiles, make_job_files, remove_job_files
from netjail.daemon.lateremoval import LateRemovals
from netjail.daemon.recovery import StateRecords
from netjail.daemon.spec import FixedUser, JobSpec
from netjail.daemon.uids import UidLeases
from netjail.dnsanswer import SYNTHETIC_NETWORK
from netjail.errors import SpawnError
from netjail.jobid import new_job_id
from netjail.kernel import cgroup as cgroups
from netjail.kernel import firewall, netns
from netjail.kernel.backends import LogBackend
from netjail.kernel.fsplan import (
    JOB_HOME,
    FsPlan,
    PathSource,
    TmpfsSizes,
    build_fs_plan,
    split_fs_plan,
)
from netjail.kernel.host import JailHost, JailListeners, JobCgroupHandle, JobProcess
from netjail.policy import CidrRule, Policy

Log = Callable[..., None]
#: How long destroying an unused standby waits for the fork server to report its end.
_STANDBY_EXIT_S = 2.0


@dataclass(frozen=True)
class JailContext:
    """What every job's build needs from the daemon; fixed at start-up."""

    host: JailHost
    intake: EventIntake
    records: StateRecords
    log: Log
    log_backend: LogBackend
    #: The uids root's jobs lease, one each.
    uids: UidLeases
    #: Where each job's HOME (a tmpfs of its own) is made on the host, root only.
    homes_dir: str
    #: The file bind-mounted read-only at every job's /etc/resolv.conf: the stub.
    resolv_conf: str
    #: Where the trust files of jobs that intercept are written, root only.
    trust_dir: str
    #: Where each job's /etc/hosts and /etc/hostname are written, root only.
    etc_dir: str
    #: Job cgroups whose removal failed at their teardown, retried in the background.
    late_removals: LateRemovals = field(default_factory=LateRemovals)


@dataclass(frozen=True)
class NflogSource:
    """The jail's logged packets arrive on its own NFLOG socket."""

    sock: socket.socket


@dataclass(frozen=True)
class KernelLogSource:
    """The jail's logged packets arrive in the kernel log, read once for all jobs."""


LogSource = NflogSource | KernelLogSource


@dataclass(frozen=True)
class InsideJail:
    """What steps 4a-4d made inside the jail."""

    log: LogSource
    listeners: JailListeners


@dataclass(frozen=True)
class BuiltJail:
    """Steps 1-4 done, for job ``job_id``."""

    job_id: str
    netns_name: str
    netns_inode: int
    #: The uid leased with the jail: root's jobs without --uid run as it.
    leased: FixedUser | None
    cgroup: JobCgroupHandle
    inside: InsideJail
    #: A pool jail's init, in the jail's netns and cgroups already, waiting for its plan.
    standby: JobProcess | None
    #: A pool jail's HOME and /etc files, made ahead for its leased uid and default hostname.
    files: JobFiles | None = None


@dataclass
class CgroupRemoval:
    """Whether the job's cgroup could not be removed at its teardown: then its uid stays
    leased (a process of the job may still hold it) until the cgroup is gone, removed later
    in the background (``LateRemovals``) or by recovery at the next start."""

    failed: bool = False
    _then: list[Callable[[], None]] = field(default_factory=list)

    def once_removed(self, then: Callable[[], None]) -> bool:
        """Call ``then`` now, or, if the cgroup could not be removed, once it is gone after
        all; whether it waits."""
        if self.failed:
            self._then.append(then)
            return True
        then()
        return False

    def removed(self) -> None:
        for then in self._then:
            then()
        self._then.clear()


async def build_jail_for(stack: AsyncExitStack, ctx: JailContext, spec: JobSpec) -> BuiltJail:
    """Steps 1-4 for the job ``spec`` asks for, now (the cold path)."""
    job_id = new_job_id()
    netns_name = f"{netns.NETNS_PREFIX}{job_id}"
    removal = CgroupRemoval()
    write_record(stack, ctx, job_id, netns_name, removal)  # 1
    leased = None if isinstance(spec.user, FixedUser) else lease_uid(stack, ctx, job_id, removal)
    cgroup = await make_cgroup(stack, ctx, job_id, limits_of(spec), removal)  # 3
    rules = firewall.JailRules(job_id, dns_stub=True, proxied=proxied_ranges(spec.policy))
    inside = await build_netns(stack, ctx, netns_name, rules)  # 4
    return BuiltJail(
        job_id=job_id,
        netns_name=netns_name,
        netns_inode=ctx.host.netns_inode(netns_name),
        leased=leased,
        cgroup=cgroup,
        inside=inside,
        standby=None,
    )


# ---------------------------------------------------------------------- the steps


def write_record(
    stack: AsyncExitStack,
    ctx: JailContext,
    job_id: str,
    netns_name: str,
    removal: CgroupRemoval,
) -> None:
    """1. The state record, before anything is built: a crash from here on leaves a trace. It
    goes last, and only once the job's cgroup is gone: while that is still being retried, the
    record is what recovery at the next start finds it by."""
    ctx.records.write(job_id, netns_name, time.time())
    stack.callback(removal.once_removed, functools.partial(ctx.records.remove, job_id))


def lease_uid(
    stack: AsyncExitStack, ctx: JailContext, job_id: str, removal: CgroupRemoval
) -> FixedUser:
    """2. A uid of the job range. It goes back only after the cgroup is gone (its undo runs
    after the cgroup's, and not at all if that failed), so no process of the job can still
    hold it."""
    lease = ctx.uids.lease(job_id)

    def release() -> None:
        if removal.once_removed(functools.partial(ctx.uids.release, lease)):
            ctx.log("warning", "uid kept leased: the job's cgroup is still there", uid=lease.uid)

    stack.callback(release)
    return FixedUser(lease.uid, lease.gid)


async def make_cgroup(
    stack: AsyncExitStack,
    ctx: JailContext,
    job_id: str,
    limits: cgroups.Limits,
    removal: CgroupRemoval,
) -> JobCgroupHandle:
    """3. The job's cgroup with ``limits``."""
    cgroup = await asyncio.to_thread(ctx.host.create_cgroup, job_id, limits)

    async def remove() -> None:
        try:
            await asyncio.to_thread(_kill_and_remove, cgroup)
        except BaseException as e:
            # Not given up on: retried in the background, its uid and record kept meanwhile.
            removal.failed = True
            retry = functools.partial(_kill_and_remove, cgroup)
            ctx.late_removals.add(job_id, retry, removal.removed, ctx.log, error=str(e))
            if not isinstance(e, Exception):
                raise

    push_undo(stack, ctx, "cgroup", remove)
    return cgroup


async def build_netns(
    stack: AsyncExitStack, ctx: JailContext, netns_name: str, rules: firewall.JailRules
) -> InsideJail:
    """4. The network namespace, and inside it, from its own thread:
    4a. lo, the jail's link (an ifb) and default routes, and the jail's sysctls;
    4b. one atomic ruleset (accept local, DNS to the stub, the synthetic pool and CIDR rules
        to the proxy, log and reject everything else);
    4c. the NFLOG socket (with log_backend = "nflog");
    4d. the DNS stub's and the proxy's listeners.
    """
    host = ctx.host

    def inside() -> InsideJail:
        with ExitStack() as on_fail:
            host.configure_jail()  # 4a
            host.apply_rules(rules)  # 4b
            log: LogSource = KernelLogSource()
            if ctx.log_backend == "nflog":
                sock = host.open_log_socket()  # 4c
                on_fail.callback(sock.close)
                log = NflogSource(sock)
            listeners = host.open_listeners()  # 4d
            on_fail.pop_all()
        return InsideJail(log=log, listeners=listeners)

    # The netns is deleted by in_new_netns itself when inside() fails.
    made = await asyncio.wrap_future(host.in_new_netns(netns_name, inside))
    push_undo(stack, ctx, "netns", in_thread(host.delete_netns, netns_name))
    stack.callback(made.listeners.close)
    if isinstance(made.log, NflogSource):
        stack.callback(made.log.sock.close)
    return made


async def prefork_standby(
    stack: AsyncExitStack,
    ctx: JailContext,
    netns_name: str,
    cgroup: JobCgroupHandle,
    base: FsPlan,
) -> JobProcess:
    """4e (pool jails only). The jail's init, forked now into its netns and cgroups, where it
    builds ``base`` of its job's file system and waits for the job's plan. Unused, it is
    killed and its end collected before the cgroup goes."""
    process = await ctx.host.prefork(netns_name, cgroup, base)

    async def end() -> None:
        try:
            # False once it was reaped (its job's end was collected by the supervisor).
            if process.send_signal(signal.SIGKILL):
                # A fork server that ended took the standby's exit with it: nothing to collect.
                with contextlib.suppress(TimeoutError, SpawnError):
                    await asyncio.wait_for(ctx.host.wait(process.pid), _STANDBY_EXIT_S)
        finally:
            process.close()

    push_undo(stack, ctx, "standby", end)
    return process


async def make_files(
    stack: AsyncExitStack, ctx: JailContext, job_id: str, shape: HomeShape, hostname: str
) -> JobFiles:
    """9, 9a (for a cold job, or ahead in a pool jail). The job's HOME (empty, writable by
    the job only, a tmpfs of its own) and its /etc/hosts and /etc/hostname, which know its
    hostname; in one worker-thread hop, and gone after."""
    host = ctx.host
    files = await asyncio.to_thread(
        make_job_files,
        host,
        homes_dir=ctx.homes_dir,
        etc_dir=ctx.etc_dir,
        job_id=job_id,
        shape=shape,
        hostname=hostname,
    )
    push_undo(stack, ctx, "home and /etc files", in_thread(remove_job_files, host, files))
    return files


# ---------------------------------------------------------------------- helpers


def fs_sizes(jail: Jail) -> TmpfsSizes:
    """The sizes of a job's tmpfs mounts, from the ``[jail]`` settings it was asked under."""
    return TmpfsSizes(
        tmp=jail.tmp_size, var_tmp=jail.var_tmp_size, run=jail.run_size, dev_shm=jail.dev_shm_size
    )


def base_fs_plan(ctx: JailContext, sizes: TmpfsSizes) -> FsPlan:
    """The part of every job's file system that is the same for all (``split_fs_plan``)."""
    whole = build_fs_plan(host=ctx.host.host_layout(), home=PathSource(JOB_HOME), sizes=sizes)
    return split_fs_plan(whole)[0]


def limits_of(spec: JobSpec) -> cgroups.Limits:
    """The cgroup limits of the job (defaults for pids and memory come from the spec)."""
    return cgroups.Limits(
        memory_bytes=spec.limits.memory_bytes, cpus=spec.limits.cpus, pids=spec.limits.pids
    )


def proxied_ranges(policy: Policy) -> tuple[firewall.ProxiedRange, ...]:
    """TCP the firewall must send to the proxy: the synthetic pool, and every CIDR allow rule."""
    ranges = [firewall.ProxiedRange(SYNTHETIC_NETWORK, None)]
    for rule in policy.allow:
        if isinstance(rule, CidrRule):
            ranges.append(firewall.ProxiedRange(rule.network, rule.ports))
    return tuple(ranges)


def _kill_and_remove(cgroup: JobCgroupHandle) -> None:
    cgroup.kill_all()
    cgroup.remove()


def in_thread(func: Callable[..., object], *args: object) -> Callable[[], Awaitable[object]]:
    """An undo that runs ``func(*args)`` on a worker thread."""

    async def run() -> object:
        return await asyncio.to_thread(func, *args)

    return run


def push_undo(
    stack: AsyncExitStack, ctx: JailContext, what: str, undo: Callable[[], Awaitable[object]]
) -> None:
    """Register an undo that logs its own failure: one undo failing must not stop the others,
    nor hide the error that made the build fail."""

    async def guarded() -> None:
        try:
            await undo()
        except Exception as e:
            ctx.log("error", "cannot remove a job's resource", resource=what, error=str(e))

    stack.push_async_callback(guarded)
