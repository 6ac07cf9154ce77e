"""Jobs: build a jail, start the job in it, collect its events, end it, report, clean up.

Order matters and every step fails closed: the state record is written first (so a crash
leaves something to clean up), then the cgroup, then the netns with interfaces, ruleset and
NFLOG socket (all from one thread inside the jail), and only then is the job spawned. If any
step fails, what was made is removed and the client gets a JailError; the job never ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import json
import os
import secrets
import signal
import socket
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from netjail.daemon.config import Firewall as FirewallBackend
from netjail.daemon.config import Limits, LogBackend
from netjail.daemon.dnsstub import DnsStub
from netjail.daemon.events import JobEvents, rfc3339
from netjail.daemon.proxy import IPAddress, Proxy
from netjail.dnsanswer import SYNTHETIC_NETWORK, BlockedRcode, SyntheticPool
from netjail.errors import JailError, NetjailError, NotFoundError, RequestError
from netjail.kernel import cgroup as cgroups
from netjail.kernel import firewall, iptables, kmsg, listeners, netns, nflog
from netjail.kernel.cgroup import CgroupManager, JobCgroup
from netjail.kernel.peer import PeerCred, pids_in_netns
from netjail.kernel.spawn import ExitStatus, ForkServer, SpawnedJob, SpawnRequest
from netjail.policy import CidrRule, Policy
from netjail.protocol import AppliedLimits, DomainSummary, Event, Report
from netjail.units import format_size

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NOBODY = 65534
#: Recent events across all jobs kept for ``netjail events`` without --follow.
HISTORY_EVENTS = 10_000
_NFLOG_RECV = 65536


@dataclass(frozen=True)
class JobSpec:
    """A validated request to run one job."""

    argv: list[str]
    env: dict[str, str]
    cwd: str
    uid: int
    gid: int
    owner: PeerCred
    limits: AppliedLimits
    capture_bytes: int | None  # None: stdio is given as fds
    policy: Policy = field(default_factory=lambda: Policy([]))
    #: The job's --add-host entries: resolved without DNS, reachable even if not global.
    job_hosts: Mapping[str, IPAddress] = field(default_factory=dict)
    blocked_dns_answer: BlockedRcode = "NXDOMAIN"


@dataclass
class JailSockets:
    """The daemon's sockets inside one jail, made by the netns thread."""

    nflog: socket.socket | None  # None with log_backend = "kmsg"
    dns_udp: list[socket.socket]
    dns_tcp: list[socket.socket]
    proxy: list[socket.socket]

    def close(self) -> None:
        for sock in [*self.dns_udp, *self.dns_tcp, *self.proxy]:
            sock.close()
        if self.nflog is not None:
            self.nflog.close()


EventSink = Callable[[Event], None]


def may_see(peer: PeerCred, owner_uid: int | None) -> bool:
    """Who may see, follow and kill a job: root, and the uid that ran it (None: nobody knows)."""
    return peer.uid == 0 or (owner_uid is not None and peer.uid == owner_uid)


@dataclass
class _Capture:
    fd: int
    limit: int
    data: bytearray = field(default_factory=bytearray)
    truncated: bool = False
    closed: bool = False


@dataclass(eq=False)
class Job:
    """One job and everything the daemon holds for it."""

    id: str
    spec: JobSpec
    started_wall: float
    started: float
    netns_name: str
    netns_inode: int | None = None
    cgroup: JobCgroup | None = None
    process: SpawnedJob | None = None
    sockets: JailSockets | None = None
    pool: SyntheticPool = field(default_factory=SyntheticPool)
    dns_stub: DnsStub | None = None
    proxy: Proxy | None = None
    events: JobEvents = field(default_factory=JobEvents)
    sinks: list[EventSink] = field(default_factory=list)
    captures: list[_Capture] = field(default_factory=list)
    timed_out: bool = False
    finished: asyncio.Future[Report] | None = None
    #: Set once the jail is torn down and the job is no longer listed.
    removed: asyncio.Event = field(default_factory=asyncio.Event)
    #: Counts NFLOG messages lost before they reached us (sequence gaps, ENOBUFS).
    nflog_seq: nflog.SequenceTracker = field(default_factory=nflog.SequenceTracker)

    @property
    def nflog_sock(self) -> socket.socket | None:
        """The jail's NFLOG socket (None with log_backend = "kmsg", or once torn down)."""
        return self.sockets.nflog if self.sockets is not None else None


