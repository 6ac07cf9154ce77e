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

from netjail.daemon.dnsstub import DnsStub
from netjail.daemon.intake import EventIntake, EventSink, JobFeed
from netjail.daemon.proxy import Proxy
from netjail.daemon.recovery import StateRecords
from netjail.daemon.report import Capture
from netjail.daemon.spec import JobSpec, PassedStdio
from netjail.dnsanswer import SYNTHETIC_NETWORK
from netjail.errors import JailError, NetjailError
from netjail.jobid import new_job_id
from netjail.kernel import cgroup as cgroups
from netjail.kernel import firewall, netns
from netjail.kernel.backends import LogBackend
from netjail.kernel.host import JailHost, JailListeners, JobCgroupHandle, JobProcess
from netjail.kernel.spawn import SpawnRequest
from netjail.policy import CidrRule, Policy
from netjail.protocol import Report

Log = Callable[..., None]
_CAPTURE_READ = 65536


@dataclass(frozen=True)
class JailContext:
    """What every job's build needs from the daemon; fixed at start-up."""

    host: JailHost
    intake: EventIntake
    records: StateRecords
    log: Log
    log_backend: LogBackend
    #: Host directories every job gets hidden (the daemon's socket and state directories).
    hide_paths: tuple[str, ...]
    #: The file bind-mounted read-only at every job's /etc/resolv.conf: the stub.
    resolv_conf: str


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
            cgroup = await make_cgroup(cleanup_on_fail, ctx, job_id, spec)  # 2
            marks.mark()
            inside = await build_jail(cleanup_on_fail, ctx, job_id, netns_name, spec)  # 3
            inode = ctx.host.netns_inode(netns_name)
            watch_log(cleanup_on_fail, ctx, feed, inside.log)  # 4
            await start_dns_stub(cleanup_on_fail, ctx, feed, spec, inside.listeners)  # 5
            await start_proxy(cleanup_on_fail, ctx, feed, spec, inside.listeners)  # 6
            child_stdio, captures = wire_stdio(always_cleanup, cleanup_on_fail, spec, stdio)  # 7
            marks.mark()
            process = await spawn_process(  # 8
                cleanup_on_fail, ctx, spec, netns_name=netns_name, cgroup=cgroup, stdio=child_stdio
            )
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
        uid=spec.uid,
        owner=spec.owner.uid,
        argv=spec.argv,
        **marks.phases_ms(),
    )
    return Job(
        id=job_id,
        spec=spec,
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


async def make_cgroup(
    stack: AsyncExitStack, ctx: JailContext, job_id: str, spec: JobSpec
) -> JobCgroupHandle:
    """2. The job's cgroup with its limits (defaults for pids and memory come from the spec)."""
    limits = cgroups.Limits(
        memory_bytes=spec.limits.memory_bytes, cpus=spec.limits.cpus, pids=spec.limits.pids
    )
    cgroup = await asyncio.to_thread(ctx.host.create_cgroup, job_id, limits)
    _push_undo(stack, ctx, "cgroup", _in_thread(_kill_and_remove, cgroup))
    return cgroup


async def build_jail(
    stack: AsyncExitStack, ctx: JailContext, job_id: str, netns_name: str, spec: JobSpec
) -> InsideJail:
    """3. The network namespace, and inside it, from its own thread:
    3a. lo, the veth pair and default routes, and the jail's sysctls;
    3b. one atomic ruleset (accept local, DNS to the stub, the synthetic pool and CIDR rules
        to the proxy, log and reject everything else);
    3c. the NFLOG socket (with log_backend = "nflog");
    3d. the DNS stub's and the proxy's listeners.
    """
    host = ctx.host
    rules = firewall.JailRules(job_id, dns_stub=True, proxied=proxied_ranges(spec.policy))

    def inside() -> InsideJail:
        with ExitStack() as on_fail:
            host.configure_jail()  # 3a
            host.apply_rules(rules)  # 3b
            log: LogSource = KernelLogSource()
            if ctx.log_backend == "nflog":
                sock = host.open_log_socket()  # 3c
                on_fail.callback(sock.close)
                log = NflogSource(sock)
            listeners = host.open_listeners()  # 3d
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
    """4. Read the jail's NFLOG socket from the loop (kernel-log jobs are routed by feed)."""
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
    spec: JobSpec,
    listeners: JailListeners,
) -> None:
    """5. The DNS stub, answering allowed names with synthetic addresses."""
    stub = DnsStub(
        job_id=feed.job_id,
        uid=spec.uid,
        policy=spec.policy,
        pool=feed.pool,
        blocked_rcode=spec.blocked_dns_answer,
        record=ctx.intake.recorder(feed),
    )
    stack.callback(stub.close)
    await stub.start(list(listeners.dns_udp), list(listeners.dns_tcp))


async def start_proxy(
    stack: AsyncExitStack,
    ctx: JailContext,
    feed: JobFeed,
    spec: JobSpec,
    listeners: JailListeners,
) -> None:
    """6. The transparent proxy, checking each connection's name before relaying it."""
    proxy = Proxy(
        job_id=feed.job_id,
        uid=spec.uid,
        policy=spec.policy,
        pool=feed.pool,
        job_hosts=spec.job_hosts,
        daemon_hosts=spec.daemon_hosts,
        record=ctx.intake.recorder(feed),
    )
    stack.callback(proxy.close)
    await proxy.start(list(listeners.proxy))


def wire_stdio(
    always: AsyncExitStack, stack: AsyncExitStack, spec: JobSpec, stdio: list[int]
) -> tuple[list[int], tuple[Capture, ...]]:
    """7. The child's fds 0-2: the client's own, or /dev/null and two capture pipes."""
    if isinstance(spec.stdio, PassedStdio):
        return stdio, ()
    limit = spec.stdio.limit
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
    spec: JobSpec,
    *,
    netns_name: str,
    cgroup: JobCgroupHandle,
    stdio: list[int],
) -> JobProcess:
    """8. The job's process, through the fork server: enters the jail, drops privileges, execs."""
    request = SpawnRequest(
        argv=spec.argv,
        env=spec.env,
        cwd=spec.cwd,
        uid=spec.uid,
        gid=spec.gid,
        netns_path=netns.netns_path(netns_name),
        hide_paths=list(ctx.hide_paths),
        cgroup_procs=list(cgroup.procs_files),
        bind_files=[(ctx.resolv_conf, "/etc/resolv.conf")],
    )
    process = await ctx.host.spawn(request, stdio)
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
