"""Stand-ins for testing the daemon's connections, server and start-up without any jail.

``StubJobs`` is the real ``JobManager`` (its lookups, visibility and jail checks are the real
ones) with ``start``, ``kill`` and ``shutdown`` replaced: a started job is a real ``Job`` record
with nothing behind it, which the test finishes when it wants. ``WireClient`` is the client end
of a connection, driven from the test's own event loop; ``Daemon`` holds a ``Server`` over
``StubJobs`` and what the test needs to look at.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import socket
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec

from netjail import protocol as p
from netjail.daemon.config import Config
from netjail.daemon.connection import Connection
from netjail.daemon.intake import EventIntake, EventSink
from netjail.daemon.jobs import JobManager
from netjail.daemon.pipeline import JailContext, Job, KernelLogSource
from netjail.daemon.recovery import StateRecords
from netjail.daemon.server import Server
from netjail.daemon.spec import FixedUser, JobSpec, job_spec
from netjail.daemon.uids import UidLeases, UidRange
from netjail.kernel import cgroup as cgroups
from netjail.kernel.fsplan import HostLayout, PathSource, build_fs_plan
from netjail.kernel.jobplan import JobPlan
from netjail.kernel.peer import PeerCred

from .fakehost import FakeJailHost

T = TypeVar("T")

ROOT = PeerCred(pid=101, uid=0, gid=0)
ALICE = PeerCred(pid=102, uid=1000, gid=1000)
BOB = PeerCred(pid=103, uid=1001, gid=1001)
#: Every stub job's start (wall clock); its RFC 3339 form is STARTED_TEXT.
STARTED_WALL = 1_795_000_000.0
STARTED_TEXT = "2026-11-18T11:06:40.000Z"


def job_plan(**changes: Any) -> JobPlan:
    """A job's plan, for tests of how it travels (it is never run): defaults, with ``changes``."""
    plan = JobPlan(
        argv=["/bin/true"],
        env={"PATH": "/usr/bin"},
        cwd="/",
        uid=61184,
        gid=61184,
        netns_path="/run/netns/netjail-j-1",
        cgroup_procs=[],
        hostname="netjail-j-1",
        fs=build_fs_plan(host=HostLayout(()), home=PathSource("/var/lib/netjail/home/j-1")),
    )
    return msgspec.structs.replace(plan, **changes)


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run a test's coroutine on a fresh loop, bounded so that a hang fails instead of hanging."""

    async def bounded() -> T:
        return await asyncio.wait_for(main, 30)

    return asyncio.run(bounded())


def open_fds() -> set[int]:
    """This process's open file descriptors."""
    return {int(name) for name in os.listdir("/proc/self/fd")}


class RecordingLog:
    """A daemon ``log`` callable that keeps every record."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict[str, object]]] = []

    def __call__(self, level: str, message: str, **fields: object) -> None:
        self.records.append((level, message, fields))

    def messages(self) -> list[str]:
        return [message for _, message, _ in self.records]


def spec_for(peer: PeerCred, argv: list[str] | None = None) -> JobSpec:
    """The spec the daemon makes of a plain run request from ``peer``."""
    return job_spec(p.RunRequest(argv=argv or ["true"]), peer, Config())


def egress_event(port: int, job: str = "j-00000000") -> p.Event:
    """A blocked TCP attempt to 192.0.2.1:``port`` (distinct ports are distinct events)."""
    return p.Event(
        job=job,
        time="2026-11-18T11:06:41.000Z",
        kind="egress",
        verdict="blocked",
        proto="tcp",
        family=4,
        dst="192.0.2.1",
        port=port,
        uid=1000,
        count=1,
        via="nflog",
    )


def report_for(job: Job, exit_code: int = 0) -> p.Report:
    """A plain report of ``job``."""
    return p.Report(
        job=job.id,
        argv=job.spec.argv,
        uid=job.uid,
        gid=job.gid,
        exit_code=exit_code,
        signal=None,
        wall_s=0.5,
        events=list(job.feed.events.events),
        lost_events=0,
    )


@dataclass
class StubCgroup:
    """A job cgroup with no processes."""

    procs_files: tuple[str, ...] = ("/fake/cgroup.procs",)

    def pids(self) -> list[int]:
        return []

    def holds_other_than(self, pid: int) -> bool:
        return False

    def kill_all(self, timeout: float = 2.0) -> None:
        pass

    def usage(self) -> cgroups.ResourceUsage:
        raise AssertionError("a stub job ends by StubJobs.finish: its usage is never read")

    def remove(self) -> None:
        pass


@dataclass
class StubProcess:
    """A job's main process that only records the signals sent to it."""

    pid: int
    signals: list[int] = field(default_factory=list)

    def send_signal(self, sig: int) -> bool:
        self.signals.append(sig)
        return True

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class StartCall:
    """One ``StubJobs.start``: the spec, the stdio fds as they were then, and whether a sink
    (the client's event stream) was given."""

    spec: JobSpec
    stdio: list[os.stat_result]
    streamed: bool


