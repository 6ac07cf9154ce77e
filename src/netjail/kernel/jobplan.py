"""A job's plan, and what its set-up and its init send back: pure data and its wire formats.

``JobPlan`` is what the fork server hands ``netjail.kernel.jailinit.spawn_job``; it is a
msgspec struct, so it crosses the daemon's socket to the fork server as it is. The rest is the
two pipes between the job's processes and the fork server, kept here so that each format has
one home and is unit-tested on exact bytes:

- the *set-up pipe*: JSON lines, each below PIPE_BUF so that one write() is atomic and records
  written by different processes never interleave. The job child writes an ``InitRecord`` with
  its init's host pid; any step that fails writes one ``FailureRecord``.
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


class JobPlan(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a job's processes need.

    ``cwd`` is a path in the job's view (``fsplan.JOB_HOME`` by default), ``cgroup_procs``
    the cgroup.procs files the job is born in, ``fs`` its file system (``build_fs_plan``).
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


class SpawnFailure(msgspec.Struct, frozen=True):
    """Which step of a job's set-up failed, and why."""

    stage: str
    errno: int
    detail: str


class InitRecord(msgspec.Struct, frozen=True, tag="init"):
    """The job's init was forked; ``pid`` is its pid in the fork server's PID namespace."""

    pid: int


class FailureRecord(msgspec.Struct, frozen=True, tag="failed"):
    """A set-up step failed; the job does not run."""

    failure: SpawnFailure


@dataclass(frozen=True)
class SetupReport:
    """What the set-up pipe said: the init's host pid if it was forked, the failure if any."""

    init_pid: int | None
    failure: SpawnFailure | None


@dataclass(frozen=True)
class JobExit:
    """How the job's command ended: an exit code, or the signal that killed it."""

    exit_code: int | None
    signal: int | None


_records = msgspec.json.Decoder(InitRecord | FailureRecord)


def job_hostname(job_id: str) -> str:
    """The hostname a job gets unless its request names one."""
    return f"netjail-{job_id}"


def encode_record(record: InitRecord | FailureRecord) -> bytes:
    """One line for the set-up pipe, below PIPE_BUF: a long failure detail is cut to fit."""
    if isinstance(record, FailureRecord):
        failure = record.failure
        detail = failure.detail[:_MAX_DETAIL]
        while True:
            cut = SpawnFailure(stage=failure.stage[:_MAX_STAGE], errno=failure.errno, detail=detail)
            data = msgspec.json.encode(FailureRecord(cut))
            if len(data) < _MAX_RECORD:
                break
            detail = detail[: len(detail) // 2]
    else:
        data = msgspec.json.encode(record)
    return data + b"\n"


def read_setup_report(data: bytes) -> SetupReport:
    """Decode everything the set-up pipe carried, in any order; garbage is a failure."""
    init_pid: int | None = None
    failure: SpawnFailure | None = None
    for line in data.splitlines():
        try:
            record = _records.decode(line)
        except msgspec.DecodeError:
            failure = failure or SpawnFailure(
                stage="set-up", errno=0, detail="unreadable set-up report"
            )
            continue
        if isinstance(record, InitRecord):
            init_pid = record.pid
        else:
            failure = failure or record.failure
    return SetupReport(init_pid=init_pid, failure=failure)


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
