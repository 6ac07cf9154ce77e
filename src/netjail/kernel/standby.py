"""Standby inits: a pool jail's PID 1, forked ahead of its job, in the fork server.

A cold job's init enters the jail's netns and joins its cgroups after the job is asked for;
joining a fresh cgroup is the costliest step of a job (the kernel's first migration into it
waits for an RCU grace period, ~12 ms on the test VM). A standby init takes those steps when
its pool jail is built (``jailinit.run_standby_init``), says ``ready`` on its channel, and
waits there. The job's plan, stdio and bind sources come down the channel when a job claims
the jail; the init then does only the per-job steps (file system, uid, seccomp, spawn).

``StandbyTable`` is the fork server's side: it never blocks on an init. Each standby moves
through three states, driven by the fork server's selector:

- *warming*: forked; its channel is watched for ``ready`` (EOF instead: it failed, and its
  set-up pipe says why);
- *idle*: ready; nothing is watched (its end is seen by the reaper, like any init's);
- *starting*: its plan was sent; its set-up pipe is watched, EOF meaning the command exec'd.

A standby is used for one job. One whose jail is destroyed unused is killed with its cgroup;
the reaper reports its end like a job's, and ``forget`` drops what the table held for it. A
standby that fails ends by itself (and one whose channel closes, too).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import msgspec

from netjail.errors import NetjailError, SpawnError
from netjail.kernel.fdpass import read_payload, send_with_fds
from netjail.kernel.fsplan import FsPlan, split_fs_plan
from netjail.kernel.jailinit import (
    ExecHook,
    fork_in_new_pid_namespace,
    run_standby_init,
)
from netjail.kernel.jobplan import SpawnFailure, read_setup_failure
from netjail.kernel.rootfs import open_bind_trees
from netjail.kernel.standbychannel import MAX_PLAN, STANDBY_PLAN, STANDBY_READY, plans

StandbyState = Literal["warming", "idle", "starting"]


@dataclass
class Standby:
    """One standby init, as the fork server holds it."""

    #: The request (prefork, then start) whose answer is owed.
    request: int
    pid: int
    channel: socket.socket
    report_fd: int
    status_fd: int
    #: The part of every job's file system it built ahead.
    base: FsPlan
    state: StandbyState = "warming"


@dataclass(frozen=True)
class StandbyReady:
    """The standby ``pid`` is in its jail, waiting for a plan."""

    request: int
    pid: int


@dataclass(frozen=True)
class StandbyStarted:
    """The standby ``pid``'s command exec'd."""

    request: int
    pid: int


@dataclass(frozen=True)
class StandbyFailed:
    """The standby could not get ready, or could not start its job; it is ending."""

    request: int
    pid: int
    failure: SpawnFailure


StandbyOutcome = StandbyReady | StandbyStarted | StandbyFailed


def fork_standby(
    request: int,
    netns_path: str,
    cgroup_procs: Sequence[str],
    base: FsPlan,
    hooks: Sequence[ExecHook],
) -> Standby | SpawnFailure:
    """Fork a standby init for the jail at ``netns_path`` and ``cgroup_procs``, to build
    ``base`` of its job's file system; at once."""
    report_r, report_w = os.pipe2(os.O_CLOEXEC)
    status_r, status_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        pid = fork_in_new_pid_namespace()
    except OSError as e:
        for fd in (report_r, report_w, status_r, status_w):
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
        )
    theirs.close()
    os.close(report_w)
    os.close(status_w)
    ours.setblocking(False)
    return Standby(
        request=request,
        pid=pid,
        channel=ours,
        report_fd=report_r,
        status_fd=status_r,
        base=base,
    )


