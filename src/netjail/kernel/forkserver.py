"""The fork server process: the only process that forks jobs.

Why a fork server: the daemon is multi-threaded (namespace builder threads), and forking a
multi-threaded process then running Python before exec can deadlock on locks other threads held
at fork time. So every job is forked from this helper, which stays single-threaded and starts
each with ``jailinit.spawn_job``: the job's init, PID 1 of a new PID namespace, enters the
jail's netns and cgroups, builds the job's file system in new mount, IPC and UTS namespaces,
drops privileges, loads the seccomp filter (compiled here once, before the first job) and
spawns the command. A failure at any step is reported back with the step's name; the job never
runs.

Why exec'd, lean. The daemon starts it as a fresh interpreter (``python -s -P -m
netjail.kernel.forkserver``, see ``netjail.kernel.helperproc``), at start-up and again whenever
one ends, from a daemon that runs threads by then: only exec is safe there. It imports only the
kernel modules a job needs, so each fork of it copies a small process (a fork of the whole
daemon copied every page table of the daemon's heap), and a job's init, forked from it, shows
this short command line as /proc/1/cmdline, not the daemon's (its config, socket and state
paths).

The helper is also a child subreaper, so whatever leaves a job's namespaces is re-parented to
it and reaped: zombies never pile up. It reports every init's exit with the rusage, and, for a
job it forked, the command's status (read from the init's status pipe; a standby's pipe goes to
the daemon, below); the daemon holds a pidfd per job, so signals never reach a recycled pid.

The channel. Its socket (one end of a SOCK_SEQPACKET socketpair) comes as fd 0. Messages are
typed msgspec structs (``ToServer``, ``FromServer``), one per datagram, fds passed with
SCM_RIGHTS; a job's plan, which carries its argv and env, travels in a sealed memfd
(``netjail.kernel.fdpass``), so every datagram is a few bytes. The first message is ``Ready``,
once the seccomp filter is compiled, or ``StartFailed`` with the reason. Both ends are ours:
the daemon validated everything before it got here. A new request is one more struct in the
``ToServer`` union and one more branch in ``_handle``.

Pool jails. ``PreforkRequest`` forks a standby init into a pool jail's netns and cgroups
(``netjail.kernel.standby``) without blocking this loop, which watches each warming
standby's channel beside the daemon's socket. Once the standby is ready, its answer
(``Spawned``) carries its channel, its set-up pipe and its status pipe besides its pidfd: the
daemon gives it its job directly (``netjail.kernel.standbylink``) and reads the job's end
from the status pipe itself; this process only reaps the init and reports the reaping.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
from dataclasses import dataclass, field

import msgspec

from netjail.errors import NetjailError
from netjail.kernel import syscalls
from netjail.kernel.fdpass import read_payload, recv_with_fds, send_with_fds
from netjail.kernel.fsplan import FsPlan
from netjail.kernel.jailinit import ExecHook, StartedJob, read_job_exit, spawn_job
from netjail.kernel.jobplan import JobExit, JobPlan, SpawnFailure, decode_job_exit
from netjail.kernel.prefault import HotPages
from netjail.kernel.seccomp import load_job_filter, prepare_job_filter
from netjail.kernel.standby import (
    StandbyFailed,
    StandbyOutcome,
    StandbyReady,
    StandbyTable,
    fork_standby,
)

#: Every datagram is small: what may be large (a job's plan) comes in a memfd.
MAX_MESSAGE = 1 << 16
#: The kernel's bound on the fds one SCM_RIGHTS message carries (SCM_MAX_FD).
MAX_FDS = 253
#: The largest plan read: argv and env are bounded at 120 KiB by the protocol, the binds by
#: MAX_BINDS; this leaves ample room and still bounds what one plan costs to read.
_MAX_PLAN = 16 << 20


class ExitStatus(msgspec.Struct, frozen=True):
    """How a job's main process ended, and its resource usage (its reaped children included)."""

    exit_code: int | None
    signal: int | None
    cpu_user_s: float
    cpu_system_s: float
    max_rss_bytes: int


class SpawnRequest(msgspec.Struct, frozen=True, tag="spawn"):
    """Start a job. The message's fds: a sealed memfd holding its ``JobPlan`` (msgpack), the
    job's stdio (3), then its bind sources."""

    id: int


