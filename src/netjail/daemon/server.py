"""The Unix-socket server: accepts connections, decides who may connect, holds what they share.

Each connection is served by its own task pair (netjail.daemon.connection), isolated from the
others. The server refuses clients the configuration does not allow and clients inside a jail,
and it owns the configuration in force (``apply`` takes a reloaded one).
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import socket
import time
from collections.abc import Callable

from netjail import protocol as p
from netjail._version import __version__
from netjail.daemon.config import Config
from netjail.daemon.connection import Connection, close_gracefully
from netjail.daemon.intake import EventIntake
from netjail.daemon.jobs import JobManager
from netjail.kernel.peer import PeerCred, namespace_inode, peer_credentials, peer_groups

#: How long a stopping daemon waits for the reports its clients are owed.
_REPORTS_WAIT_S = 30.0


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
        # Strong references: the loop keeps only weak ones to running tasks.
        self._connection_tasks: set[asyncio.Task[None]] = set()

    def status(self) -> p.StatusReply:
        return p.StatusReply(
            version=__version__,
            pid=os.getpid(),
            uptime_s=round(time.monotonic() - self.started, 3),
            jobs_running=len(self.jobs.jobs),
            jobs_total=self.jobs.jobs_total,
            events_seen=self.intake.events_seen,
            events_lost=self.intake.events_lost,
            cgroup_mode=self.cgroup_mode,
        )

    def apply(self, config: Config, file_config: Config) -> None:
        """Use a reloaded configuration for connections and jobs from now on.

        ``file_config`` is what the file itself says (before command-line overrides), which
        the next reload compares against.
        """
        self.config = config
        self.file_config = file_config

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        self.listener.setblocking(False)
        while True:
            sock, _ = await loop.sock_accept(self.listener)
            task = loop.create_task(self._serve_connection(sock))
            self._connection_tasks.add(task)
            task.add_done_callback(self._connection_tasks.discard)

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
            connection.send(p.ErrorMessage(code="shutdown", message=reason))
            connection.outbox.close()
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
        if self.jailed(peer):
            self.log(
                "warning", "refused a connection from inside a jail", pid=peer.pid, uid=peer.uid
            )
            await self._refuse(sock, "permission", "connections from inside a jail are refused")
            return
        connection = Connection(self, sock, peer)
        self.connections.add(connection)
        try:
            await connection.serve()
        except Exception as e:
            self.log("error", "connection failed", pid=peer.pid, error=repr(e))
        finally:
            self.connections.discard(connection)
            sock.close()  # a no-op when the connection closed it itself
