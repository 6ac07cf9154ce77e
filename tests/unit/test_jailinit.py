"""Tests for netjail.kernel.jailinit's pure parts: the set-up report, the job's exit, the plan."""

from __future__ import annotations

import os
import signal

import msgspec
import pytest

from netjail.kernel import jailinit
from netjail.kernel.fsplan import HostLayout, PathSource, build_fs_plan
from netjail.kernel.jailinit import (
    JobExit,
    JobPlan,
    SetupReport,
    SpawnFailure,
    decode_job_exit,
    job_hostname,
    read_setup_report,
)

FAILURE = SpawnFailure(stage="file system", errno=30, detail="mounting /x: Read-only file system")


def _record(record: jailinit._InitStarted | jailinit._Failed) -> bytes:
    return msgspec.json.encode(record) + b"\n"


def _exited(code: int) -> int:
    return code << 8


def test_a_started_job_reports_its_init() -> None:
    """C's init record alone: the job started, and I's host pid is known."""
    data = _record(jailinit._InitStarted(pid=4242))
    assert read_setup_report(data) == SetupReport(init_pid=4242, failure=None)


def test_a_failure_is_read_in_either_order() -> None:
    """I's failure may reach the pipe before C's init record; both are read."""
    init, failed = _record(jailinit._InitStarted(pid=7)), _record(jailinit._Failed(FAILURE))
    expected = SetupReport(init_pid=7, failure=FAILURE)
    assert read_setup_report(failed + init) == expected
    assert read_setup_report(init + failed) == expected


def test_a_failure_before_the_fork_has_no_init() -> None:
    """C failed before it forked I: no pid, the failure."""
    failure = SpawnFailure(stage="network namespace", errno=2, detail="No such file or directory")
    report = read_setup_report(_record(jailinit._Failed(failure)))
    assert report == SetupReport(init_pid=None, failure=failure)


def test_an_unreadable_report_is_a_failure() -> None:
    """Garbage on the pipe fails the start, it is never taken for success."""
    report = read_setup_report(_record(jailinit._InitStarted(pid=9)) + b"{not json\n")
    assert report.init_pid == 9
    assert report.failure == SpawnFailure(
        stage="set-up", errno=0, detail="unreadable set-up report"
    )


def test_an_empty_report_has_neither() -> None:
    """Nothing on the pipe: no init, no failure (spawn_job turns that into a failure)."""
    assert read_setup_report(b"") == SetupReport(init_pid=None, failure=None)


@pytest.mark.parametrize(
    ("record", "init_status", "expected"),
    [
        ((7 << 8).to_bytes(4, "little"), _exited(7), JobExit(7, None)),
        # K killed by SIGTERM: I exited 143, the record tells the truth.
        (int(signal.SIGTERM).to_bytes(4, "little"), _exited(143), JobExit(None, signal.SIGTERM)),
        # A command that exited 143 itself stays an exit code.
        ((143 << 8).to_bytes(4, "little"), _exited(143), JobExit(143, None)),
        # No record: I was SIGKILLed from outside; its own status is the job's.
        (b"", int(signal.SIGKILL), JobExit(None, signal.SIGKILL)),
        (b"\x01\x02", _exited(1), JobExit(1, None)),
    ],
)
def test_decode_job_exit(record: bytes, init_status: int, expected: JobExit) -> None:
    """K's wait status from I's record wins; without one, I's own status is used."""
    assert decode_job_exit(record, init_status) == expected


def test_read_job_exit_reads_the_status_pipe() -> None:
    """The record on a non-blocking pipe is read; an empty pipe falls back to I's status."""
    read_fd, write_fd = os.pipe2(os.O_NONBLOCK)
    try:
        assert jailinit.read_job_exit(read_fd, _exited(3)) == JobExit(3, None)
        os.write(write_fd, int(signal.SIGINT).to_bytes(4, "little"))
        assert jailinit.read_job_exit(read_fd, _exited(130)) == JobExit(None, signal.SIGINT)
    finally:
        os.close(read_fd)
        os.close(write_fd)


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


def test_a_long_failure_still_fits_one_atomic_write() -> None:
    """A failure with a huge detail is cut to below PIPE_BUF and still decodes."""
    read_fd, write_fd = os.pipe()
    try:
        failure = SpawnFailure(stage="exec", errno=2, detail="\x01" * 3000)
        jailinit._report(write_fd, jailinit._Failed(failure))
        data = os.read(read_fd, 65536)
    finally:
        os.close(read_fd)
        os.close(write_fd)
    assert len(data) < 4096
    report = read_setup_report(data)
    assert report.failure is not None
    assert report.failure.detail == "\x01" * len(report.failure.detail)
    assert report.failure.stage == "exec"