class PreforkRequest(msgspec.Struct, frozen=True, tag="prefork"):
    """Fork a standby init (``netjail.kernel.standby``) into the jail at ``netns_path`` and
    ``cgroup_procs``; answered by ``Spawned`` once it is there, waiting, with its pidfd, its
    channel and its set-up pipe's read end (in that order), or by ``SpawnFailed``."""

    id: int
    netns_path: str
    cgroup_procs: list[str]
    #: The part of every job's file system the standby builds ahead (fsplan.split_fs_plan).
    base: FsPlan


class Ready(msgspec.Struct, frozen=True, tag="ready"):
    """The server is serving: the seccomp filter is compiled."""


class StartFailed(msgspec.Struct, frozen=True, tag="start_failed"):
    """The server cannot serve (say, the seccomp filter cannot be compiled); it exits."""

    detail: str


class Spawned(msgspec.Struct, frozen=True, tag="spawned"):
    """The job runs; its pidfd comes with this message (SCM_RIGHTS), and, for a standby, its
    channel, its set-up pipe and (unless its init is already ending) its status pipe after it
    (``PreforkRequest``). A standby's job end is then read by the daemon from that pipe: no
    ``Ended`` comes from here for it, only its ``Exited``, whose exit code and signal are
    then the init's own."""

    id: int
    pid: int


class SpawnFailed(msgspec.Struct, frozen=True, tag="failed"):
    id: int
    failure: SpawnFailure


class Ended(msgspec.Struct, frozen=True, tag="ended"):
    """Job ``pid``'s command ended, and every other process of its PID namespace is killed and
    reaped: its init wrote its status record and is exiting (``Exited`` follows, once it is
    reaped, with the rusage)."""

    pid: int
    exit_code: int | None
    signal: int | None


class Exited(msgspec.Struct, frozen=True, tag="exited"):
    pid: int
    status: ExitStatus


ToServer = SpawnRequest | PreforkRequest
FromServer = Ready | StartFailed | Spawned | SpawnFailed | Ended | Exited
to_server = msgspec.msgpack.Decoder(ToServer)
from_server = msgspec.msgpack.Decoder(FromServer)
plan_decoder = msgspec.msgpack.Decoder(JobPlan)
encode = msgspec.msgpack.encode

#: The steps a job's init runs last before its command is spawned.
_HOOKS = (ExecHook(stage="seccomp filter", run=load_job_filter),)


def _send(sock: socket.socket, message: msgspec.Struct, fds: list[int] | None = None) -> None:
    send_with_fds(sock, encode(message), fds or ())


@dataclass
class _Inits:
    """The jobs' inits (standbys included) and their status pipes, watched (``watched``) until
    the record, or EOF, comes."""

    #: An init's pid -> its status pipe's read end.
    status_fds: dict[int, int] = field(default_factory=dict)
    #: The inits whose pipe is still to be read.
    unread: set[int] = field(default_factory=set)
    #: Records read ahead of the reaping, by pid.
    records: dict[int, bytes] = field(default_factory=dict)
    #: Inits whose status pipe the daemon reads (``hand_over``): their reaping is told alone.
    handed: set[int] = field(default_factory=set)

    def add(self, pid: int, status_fd: int) -> None:
        self.status_fds[pid] = status_fd
        self.unread.add(pid)

    def watched(self) -> list[tuple[int, int]]:
        """(fd, pid) pairs the selector must watch now."""
        return [(self.status_fds[pid], pid) for pid in self.unread]

    def on_status(self, sock: socket.socket, pid: int) -> None:
        """Init ``pid``'s status pipe is readable: with the record, its job ended (say so now);
        EOF alone, it was killed (its reaping says how)."""
        if pid not in self.unread:
            return  # read, or reaped, earlier in the same round of events
        try:
            record = os.read(self.status_fds[pid], 8)
        except BlockingIOError:
            return
        self.unread.discard(pid)
        if not record:
            return
        self.records[pid] = record
        ended = decode_job_exit(record, 0)
        _send(sock, Ended(pid=pid, exit_code=ended.exit_code, signal=ended.signal))

    def hand_over(self, pid: int) -> int | None:
        """Init ``pid``'s status pipe, for the daemon to read from now on (the caller sends
        it and closes this copy); None if its pipe was already read (the init is ending: its
        reaping is reported here, as any other's). From then on only its reaping is told."""
        if pid not in self.unread:
            return None
        self.unread.discard(pid)
        self.handed.add(pid)
        return self.status_fds.pop(pid)

    def reaped(self, pid: int, wait_status: int) -> JobExit | None:
        """How init ``pid``'s job ended, now it is reaped (None: it was no init of ours). For
        a handed-over pipe, the init's own end: the daemon has the record, if one came."""
        if pid in self.handed:
            self.handed.discard(pid)
            return decode_job_exit(b"", wait_status)
        status_fd = self.status_fds.pop(pid, None)
        if status_fd is None:
            return None
        record = self.records.pop(pid, None)
        self.unread.discard(pid)
        try:
            if record is not None:
                return decode_job_exit(record, wait_status)
            return read_job_exit(status_fd, wait_status)
        finally:
            os.close(status_fd)


