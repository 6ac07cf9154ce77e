"""Tests for netjail.kernel.jobplan: the job's plan, the set-up pipe and the job's exit."""

from __future__ import annotations

import signal

import msgspec
import pytest

from netjail.kernel.fsplan import HostLayout, PathSource, build_fs_plan
from netjail.kernel.jobplan import (
    JobExit,
    JobPlan,
    SpawnFailure,
    decode_job_exit,
    encode_failure,
    encode_job_status,
    job_hostname,
    read_setup_failure,
)

FAILURE = SpawnFailure(stage="file system", errno=30, detail="mounting /x: Read-only file system")


def _exited(code: int) -> int:
    return code << 8


def test_a_failure_is_one_json_line() -> None:
    """A failure is one JSON object on one line."""
    assert encode_failure(FAILURE) == (
        b'{"stage":"file system","errno":30,"detail":"mounting /x: Read-only file system"}\n'
    )


def test_a_failure_is_read_back() -> None:
    """What the init wrote is what the fork server reads."""
    assert read_setup_failure(encode_failure(FAILURE)) == FAILURE


def test_nothing_on_the_pipe_means_the_command_started() -> None:
    """EOF without data: no failure."""
    assert read_setup_failure(b"") is None


@pytest.mark.parametrize("garbage", [b"{not json\n", b"\n", b'{"stage": 1}\n'])
def test_an_unreadable_report_is_a_failure(garbage: bytes) -> None:
    """Garbage on the pipe fails the start: it is never taken for success."""
    assert read_setup_failure(garbage) == SpawnFailure(
        stage="set-up", errno=0, detail="unreadable set-up report"
    )


@pytest.mark.parametrize("detail", ["\x01" * 3000, "é" * 5000, "x" * 100_000])
def test_a_long_failure_still_fits_one_atomic_write(detail: str) -> None:
    """A failure with a huge detail is cut below PIPE_BUF, keeps its stage, and decodes."""
    data = encode_failure(SpawnFailure(stage="exec", errno=2, detail=detail))
    assert len(data) < 4096
    failure = read_setup_failure(data)
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
