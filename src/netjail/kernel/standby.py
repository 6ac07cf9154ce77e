"""Standby inits: a pool jail's PID 1, forked ahead of its job, in the fork server.

A cold job's init enters the jail's netns and joins its cgroups after the job is asked for;
joining a fresh cgroup is the costliest step of a job (the kernel's first migration into it
waits for an RCU grace period, ~12 ms on the test VM). A standby init takes those steps when
its pool jail is built (``jailinit.run_standby_init``), says ``ready`` on its channel, and
waits there. The job's plan, stdio and bind trees come down the channel when a job claims
the jail; the init then does only the per-job steps (file system, uid, seccomp, spawn).

``StandbyTable`` is the fork server's side, and it never blocks on an init: a standby is
*warming* from its fork until its channel says ``ready`` (EOF instead: it failed, and its
set-up pipe says why). Once ready, the fork server passes its channel and the read end of
its set-up pipe to the daemon with its pidfd, and keeps neither: the daemon gives it its job
directly (``netjail.kernel.standbylink``), and the fork server, its parent, only reaps it and
reports its end, as any job's.

A standby is used for one job. One whose jail is destroyed unused is killed with its cgroup
(and one whose channel closes ends by itself); the reaper reports its end like a job's. A
standby that fails ends by itself.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from netjail.kernel.fsplan import FsPlan
from netjail.kernel.jailinit import (
    ExecHook,
    fork_in_new_pid_namespace,
    run_standby_init,
)
from netjail.kernel.jobplan import SpawnFailure, read_setup_failure
from netjail.kernel.standbychannel import STANDBY_READY


@dataclass
class Standby:
    """One standby init, as the fork server holds it while it warms."""

    #: The prefork request whose answer is owed.
    request: int
    pid: int
    channel: socket.socket
    report_fd: int
    status_fd: int
    #: A learning standby's pipe of the pages its job wrote (``netjail.kernel.prefault``).
    learn_fd: int | None = None


@dataclass(frozen=True)
class StandbyReady:
    """The standby ``pid`` is in its jail, waiting for a plan on ``channel``; ``report_fd``
    is its set-up pipe's read end. Both are the receiver's to pass on and close."""

    request: int
    pid: int
    channel: socket.socket
    report_fd: int


@dataclass(frozen=True)
class StandbyFailed:
    """The standby could not get ready; it is ending."""

    request: int
    pid: int
    failure: SpawnFailure


StandbyOutcome = StandbyReady | StandbyFailed


def fork_standby(
    request: int,
    netns_path: str,
    cgroup_procs: Sequence[str],
    base: FsPlan,
    hooks: Sequence[ExecHook],
    *,
    hot: Sequence[tuple[int, int]] = (),
    learn: bool = False,
) -> Standby | SpawnFailure:
    """Fork a standby init for the jail at ``netns_path`` and ``cgroup_procs``, to build
    ``base`` of its job's file system; at once. It copies the ``hot`` page runs ahead; with
    ``learn``, it tells which pages its job wrote (``netjail.kernel.prefault``)."""
    report_r, report_w = os.pipe2(os.O_CLOEXEC)
    status_r, status_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    learn_r, learn_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK) if learn else (-1, -1)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        pid = fork_in_new_pid_namespace()
    except OSError as e:
        for fd in (report_r, report_w, status_r, status_w, learn_r, learn_w):
            if fd >= 0:
                os.close(fd)
        ours.close()
        theirs.close()
        return SpawnFailure(stage="namespaces", errno=e.errno or 0, detail=e.strerror or str(e))
    if pid == 0:
        run_standby_init(
            netns_path,
            cgroup_procs,
            base,
            channel=theirs.detach(),
            report_fd=report_w,
            status_fd=status_w,
            hooks=hooks,
            hot=hot,
            learn_fd=learn_w,
        )
    theirs.close()
    os.close(report_w)
    os.close(status_w)
    if learn_w >= 0:
        os.close(learn_w)
    ours.setblocking(False)
    return Standby(
        request=request,
        pid=pid,
        channel=ours,
        report_fd=report_r,
        status_fd=status_r,
        learn_fd=learn_r if learn_r >= 0 else None,
    )


class StandbyTable:
    """The fork server's warming standby inits, by pid."""

    def __init__(self) -> None:
        self._by_pid: dict[int, Standby] = {}

    def add(self, standby: Standby) -> None:
        self._by_pid[standby.pid] = standby

    def watched(self) -> list[tuple[int, int]]:
        """(fd, pid) pairs the selector must watch now: each warming standby's channel."""
        return [(standby.channel.fileno(), pid) for pid, standby in self._by_pid.items()]

    def on_readable(self, pid: int) -> StandbyOutcome | None:
        """What standby ``pid``'s readable channel means (None: nothing yet). Either way, it
        leaves the table."""
        standby = self._by_pid.get(pid)
        if standby is None:
            return None
        try:
            data = standby.channel.recv(16)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            data = b""
        if data != STANDBY_READY:
            return self._failed(standby)
        del self._by_pid[pid]
        return StandbyReady(standby.request, pid, standby.channel, standby.report_fd)

    def forget(self, pid: int) -> StandbyFailed | None:
        """Standby ``pid`` was reaped: if it was still warming, it failed (its set-up pipe
        says why); its status pipe is the reaper's."""
        standby = self._by_pid.get(pid)
        return None if standby is None else self._failed(standby)

    def _failed(self, standby: Standby) -> StandbyFailed:
        failure = read_setup_failure(_read_all(standby.report_fd)) or SpawnFailure(
            stage="standby", errno=0, detail="the standby init ended before it was ready"
        )
        self._by_pid.pop(standby.pid, None)
        standby.channel.close()
        with contextlib.suppress(OSError):
            os.close(standby.report_fd)
        return StandbyFailed(standby.request, standby.pid, failure)


def _read_all(fd: int) -> bytes:
    chunks = []
    with contextlib.suppress(OSError):
        while chunk := os.read(fd, 4096):
            chunks.append(chunk)
    return b"".join(chunks)