def _reap(sock: socket.socket, inits: _Inits, standbys: StandbyTable) -> None:
    """Reap every exited child; report jobs' inits with how their command ended (a standby's
    answer still owed goes first)."""
    while True:
        try:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _answer_standby(sock, standbys.forget(pid), inits)
        ended = inits.reaped(pid, status)
        if ended is None:
            continue  # not a job's init: nothing to report
        exit_status = ExitStatus(
            exit_code=ended.exit_code,
            signal=ended.signal,
            cpu_user_s=usage.ru_utime,
            cpu_system_s=usage.ru_stime,
            max_rss_bytes=usage.ru_maxrss * 1024,
        )
        _send(sock, Exited(pid=pid, status=exit_status))


def _start_job(fds: list[int]) -> StartedJob | SpawnFailure:
    """Read the plan from the request's memfd and start the job with the fds after it."""
    if len(fds) < 4:
        detail = f"expected a plan and 3 stdio fds, got {len(fds)} fds"
        return SpawnFailure(stage="plan", errno=0, detail=detail)
    try:
        plan = plan_decoder.decode(read_payload(fds[0], _MAX_PLAN))
    except (ValueError, msgspec.DecodeError) as e:
        return SpawnFailure(stage="plan", errno=0, detail=f"unreadable plan: {e}")
    return spawn_job(plan, fds[1:4], fds[4:], _HOOKS)


def _handle(
    sock: socket.socket,
    request: ToServer,
    fds: list[int],
    inits: _Inits,
    standbys: StandbyTable,
    *,
    hot: HotPages,
) -> None:
    """Serve one request (the fds are closed by the caller)."""
    if isinstance(request, PreforkRequest):
        forked = fork_standby(
            request.id,
            request.netns_path,
            request.cgroup_procs,
            request.base,
            _HOOKS,
            hot=hot.runs,
            learn=hot.wants_learner(),
        )
        if isinstance(forked, SpawnFailure):
            _send(sock, SpawnFailed(id=request.id, failure=forked))
            return
        inits.add(forked.pid, forked.status_fd)
        standbys.add(forked)
        if forked.learn_fd is not None:
            hot.add_learner(forked.learn_fd, forked.pid)
        return
    outcome = _start_job(fds)
    if isinstance(outcome, SpawnFailure):
        _send(sock, SpawnFailed(id=request.id, failure=outcome))
        return
    inits.add(outcome.init_pid, outcome.status_fd)
    pidfd = os.pidfd_open(outcome.init_pid)
    try:
        _send(sock, Spawned(id=request.id, pid=outcome.init_pid), [pidfd])
    finally:
        os.close(pidfd)


def serve(sock: socket.socket) -> None:
    """The fork server's main loop; returns when the daemon's end of the socket closes."""
    syscalls.prctl(syscalls.PR_SET_CHILD_SUBREAPER, 1)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    standbys = StandbyTable()
    inits = _Inits()
    hot = HotPages()
    watching: dict[int, _Watched] = {}  # a watched fd of an init -> what it is
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    _send(sock, Ready())
    while True:
        for key, _ in selector.select():
            if key.fileobj == wake_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 4096)
                _reap(sock, inits, standbys)
                continue
            if key.fileobj != sock:
                watched = watching.get(key.fd)
                if isinstance(watched, _StandbyFd):
                    _answer_standby(sock, standbys.on_readable(watched.pid), inits)
                elif isinstance(watched, _StatusFd):
                    inits.on_status(sock, watched.pid)
                elif isinstance(watched, _LearnFd):
                    hot.on_readable(key.fd)
                continue
            try:
                data, fds = recv_with_fds(sock, MAX_MESSAGE, MAX_FDS)
            except InterruptedError:
                continue
            if not data:
                return
            try:
                _handle(sock, to_server.decode(data), fds, inits, standbys, hot=hot)
            finally:
                for fd in fds:
                    os.close(fd)
            _reap(sock, inits, standbys)
        _watch_inits(selector, watching, standbys, inits, hot)


