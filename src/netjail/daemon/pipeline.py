"""A job is a list of steps: each sets one thing up and registers its undo.

``start_job`` below is the whole list, top to bottom, the way nsjail's ``containProc`` reads.
The composition is trio's ``_open_process``: two exit stacks. ``cleanup_on_fail`` collects
each step's undo; if step k fails, leaving the ``async with`` runs the undos of steps k-1 … 1
in reverse, and the client gets a ``JailError`` naming what failed: the job never ran, and
nothing is left. On success ``pop_all()`` hands the undos to the running ``Job`` as its
``teardown``, which the supervisor runs after the report. ``always_cleanup`` holds what is
released either way (the child's ends of the capture pipes, once the child has its own).

Steps 1-4, the jail itself (record, uid, cgroup, netns and what is inside it), come from the
warm pool (netjail.daemon.pool) when it has a jail that fits, and are built now otherwise
(netjail.daemon.jailbuild); either way their undos are on the same stack. Kernel work goes
through ``JailHost`` (netjail.kernel.host), the seam the unit tests fake.

To add a step: write a function that sets up one thing and pushes its undo on the stack,
and call it at its place in ``start_job``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field

from netjail.daemon.certauthority import JobCA
from netjail.daemon.decisions import NameDecisions, RequestDecisions
from netjail.daemon.dnsstub import DnsStub
from netjail.daemon.intake import EventSink, JobFeed
from netjail.daemon.interception import Interception, warm_leaves
from netjail.daemon.jailbuild import (
    BuiltJail,
    JailContext,
    KernelLogSource,
    LogSource,
    NflogSource,
    build_jail_for,
    fs_sizes,
    in_thread,
    make_files,
    push_undo,
)
from netjail.daemon.jobfiles import HomeShape, JobFiles, remake_job_files
from netjail.daemon.jobstdio import take_terminal, wire_stdio
from netjail.daemon.pool import JailPool
from netjail.daemon.proxy import Proxy
from netjail.daemon.report import Capture
from netjail.daemon.spec import FixedUser, JobSpec, TerminalStdio
from netjail.daemon.trust import TrustFiles, remove_trust_files, write_trust_files
from netjail.errors import JailError, NetjailError
from netjail.kernel import netns
from netjail.kernel.fsplan import (
    JOB_HOME,
    Bind,
    FdSource,
    FsPlan,
    PathSource,
    build_fs_plan,
    shows_path,
)
from netjail.kernel.host import JailListeners, JobCgroupHandle, JobProcess
from netjail.kernel.jobplan import JobPlan, TerminalPlan, job_hostname
from netjail.kernel.pathcheck import BindSource, Credentials
from netjail.kernel.peer import peer_groups
from netjail.protocol import BindMount, Report

__all__ = [
    "JailContext",
    "Job",
    "KernelLogSource",
    "NflogSource",
    "start_job",
]

Log = Callable[..., None]
#: The daemon's own binds (config jail.binds) are opened as root, with the same symlink rules.
ROOT_CREDENTIALS = Credentials(0, 0, frozenset())


@dataclass(eq=False)
class Job:
    """A running job: every field is set, because it exists only once every step succeeded."""

    id: str
    spec: JobSpec
    #: Who the job runs as (its leased uid, or the fixed one) and where it started.
    uid: int
    gid: int
    cwd: str
    started_wall: float
    started: float
    netns_name: str
    netns_inode: int
    cgroup: JobCgroupHandle
    process: JobProcess
    feed: JobFeed
    log: LogSource
    captures: tuple[Capture, ...]
    #: Every step's undo, run in reverse by the supervisor after the report.
    teardown: AsyncExitStack
    finished: asyncio.Future[Report]
    #: Set once the jail is torn down and the job is no longer listed.
    removed: asyncio.Event = field(default_factory=asyncio.Event)
    timed_out: bool = False
    #: With stdio "tty": the master of the job's pty, for its client (closed at teardown).
    terminal: int | None = None


@dataclass
class _Marks:
    """Start-up phase timings for the "job started" log line."""

    points: list[float] = field(default_factory=lambda: [time.perf_counter()])

    def mark(self) -> None:
        self.points.append(time.perf_counter())

    def phases_ms(self) -> dict[str, float]:
        names = ("cgroup_ms", "jail_ms", "spawn_ms")
        gaps = [b - a for a, b in zip(self.points, self.points[1:], strict=False)]
        return {name: round(gap * 1000, 2) for name, gap in zip(names, gaps, strict=False)}


async def start_job(
    ctx: JailContext,
    spec: JobSpec,
    stdio: list[int],
    sink: EventSink | None,
    pool: JailPool | None = None,
) -> Job:
    """Build the jail and start the job in it; JailError (and nothing left) on any failure.

    ``stdio`` are the job's fds 0-2 when ``spec.stdio`` is PassedStdio; the caller keeps
    ownership of them.
    """
    started_wall, started = time.time(), time.monotonic()
    marks = _Marks()
    try:
        async with AsyncExitStack() as always_cleanup, AsyncExitStack() as cleanup_on_fail:
            jail = await provide_jail(cleanup_on_fail, ctx, spec, pool)  # 1-4
            job_id = jail.job_id
            feed = open_feed(cleanup_on_fail, ctx, job_id, spec, sink)  # 5
            feed.owners.list_pids = jail.cgroup.pids  # events name their process, from the cgroup
            user = spec.user if isinstance(spec.user, FixedUser) else jail.leased
            assert user is not None  # noqa: S101 - build_jail_for and the pool lease for it
            marks.mark()
            inside = jail.inside
            watch_log(cleanup_on_fail, ctx, feed, inside.log)  # 6
            await start_dns_stub(  # 7
                cleanup_on_fail, ctx, feed, user=user, spec=spec, listeners=inside.listeners
            )
            trust = await make_trust(cleanup_on_fail, ctx, job_id, spec)  # 8a
            await start_proxy(  # 8
                cleanup_on_fail,
                ctx,
                feed,
                user=user,
                spec=spec,
                listeners=inside.listeners,
                trust=trust,
            )
            files = await provide_files(cleanup_on_fail, ctx, jail, user, spec)  # 9, 9a
            sources = await open_binds(always_cleanup, ctx, spec)  # 10
            plan = plan_job(  # 11
                ctx,
                job_id,
                spec,
                user=user,
                netns_name=jail.netns_name,
                cgroup=jail.cgroup,
                files=files,
                sources=sources,
                trust=trust,
            )
            wired = wire_stdio(always_cleanup, cleanup_on_fail, spec, stdio)  # 12
            marks.mark()
            process = await spawn_process(  # 13
                cleanup_on_fail, ctx, jail, plan=plan, stdio=wired.child, sources=sources
            )
            terminal = take_terminal(cleanup_on_fail, wired)  # 14
            marks.mark()
            teardown = cleanup_on_fail.pop_all()
    except NetjailError:
        raise
    except Exception as e:
        raise JailError(f"cannot build the jail: {e}") from e
    ctx.log(
        "info",
        "job started",
        job=job_id,
        pid=process.pid,
        uid=user.uid,
        owner=spec.owner.uid,
        argv=spec.argv,
        warm=jail.standby is not None,
        **marks.phases_ms(),
    )
    return Job(
        id=job_id,
        spec=spec,
        uid=user.uid,
        gid=user.gid,
        cwd=plan.cwd,
        started_wall=started_wall,
        started=started,
        netns_name=jail.netns_name,
        netns_inode=jail.netns_inode,
        cgroup=jail.cgroup,
        process=process,
        feed=feed,
        log=inside.log,
        captures=wired.captures,
        teardown=teardown,
        finished=asyncio.get_running_loop().create_future(),
        terminal=terminal,
    )


# ---------------------------------------------------------------------- the steps


async def provide_jail(
    stack: AsyncExitStack, ctx: JailContext, spec: JobSpec, pool: JailPool | None
) -> BuiltJail:
    """1-4. The jail: a warm one from the pool, fitted to the job (limits, rules), or one built
    now: 1 the state record, 2 the uid lease, 3 the cgroup, 4 the netns and, inside it, the
    ruleset, the NFLOG socket and the stub's and proxy's listeners."""
    if pool is not None:
        jail = await pool.claim(stack, spec)
        if jail is not None:
            return jail
    return await build_jail_for(stack, ctx, spec)


def open_feed(
    stack: AsyncExitStack, ctx: JailContext, job_id: str, spec: JobSpec, sink: EventSink | None
) -> JobFeed:
    """5. Where the job's events go: routed from now on, before anything runs in the jail."""
    feed = ctx.intake.open_feed(job_id, spec.owner.uid, sink)
    stack.callback(ctx.intake.close_feed, feed)
    return feed