class StubJobs(JobManager):
    """``JobManager`` without jails: see the module docstring."""

    def __init__(self, ctx: JailContext) -> None:
        super().__init__(ctx)
        self.starts: list[StartCall] = []
        self.kills: list[tuple[str, int]] = []
        self.shutdowns = 0
        #: Raised by the next ``start`` (after it is recorded).
        self.start_error: Exception | None = None
        #: Raised by ``kill`` (after it is recorded).
        self.kill_error: Exception | None = None
        #: Recorded into each started job's feed before ``start`` returns (before ``started``).
        self.early_events: list[p.Event] = []
        #: Called with each started job before ``start`` returns.
        self.on_start: Callable[[Job], object] | None = None
        self._made = 0

    def add_job(self, spec: JobSpec, sink: EventSink | None = None) -> Job:
        """A running job of ``spec``, listed and routed, with a feed in the intake."""
        self._made += 1
        job_id = f"j-{self._made:08x}"
        user = spec.user if isinstance(spec.user, FixedUser) else FixedUser(61184, 61184)
        job = Job(
            id=job_id,
            spec=spec,
            uid=user.uid,
            gid=user.gid,
            cwd=spec.cwd,
            started_wall=STARTED_WALL,
            started=0.0,
            netns_name=f"netjail-{job_id}",
            netns_inode=4026540000 + self._made,
            cgroup=StubCgroup(),
            process=StubProcess(pid=2000 + self._made),
            feed=self.ctx.intake.open_feed(job_id, spec.owner.uid, sink),
            log=KernelLogSource(),
            captures=(),
            teardown=AsyncExitStack(),
            finished=asyncio.get_running_loop().create_future(),
        )
        self.jobs[job_id] = job
        self.jobs_total += 1
        return job

    def finish(self, job: Job, report: p.Report | None = None) -> p.Report:
        """End ``job`` as the supervisor does: its report, then unlisted and removed."""
        final = report or report_for(job)
        job.finished.set_result(final)
        self.ctx.intake.close_feed(job.feed)
        self.jobs.pop(job.id, None)
        job.removed.set()
        return final

    async def start(self, spec: JobSpec, stdio: list[int], sink: EventSink | None) -> Job:
        self.starts.append(StartCall(spec, [os.fstat(fd) for fd in stdio], sink is not None))
        if self.start_error is not None:
            raise self.start_error
        job = self.add_job(spec, sink)
        for event in self.early_events:
            self.ctx.intake.record(job.feed, msgspec.structs.replace(event, job=job.id))
        if self.on_start is not None:
            self.on_start(job)
        return job

    async def kill(self, job: Job, sig: int) -> None:
        self.kills.append((job.id, sig))
        if self.kill_error is not None:
            raise self.kill_error

    async def shutdown(self) -> None:
        self.shutdowns += 1