def _answer_standby(sock: socket.socket, outcome: StandbyOutcome | None, inits: _Inits) -> None:
    if isinstance(outcome, StandbyReady):
        try:
            _pass_standby(sock, outcome, inits)
        finally:
            outcome.channel.close()
            os.close(outcome.report_fd)
    elif isinstance(outcome, StandbyFailed):
        # The init ends by itself (a failed step exits; a closed channel, too).
        _send(sock, SpawnFailed(id=outcome.request, failure=outcome.failure))


def _pass_standby(sock: socket.socket, ready: StandbyReady, inits: _Inits) -> None:
    """The ready standby's pidfd, channel, set-up pipe and status pipe, to the daemon
    (``Spawned``): its job's start and its end are the daemon's to read, with no hop through
    this process; only the init's reaping (with the rusage) is still told from here."""
    try:
        pidfd = os.pidfd_open(ready.pid)
    except OSError as e:
        failure = SpawnFailure(stage="standby", errno=e.errno or 0, detail=e.strerror or "")
        _send(sock, SpawnFailed(id=ready.request, failure=failure))
        return
    status_fd = inits.hand_over(ready.pid)
    try:
        fds = [pidfd, ready.channel.fileno(), ready.report_fd]
        _send(sock, Spawned(id=ready.request, pid=ready.pid), fds + _some(status_fd))
    finally:
        os.close(pidfd)
        if status_fd is not None:
            os.close(status_fd)


def _some(fd: int | None) -> list[int]:
    return [] if fd is None else [fd]


@dataclass(frozen=True)
class _StandbyFd:
    """A warming standby's channel (``standby.StandbyTable.watched``)."""

    pid: int


@dataclass(frozen=True)
class _StatusFd:
    """An init's status pipe, until its record (``_Inits.watched``)."""

    pid: int


@dataclass(frozen=True)
class _LearnFd:
    """A learning standby's pipe of the pages its job wrote (``HotPages.watched``)."""

    pid: int


_Watched = _StandbyFd | _StatusFd | _LearnFd


def _watch_inits(
    selector: selectors.BaseSelector,
    watching: dict[int, _Watched],
    standbys: StandbyTable,
    inits: _Inits,
    hot: HotPages,
) -> None:
    """Watch exactly the fds the inits wait on now: one place registers them all, so an fd
    closed and its number reused (a standby's pipe, then a new init's) is never registered
    twice."""
    wanted: dict[int, _Watched] = {fd: _StandbyFd(pid) for fd, pid in standbys.watched()}
    wanted.update((fd, _StatusFd(pid)) for fd, pid in inits.watched())
    wanted.update((fd, _LearnFd(pid)) for fd, pid in hot.watched())
    for fd in [fd for fd in watching if watching[fd] != wanted.get(fd)]:
        with contextlib.suppress(KeyError, ValueError):
            selector.unregister(fd)
        del watching[fd]
    for fd, what in wanted.items():
        if fd not in watching:
            selector.register(fd, selectors.EVENT_READ)
            watching[fd] = what


def _take_socket() -> socket.socket:
    """The daemon's end comes as fd 0: move it above 2 (close-on-exec) and put /dev/null on 0.

    A job's init keeps fds 0-2 of this process and closes the rest, so it never holds the
    channel: when this process dies, the daemon sees the socket's end at once.
    """
    fd = os.dup(0)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    return socket.socket(fileno=fd)


def main() -> None:
    """The exec'd fork server's entry point."""
    sock = _take_socket()
    # The daemon dies: so does this. (Set from the daemon's main thread's child, so it follows
    # the daemon's life, not a thread's.) Should the daemon be gone already, the socket's end
    # ends the loop at once.
    syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)
    # A Ctrl-C meant for a daemon in the foreground reaches its whole process group: the daemon
    # stops gracefully, and this ends when the daemon closes its socket.
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        prepare_job_filter()  # compiled once: the inits only load it
    except NetjailError as e:
        _send(sock, StartFailed(detail=str(e)))
        os._exit(1)
    serve(sock)
    os._exit(0)


if __name__ == "__main__":
    main()
