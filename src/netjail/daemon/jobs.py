"""The job lifecycle: start (the pipeline), supervise, time out, kill, report, tear down.

``JobManager`` keeps the running jobs and nothing else: events live in the intake, records
in the state directory, the build in netjail.daemon.pipeline. A job is listed from the moment
its process runs until its jail is gone, so nothing is ever unaccounted for; its client gets
the report first, and the teardown happens after, off the critical path.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import signal
import time
from dataclasses import dataclass

from netjail.daemon.intake import EventSink
from netjail.daemon.jobstdio import drain_capture
from netjail.daemon.metrics import DaemonState, Metrics, outcome_of
from netjail.daemon.pipeline import JailContext, Job, NflogSource, start_job
from netjail.daemon.pool import REFILL_AFTER_REPORT_S, JailPool
from netjail.daemon.report import Ending, build_report
from netjail.daemon.spec import JobSpec
from netjail.errors import BusyError, JailError, NotFoundError
from netjail.kernel.cgroup import ResourceUsage
from netjail.kernel.host import JobCgroupHandle
from netjail.kernel.jobplan import JobExit
from netjail.kernel.peer import PeerCred
from netjail.kernel.spawn import ExitStatus
from netjail.protocol import Event, Report

#: How often a graceful stop checks whether the job's processes are gone.
_GRACE_POLL_S = 0.02
#: How long the end waits for an init's reaping (its exit takes milliseconds).
_REAPING_S = 5.0
#: The fds a job holds in the daemon while it is built or runs (measured by bench/load.py: its
#: netns, NFLOG socket, DNS stub and proxy listeners, pidfd and pipes, about 9), and its client's
#: connection.
FDS_PER_JOB = 10
#: The fds kept for all else: the listener, connections without a job, the helpers, the log,
#: state files, and the proxies' upstream connections (not counted per job: a job without
#: network traffic has none). At least this many, or an eighth of the limit if more.
FD_RESERVE = 256


def max_jobs_for(nofile: int) -> int:
    """The default ``max_jobs``: as many jobs as the fd limit ``nofile`` holds, after the
    reserve (at least one)."""
    reserve = max(FD_RESERVE, nofile // 8)
    return max(1, (nofile - reserve) // FDS_PER_JOB)


def _fd_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


#: Jails torn down at once (jobs' and unused pool jails'): each is mostly kernel work on
#: worker threads, and past a few at once they only slow the jobs being built.
TEARDOWNS_AT_ONCE = 4


@dataclass(frozen=True)
class Remains:
    """A finished job's cgroup, read once nothing of the job is left in it."""

    #: None when the host could not give the figures (``usage_error`` says why).
    usage: ResourceUsage | None
    usage_error: str | None


async def read_remains(cgroup: JobCgroupHandle, init_pid: int) -> Remains:
    """Once the job ended (its init's status record came): end whatever of the job is left,
    then read what it used.

    Before its record, the init (``init_pid``, PID 1 of the job's PID namespace, which every
    process of the job is in: none may make a user namespace, so none can leave it) killed and
    reaped every other process of it: the cgroup holds only the init, which is exiting, and
    only a check is needed. A job that left anything else behind anyway is killed now, and
    waited for, on a worker thread: a write to ``cgroup.kill`` takes the kernel's cgroup
    mutex, and waits behind any cgroup migration under way on the host (a pool jail being
    built, say). The check and the usage are reads of the cgroup's files, which take no such
    lock: they run on the loop, with no worker-thread hop.
    """
    if cgroup.holds_other_than(init_pid):
        await asyncio.to_thread(cgroup.kill_all)
    try:
        return Remains(usage=cgroup.usage(), usage_error=None)
    except Exception as e:
        return Remains(usage=None, usage_error=str(e))


def may_see(peer: PeerCred, owner_uid: int | None) -> bool:
    """Who may see, follow and kill a job: root, and the uid that ran it (None: nobody knows)."""
    return peer.uid == 0 or (owner_uid is not None and peer.uid == owner_uid)


