"""One fork server process as the daemon holds it: exec'd on a socketpair, its ``Ready``
awaited, what is in flight with it, its release; and the back-off before the next one
(``netjail.kernel.spawn`` watches it and restarts it)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from netjail.errors import SpawnError, map_os_errors
from netjail.kernel.fdpass import recv_with_fds
from netjail.kernel.forkserver import (
    MAX_FDS,
    MAX_MESSAGE,
    ExitStatus,
    Ready,
    StartFailed,
    from_server,
)
from netjail.kernel.helperproc import describe_exit, helper_env
from netjail.kernel.jobplan import JobExit
from netjail.kernel.standbylink import StandbyLink

__all__ = [
    "READY_TIMEOUT_S",
    "ForkServerHealth",
    "ForkServerState",
    "Outgoing",
    "ServerProcess",
    "SpawnedJob",
    "launch_server",
    "restart_delay",
    "wait_ready",
]

#: How long the daemon waits for a new fork server's ``Ready``.
READY_TIMEOUT_S = 10.0
#: The first back-off before a new fork server is started, and the longest.
RESTART_FIRST_S = 0.05
RESTART_MAX_S = 10.0
#: A fork server that ran this long was healthy: the back-off starts over after it ends.
STABLE_S = 30.0

#: up: serving; starting: exec'd, not yet ready (jobs sent now wait for it); down: ended, a
#: new one is due after the back-off (jobs are refused until then).
ForkServerState = Literal["up", "starting", "down"]


@dataclass(frozen=True)
class ForkServerHealth:
    """What ``status`` says about the fork server: its state, how many times it was restarted,
    and how the last one that ended did (None if none has)."""

    state: ForkServerState
    restarts: int
    last_exit: str | None


@dataclass
class SpawnedJob:
    """A running job's main process, as the daemon sees it; for a standby init, also its
    channel and set-up pipe until its job's start (``standbylink``)."""

    pid: int
    pidfd: int
    link: StandbyLink | None = None

    def send_signal(self, sig: int) -> bool:
        """Signal the main process; False if it has already exited (never hits a reused pid)."""
        try:
            signal.pidfd_send_signal(self.pidfd, sig)
        except ProcessLookupError:
            return False
        return True

    def close(self) -> None:
        if self.link is not None:
            self.link.close()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


@dataclass(frozen=True)
class Outgoing:
    """A spawn request waiting for room in the socket; ``sent`` is done once it was sent."""

    data: bytes
    fds: list[int]
    sent: asyncio.Future[None]


@dataclass(eq=False)
class ServerProcess:
    """One fork server process, and what is in flight with it."""

    process: subprocess.Popen[bytes]
    sock: socket.socket
    pidfd: int
    started: float
    ready: bool = False
    #: Why it cannot serve, if it said so (``StartFailed``).
    refusal: str | None = None
    pending: dict[int, asyncio.Future[SpawnedJob]] = field(default_factory=dict)
    waiters: dict[int, asyncio.Future[ExitStatus]] = field(default_factory=dict)
    exits: dict[int, ExitStatus] = field(default_factory=dict)
    #: Jobs' ends (``Ended``, or ``Exited`` when no record came), awaited or not yet.
    end_waiters: dict[int, asyncio.Future[JobExit]] = field(default_factory=dict)
    ends: dict[int, JobExit] = field(default_factory=dict)
    #: Standbys' status pipes, read here until the record or EOF (``Spawned``), by pid.
    status_fds: dict[int, int] = field(default_factory=dict)
    outbox: deque[Outgoing] = field(default_factory=deque)
    reading: bool = False

    def release(self) -> int | None:
        """Close its socket and pidfd; make sure it is gone and reap it: its exit status."""
        with contextlib.suppress(OSError):
            self.sock.close()
        try:
            status = self.process.wait(1)
        except subprocess.TimeoutExpired:
            self.process.kill()
            status = self.process.wait()
        with contextlib.suppress(OSError):
            os.close(self.pidfd)
        return status


def launch_server(command: Sequence[str]) -> ServerProcess:
    """Exec a fork server, its end of a new socketpair on its fd 0."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        with map_os_errors(SpawnError, "cannot start the fork server"):
            process = subprocess.Popen(
                list(command),
                stdin=theirs.fileno(),
                stdout=subprocess.DEVNULL,
                env=helper_env(),
            )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    try:
        pidfd = os.pidfd_open(process.pid)
    except OSError as e:
        process.kill()
        process.wait()
        ours.close()
        raise SpawnError(f"cannot watch the fork server: {e.strerror}") from None
    return ServerProcess(process=process, sock=ours, pidfd=pidfd, started=time.monotonic())


def wait_ready(server: ServerProcess, timeout: float) -> None:
    """Block until ``server`` says Ready; SpawnError with the reason if it cannot serve."""
    server.sock.settimeout(timeout)
    try:
        data, fds = recv_with_fds(server.sock, MAX_MESSAGE, MAX_FDS)
    except TimeoutError:
        raise SpawnError(f"the fork server did not start within {timeout:g} s") from None
    except OSError:
        data, fds = b"", []
    for fd in fds:
        os.close(fd)
    message = from_server.decode(data) if data else None
    if isinstance(message, StartFailed):
        raise SpawnError(message.detail)
    if not isinstance(message, Ready):
        try:
            status = server.process.wait(timeout)
        except subprocess.TimeoutExpired:
            status = None
        raise SpawnError(f"the fork server {describe_exit(status)} at start")
    server.ready = True


def restart_delay(previous_s: float | None, ran_s: float) -> float:
    """The back-off before the next fork server: the first delay after one that ran for a
    while (or the first end), else twice the last one, up to RESTART_MAX_S."""
    if previous_s is None or ran_s >= STABLE_S:
        return RESTART_FIRST_S
    return min(previous_s * 2, RESTART_MAX_S)
