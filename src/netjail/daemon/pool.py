"""The warm pool: jails built ahead of any job, each used by one job, then destroyed.

A pool jail is steps 1-4 of a job (netjail.daemon.jailbuild) done before the job exists: its
state record (so crash recovery sweeps it like a job), a leased uid, a cgroup with the
config's default limits, the netns with its link, routes, the base ruleset, the NFLOG socket
and the stub's and proxy's listeners, the job's HOME and /etc files for its uid and default
hostname (netjail.daemon.jobfiles), and a standby init already in the netns and the cgroups
(the costly first migration into a fresh cgroup is paid here, not by the job). ``claim`` fits
one to a job: the job's limits are written to its cgroup unless they are the defaults it was
made with, and its ruleset, if the policy's CIDR rules make it differ from the base one,
replaces the base one in one transaction. A jail that cannot be fitted is destroyed and the
job is built cold; a jail is never shared, never reused, and never weaker than a cold one.

Reuse would carry state from one job to the next (conntrack entries, sockets, files in the
tmpfs mounts, the uid's processes), so every jail is destroyed after its one job, like a cold
one. The pool refills in the background, ``BUILDERS`` jails at a time; destroying unused jails
(at a stop) shares the daemon's bound on teardowns.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass

from netjail.daemon.config import Config, Jail
from netjail.daemon.jailbuild import (
    BuiltJail,
    CgroupRemoval,
    JailContext,
    base_fs_plan,
    build_netns,
    fs_sizes,
    lease_uid,
    limits_of,
    make_cgroup,
    make_files,
    prefork_standby,
    proxied_ranges,
    write_record,
)
from netjail.daemon.jobfiles import HomeShape
from netjail.daemon.spec import JobSpec, applied_limits
from netjail.jobid import new_job_id
from netjail.kernel import cgroup as cgroups
from netjail.kernel import firewall, netns
from netjail.kernel.fsplan import FsPlan, TmpfsSizes
from netjail.kernel.jobplan import job_hostname
from netjail.kernel.spawn import ExitStatus
from netjail.policy import Policy

#: Pool jails built at once. Each build waits mostly on the kernel (the standby's first
#: migration into its cgroup), so two overlap well on two cores without starving the jobs.
BUILDERS = 2
#: A lone job's claimed jail is replaced once its report is out, or this long after the
#: claim if that comes first.
REFILL_AFTER_CLAIM_S = 0.1
#: How long after a lone job's report is made its jail's replacement starts: by then the
#: job's connection has written the report.
REFILL_AFTER_REPORT_S = 0.005
#: After a failed build, the next waits this long, doubling up to the maximum.
RETRY_MIN_S = 0.5
RETRY_MAX_S = 30.0
#: The base ruleset's proxied ranges: the synthetic pool only (a policy without CIDR rules).
BASE_PROXIED = proxied_ranges(Policy([]))


@dataclass
class _PoolJail:
    jail: BuiltJail
    teardown: AsyncExitStack
    #: The part of its job's file system its standby has built (for jobs whose plan has it).
    base: FsPlan
    #: The limits its cgroup was made with (the config's defaults when it was built).
    limits: cgroups.Limits
    #: The standby's end, awaited while the jail waits: one that dies (killed, or its fork
    #: server gone) takes its jail out of the pool. Cancelled at the claim: the job's
    #: supervisor waits for it from then on.
    watch: asyncio.Future[ExitStatus] | None = None


class JailPool:
    """Up to ``size`` warm jails; owned by the daemon's loop (``start`` ... ``close``)."""

    def __init__(
        self,
        ctx: JailContext,
        size: int,
        teardowns: asyncio.Semaphore,
        *,
        others_busy: Callable[[], bool] = lambda: True,
    ) -> None:
        self.ctx = ctx
        #: Whether jobs other than the one claiming are starting or running (the manager's).
        self._others_busy = others_busy
        self.size = size
        self._teardowns = teardowns
        self._idle: deque[_PoolJail] = deque()
        self._building = 0
        self._wanted = asyncio.Event()
        self._builders: list[asyncio.Task[None]] = []
        self._destroying: set[asyncio.Task[None]] = set()
        self._closing = False
        #: The sizes of the jobs' tmpfs mounts: the standbys mount them ahead.
        self.fs_sizes = TmpfsSizes()
        #: The size of the jobs' HOME, made ahead with each jail.
        self.home_size = Jail().home_size
        #: The limits of a job that asks for none (the config's defaults): each jail's cgroup
        #: is made with them, so such a job's claim writes nothing.
        self.limits = cgroups.Limits()
        self.claimed = 0
        self.missed = 0

    @property
    def ready(self) -> int:
        """Warm jails waiting for a job."""
        return len(self._idle)

    def start(self) -> None:
        """Start filling the pool (nothing with ``size`` 0)."""
        if self.size <= 0 or self._builders:
            return
        loop = asyncio.get_running_loop()
        self._builders = [loop.create_task(self._fill()) for _ in range(min(BUILDERS, self.size))]
        self._wanted.set()

    async def close(self) -> None:
        """Stop refilling and destroy every unused jail; returns once they are gone.

        A build under way is not cancelled (a netns thread cannot be stopped half-way, and
        what it made would be left): it finishes and is destroyed with the rest.
        """
        self._closing = True
        self._wanted.set()
        for task in self._builders:
            with contextlib.suppress(Exception):
                await task
        self._builders = []
        while self._idle:
            await self._destroy(self._idle.popleft())
        while self._destroying:
            await asyncio.gather(*self._destroying, return_exceptions=True)

    def use_config(self, config: Config) -> None:
        """The jobs' tmpfs and HOME sizes and default limits from now on (the config, at start
        and at each reload). Warm jails built with other tmpfs sizes or default limits are
        destroyed and rebuilt; one whose HOME has another size gets a new one at its claim."""
        self.home_size = config.jail.home_size
        sizes, limits = fs_sizes(config.jail), default_limits(config)
        if (sizes, limits) == (self.fs_sizes, self.limits):
            return
        self.fs_sizes, self.limits = sizes, limits
        stale, self._idle = list(self._idle), deque()
        for pooled in stale:
            if pooled.watch is not None:
                pooled.watch.cancel()
            self._destroy_later(pooled)
        self._wanted.set()

    # ------------------------------------------------------------------ claim

    async def claim(self, stack: AsyncExitStack, spec: JobSpec) -> BuiltJail | None:
        """A warm jail fitted to ``spec``, its undos on ``stack``; None if there is none to
        have (the caller builds one cold). Its replacement is built at once while other jobs
        start or run; for a lone job, after its report (``refill``), or
        ``REFILL_AFTER_CLAIM_S`` after the claim if that comes first."""
        limits = limits_of(spec)
        pooled = self._take(limits, base_fs_plan(self.ctx, fs_sizes(spec.jail)))
        if pooled is None:
            if self.size > 0:
                self.missed += 1
            return None
        if self._others_busy():
            self._wanted.set()  # the pool serves a load: refill at once
        else:
            # A lone job: a build beside its start would take the loop and a core from it (on
            # two cores the fork server then waited ~0.4 ms for one to read the job's plan).
            # Its report calls ``refill``; a job that runs longer gets it after a while.
            asyncio.get_running_loop().call_later(REFILL_AFTER_CLAIM_S, self._wanted.set)
        try:
            await fit_jail(self.ctx, pooled, spec, limits)
        except Exception as e:
            self.ctx.log(
                "warning",
                "cannot fit a pool jail to a job; it is destroyed and the job built cold",
                jail=pooled.jail.job_id,
                error=str(e),
            )
            await self._destroy(pooled)
            return None
        stack.push_async_callback(pooled.teardown.aclose)
        self.claimed += 1
        return pooled.jail

    def refill(self) -> None:
        """Wake the builders for the jails claims took (a job's report calls it)."""
        self._wanted.set()

    def _take(self, limits: cgroups.Limits, base: FsPlan) -> _PoolJail | None:
        for pooled in self._idle:
            if (
                pooled.base == base
                and pooled.jail.cgroup.fits(limits)
                and overwrites(limits, pooled.limits)
            ):
                self._idle.remove(pooled)
                if pooled.watch is not None:
                    pooled.watch.cancel()
                return pooled
        return None

    # ------------------------------------------------------------------ fill

    async def _fill(self) -> None:
        delay = RETRY_MIN_S
        while not self._closing:
            if len(self._idle) + self._building >= self.size:
                self._wanted.clear()
                await self._wanted.wait()
                continue
            self._building += 1
            try:
                pooled = await self._build()
            except Exception as e:
                self.ctx.log("warning", "cannot build a pool jail", error=str(e), retry_s=delay)
                with contextlib.suppress(TimeoutError):
                    # Woken early by close().
                    await asyncio.wait_for(self._closed(), delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            finally:
                self._building -= 1
            delay = RETRY_MIN_S
            self._idle.append(pooled)
            self._watch(pooled)

    def _watch(self, pooled: _PoolJail) -> None:
        standby = pooled.jail.standby
        if standby is None:
            return
        watch = asyncio.ensure_future(self.ctx.host.wait(standby.pid))
        pooled.watch = watch

        def ended(watch: asyncio.Future[ExitStatus]) -> None:
            if watch.cancelled() or pooled not in self._idle:
                return
            self._idle.remove(pooled)
            error = watch.exception()
            self.ctx.log(
                "warning",
                "a pool jail's standby init ended before any job; the jail is destroyed",
                jail=pooled.jail.job_id,
                error=str(error) if error is not None else None,
            )
            self._destroy_later(pooled)
            self._wanted.set()

        watch.add_done_callback(ended)

    def _destroy_later(self, pooled: _PoolJail) -> None:
        task = asyncio.ensure_future(self._destroy(pooled))
        self._destroying.add(task)
        task.add_done_callback(self._destroying.discard)

    async def _closed(self) -> None:
        while not self._closing:
            self._wanted.clear()
            await self._wanted.wait()

    async def _build(self) -> _PoolJail:
        """Steps 1-4 of a job not asked for yet, and its standby init."""
        job_id = new_job_id()
        netns_name = f"{netns.NETNS_PREFIX}{job_id}"
        async with AsyncExitStack() as on_fail:
            # A build that fails undoes what it made.
            teardown = AsyncExitStack()
            on_fail.push_async_callback(teardown.aclose)
            removal = CgroupRemoval()
            write_record(teardown, self.ctx, job_id, netns_name, removal)  # 1
            leased = lease_uid(teardown, self.ctx, job_id, removal)  # 2
            limits = self.limits
            cgroup = await make_cgroup(teardown, self.ctx, job_id, limits, removal)  # 3
            rules = firewall.JailRules(job_id, dns_stub=True, proxied=BASE_PROXIED)
            inside = await build_netns(teardown, self.ctx, netns_name, rules)  # 4
            shape = HomeShape(leased.uid, leased.gid, self.home_size)
            files = await make_files(teardown, self.ctx, job_id, shape, job_hostname(job_id))  # 9
            base = base_fs_plan(self.ctx, self.fs_sizes)
            standby = await prefork_standby(teardown, self.ctx, netns_name, cgroup, base)  # 4e
            jail = BuiltJail(
                job_id=job_id,
                netns_name=netns_name,
                netns_inode=self.ctx.host.netns_inode(netns_name),
                leased=leased,
                cgroup=cgroup,
                inside=inside,
                standby=standby,
                files=files,
            )
            on_fail.pop_all()
        return _PoolJail(jail, teardown, base, limits)

    async def _destroy(self, pooled: _PoolJail) -> None:
        async with self._teardowns:
            await pooled.teardown.aclose()


def default_limits(config: Config) -> cgroups.Limits:
    """The cgroup limits of a job that asks for none."""
    applied = applied_limits(
        config.limits, memory=None, cpus=None, pids=None, timeout=None, kill_grace=None
    )
    return cgroups.Limits(memory_bytes=applied.memory_bytes, cpus=applied.cpus, pids=applied.pids)


def overwrites(limits: cgroups.Limits, made_with: cgroups.Limits) -> bool:
    """Whether writing ``limits`` replaces every limit a cgroup ``made_with`` has (a limit
    the job does not set would otherwise stay)."""
    return all(
        new is not None or old is None
        for new, old in (
            (limits.memory_bytes, made_with.memory_bytes),
            (limits.cpus, made_with.cpus),
            (limits.pids, made_with.pids),
        )
    )


async def fit_jail(
    ctx: JailContext, pooled: _PoolJail, spec: JobSpec, limits: cgroups.Limits
) -> None:
    """Make a pool jail the one ``spec`` asks for: its limits, unless its cgroup was made with
    them, and its ruleset if the policy needs more than the base one (replaced in one
    transaction)."""
    jail = pooled.jail
    if limits != pooled.limits:
        await asyncio.to_thread(jail.cgroup.apply_limits, limits)
    proxied = proxied_ranges(spec.policy)
    if proxied == BASE_PROXIED:
        return
    host = ctx.host
    rules = firewall.JailRules(jail.job_id, dns_stub=True, proxied=proxied)
    await asyncio.wrap_future(host.in_netns(jail.netns_name, lambda: host.replace_rules(rules)))
