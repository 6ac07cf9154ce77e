"""Tests for netjail.kernel.jailinit that need no root: the fork server's side of a start."""

from __future__ import annotations

import errno
import os
import signal
import threading
from pathlib import Path

from netjail.kernel import jailinit
from netjail.kernel.fsplan import HostLayout, PathSource, build_fs_plan
from netjail.kernel.jobplan import JobExit, JobPlan, SpawnFailure, encode_job_status


def _plan(netns_path: str) -> JobPlan:
    return JobPlan(
        argv=["true"],
        env={},
        cwd="/",
        uid=65534,
        gid=65534,
        netns_path=netns_path,
        cgroup_procs=[],
        hostname="netjail-unit",
        fs=build_fs_plan(host=HostLayout(()), home=PathSource("/nonexistent")),
    )


def test_a_failed_step_comes_back_named_and_nothing_is_left() -> None:
    """A start that fails reports the step; no process of it is left.

    As root the init runs and cannot enter a missing netns; without root the PID namespace
    cannot even be made.
    """
    before = _children()
    null = os.open("/dev/null", os.O_RDWR)
    try:
        outcome = jailinit.spawn_job(_plan("/nonexistent/netns"), [null, null, null])
    finally:
        os.close(null)
    if os.geteuid() == 0:
        expected = SpawnFailure("network namespace", errno.ENOENT, "No such file or directory")
    else:
        expected = SpawnFailure("namespaces", errno.EPERM, "unshare: Operation not permitted")
    assert outcome == expected
    assert _children() == before


def _children() -> set[str]:
    """This process's children, zombies included."""
    tid = threading.get_native_id()
    return set(Path(f"/proc/self/task/{tid}/children").read_text().split())


def test_read_job_exit_reads_the_status_pipe() -> None:
    """The record on a non-blocking pipe is read; an empty pipe falls back to I's status."""
    read_fd, write_fd = os.pipe2(os.O_NONBLOCK)
    try:
        assert jailinit.read_job_exit(read_fd, 3 << 8) == JobExit(3, None)
        os.write(write_fd, encode_job_status(signal.SIGINT))
        assert jailinit.read_job_exit(read_fd, 130 << 8) == JobExit(None, signal.SIGINT)
    finally:
        os.close(read_fd)
        os.close(write_fd)


def test_init_forwards_the_signals_a_job_needs() -> None:
    """The init passes on terminal, job-control and user signals, never SIGKILL or SIGSTOP."""
    assert {
        signal.SIGINT,
        signal.SIGTERM,
        signal.SIGHUP,
        signal.SIGQUIT,
        signal.SIGUSR1,
        signal.SIGUSR2,
        signal.SIGWINCH,
        signal.SIGCONT,
    } == jailinit.FORWARDED_SIGNALS
