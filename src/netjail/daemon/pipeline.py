"""A job is a list of steps: each sets one thing up and registers its undo.

``start_job`` below is the whole list, top to bottom, the way nsjail's ``containProc`` reads.
The composition is trio's ``_open_process``: two exit stacks. ``cleanup_on_fail`` collects
each step's undo; if step k fails, leaving the ``async with`` runs the undos of steps k-1 … 1
in reverse, and the client gets a ``JailError`` naming what failed: the job never ran, and
nothing is left. On success ``pop_all()`` hands the undos to the running ``Job`` as its
``teardown``, which the supervisor runs after the report. ``always_cleanup`` holds what is
released either way (the child's ends of the capture pipes, once the child has its own).

Steps 3a-3d run on the jail's netns thread (a socket keeps the netns it was made in), with
their own exit stack; every other step runs on the daemon's loop. Kernel work goes through
``JailHost`` (netjail.kernel.host), the seam the unit tests fake.

To add a step: write a function that sets up one thing and pushes its undo on the stack,
and call it at its place in ``start_job``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack, ExitStack
from dataclasses import dataclass, field

from netjail.daemon.certauthority import JobCA
from netjail.daemon.dnsstub import DnsStub
from netjail.daemon.intake import EventIntake, EventSink, JobFeed
from netjail.daemon.interception import Interception
from netjail.daemon.proxy import Proxy
from netjail.daemon.recovery import StateRecords
from netjail.daemon.report import Capture
from netjail.daemon.spec import FixedUser, JobSpec, PassedStdio
from netjail.daemon.stdinfeed import open_stdin_feed
from netjail.daemon.trust import TrustFiles, remove_trust_files, write_trust_files
from netjail.daemon.uids import UidLeases
from netjail.dnsanswer import SYNTHETIC_NETWORK
from netjail.errors import JailError, NetjailError
from netjail.jobid import new_job_id
from netjail.kernel import cgroup as cgroups
from netjail.kernel import firewall, netns
from netjail.kernel.backends import LogBackend
from netjail.kernel.fsplan import (
    JOB_HOME,
    Bind,
    FdSource,
    FsPlan,
    PathSource,
    TmpfsSizes,
    build_fs_plan,
    shows_path,
)
from netjail.kernel.host import JailHost, JailListeners, JobCgroupHandle, JobProcess
from netjail.kernel.jobplan import JobPlan, job_hostname
from netjail.kernel.pathcheck import BindSource, Credentials
from netjail.kernel.peer import peer_groups
from netjail.policy import CidrRule, Policy
from netjail.protocol import BindMount, Report

Log = Callable[..., None]
_CAPTURE_READ = 65536
#: The daemon's own binds (config jail.binds) are opened as root, with the same symlink rules.
ROOT_CREDENTIALS = Credentials(0, 0, frozenset())


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
    """What steps 3a-3d made inside the jail."""

    log: LogSource
    listeners: JailListeners


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
    ctx: JailContext, spec: JobSpec, stdio: list[int], sink: EventSink | None
) -> Job:
    """Build the jail and start the job in it; JailError (and nothing left) on any failure.

    ``stdio`` are the job's fds 0-2 when ``spec.stdio`` is PassedStdio; the caller keeps
    ownership of them.
    """
    job_id = new_job_id()
    netns_name = f"{netns.NETNS_PREFIX}{job_id}"
    started_wall, started = time.time(), time.monotonic()
    marks = _Marks()
    try:
        async with AsyncExitStack() as always_cleanup, AsyncExitStack() as cleanup_on_fail:
            feed = open_feed(cleanup_on_fail, ctx, job_id, spec, sink)
            write_record(cleanup_on_fail, ctx, job_id, netns_name, started_wall)  # 1
            removal = CgroupRemoval()
            user = lease_uid(cleanup_on_fail, ctx, job_id, spec, removal)  # 2
            cgroup = await make_cgroup(cleanup_on_fail, ctx, job_id, spec, removal)  # 3
            feed.owners.list_pids = cgroup.pids  # events name their process, from the cgroup
            marks.mark()
            inside = await build_jail(cleanup_on_fail, ctx, job_id, netns_name, spec)  # 4
            inode = ctx.host.netns_inode(netns_name)
            watch_log(cleanup_on_fail, ctx, feed, inside.log)  # 5
            await start_dns_stub(  # 6
                cleanup_on_fail, ctx, feed, user=user, spec=spec, listeners=inside.listeners
            )
            trust = await make_trust(cleanup_on_fail, ctx, job_id, spec)  # 7a
            await start_proxy(  # 7
                cleanup_on_fail,
                ctx,
                feed,
                user=user,
                spec=spec,
                listeners=inside.listeners,
                trust=trust,
            )
            home = await make_home(cleanup_on_fail, ctx, job_id, user, spec)  # 8
            sources = await open_binds(always_cleanup, ctx, spec)  # 9
            plan = plan_job(  # 10
                ctx,
                job_id,
                spec,
                user=user,
                netns_name=netns_name,
                cgroup=cgroup,
                home=home,
                sources=sources,
                trust=trust,
            )
            child_stdio, captures = wire_stdio(always_cleanup, cleanup_on_fail, spec, stdio)  # 11
            marks.mark()
            process = await spawn_process(cleanup_on_fail, ctx, plan, child_stdio, sources)  # 12
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
        netns_name=netns_name,
        netns_inode=inode,
        cgroup=cgroup,
        process=process,
        feed=feed,
        log=inside.log,
        captures=captures,
        teardown=teardown,
        finished=asyncio.get_running_loop().create_future(),
    )


# ---------------------------------------------------------------------- the steps


def open_feed(
    stack: AsyncExitStack, ctx: JailContext, job_id: str, spec: JobSpec, sink: EventSink | None
) -> JobFeed:
    """0. Where the job's events go: routed from now on, since they may come before it runs."""
    feed = ctx.intake.open_feed(job_id, spec.owner.uid, sink)
    stack.callback(ctx.intake.close_feed, feed)
    return feed


