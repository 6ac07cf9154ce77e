"""A standby init's channel: the standby's ``ready`` (read by the fork server), then the job's
plan with its stdio and detached bind trees (SCM_RIGHTS; sent by the daemon, which holds the
channel once the standby is ready: ``netjail.kernel.standbylink``)."""

from __future__ import annotations

import os
import socket

import msgspec

from netjail.errors import SpawnError
from netjail.kernel.fdpass import read_payload, recv_with_fds
from netjail.kernel.jobplan import JobPlan

__all__ = ["MAX_PLAN", "STANDBY_PLAN", "STANDBY_READY", "plans", "receive_plan"]

#: What a standby init sends once it is in its jail's netns and cgroups.
STANDBY_READY = b"ready"
#: The datagram a standby's plan comes in; its fds: the plan's sealed memfd, the job's stdio
#: (3), then a detached tree per Bind of the job's own steps, in order.
STANDBY_PLAN = b"plan"
#: The largest plan a standby reads (as the fork server's bound).
MAX_PLAN = 16 << 20
#: The kernel's bound on the fds one SCM_RIGHTS message carries (SCM_MAX_FD).
_MAX_FDS = 253
#: A plan, as it travels.
plans = msgspec.msgpack.Decoder(JobPlan)


def receive_plan(sock: socket.socket) -> tuple[JobPlan, list[int], list[int]] | None:
    """The plan the fork server passed on, its stdio and its bind sources; None if the channel
    closed first (the jail is destroyed unused)."""
    data, fds = recv_with_fds(sock, 64, _MAX_FDS)
    if not data:
        return None
    if data != STANDBY_PLAN or len(fds) < 4:
        raise SpawnError(f"malformed plan message ({len(fds)} fds)")
    memfd, *rest = fds
    try:
        plan = plans.decode(read_payload(memfd, MAX_PLAN))
    except (ValueError, msgspec.DecodeError) as e:
        raise SpawnError(f"unreadable plan: {e}") from None
    finally:
        os.close(memfd)
    return plan, rest[:3], rest[3:]
