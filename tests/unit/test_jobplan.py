"""Tests for netjail.kernel.jobplan: the job's plan, the set-up report and the job's exit."""

from __future__ import annotations

import signal

import msgspec
import pytest

from netjail.kernel.fsplan import HostLayout, PathSource, build_fs_plan
from netjail.kernel.jobplan import (
    FailureRecord,
    InitRecord,
    JobExit,
    JobPlan,
    SetupReport,
    SpawnFailure,
    decode_job_exit,
    encode_job_status,
    encode_record,
    job_hostname,
    read_setup_report,
)

FAILURE = SpawnFailure(stage="file system", errno=30, detail="mounting /x: Read-only file system")


def _exited(code: int) -> int:
    return code << 8


def test_records_are_json_lines() -> None:
    """Each record is one JSON object on one line."""
    assert encode_record(InitRecord(pid=42)) == b'{"type":"init","pid":42}\n'
    assert encode_record(FailureRecord(FAILURE)) == (
        b'{"type":"failed","failure":{"stage":"file system","errno":30,'
        b'"detail":"mounting /x: Read-only file system"}}\n'
    )


def test_a_started_job_reports_its_init() -> None:
    """The init record alone: the job started, and I's host pid is known."""
    assert read_setup_report(encode_record(InitRecord(pid=4242))) == SetupReport(4242, None)


def test_a_failure_is_read_in_either_order() -> None:
    """I's failure may reach the pipe before C's init record; both are read."""
    init, failed = encode_record(InitRecord(pid=7)), encode_record(FailureRecord(FAILURE))
    assert read_setup_report(failed + init) == SetupReport(7, FAILURE)
    assert read_setup_report(init + failed) == SetupReport(7, FAILURE)


def test_a_failure_before_the_fork_has_no_init() -> None:
    """C failed before it forked I: no pid, the failure."""
    failure = SpawnFailure(stage="network namespace", errno=2, detail="No such file or directory")
    report = read_setup_report(encode_record(FailureRecord(failure)))
    assert report == SetupReport(init_pid=None, failure=failure)


def test_an_unreadable_report_is_a_failure() -> None:
    """Garbage on the pipe fails the start: it is never taken for success."""
    report = read_setup_report(encode_record(InitRecord(pid=9)) + b"{not json\n")
    assert report == SetupReport(
        init_pid=9, failure=SpawnFailure(stage="set-up", errno=0, detail="unreadable set-up report")
    )


def test_an_empty_report_has_neither() -> None:
    """Nothing on the pipe: no init, no failure (spawn_job turns that into a failure)."""
    assert read_setup_report(b"") == SetupReport(init_pid=None, failure=None)


@pytest.mark.parametrize("detail", ["\x01" * 3000, "é" * 5000, "x" * 100_000])
def test_a_long_failure_still_fits_one_atomic_write(detail: str) -> None:
    """A failure with a huge detail is cut below PIPE_BUF, keeps its stage, and decodes."""
    data = encode_record(FailureRecord(SpawnFailure(stage="exec", errno=2, detail=detail)))
    assert len(data) < 4096
    failure = read_setup_report(data).failure
    assert failure is not None
    assert (failure.stage, failure.errno) == ("exec", 2)
    assert 0 < len(failure.detail) < len(detail)
    assert detail.startswith(failure.detail)


@pytest.mark.parametrize(
    ("record", "init_status", "expected"),
    [
        (encode_job_status(_exited(7)), _exited(7), JobExit(7, None)),
        # K killed by SIGTERM: I exited 143, its record tells the truth.
        (encode_job_status(signal.SIGTERM), _exited(143), JobExit(None, signal.SIGTERM)),
        # A command that exited 143 itself stays an exit code.
        (encode_job_status(_exited(143)), _exited(143), JobExit(143, None)),
        # No record: I was SIGKILLed from outside; its own status is the job's.
        (b"", int(signal.SIGKILL), JobExit(None, signal.SIGKILL)),
        (b"\x01\x02", _exited(1), JobExit(1, None)),
    ],
)
def test_decode_job_exit(record: bytes, init_status: int, expected: JobExit) -> None:
    """The command's wait status from I's record wins; without one, I's own status is used."""
    assert decode_job_exit(record, init_status) == expected


def test_the_default_hostname_names_the_job() -> None:
    """A job's hostname is netjail-<job id>."""
    assert job_hostname("j-3f2a9c01") == "netjail-j-3f2a9c01"


def test_a_job_plan_crosses_the_fork_servers_socket_intact() -> None:
    """JobPlan survives a msgpack round trip, its file system plan included."""
    plan = JobPlan(
        argv=["python3", "-c", "print(1)"],
        env={"HOME": "/home/job"},
        cwd="/home/job",
        uid=61184,
        gid=61184,
        netns_path="/run/netns/netjail-j-1",
        cgroup_procs=["/sys/fs/cgroup/pids/netjail/j-1/cgroup.procs"],
        hostname=job_hostname("j-1"),
        fs=build_fs_plan(host=HostLayout(()), home=PathSource("/var/lib/netjail/home/j-1")),
    )
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(plan), type=JobPlan) == plan