def watch_log(stack: AsyncExitStack, ctx: JailContext, feed: JobFeed, log: LogSource) -> None:
    """6. Read the jail's NFLOG socket from the loop (kernel-log jobs are routed by feed)."""
    if not isinstance(log, NflogSource):
        return
    loop = asyncio.get_running_loop()
    sock = log.sock
    fileno = sock.fileno()
    loop.add_reader(fileno, ctx.intake.read_nflog, feed, sock)
    stack.callback(loop.remove_reader, fileno)


async def start_dns_stub(
    stack: AsyncExitStack,
    ctx: JailContext,
    feed: JobFeed,
    *,
    user: FixedUser,
    spec: JobSpec,
    listeners: JailListeners,
) -> None:
    """7. The DNS stub, answering allowed names with synthetic addresses."""
    stub = DnsStub(
        job_id=feed.job_id,
        uid=user.uid,
        policy=spec.policy,
        pool=feed.pool,
        blocked_rcode=spec.blocked_dns_answer,
        record=ctx.intake.recorder(feed),
        owner_of=feed.owners.owner_of,
        decisions=(
            NameDecisions(feed.job_id, spec.ask, spec.policy, spec.decision_timeout_s)
            if spec.ask is not None
            else None
        ),
    )
    stack.callback(stub.close)
    await stub.start(list(listeners.dns_udp), list(listeners.dns_tcp))