class JobManager:
    """Runs jobs; owned by the daemon's one asyncio loop."""

    def __init__(
        self,
        *,
        forkserver: ForkServer,
        cgroups: CgroupManager,
        state_dir: str,
        hide_paths: list[str],
        limits: Limits,
        log: Callable[..., None],
        daemon_hosts: Mapping[str, IPAddress] | None = None,
        firewall_backend: FirewallBackend = "nftables",
        log_backend: LogBackend = "nflog",
    ) -> None:
        self._forkserver = forkserver
        self._cgroups = cgroups
        self._state_dir = os.path.join(state_dir, "jobs")
        self._hide_paths = hide_paths
        self.limits = limits
        self._log = log
        self.jobs: dict[str, Job] = {}
        self.history: deque[Event] = deque(maxlen=HISTORY_EVENTS)
        self.followers: list[Callable[[Event], None]] = []
        self.jobs_total = 0
        self.events_seen = 0
        self.events_lost = 0
        self.daemon_hosts: Mapping[str, IPAddress] = daemon_hosts or {}
        self._backends = (firewall_backend, log_backend)
        self._kmsg: kmsg.KmsgReader | None = None
        self._routing: dict[str, Job] = {}
        os.makedirs(self._state_dir, mode=0o700, exist_ok=True)
        # Every job's /etc/resolv.conf: the stub, on both loopbacks. Bind-mounted read-only.
        self._resolv_conf = os.path.join(state_dir, "resolv.conf")
        with open(self._resolv_conf, "w") as f:
            f.write("nameserver 127.0.0.1\nnameserver ::1\noptions edns0 timeout:2 attempts:2\n")
        os.chmod(self._resolv_conf, 0o644)

    def forget_history(self) -> None:
        """Clear counters and event history (after the start-up self-test)."""
        self.history.clear()
        self.jobs_total = self.events_seen = self.events_lost = 0

    # ------------------------------------------------------------------ lookup

    def visible_jobs(self, peer: PeerCred) -> list[Job]:
        return [j for j in self.jobs.values() if may_see(peer, j.spec.owner.uid)]

    def find(self, job_id: str, peer: PeerCred) -> Job:
        job = self.jobs.get(job_id)
        if job is None or not may_see(peer, job.spec.owner.uid):
            raise NotFoundError(f"no such job: {job_id}")
        return job

    def is_jailed(self, pid: int, netns_inode: int | None) -> bool:
        """Is ``pid`` (a socket peer) a process of some job?

        By its network namespace, or — for a job process that made itself a new netns (e.g.
        in a user namespace) — by its cgroup, which it cannot leave. Unknown counts as jailed.
        """
        if netns_inode is None:
            return True
        if any(netns_inode == job.netns_inode for job in self.jobs.values()):
            return True
        try:
            with open(f"/proc/{pid}/cgroup") as f:
                memberships = f.read()
        except OSError:
            return True
        marker = f"/{self._cgroups.parent_name}/j-"
        return any(marker in line for line in memberships.splitlines())

    # ------------------------------------------------------------------ start

    async def start(self, spec: JobSpec, stdio: list[int], sink: EventSink | None) -> Job:
        """Build the jail and start the job in it; raise JailError (nothing left) on failure.

        ``stdio`` are the job's fds 0-2 when ``spec.capture_bytes`` is None; the caller keeps
        ownership of them.
        """
        job_id = f"j-{secrets.token_hex(4)}"
        now = time.time()
        job = Job(
            id=job_id,
            spec=spec,
            started_wall=now,
            started=time.monotonic(),
            netns_name=f"{netns.NETNS_PREFIX}{job_id}",
        )
        if sink is not None:
            job.sinks.append(sink)
        self._write_state(job)
        # Routed from here on: kernel-log events may arrive before the job is listed.
        self._routing[job_id] = job
        child_fds: list[int] = []
        marks = [time.perf_counter()]
        try:
            job.cgroup = await asyncio.to_thread(
                self._cgroups.create_job,
                job_id,
                cgroups.Limits(
                    memory_bytes=spec.limits.memory_bytes,
                    cpus=spec.limits.cpus,
                    pids=spec.limits.pids,
                ),
            )
            marks.append(time.perf_counter())
            rules = firewall.JailRules(job_id, dns_stub=True, proxied=_proxied_ranges(spec.policy))
            job.sockets = await asyncio.wrap_future(
                netns.run_in_new_netns(job.netns_name, lambda: _build_jail(rules, *self._backends))
            )
            job.netns_inode = netns.netns_inode(netns.netns_path(job.netns_name))
            loop = asyncio.get_running_loop()
            if job.nflog_sock is not None:
                loop.add_reader(job.nflog_sock.fileno(), self._on_nflog, job)
            await self._start_services(job)
            if spec.capture_bytes is None:
                child_stdio = stdio
            else:
                child_stdio = self._make_captures(job, spec.capture_bytes, child_fds)
            request = SpawnRequest(
                argv=spec.argv,
                env=spec.env,
                cwd=spec.cwd,
                uid=spec.uid,
                gid=spec.gid,
                netns_path=netns.netns_path(job.netns_name),
                hide_paths=self._hide_paths,
                cgroup_procs=list(job.cgroup.procs_files),
                bind_files=[(self._resolv_conf, "/etc/resolv.conf")],
            )
            marks.append(time.perf_counter())
            job.process = await self._forkserver.spawn(request, child_stdio)
            marks.append(time.perf_counter())
        except BaseException as e:
            await self._teardown(job)
            if isinstance(e, NetjailError):
                raise
            if isinstance(e, Exception):
                raise JailError(f"cannot build the jail: {e}") from e
            raise
        finally:
            for fd in child_fds:
                os.close(fd)
        self.jobs[job_id] = job
        self.jobs_total += 1
        job.finished = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().create_task(self._supervise(job))
        self._log(
            "info",
            "job started",
            job=job_id,
            pid=job.process.pid,
            uid=spec.uid,
            owner=spec.owner.uid,
            argv=spec.argv,
            cgroup_ms=round((marks[1] - marks[0]) * 1000, 2),
            jail_ms=round((marks[2] - marks[1]) * 1000, 2),
            spawn_ms=round((marks[3] - marks[2]) * 1000, 2),
        )
        return job

    async def _start_services(self, job: Job) -> None:
        """The job's DNS stub and proxy, serving the sockets made inside its jail."""
        assert job.sockets is not None  # noqa: S101 - set by start() just before
        spec = job.spec

        def record(event: Event) -> None:
            self._record(job, event, time.monotonic())

        job.dns_stub = DnsStub(
            job_id=job.id,
            uid=spec.uid,
            policy=spec.policy,
            pool=job.pool,
            blocked_rcode=spec.blocked_dns_answer,
            record=record,
        )
        await job.dns_stub.start(job.sockets.dns_udp, job.sockets.dns_tcp)
        job.proxy = Proxy(
            job_id=job.id,
            uid=spec.uid,
            policy=spec.policy,
            pool=job.pool,
            job_hosts=spec.job_hosts,
            daemon_hosts=self.daemon_hosts,
            record=record,
        )
        await job.proxy.start(job.sockets.proxy)

    def _make_captures(self, job: Job, limit: int, child_fds: list[int]) -> list[int]:
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        child_fds.append(null)
        stdio = [null]
        loop = asyncio.get_running_loop()
        for _ in range(2):
            read_fd, write_fd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            child_fds.append(write_fd)
            # The child's end must block as an inherited pipe normally does.
            os.set_blocking(write_fd, True)
            capture = _Capture(fd=read_fd, limit=limit)
            job.captures.append(capture)
            loop.add_reader(read_fd, self._on_capture, capture)
            stdio.append(write_fd)
        return stdio

    def _on_capture(self, capture: _Capture) -> None:
        _drain_capture(capture)
        if capture.closed:
            asyncio.get_running_loop().remove_reader(capture.fd)

    # ------------------------------------------------------------------ events

    def _on_nflog(self, job: Job) -> None:
        sock = job.nflog_sock
        if sock is None:
            return
        for _ in range(64):  # bounded per wake-up, so one busy job cannot starve the loop
            try:
                data = sock.recv(_NFLOG_RECV)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    # The kernel dropped messages for us (socket buffer full).
                    job.events.lost += job.nflog_seq.overrun()
                    continue
                raise
            self._handle_nflog(job, data)

    def _handle_nflog(self, job: Job, data: bytes) -> None:
        batch = nflog.parse_netlink_messages(data)
        now = time.monotonic()
        for packet in batch.packets:
            if packet.seq is not None:
                job.events.lost += job.nflog_seq.record(packet.seq)
            summary = nflog.parse_ip_packet(packet.payload)
            if summary is not None:
                self._record_packet(
                    job, prefix=packet.prefix, uid=packet.uid, summary=summary, via="nflog", now=now
                )

    def _record_packet(
        self,
        job: Job,
        *,
        prefix: str,
        uid: int | None,
        summary: nflog.PacketSummary,
        via: str,
        now: float,
    ) -> None:
        """One packet the jail's ruleset logged (from NFLOG or the kernel log) as an event."""
        if uid is None:
            return  # the kernel's own packets (no socket): not the job's attempts
        # A DNS packet to a foreign resolver, logged by the divert chain on its way to the
        # stub: it never left, and the stub reports the query itself.
        redirected = prefix.endswith(f" {firewall.DNS_REDIRECT_MARK} ")
        self._record(
            job,
            Event(
                job=job.id,
                time=rfc3339(time.time()),
                kind="dns" if redirected else "egress",
                verdict="redirected" if redirected else "blocked",
                domain=_synthetic_name(job.pool, summary.dst),
                reason="foreign_resolver" if redirected else None,
                proto=summary.proto,
                family=summary.family,
                dst=summary.dst,
                port=summary.port,
                uid=uid,
                count=1,
                via=via,
            ),
            now,
        )

    def attach_kmsg(self, reader: kmsg.KmsgReader) -> None:
        """Take events from the kernel log (log_backend = "kmsg") instead of NFLOG sockets."""
        self._kmsg = reader
        asyncio.get_running_loop().add_reader(reader.fileno(), self._on_kmsg)

    def _on_kmsg(self) -> None:
        if self._kmsg is None:
            return
        records, lost = self._kmsg.read_records()
        if lost:
            # Lost kernel-log records cannot be attributed to a job: every running job may
            # have lost events, so each counts them (an upper bound, never an undercount).
            for running in self._routing.values():
                running.events.lost += lost
        now = time.monotonic()
        for record in records:
            packet = kmsg.parse_logged_packet(record)
            if packet is None:
                continue
            job = self._routing.get(packet.job_id)
            if job is not None:
                self._record_packet(
                    job,
                    prefix=packet.prefix,
                    uid=packet.uid,
                    summary=packet.summary,
                    via="kmsg",
                    now=now,
                )

    def _record(self, job: Job, event: Event, now: float) -> None:
        self.events_seen += 1
        new = job.events.add(event, now)
        if new is None:
            return
        self.history.append(new)
        for sink in list(job.sinks) + [f for f in self.followers]:
            sink(new)

    # ------------------------------------------------------------------ end

    async def _supervise(self, job: Job) -> None:
        if job.process is None or job.finished is None:
            raise JailError(f"job {job.id} supervised before it started")
        status: ExitStatus | None = None
        try:
            wait = asyncio.ensure_future(self._forkserver.wait(job.process.pid))
            timeout = job.spec.limits.timeout_s
            try:
                status = await asyncio.wait_for(asyncio.shield(wait), timeout)
            except TimeoutError:
                job.timed_out = True
                self._log("info", "job timed out", job=job.id, timeout_s=timeout)
                await self._terminate(job, job.spec.limits.kill_grace_s)
                status = await wait
            report = await self._finish(job, status)
            # The client gets its report first; the jail is torn down right after (the job
            # stays listed in `ps` until that is done, so nothing is ever unaccounted for).
            if not job.finished.done():
                job.finished.set_result(report)
            await self._teardown(job)
            self.jobs.pop(job.id, None)
            job.removed.set()
        except BaseException as e:
            self._log("error", "job supervision failed", job=job.id, error=repr(e))
            await self._teardown(job)
            self.jobs.pop(job.id, None)
            job.removed.set()
            if not job.finished.done():
                job.finished.set_exception(JailError(f"job {job.id} failed: {e}"))
            raise

    async def _terminate(self, job: Job, grace: float) -> None:
        """SIGTERM every process of the job, wait ``grace``, then kill what is left."""
        cgroup = job.cgroup
        if cgroup is not None:
            for pid in cgroup.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while cgroup is not None and cgroup.pids() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if cgroup is not None:
            await asyncio.to_thread(cgroup.kill_all)

    async def kill(self, job: Job, sig: int) -> None:
        """Send ``sig`` to the job's main process; SIGKILL kills its whole cgroup."""
        if job.process is not None:
            job.process.send_signal(sig)
        if sig == signal.SIGKILL and job.cgroup is not None:
            await asyncio.to_thread(job.cgroup.kill_all)

    async def _finish(self, job: Job, status: ExitStatus) -> Report:
        cgroup = job.cgroup
        usage = None
        if cgroup is not None:
            # The main process is gone; whatever it left behind (daemons, setsid, nohup) goes too.
            await asyncio.to_thread(cgroup.kill_all)
            usage = await asyncio.to_thread(cgroup.usage)
        # Packets are logged synchronously with the send, so all the job's messages are
        # already queued (NFLOG socket or kernel log): read them before the jail goes.
        if job.nflog_sock is not None:
            self._on_nflog(job)
        self._on_kmsg()
        for capture in job.captures:
            _drain_capture(capture)
        wall = time.monotonic() - job.started
        report = Report(
            job=job.id,
            argv=job.spec.argv,
            uid=job.spec.uid,
            gid=job.spec.gid,
            exit_code=status.exit_code,
            signal=status.signal,
            wall_s=round(wall, 6),
            events=job.events.events,
            lost_events=job.events.lost,
            timed_out=job.timed_out,
            oom_killed=bool(usage and usage.oom_killed),
            cpu_user_s=usage.cpu_user_s if usage else status.cpu_user_s,
            cpu_system_s=usage.cpu_system_s if usage else status.cpu_system_s,
            memory_peak_bytes=usage.memory_peak_bytes if usage else None,
            pids_peak=usage.pids_peak if usage else None,
            limits=job.spec.limits,
        )
        report.domains = summarize_domains(job.events.events)
        if len(job.captures) == 2:
            out, err = job.captures
            report.stdout, report.stdout_truncated = bytes(out.data), out.truncated
            report.stderr, report.stderr_truncated = bytes(err.data), err.truncated
        self.events_lost += job.events.lost
        self._log(
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
        )
        return report

    async def _teardown(self, job: Job) -> None:
        """Remove everything the job had; safe to call on a half-built job."""
        loop = asyncio.get_running_loop()
        if job.dns_stub is not None:
            job.dns_stub.close()
        if job.proxy is not None:
            job.proxy.close()
        if job.nflog_sock is not None:
            with contextlib.suppress(Exception):
                loop.remove_reader(job.nflog_sock.fileno())
        if job.sockets is not None:
            job.sockets.close()
            job.sockets = None
        for capture in job.captures:
            if not capture.closed:
                with contextlib.suppress(Exception):
                    loop.remove_reader(capture.fd)
                os.close(capture.fd)
                capture.closed = True
        if job.process is not None:
            job.process.close()
        await asyncio.to_thread(self._remove_kernel_objects, job.netns_name, job.cgroup)
        self._remove_state(job.id)
        self._routing.pop(job.id, None)

    def _remove_kernel_objects(self, netns_name: str, cgroup: JobCgroup | None) -> None:
        if cgroup is not None:
            cgroup.kill_all()
            cgroup.remove()
        netns.delete_netns(netns_name)

    # ------------------------------------------------------------------ crash safety

    def _write_state(self, job: Job) -> None:
        path = os.path.join(self._state_dir, f"{job.id}.json")
        with open(path, "w") as f:
            json.dump({"job": job.id, "netns": job.netns_name, "started": job.started_wall}, f)

    def _remove_state(self, job_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self._state_dir, f"{job_id}.json"))

    def recover(self) -> list[str]:
        """Remove what jobs recorded in our state dir left behind (after a crash). Blocking.

        Only jobs this daemon's state dir knows: another daemon's jails on the same machine are
        not ours to touch. A record is written before anything of its job is built, so every
        netns, cgroup and process a crashed daemon could leave is found from it.
        """
        removed: list[str] = []
        for entry in sorted(os.listdir(self._state_dir)):
            path = os.path.join(self._state_dir, entry)
            try:
                with open(path) as f:
                    record = json.load(f)
                job_id, netns_name = str(record["job"]), str(record["netns"])
            except (OSError, ValueError, KeyError, TypeError):
                self._log("warning", "unreadable job state record removed", file=entry)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                continue
            if not netns_name.startswith(netns.NETNS_PREFIX) or "/" in netns_name:
                continue  # not a record of ours: never act on an arbitrary path
            removed += self._remove_leftovers(job_id, netns_name)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        return removed

    def _remove_leftovers(self, job_id: str, netns_name: str) -> list[str]:
        removed = []
        if job_id in self._cgroups.leftover_job_ids():
            with contextlib.suppress(Exception):
                leftover = self._cgroups.open_job(job_id)
                leftover.kill_all()
                leftover.remove()
                removed.append(f"cgroup of {job_id}")
        if netns_name in netns.list_netns():
            with contextlib.suppress(OSError):
                for pid in pids_in_netns(netns.netns_inode(netns.netns_path(netns_name))):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            netns.delete_netns(netns_name)
            removed.append(f"netns {netns_name}")
        return removed

    async def shutdown(self) -> None:
        """Kill every running job and wait for their reports."""
        for job in list(self.jobs.values()):
            await self._terminate(job, job.spec.limits.kill_grace_s)
        for job in list(self.jobs.values()):
            if job.finished is not None:
                with contextlib.suppress(Exception):
                    await job.finished