@dataclass
class Daemon:
    """A ``Server`` over ``StubJobs``, and what a test looks at."""

    server: Server
    jobs: StubJobs
    host: FakeJailHost
    intake: EventIntake
    log: RecordingLog

    def close(self) -> None:
        self.server.listener.close()
        self.host.close_all()


def make_daemon(
    state_dir: str, config: Config | None = None, listener: socket.socket | None = None
) -> Daemon:
    """A daemon with no jobs; ``listener`` defaults to an unbound socket (for tests that do
    not accept)."""
    host = FakeJailHost()
    intake = EventIntake()
    log = RecordingLog()
    ctx = JailContext(
        host=host,
        intake=intake,
        records=StateRecords(state_dir),
        log=log,
        log_backend="nflog",
        uids=UidLeases(UidRange(70000, 70009), state_dir, frozenset()),
        homes_dir=os.path.join(state_dir, "homes"),
        resolv_conf=os.path.join(state_dir, "resolv.conf"),
        trust_dir=os.path.join(state_dir, "trust"),
        etc_dir=os.path.join(state_dir, "etc"),
    )
    jobs = StubJobs(ctx)
    server = Server(
        listener=listener or socket.socket(socket.AF_UNIX, socket.SOCK_STREAM),
        jobs=jobs,
        log=log,
        cgroup_mode="hybrid",
        config=config or Config(),
    )
    return Daemon(server=server, jobs=jobs, host=host, intake=intake, log=log)


class WireClient:
    """The client end of a daemon connection, on the running loop."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._buffer = p.FrameBuffer()
        self._frames: deque[bytes] = deque()

    async def send(self, *messages: msgspec.Struct) -> None:
        await self.send_bytes(b"".join(p.encode_message(m) for m in messages))

    async def send_bytes(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    def send_with_fds(self, data: bytes, fds: list[int]) -> None:
        """One ``sendmsg`` of ``data`` with ``fds`` as SCM_RIGHTS (small: it never blocks)."""
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        assert self.sock.sendmsg([data], ancillary) == len(data)

    async def hello(self) -> None:
        await self.send(p.Hello(version=p.PROTOCOL_VERSION))
        reply = await self.receive()
        assert isinstance(reply, p.HelloReply), reply

    async def receive(self) -> p.Reply:
        frame = await self._frame()
        assert frame is not None, "the daemon closed the connection"
        return p.decode_reply(frame)

    async def receive_all(self) -> list[p.Reply]:
        """Every message until the daemon closes its end."""
        replies = []
        while (frame := await self._frame()) is not None:
            replies.append(p.decode_reply(frame))
        return replies

    async def _frame(self) -> bytes | None:
        loop = asyncio.get_running_loop()
        while not self._frames:
            data = await loop.sock_recv(self.sock, 65536)
            if not data:
                return None
            self._frames.extend(self._buffer.feed(data))
        return self._frames.popleft()

    def close(self) -> None:
        self.sock.close()


@dataclass
class Session:
    """One connection served by ``Connection.serve``, and its client."""

    connection: Connection
    client: WireClient
    serving: asyncio.Future[None]


@contextlib.asynccontextmanager
async def session(daemon: Daemon, peer: PeerCred) -> AsyncIterator[Session]:
    """A connection of ``peer`` to ``daemon`` over a socketpair; on exit the client hangs up
    and the connection's own clean-up is awaited."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    connection = Connection(daemon.server, ours, peer)
    serving = asyncio.ensure_future(connection.serve())
    client = WireClient(theirs)
    try:
        yield Session(connection=connection, client=client, serving=serving)
    finally:
        client.close()
        await serving


async def connect(path: str) -> WireClient:
    """A client connected to the Unix socket at ``path``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, path)
    except BaseException:
        sock.close()
        raise
    return WireClient(sock)


def listening_socket(path: str) -> socket.socket:
    """A Unix stream socket bound at ``path`` and listening."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(16)
    return sock
