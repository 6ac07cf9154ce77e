"""The Unix-socket server: accepts connections, decides who may connect, holds what they share.

Each connection is served by its own task pair (netjail.daemon.connection), isolated from the
others. The server refuses clients the configuration does not allow, clients inside a jail and
a uid's connections beyond the configured ``max_connections_per_uid``, and it owns the
configuration in force (``apply`` takes a reloaded one, and with it the connection and job
limits).

The accept loop never ends on an error. When the daemon is out of fds (EMFILE, ENFILE) or
kernel memory, accept() fails and the pending connection stays queued, so the loop would spin:
instead it logs once per episode, spends its reserve fd to accept each waiting client and tell
it "busy" (so clients fail fast instead of hanging), and pauses, longer each time, until fds are
free again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import os
import resource
import socket
import time
from collections import Counter
from collections.abc import Callable

from netjail import protocol as p
from netjail._version import __version__
from netjail.daemon.config import Config
from netjail.daemon.connection import Connection
from netjail.daemon.intake import EventIntake
from netjail.daemon.jobs import JobManager, max_jobs_for
from netjail.daemon.outbox import close_gracefully
from netjail.errors import BusyError
from netjail.kernel.peer import PeerCred, namespace_inode, peer_credentials, peer_groups
from netjail.kernel.seccomp import PROFILE as SECCOMP_PROFILE

#: How long a stopping daemon waits for the reports its clients are owed.
_REPORTS_WAIT_S = 30.0
#: accept() errors that mean "out of fds or kernel memory": pause and retry.
_STARVED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: accept() errors about one connection that went away before it was accepted: skip it.
_GONE = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EINTR, errno.EAGAIN})
#: The accept loop's pauses while starved: from the first to the longest, doubling.
ACCEPT_PAUSE_S = (0.05, 1.0)
_OUT_OF_FDS = p.encode_message(
    p.ErrorMessage(
        code=BusyError.code, message="netjaild is out of file descriptors; try again shortly"
    )
)


class Server:
    """Accepts connections and holds what they share."""

    def __init__(
        self,
        *,
        listener: socket.socket,
        jobs: JobManager,
        log: Callable[..., None],
        cgroup_mode: str | None,
        config: Config,
    ) -> None:
        self.listener = listener
        self.config = config
        #: The configuration file's own values, before command-line overrides (for reloads).
        self.file_config = config
        self.jobs = jobs
        self.intake: EventIntake = jobs.ctx.intake
        self.log = log
        self.cgroup_mode = cgroup_mode
        self.started = time.monotonic()
        self.own_netns = namespace_inode(os.getpid(), "net")
        self.connections: set[Connection] = set()
        #: Connections one non-root uid may hold at once; root's are not counted.
        self.max_connections_per_uid = config.max_connections_per_uid
        self.jobs.pool.use_config(config)
        #: Connections being served, per uid.
        self._per_uid: Counter[int] = Counter()
        #: Uids refused for the limit since their count last dropped below it (logged once).
        self._over_limit: set[int] = set()
        # Strong references: the loop keeps only weak ones to running tasks.
        self._connection_tasks: set[asyncio.Task[None]] = set()
        #: Why the daemon is stopping, once it is (no new job starts then).
        self.stopping: str | None = None

    def status(self) -> p.StatusReply:
        fork_server = self.jobs.ctx.host.fork_server_health()
        return p.StatusReply(
            version=__version__,
            pid=os.getpid(),
            uptime_s=round(time.monotonic() - self.started, 3),
            jobs_running=len(self.jobs.jobs),
            jobs_total=self.jobs.jobs_total,
            events_seen=self.intake.events_seen,
            events_lost=self.intake.events_lost,
            cgroup_mode=self.cgroup_mode,
            seccomp_profile=SECCOMP_PROFILE,
            fork_server=fork_server.state,
            fork_server_restarts=fork_server.restarts,
            fork_server_last_exit=fork_server.last_exit,
            pool_size=self.jobs.pool.size,
            pool_ready=self.jobs.pool.ready,
        )

    def apply(self, config: Config, file_config: Config) -> None:
        """Use a reloaded configuration for connections and jobs from now on.

        ``file_config`` is what the file itself says (before command-line overrides), which
        the next reload compares against.
        """
        self.config = config
        self.file_config = file_config
        self.max_connections_per_uid = config.max_connections_per_uid
        self.jobs.pool.use_config(config)
        if config.max_jobs is not None:
            self.jobs.max_jobs = config.max_jobs
        else:
            self.jobs.max_jobs = max_jobs_for(resource.getrlimit(resource.RLIMIT_NOFILE)[0])

    async def serve_forever(self) -> None:
        """Accept and serve connections until cancelled; no error ends it."""
        loop = asyncio.get_running_loop()
        self.listener.setblocking(False)
        # Kept open to be given up when fds run out: accepting a waiting client then, to tell it
        # why, needs an fd.
        reserve: int | None = _open_reserve()
        starved = _Starvation()
        try:
            while True:
                try:
                    sock, _ = await loop.sock_accept(self.listener)
                except OSError as e:
                    if e.errno in _GONE:
                        continue
                    if starved.pause_s is None:
                        # Once per episode: the pauses that follow would repeat it.
                        what = "out of fds or memory" if e.errno in _STARVED else "accept failed"
                        self.log(
                            "error",
                            f"cannot accept connections ({what}); pausing until it can",
                            error=e.strerror or str(e),
                        )
                    if e.errno in _STARVED:
                        reserve = self._turn_away_waiting(reserve, starved)
                    await asyncio.sleep(starved.next_pause())
                    continue
                if starved.pause_s is not None:
                    self.log("info", "accepting connections again", turned_away=starved.turned_away)
                    starved = _Starvation()
                if reserve is None:
                    reserve = _open_reserve()
                task = loop.create_task(self._serve_connection(sock))
                self._connection_tasks.add(task)
                task.add_done_callback(self._connection_tasks.discard)
        finally:
            if reserve is not None:
                os.close(reserve)

    def _turn_away_waiting(self, reserve: int | None, starved: _Starvation) -> int | None:
        """Accept each waiting client on the reserve fd and tell it the daemon is busy, so that
        none hangs; the reserve fd again (None while it cannot be had back)."""
        while reserve is not None:
            os.close(reserve)
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return _open_reserve()  # none waiting (or still no fd): the slot is ours again
            with sock, contextlib.suppress(OSError):
                sock.setblocking(False)
                sock.send(_OUT_OF_FDS)
            starved.turned_away += 1
            reserve = _open_reserve()
        return _open_reserve()

    async def stop(self, reason: str) -> None:
        """End every running job; each run connection gets its report and, straight after
        it, the ``shutdown`` error (``reason``); then every client is told and disconnected."""
        self.stopping = reason
        await self.jobs.shutdown()
        await self.close_connections(reason)

    async def close_connections(self, reason: str) -> None:
        """Tell every connected client why it is being disconnected, then disconnect it.

        Each client first gets every report it is owed: the jobs have ended by now, and their
        reports must be queued ahead of the ``shutdown`` error.
        """
        connections = list(self.connections)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(c.wait_for_reports() for c in connections)), _REPORTS_WAIT_S
            )
        for connection in connections:
            connection.say_shutdown(reason)
        tasks = list(self._connection_tasks)
        # Cancelled, each connection's own clean-up still flushes its outbox (the message
        # above included) and half-closes before closing.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def allowed(self, peer: PeerCred) -> bool:
        """Root always; others when no allow-list is set, or when their uid or a group is on it."""
        if peer.uid == 0 or not (self.config.allowed_uids or self.config.allowed_groups):
            return True
        if peer.uid in self.config.allowed_uids:
            return True
        wanted = set()
        for name in self.config.allowed_groups:
            with contextlib.suppress(KeyError):
                wanted.add(grp.getgrnam(name).gr_gid)
        return bool(wanted & peer_groups(peer.pid, peer.gid))

    def jailed(self, peer: PeerCred) -> bool:
        """Is the peer inside a jail (or can we not tell)?"""
        netns_inode = namespace_inode(peer.pid, "net")
        if netns_inode is not None and netns_inode == self.own_netns:
            return False  # the common case: a client on the host, in our own netns
        try:
            with open(f"/proc/{peer.pid}/cgroup") as f:
                cgroup_text: str | None = f.read()
        except OSError:
            cgroup_text = None
        return self.jobs.is_jailed(cgroup_text, netns_inode)

    @staticmethod
    async def _refuse(sock: socket.socket, code: str, message: str) -> None:
        with contextlib.suppress(OSError):
            sock.send(p.encode_message(p.ErrorMessage(code=code, message=message)))
        await close_gracefully(sock)

    async def _serve_connection(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        try:
            peer = peer_credentials(sock)
        except OSError:
            sock.close()
            return
        if not self.allowed(peer):
            self.log("warning", "refused a client not in allowed_uids/allowed_groups", uid=peer.uid)
            await self._refuse(
                sock, "permission", "this user may not use netjail (allowed_uids/allowed_groups)"
            )
            return
        if peer.uid != 0 and self._per_uid[peer.uid] >= self.max_connections_per_uid:
            if peer.uid not in self._over_limit:
                # Once until its count drops again: a flood would repeat it for each one.
                self._over_limit.add(peer.uid)
                self.log(
                    "warning",
                    "refused a connection over the per-uid limit",
                    uid=peer.uid,
                    limit=self.max_connections_per_uid,
                )
            await self._refuse(
                sock,
                BusyError.code,
                f"uid {peer.uid} already has {self.max_connections_per_uid} connections to "
                "netjaild, the most one user may have; close some and try again",
            )
            return
        if self.jailed(peer):
            self.log(
                "warning", "refused a connection from inside a jail", pid=peer.pid, uid=peer.uid
            )
            await self._refuse(sock, "permission", "connections from inside a jail are refused")
            return
        connection = Connection(self, sock, peer)
        self.connections.add(connection)
        self._per_uid[peer.uid] += 1
        try:
            await connection.serve()
        except Exception as e:
            self.log("error", "connection failed", pid=peer.pid, error=repr(e))
        finally:
            self.connections.discard(connection)
            self._per_uid[peer.uid] -= 1
            if self._per_uid[peer.uid] < self.max_connections_per_uid:
                self._over_limit.discard(peer.uid)
            if not self._per_uid[peer.uid]:
                del self._per_uid[peer.uid]
            sock.close()  # a no-op when the connection closed it itself


class _Starvation:
    """One episode of accept() failing: how long the next pause is, how many were turned away."""

    def __init__(self) -> None:
        self.pause_s: float | None = None
        self.turned_away = 0

    def next_pause(self) -> float:
        first, longest = ACCEPT_PAUSE_S
        self.pause_s = first if self.pause_s is None else min(self.pause_s * 2, longest)
        return self.pause_s


def _open_reserve() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