def _drain_capture(capture: _Capture) -> None:
    while not capture.closed:
        try:
            chunk = os.read(capture.fd, 65536)
        except BlockingIOError:
            return
        if not chunk:
            capture.closed = True
            os.close(capture.fd)
            return
        room = capture.limit - len(capture.data)
        if len(chunk) > room:
            capture.truncated = True
        if room > 0:
            capture.data += chunk[:room]


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


def _build_jail(
    rules: firewall.JailRules, firewall_backend: FirewallBackend, log_backend: LogBackend
) -> JailSockets:
    """Runs on the netns thread, inside the new jail: interfaces, ruleset, the daemon's sockets."""
    netns.configure_jail_interfaces()
    _allow_ping_sockets()
    _unpaced_tcp()
    if firewall_backend == "iptables":
        target: iptables.IptablesTarget = "log" if log_backend == "kmsg" else "nflog"
        # iptables-restore is exec'd from this thread, so it runs in this jail's netns.
        iptables.apply_iptables_rules(*iptables.build_iptables_rules(rules, target=target))
    elif log_backend == "kmsg":
        firewall.apply_ruleset(kmsg.build_log_ruleset(rules))
    else:
        firewall.apply_ruleset(firewall.build_ruleset(rules))
    nflog_sock = None
    if log_backend == "nflog":
        try:
            nflog_sock = nflog.open_nflog_socket(firewall.NFLOG_GROUP, firewall.NFLOG_SNAPLEN)
        except OSError as e:
            raise JailError(
                f"cannot receive NFLOG events ({e.strerror}): is nfnetlink_log available?"
            ) from None
    try:
        dns_udp, dns_tcp = listeners.open_dns_sockets()
        try:
            proxy = listeners.open_proxy_listeners()
        except BaseException:
            for sock in dns_udp + dns_tcp:
                sock.close()
            raise
    except OSError as e:
        if nflog_sock is not None:
            nflog_sock.close()
        raise JailError(f"cannot open the jail's DNS stub or proxy sockets: {e.strerror}") from None
    return JailSockets(nflog=nflog_sock, dns_udp=dns_udp, dns_tcp=dns_tcp, proxy=proxy)