class StandbyTable:
    """The fork server's standby inits, by pid, and what each waits for."""

    def __init__(self) -> None:
        self._by_pid: dict[int, Standby] = {}

    def add(self, standby: Standby) -> None:
        self._by_pid[standby.pid] = standby

    def watched(self) -> list[tuple[int, int]]:
        """(fd, pid) pairs the selector must watch now."""
        out = []
        for standby in self._by_pid.values():
            if standby.state == "warming":
                out.append((standby.channel.fileno(), standby.pid))
            elif standby.state == "starting":
                out.append((standby.report_fd, standby.pid))
        return out

    def on_readable(self, pid: int) -> StandbyOutcome | None:
        """What a readable watched fd of standby ``pid`` means (None: nothing yet)."""
        standby = self._by_pid.get(pid)
        if standby is None:
            return None
        if standby.state == "warming":
            return self._on_warming(standby)
        if standby.state == "starting":
            failure = read_setup_failure(_read_all(standby.report_fd))
            if failure is not None:
                return self._failed(standby, failure)
            self._release(standby)
            return StandbyStarted(standby.request, pid)
        return None

    def _on_warming(self, standby: Standby) -> StandbyOutcome | None:
        try:
            data = standby.channel.recv(16)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            data = b""
        if data == STANDBY_READY:
            standby.state = "idle"
            return StandbyReady(standby.request, standby.pid)
        return self._failed(standby)

    def start(self, request: int, pid: int, fds: Sequence[int]) -> StandbyFailed | None:
        """Pass standby ``pid`` its plan (``fds``: the sealed plan memfd, the job's stdio,
        its bind sources, as the daemon sent them), with a detached tree of each of the job's
        own binds, made here, in the daemon's mount namespace, where the sources are; a
        failure at once if it cannot take them."""
        standby = self._by_pid.get(pid)
        if standby is None or standby.state != "idle" or len(fds) < 4:
            failure = SpawnFailure(stage="standby", errno=0, detail=f"no idle standby {pid}")
            return StandbyFailed(request, pid, failure)
        standby.request = request
        try:
            plan = plans.decode(read_payload(fds[0], MAX_PLAN))
            prefix, steps = split_fs_plan(plan.fs)
            if prefix != standby.base:
                raise SpawnError("the job's file system is not the one the pool jail was made for")
            trees = open_bind_trees(FsPlan(plan.fs.root_size_bytes, steps), fds[4:])
        except (ValueError, msgspec.DecodeError, NetjailError) as e:
            failure = SpawnFailure(stage="bind sources", errno=0, detail=str(e))
            return self._failed(standby, failure)
        try:
            standby.channel.setblocking(True)
            send_with_fds(standby.channel, STANDBY_PLAN, [*fds[:4], *trees])
        except OSError as e:
            failure = SpawnFailure(stage="standby", errno=e.errno or 0, detail=e.strerror or "")
            return self._failed(standby, failure)
        finally:
            for fd in trees:
                os.close(fd)
        standby.channel.close()
        standby.state = "starting"
        return None

    def status_fd(self, pid: int) -> int | None:
        standby = self._by_pid.get(pid)
        return None if standby is None else standby.status_fd

    def forget(self, pid: int) -> StandbyOutcome | None:
        """Standby ``pid`` was reaped: drop what is held for it (its status pipe is the
        reaper's), and what its end means for the request still owed, if any. The reaper may
        see the init end before the selector sees its set-up pipe close: the answer then
        comes from here, before the end is reported."""
        standby = self._by_pid.get(pid)
        if standby is None:
            return None
        if standby.state == "idle":
            self._release(standby)
            return None
        # Its pipe's write end is closed now: reading it cannot block.
        return self.on_readable(pid) if standby.state == "starting" else self._failed(standby)

    def _failed(self, standby: Standby, failure: SpawnFailure | None = None) -> StandbyFailed:
        if failure is None:
            failure = read_setup_failure(_read_all(standby.report_fd)) or SpawnFailure(
                stage="standby", errno=0, detail="the standby init ended before it was ready"
            )
        self._release(standby)
        return StandbyFailed(standby.request, standby.pid, failure)

    def _release(self, standby: Standby) -> None:
        """Out of the table, but for its status pipe, which stays with the reaper."""
        self._by_pid.pop(standby.pid, None)
        standby.channel.close()
        with contextlib.suppress(OSError):
            os.close(standby.report_fd)


def _read_all(fd: int) -> bytes:
    chunks = []
    with contextlib.suppress(OSError):
        while chunk := os.read(fd, 4096):
            chunks.append(chunk)
    return b"".join(chunks)
