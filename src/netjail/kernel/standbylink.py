"""The daemon's end of a standby init (``netjail.kernel.standby``), from its ``ready`` to its
job's start, and the start itself.

Once a standby is in its jail and ready, the fork server passes the daemon its pidfd, its
channel and the read end of its set-up pipe, and keeps none of them: the fork server only
reaps the init and reports its end, as any job's. So a job's start on a pool jail is the
daemon's alone, with no hop through the fork server (``start_standby_job``):

1. the detached trees of the job's own binds are made here (the daemon's mount namespace is
   where their sources are, as it was the fork server's);
2. the plan's sealed memfd, the job's stdio and the trees go down the channel in one
   datagram, and the channel is closed: a standby takes one plan;
3. the set-up pipe says how it went: EOF once the command exec'd (the init holds the write
   end until its spawn returned), a ``SpawnFailure`` record if a step failed.

The standby checks that the plan is for its jail and for the file system it built ahead; it
reports a mismatch through the same pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec

from netjail.errors import NetjailError, SpawnError, map_os_errors
from netjail.kernel.fdpass import sealed_payload, send_with_fds
from netjail.kernel.fsplan import FsPlan, split_fs_plan
from netjail.kernel.jobplan import JobPlan, SpawnFailure, read_setup_failure
from netjail.kernel.rootfs import open_bind_trees
from netjail.kernel.standbychannel import STANDBY_PLAN

__all__ = ["StandbyLink", "start_standby_job"]

#: The most a set-up record can take (one line of a SpawnFailure, its detail bounded).
_MAX_REPORT = 1 << 16


@dataclass
class StandbyLink:
    """A ready standby's channel and set-up pipe, as the daemon holds them until its start.

    Closing the channel unused ends the standby quietly (the jail is destroyed unused)."""

    channel: socket.socket
    report_fd: int

    @classmethod
    def from_fds(cls, channel_fd: int, report_fd: int) -> StandbyLink:
        channel = socket.socket(fileno=channel_fd)
        channel.setblocking(False)
        os.set_blocking(report_fd, False)
        return cls(channel=channel, report_fd=report_fd)

    @property
    def used(self) -> bool:
        """Its plan was sent (or it was closed): it takes no other."""
        return self.channel.fileno() < 0

    def close(self) -> None:
        self.channel.close()
        if self.report_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.report_fd)
            self.report_fd = -1


async def start_standby_job(
    link: StandbyLink,
    plan: JobPlan,
    stdio: Sequence[int],
    source_fds: Sequence[int],
) -> SpawnFailure | None:
    """Give the standby behind ``link`` its job; return once its command exec'd (None), or
    with the step that failed. SpawnError if the plan cannot reach it. The link is closed
    either way (the caller keeps ``stdio`` and ``source_fds``)."""
    try:
        if link.used:
            raise SpawnError("the pool jail's standby init was already given a job")
        with map_os_errors(SpawnError, "cannot hand the job's plan to its standby init"):
            plan_fd = sealed_payload("netjail-plan", msgspec.msgpack.encode(plan))
        try:
            _, steps = split_fs_plan(plan.fs)
            try:
                trees = open_bind_trees(FsPlan(plan.fs.root_size_bytes, steps), source_fds)
            except NetjailError as e:
                return SpawnFailure(stage="bind sources", errno=0, detail=str(e))
            try:
                send_with_fds(link.channel, STANDBY_PLAN, [plan_fd, *stdio, *trees])
            except OSError as e:
                detail = f"cannot hand the job's plan to its standby init: {e.strerror or e}"
                raise SpawnError(detail) from None
            finally:
                for fd in trees:
                    os.close(fd)
        finally:
            os.close(plan_fd)
        link.channel.close()
        return read_setup_failure(await _read_to_end(link.report_fd))
    finally:
        link.close()


async def _read_to_end(fd: int) -> bytes:
    """All the (non-blocking) pipe ``fd`` carries until its writers are gone, read from the
    running loop as it comes."""
    loop = asyncio.get_running_loop()
    chunks: list[bytes] = []
    size = 0
    done: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        nonlocal size
        while not done.done():
            try:
                chunk = os.read(fd, 4096)
            except BlockingIOError:
                return
            except OSError as e:
                done.set_exception(SpawnError(f"cannot read the standby's set-up pipe: {e}"))
                return
            if not chunk or size >= _MAX_REPORT:
                done.set_result(None)
                return
            chunks.append(chunk)
            size += len(chunk)

    on_readable()  # it may have exec'd already
    if not done.done():
        loop.add_reader(fd, on_readable)
        try:
            await done
        finally:
            loop.remove_reader(fd)
    else:
        done.result()
    return b"".join(chunks)