def _proxied_ranges(policy: Policy) -> tuple[firewall.ProxiedRange, ...]:
    """TCP the firewall must send to the proxy: the synthetic pool, and every CIDR allow rule."""
    ranges = [firewall.ProxiedRange(SYNTHETIC_NETWORK, None)]
    for rule in policy.allow:
        if isinstance(rule, CidrRule):
            ranges.append(firewall.ProxiedRange(rule.network, rule.ports))
    return tuple(ranges)


def _synthetic_name(pool: SyntheticPool, dst: str) -> str | None:
    try:
        return pool.name_for(ipaddress.ip_address(dst))
    except ValueError:
        return None


def summarize_domains(events: list[Event]) -> dict[str, DomainSummary]:
    """Per domain: allowed and blocked attempts (connections and DNS queries), bytes relayed."""
    summary: dict[str, DomainSummary] = {}
    for event in events:
        if event.domain is None or event.verdict not in ("allowed", "blocked"):
            continue
        entry = summary.setdefault(event.domain, DomainSummary())
        if event.verdict == "allowed":
            entry.allowed += event.count
        else:
            entry.blocked += event.count
        entry.bytes_out += event.bytes_out or 0
        entry.bytes_in += event.bytes_in or 0
    return summary


def applied_limits(
    settings: Limits,
    *,
    memory: int | None,
    cpus: float | None,
    pids: int | None,
    timeout: float | None,
    kill_grace: float | None,
) -> AppliedLimits:
    """Fill in defaults and enforce the daemon's maxima (RequestError above a maximum)."""

    def pick(
        name: str, asked: float | None, default: float | None, maximum: float | None
    ) -> float | None:
        value = asked if asked is not None else default
        if maximum is not None:
            if value is None:
                value = maximum
            elif value > maximum:
                shown = format_size(int(maximum)) if name == "memory" else f"{maximum:g}"
                raise RequestError(f"--{name} above the daemon's maximum of {shown}")
        return value

    mem = pick("memory", memory, settings.default_memory, settings.max_memory)
    cpu = pick("cpus", cpus, settings.default_cpus, settings.max_cpus)
    pid = pick("pids", pids, settings.default_pids, settings.max_pids)
    tmo = pick("timeout", timeout, settings.default_timeout, settings.max_timeout)
    return AppliedLimits(
        memory_bytes=int(mem) if mem is not None else None,
        cpus=cpu,
        pids=int(pid) if pid is not None else None,
        timeout_s=tmo,
        kill_grace_s=kill_grace if kill_grace is not None else settings.kill_grace,
    )