@dataclass(frozen=True)
class JobTrust:
    """A job that intercepts: what its proxy needs, and the trust files its jail shows."""

    interception: Interception
    files: TrustFiles


async def make_trust(
    stack: AsyncExitStack, ctx: JailContext, job_id: str, spec: JobSpec
) -> JobTrust | None:
    """8a. For a job that intercepts: its CA (the key stays in the daemon), its trust bundle
    files, bound into the jail at step 11, and, in the background, the leaves of the names it
    intercepts exactly."""
    if not spec.http.active:
        return None
    ca = await asyncio.to_thread(JobCA, job_id)
    files = await asyncio.to_thread(write_trust_files, ctx.trust_dir, job_id, ca.cert_pem)
    push_undo(stack, ctx, "trust", in_thread(remove_trust_files, files))
    decisions = (
        RequestDecisions(job_id, spec.ask, spec.decision_timeout_s)
        if spec.ask is not None
        else None
    )
    interception = Interception(spec.http, ca, spec.upstream_ca, decisions)
    # In the background: the job starts without waiting, its first connections seldom do.
    warming = asyncio.ensure_future(warm_leaves(interception))
    stack.callback(warming.cancel)
    return JobTrust(interception, files)


async def start_proxy(
    stack: AsyncExitStack,
    ctx: JailContext,
    feed: JobFeed,
    *,
    user: FixedUser,
    spec: JobSpec,
    listeners: JailListeners,
    trust: JobTrust | None = None,
) -> None:
    """8. The transparent proxy, checking each connection's name before relaying it."""
    proxy = Proxy(
        job_id=feed.job_id,
        uid=user.uid,
        policy=spec.policy,
        pool=feed.pool,
        job_hosts=spec.job_hosts,
        daemon_hosts=spec.daemon_hosts,
        record=ctx.intake.recorder(feed),
        interception=trust.interception if trust is not None else None,
        owner_of=feed.owners.owner_of,
    )
    stack.callback(proxy.close)
    await proxy.start(list(listeners.proxy))


async def provide_files(
    stack: AsyncExitStack, ctx: JailContext, jail: BuiltJail, user: FixedUser, spec: JobSpec
) -> JobFiles:
    """9, 9a. The job's HOME (empty, writable by the job only, a tmpfs of its own) and its
    /etc/hosts and /etc/hostname, which know its hostname; gone after. A pool jail's were made
    ahead: they are taken as they are when they are what this job would get, the part that
    differs is remade otherwise (netjail.daemon.jobfiles)."""
    shape = HomeShape(user.uid, user.gid, spec.jail.home_size)
    hostname = hostname_of(spec, jail.job_id)
    ahead = jail.files
    if ahead is None:
        return await make_files(stack, ctx, jail.job_id, shape, hostname)
    parts = ahead.misfits(shape, hostname)
    if not parts:
        return ahead
    return await asyncio.to_thread(remake_job_files, ctx.host, ahead, parts, shape, hostname)