class JobManager:
    """Runs jobs; owned by the daemon's one asyncio loop."""

    def __init__(self, ctx: JailContext, max_jobs: int | None = None, pool_size: int = 0) -> None:
        self.ctx = ctx
        self._teardowns = asyncio.Semaphore(TEARDOWNS_AT_ONCE)
        #: Warm jails (jail.pool_size); started by ``start_pool``, once the daemon serves.
        self.pool = JailPool(
            ctx,
            pool_size,
            self._teardowns,
            # Besides the one claiming, which counts as starting.
            others_busy=lambda: self._starting + len(self.jobs) > 1,
        )
        self.jobs: dict[str, Job] = {}
        self.jobs_total = 0
        #: The most jobs built or running at once (``max_jobs``); past it, a new one is busy.
        self.max_jobs = max_jobs if max_jobs is not None else max_jobs_for(_fd_limit())
        #: Jobs being built now: not in ``jobs`` yet, but already holding fds.
        self._starting = 0
        # Strong references: the loop keeps only weak ones to running tasks.
        self._supervisors: set[asyncio.Task[None]] = set()
        #: Counted from the first job on; ``use_metrics`` swaps in the served ones.
        self.metrics = Metrics()
        ctx.intake.observers.append(self._count_event)

    def _pool_ready(self) -> int | None:
        """Warm jails ready now; None without a pool (jail.pool_size = 0)."""
        return self.pool.ready if self.pool.size > 0 else None

    def _count_event(self, event: Event) -> None:
        self.metrics.count_event(event)

    def use_metrics(self, metrics: Metrics) -> None:
        """Count into ``metrics`` from now on (after the self-test: its probe is no client's)."""
        metrics.pool_size = self._pool_ready
        self.metrics = metrics
        intake = self.ctx.intake
        metrics.watch(
            DaemonState(
                jobs_running=lambda: len(self.jobs),
                events_lost=intake.lost_total,
                events_unattributed=intake.unattributed_by_reason,
            )
        )

    # ------------------------------------------------------------------ lookup

    def visible_jobs(self, peer: PeerCred) -> list[Job]:
        return [j for j in self.jobs.values() if may_see(peer, j.spec.owner.uid)]

    def find(self, job_id: str, peer: PeerCred) -> Job:
        job = self.jobs.get(job_id)
        if job is None or not may_see(peer, job.spec.owner.uid):
            raise NotFoundError(f"no such job: {job_id}")
        return job

    def is_jailed(self, cgroup_text: str | None, netns_inode: int | None) -> bool:
        """Is a socket peer a process of some job?

        By its network namespace, or — for a job process that made itself a new netns — by
        its cgroup (``/proc/PID/cgroup``), which it cannot leave. Unknown counts as jailed.
        """
        if netns_inode is None or cgroup_text is None:
            return True
        if any(netns_inode == job.netns_inode for job in self.jobs.values()):
            return True
        return self.ctx.host.in_job_cgroup(cgroup_text)

    # ------------------------------------------------------------------ start

    async def start(self, spec: JobSpec, stdio: list[int], sink: EventSink | None) -> Job:
        """Build the jail, start the job in it and supervise it; JailError if it cannot start,
        BusyError if ``max_jobs`` jobs are built or running already."""
        if len(self.jobs) + self._starting >= self.max_jobs:
            self.metrics.job_start_failures.inc()
            raise BusyError(
                f"netjaild is running as many jobs as it may at once ({self.max_jobs}, its "
                "max_jobs); try again when one has ended"
            )
        self._starting += 1
        began = time.monotonic()
        try:
            job = await start_job(self.ctx, spec, stdio, sink, self.pool)
        except BaseException:
            self.metrics.job_start_failures.inc()
            raise
        finally:
            self._starting -= 1
        self.metrics.count_start(time.monotonic() - began)
        self.jobs[job.id] = job
        self.jobs_total += 1
        task = asyncio.get_running_loop().create_task(self._supervise(job))
        self._supervisors.add(task)
        task.add_done_callback(self._supervisors.discard)
        return job

    # ------------------------------------------------------------------ supervise and end

    async def _supervise(self, job: Job) -> None:
        try:
            ended = await self._wait(job)
            report = await self._finish(job, ended)
            self.metrics.count_end(outcome_of(report))
            if not job.finished.done():
                job.finished.set_result(report)
        except Exception as e:
            self.metrics.count_end("error")
            self.ctx.log("error", "job supervision failed", job=job.id, error=repr(e))
            if not job.finished.done():
                job.finished.set_exception(JailError(f"job {job.id} failed: {e}"))
        finally:
            # After the report: the client has it; the pool replaces what the job's claim took,
            # once the report is written (woken now, its builder would run ahead of the
            # connection's task that sends it); the init's reaping is collected (its exit was
            # still under way), and the jail goes, in reverse build order, a bounded number at
            # once.
            asyncio.get_running_loop().call_later(REFILL_AFTER_REPORT_S, self.pool.refill)
            await self._collect_reaping(job)
            async with self._teardowns:
                await job.teardown.aclose()
            self.jobs.pop(job.id, None)
            job.removed.set()

    async def _collect_reaping(self, job: Job) -> ExitStatus | None:
        """The init's reaping, with its rusage (bounded: None if a fork server that ended took
        it with it)."""
        with contextlib.suppress(Exception):
            return await asyncio.wait_for(self.ctx.host.wait(job.process.pid), _REAPING_S)
        return None

    async def _wait(self, job: Job) -> JobExit:
        """The command's end, with nothing else of the job left running; past the timeout,
        the job is ended (TERM, grace, KILL)."""
        wait = asyncio.ensure_future(self.ctx.host.wait_end(job.process.pid))
        timeout = job.spec.limits.timeout_s
        try:
            return await asyncio.wait_for(asyncio.shield(wait), timeout)
        except TimeoutError:
            job.timed_out = True
            self.ctx.log("info", "job timed out", job=job.id, timeout_s=timeout)
            await self.terminate(job, job.spec.limits.kill_grace_s)
            return await wait

    async def _finish(self, job: Job, ended: JobExit) -> Report:
        reaped = time.perf_counter()
        remains = await read_remains(job.cgroup, job.process.pid)
        usage = remains.usage
        status: ExitStatus | JobExit = ended
        if remains.usage_error is not None:
            self.ctx.log(
                "warning",
                "cannot read the job's resource usage",
                job=job.id,
                error=remains.usage_error,
            )
            # The CPU figures then come from the init's rusage, once it is reaped.
            reaped_status = await self._collect_reaping(job)
            if reaped_status is not None:
                status = reaped_status
        # Packets are logged synchronously with the send, so all the job's messages are
        # already queued (NFLOG socket or kernel log): read them before the jail goes.
        self._read_pending_events(job)
        for capture in job.captures:
            drain_capture(capture)
        ending = Ending(
            status=status,
            usage=usage,
            wall_s=time.monotonic() - job.started,
            timed_out=job.timed_out,
        )
        report = build_report(
            job.id,
            job.spec,
            user=(job.uid, job.gid),
            feed=job.feed,
            ending=ending,
            captures=job.captures,
        )
        self.ctx.log(
            "info",
            "job ended",
            job=job.id,
            exit_code=status.exit_code,
            signal=status.signal,
            wall_s=report.wall_s,
            events=len(report.events),
            lost_events=report.lost_events,
            timed_out=job.timed_out,
            oom_killed=report.oom_killed,
            # From the job's end (its init's status record) to the report: the end's share of
            # the wall.
            finish_ms=round((time.perf_counter() - reaped) * 1000, 2),
        )
        return report

    def _read_pending_events(self, job: Job) -> None:
        if isinstance(job.log, NflogSource):
            self.ctx.intake.drain_nflog(job.feed, job.log.sock)
        self.ctx.intake.read_kmsg()

    async def terminate(self, job: Job, grace: float) -> None:
        """SIGTERM the job, wait ``grace``, then kill what is left of its cgroup.

        The SIGTERM goes to the job's init, which forwards it to every process of the job (to
        the terminal's foreground group when there is one): sent to each pid as well, every
        process would get it twice.
        """
        job.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while job.cgroup.pids() and time.monotonic() < deadline:
            await asyncio.sleep(_GRACE_POLL_S)
        await asyncio.to_thread(job.cgroup.kill_all)

    async def kill(self, job: Job, sig: int) -> None:
        """Send ``sig`` to the job's main process; SIGKILL kills its whole cgroup."""
        job.process.send_signal(sig)
        if sig == signal.SIGKILL:
            await asyncio.to_thread(job.cgroup.kill_all)

    def start_pool(self) -> None:
        """Start keeping warm jails (none with jail.pool_size = 0)."""
        self.pool.start()

    async def shutdown(self) -> None:
        """End every running job (TERM, grace, KILL) and wait until each has its report, and
        destroy the pool's unused jails.

        Jobs whose build was under way are ended too, once they run: their command may have
        started already (a job runs before its build returns)."""
        await self.pool.close()
        ended: dict[str, Job] = {}
        while self._starting or self.jobs.keys() - ended.keys():
            running = [job for job in self.jobs.values() if job.id not in ended]
            if not running:
                await asyncio.sleep(_GRACE_POLL_S)
                continue
            ended.update((job.id, job) for job in running)
            await asyncio.gather(
                *(self.terminate(job, job.spec.limits.kill_grace_s) for job in running),
                return_exceptions=True,
            )
        for job in ended.values():
            with contextlib.suppress(Exception):
                await job.finished
            # And until each jail is gone: the loop ends when this returns, and an undo still
            # queued then (a netns delete, a cgroup removal) would never run, while the later
            # ones (the lease, the record) would, hiding the leftover from recovery.
            await job.removed.wait()
        # Last, the cgroups whose removal failed at their teardown and is still retried.
        await self.ctx.late_removals.close(self.ctx.log)
