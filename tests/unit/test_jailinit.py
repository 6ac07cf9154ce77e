"""Tests for netjail.kernel.jailinit that need no root: the fork server's side of a start."""

from __future__ import annotations

import errno
import os
import signal
import threading
from pathlib import Path

import pytest

from netjail.kernel import initloop, jailinit, syscalls
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
    } == initloop.FORWARDED_SIGNALS


def _spawn_and_read(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    read_fd, write_fd = os.pipe()
    null = os.open("/dev/null", os.O_RDONLY)
    try:
        pid = syscalls.spawn_command(argv, env, [null, write_fd, write_fd], foreground_of=None)
    finally:
        os.close(null)
        os.close(write_fd)
    with os.fdopen(read_fd) as out:
        text = out.read()
    return os.waitpid(pid, 0)[1], text


def test_the_command_gets_exactly_its_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """posix_spawn gives the command the plan's environment only, and its stdio on 0-2.

    (That it holds no other fd is the init's part, tested against the real kernel.)
    """
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    status, out = _spawn_and_read(["env"], {"PATH": "/usr/bin:/bin", "ONLY": "this"})
    assert (status, sorted(out.splitlines())) == (0, ["ONLY=this", "PATH=/usr/bin:/bin"])


def test_a_missing_command_is_enoent(monkeypatch: pytest.MonkeyPatch) -> None:
    """A command found nowhere fails the spawn with ENOENT, which becomes exit 127."""
    # posix_spawnp searches the caller's PATH: the init sets it to the job's.
    monkeypatch.setenv("PATH", "/usr/bin")
    with pytest.raises(FileNotFoundError):
        syscalls.spawn_command(
            ["no-such-command-njk"], {"PATH": "/usr/bin"}, [0, 1, 2], foreground_of=None
        )