def write_record(
    stack: AsyncExitStack, ctx: JailContext, job_id: str, netns_name: str, started: float
) -> None:
    """1. The state record, before anything is built: a crash from here on leaves a trace."""
    ctx.records.write(job_id, netns_name, started)
    stack.callback(ctx.records.remove, job_id)


@dataclass
class CgroupRemoval:
    """Whether the job's cgroup could not be removed: then its uid stays leased (a process of
    the job may still hold it) until recovery at the next start removes the cgroup."""

    failed: bool = False


def lease_uid(
    stack: AsyncExitStack,
    ctx: JailContext,
    job_id: str,
    spec: JobSpec,
    removal: CgroupRemoval,
) -> FixedUser:
    """2. Who the job runs as. A leased uid goes back only after the cgroup is gone (its undo
    runs after the cgroup's, and not at all if that failed), so no process of this job can
    still hold it."""
    if isinstance(spec.user, FixedUser):
        return spec.user
    lease = ctx.uids.lease(job_id)

    def release() -> None:
        if removal.failed:
            ctx.log("warning", "uid kept leased: the job's cgroup is still there", uid=lease.uid)
            return
        ctx.uids.release(lease)

    stack.callback(release)
    return FixedUser(lease.uid, lease.gid)


async def make_cgroup(
    stack: AsyncExitStack,
    ctx: JailContext,
    job_id: str,
    spec: JobSpec,
    removal: CgroupRemoval,
) -> JobCgroupHandle:
    """3. The job's cgroup with its limits (defaults for pids and memory come from the spec)."""
    limits = cgroups.Limits(
        memory_bytes=spec.limits.memory_bytes, cpus=spec.limits.cpus, pids=spec.limits.pids
    )
    cgroup = await asyncio.to_thread(ctx.host.create_cgroup, job_id, limits)

    async def remove() -> None:
        try:
            await asyncio.to_thread(_kill_and_remove, cgroup)
        except BaseException:
            removal.failed = True
            raise

    _push_undo(stack, ctx, "cgroup", remove)
    return cgroup


