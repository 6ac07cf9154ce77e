"""A job's plan, and what its set-up and its init send back: pure data and its wire formats.

``JobPlan`` is what the fork server hands ``netjail.kernel.jailinit.spawn_job``; it is a
msgspec struct, so it crosses the daemon's socket to the fork server as it is. The rest is the
two pipes between the job's processes and the fork server, kept here so that each format has
one home and is unit-tested on exact bytes:

- the *set-up pipe*: nothing if the command exec'd, or one ``SpawnFailure`` as a JSON line
  below PIPE_BUF, so that its one write() is atomic.
- the *status pipe*: I's record of how the command ended, its raw wait status in 4 bytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import msgspec

from netjail.kernel.fsplan import FsPlan

_MAX_STAGE = 200
_MAX_DETAIL = 3000
#: Below PIPE_BUF (4096) with the newline: one write of a record is atomic.
_MAX_RECORD = 4000


class TerminalPlan(msgspec.Struct, frozen=True, kw_only=True):
    """The job's stdio is a pty of its own, from the jail's devpts, first ``rows`` x ``cols``
    (0: unknown). The job's init sends the master on the Unix socket it gets as its stdin
    (``netjail.kernel.pty``)."""

    rows: int
    cols: int


class JobPlan(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a job's processes need.

    ``cwd`` is a path in the job's view (``fsplan.JOB_HOME`` by default), ``cgroup_procs``
    the cgroup.procs files the job is born in, ``fs`` its file system (``build_fs_plan``),
    ``terminal`` its pty when it has one.
    """

    argv: list[str]
    env: dict[str, str]
    cwd: str
    uid: int
    gid: int
    netns_path: str
    cgroup_procs: list[str]
    hostname: str
    fs: FsPlan
    terminal: TerminalPlan | None = None


class SpawnFailure(msgspec.Struct, frozen=True):
    """Which step of a job's set-up failed, and why."""

    stage: str
    errno: int
    detail: str


@dataclass(frozen=True)
class JobExit:
    """How the job's command ended: an exit code, or the signal that killed it."""

    exit_code: int | None
    signal: int | None


_failures = msgspec.json.Decoder(SpawnFailure)


def job_hostname(job_id: str) -> str:
    """The hostname a job gets unless its request names one."""
    return f"netjail-{job_id}"


def encode_failure(failure: SpawnFailure) -> bytes:
    """One line for the set-up pipe, below PIPE_BUF: a long detail is cut to fit."""
    detail = failure.detail[:_MAX_DETAIL]
    while True:
        cut = SpawnFailure(stage=failure.stage[:_MAX_STAGE], errno=failure.errno, detail=detail)
        data = msgspec.json.encode(cut)
        if len(data) < _MAX_RECORD:
            return data + b"\n"
        detail = detail[: len(detail) // 2]


def read_setup_failure(data: bytes) -> SpawnFailure | None:
    """The failure the set-up pipe carried, or None if it carried nothing (the command
    exec'd); anything unreadable is a failure, never taken for success."""
    if not data:
        return None
    try:
        return _failures.decode(data.splitlines()[0])
    except msgspec.DecodeError:
        return SpawnFailure(stage="set-up", errno=0, detail="unreadable set-up report")


def encode_job_status(wait_status: int) -> bytes:
    """I's record of the command's raw wait status, for the status pipe."""
    return wait_status.to_bytes(4, "little", signed=True)


def decode_job_exit(record: bytes, wait_status: int) -> JobExit:
    """The command's end from I's ``record``, or, without one, I's own ``wait_status``.

    No record means I was killed from outside (SIGKILL from the daemon or a cgroup kill), and
    its own end is the job's.
    """
    status = int.from_bytes(record, "little", signed=True) if len(record) == 4 else wait_status
    return JobExit(
        exit_code=os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        signal=os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
    )