def hostname_of(spec: JobSpec, job_id: str) -> str:
    """The job's hostname: as asked, or netjail-<job>."""
    return spec.hostname or job_hostname(job_id)


async def open_binds(
    always: AsyncExitStack, ctx: JailContext, spec: JobSpec
) -> list[tuple[BindMount, BindSource]]:
    """10. The bind sources, opened as the client (the daemon's own as root) without following
    symlinks anyone else controls; what is checked is what the child mounts. Closed once the
    fork server has its copies."""
    owner = spec.owner
    client = (
        ROOT_CREDENTIALS
        if owner.uid == 0
        else Credentials(owner.uid, owner.gid, frozenset(peer_groups(owner.pid, owner.gid)))
    )
    opened: list[tuple[BindMount, BindSource]] = []
    for bind in (*spec.daemon_binds, *spec.client_binds):
        creds = ROOT_CREDENTIALS if len(opened) < len(spec.daemon_binds) else client
        source = await asyncio.to_thread(ctx.host.open_bind_source, bind.source, creds, bind.access)
        always.callback(source.close)
        opened.append((bind, source))
    return opened


def plan_job(
    ctx: JailContext,
    job_id: str,
    spec: JobSpec,
    *,
    user: FixedUser,
    netns_name: str,
    cgroup: JobCgroupHandle,
    files: JobFiles,
    sources: list[tuple[BindMount, BindSource]],
    trust: JobTrust | None = None,
) -> JobPlan:
    """11. Everything the job's init needs, as one struct (pure)."""
    trust_binds = trust.files.binds() if trust is not None else []
    fs = build_fs_plan(
        host=ctx.host.host_layout(),
        home=PathSource(files.home),
        binds=[
            Bind(FdSource(index), bind.target or bind.source, bind.access)
            for index, (bind, _) in enumerate(sources)
        ],
        files=[
            Bind(PathSource(ctx.resolv_conf), "/etc/resolv.conf", "ro"),
            *files.etc.binds(),
            *trust_binds,
        ],
        sizes=fs_sizes(spec.jail),
    )
    return JobPlan(
        argv=spec.argv,
        env=spec.env,
        cwd=start_dir(spec, fs),
        uid=user.uid,
        gid=user.gid,
        netns_path=netns.netns_path(netns_name),
        cgroup_procs=list(cgroup.procs_files),
        hostname=hostname_of(spec, job_id),
        fs=fs,
        terminal=(
            TerminalPlan(rows=spec.stdio.rows, cols=spec.stdio.cols)
            if isinstance(spec.stdio, TerminalStdio)
            else None
        ),
    )


def start_dir(spec: JobSpec, fs: FsPlan) -> str:
    """The job's cwd: as asked, or its HOME when asked to fall back and the cwd is outside
    everything the plan mounts (then nothing of it would be there)."""
    if spec.cwd_fallback == "error" or shows_path(fs, spec.cwd):
        return spec.cwd
    return JOB_HOME


async def spawn_process(
    stack: AsyncExitStack,
    ctx: JailContext,
    jail: BuiltJail,
    *,
    plan: JobPlan,
    stdio: list[int],
    sources: list[tuple[BindMount, BindSource]],
) -> JobProcess:
    """13. The job's init (PID 1 of a new PID namespace): a pool jail's standby, already in
    the jail's netns and cgroups, is given the plan; otherwise the fork server starts one,
    which enters them first. Either then builds the file system, drops privileges, loads the
    seccomp filter and spawns the command (netjail.kernel.jailinit)."""
    fds = [source.fd for _, source in sources]
    if jail.standby is not None:
        # The standby's own undo (kill, collect, close) is the pool jail's, on the stack.
        await ctx.host.start_standby(jail.standby, plan, stdio, fds)
        return jail.standby
    process = await ctx.host.spawn(plan, stdio, fds)
    stack.callback(process.close)
    return process