async def build_jail(
    stack: AsyncExitStack, ctx: JailContext, job_id: str, netns_name: str, spec: JobSpec
) -> InsideJail:
    """4. The network namespace, and inside it, from its own thread:
    4a. lo, the veth pair and default routes, and the jail's sysctls;
    4b. one atomic ruleset (accept local, DNS to the stub, the synthetic pool and CIDR rules
        to the proxy, log and reject everything else);
    4c. the NFLOG socket (with log_backend = "nflog");
    4d. the DNS stub's and the proxy's listeners.
    """
    host = ctx.host
    rules = firewall.JailRules(job_id, dns_stub=True, proxied=proxied_ranges(spec.policy))

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
    _push_undo(stack, ctx, "netns", _in_thread(host.delete_netns, netns_name))
    stack.callback(made.listeners.close)
    if isinstance(made.log, NflogSource):
        stack.callback(made.log.sock.close)
    return made


def watch_log(stack: AsyncExitStack, ctx: JailContext, feed: JobFeed, log: LogSource) -> None:
    """5. Read the jail's NFLOG socket from the loop (kernel-log jobs are routed by feed)."""
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
    """6. The DNS stub, answering allowed names with synthetic addresses."""
    stub = DnsStub(
        job_id=feed.job_id,
        uid=user.uid,
        policy=spec.policy,
        pool=feed.pool,
        blocked_rcode=spec.blocked_dns_answer,
        record=ctx.intake.recorder(feed),
        owner_of=feed.owners.owner_of,
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
    """7a. For a job that intercepts: its CA (the key stays in the daemon), and its trust
    bundle files, bound into the jail at step 10."""
    if not spec.http.active:
        return None
    ca = await asyncio.to_thread(JobCA, job_id)
    files = await asyncio.to_thread(write_trust_files, ctx.trust_dir, job_id, ca.cert_pem)
    _push_undo(stack, ctx, "trust", _in_thread(remove_trust_files, files))
    return JobTrust(Interception(spec.http, ca, spec.upstream_ca), files)


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
    """7. The transparent proxy, checking each connection's name before relaying it."""
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


async def make_home(
    stack: AsyncExitStack, ctx: JailContext, job_id: str, user: FixedUser, spec: JobSpec
) -> str:
    """8. The job's HOME: empty, writable by the job only, a tmpfs of its own; gone after."""
    path = os.path.join(ctx.homes_dir, job_id)
    await asyncio.to_thread(ctx.host.make_home, path, user.uid, user.gid, spec.jail.home_size)
    _push_undo(stack, ctx, "home", _in_thread(ctx.host.remove_home, path))
    return path


async def open_binds(
    always: AsyncExitStack, ctx: JailContext, spec: JobSpec
) -> list[tuple[BindMount, BindSource]]:
    """9. The bind sources, opened as the client (the daemon's own as root) without following
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
    home: str,
    sources: list[tuple[BindMount, BindSource]],
    trust: JobTrust | None = None,
) -> JobPlan:
    """10. Everything the job's init needs, as one struct (pure)."""
    trust_binds = trust.files.binds() if trust is not None else []
    fs = build_fs_plan(
        host=ctx.host.host_layout(),
        home=PathSource(home),
        binds=[
            Bind(FdSource(index), bind.target or bind.source, bind.access)
            for index, (bind, _) in enumerate(sources)
        ],
        files=[Bind(PathSource(ctx.resolv_conf), "/etc/resolv.conf", "ro"), *trust_binds],
        sizes=TmpfsSizes(
            tmp=spec.jail.tmp_size,
            var_tmp=spec.jail.var_tmp_size,
            run=spec.jail.run_size,
            dev_shm=spec.jail.dev_shm_size,
        ),
    )
    return JobPlan(
        argv=spec.argv,
        env=spec.env,
        cwd=start_dir(spec, fs),
        uid=user.uid,
        gid=user.gid,
        netns_path=netns.netns_path(netns_name),
        cgroup_procs=list(cgroup.procs_files),
        hostname=spec.hostname or job_hostname(job_id),
        fs=fs,
    )


def start_dir(spec: JobSpec, fs: FsPlan) -> str:
    """The job's cwd: as asked, or its HOME when asked to fall back and the cwd is outside
    everything the plan mounts (then nothing of it would be there)."""
    if spec.cwd_fallback == "error" or shows_path(fs, spec.cwd):
        return spec.cwd
    return JOB_HOME


def wire_stdio(
    always: AsyncExitStack, stack: AsyncExitStack, spec: JobSpec, stdio: list[int]
) -> tuple[list[int], tuple[Capture, ...]]:
    """11. The child's fds 0-2: the client's own, or /dev/null (or a pipe fed the request's
    stdin payload) and two capture pipes."""
    if isinstance(spec.stdio, PassedStdio):
        return stdio, ()
    limit = spec.stdio.limit
    if spec.stdio.stdin is not None:
        child = [open_stdin_feed(always, stack, spec.stdio.stdin)]
    else:
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        always.callback(os.close, null)
        child = [null]
    captures = []
    loop = asyncio.get_running_loop()
    for _ in range(2):
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        always.callback(os.close, write_fd)  # the child has its own copy once spawned
        # The child's end must block as an inherited pipe normally does.
        os.set_blocking(write_fd, True)
        capture = Capture(fd=read_fd, limit=limit)
        stack.callback(close_capture, capture)
        loop.add_reader(read_fd, _on_capture, capture)
        captures.append(capture)
        child.append(write_fd)
    return child, tuple(captures)


async def spawn_process(
    stack: AsyncExitStack,
    ctx: JailContext,
    plan: JobPlan,
    stdio: list[int],
    sources: list[tuple[BindMount, BindSource]],
) -> JobProcess:
    """12. The job, through the fork server: its init (PID 1 of a new PID namespace) enters
    the jail, builds the file system, drops privileges, loads the seccomp filter and spawns
    the command (netjail.kernel.jailinit)."""
    process = await ctx.host.spawn(plan, stdio, [source.fd for _, source in sources])
    stack.callback(process.close)
    return process


# ---------------------------------------------------------------------- helpers


def proxied_ranges(policy: Policy) -> tuple[firewall.ProxiedRange, ...]:
    """TCP the firewall must send to the proxy: the synthetic pool, and every CIDR allow rule."""
    ranges = [firewall.ProxiedRange(SYNTHETIC_NETWORK, None)]
    for rule in policy.allow:
        if isinstance(rule, CidrRule):
            ranges.append(firewall.ProxiedRange(rule.network, rule.ports))
    return tuple(ranges)


def drain_capture(capture: Capture) -> None:
    """Read what the job wrote to a capture pipe, up to EOF or what is there now."""
    while not capture.closed:
        try:
            chunk = os.read(capture.fd, _CAPTURE_READ)
        except BlockingIOError:
            return
        if not chunk:
            close_capture(capture)
            return
        capture.take(chunk)


def close_capture(capture: Capture) -> None:
    if capture.closed:
        return
    capture.closed = True
    with contextlib.suppress(ValueError, RuntimeError):
        asyncio.get_running_loop().remove_reader(capture.fd)
    os.close(capture.fd)


def _on_capture(capture: Capture) -> None:
    drain_capture(capture)


def _kill_and_remove(cgroup: JobCgroupHandle) -> None:
    cgroup.kill_all()
    cgroup.remove()


def _in_thread(func: Callable[..., object], *args: object) -> Callable[[], Awaitable[object]]:
    async def run() -> object:
        return await asyncio.to_thread(func, *args)

    return run


def _push_undo(
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
