"""A job's namespaces and its PID 1: what the fork server does, and its child runs, per job.

``spawn_job`` runs in the fork server. It unshares a new PID namespace *for its children*,
forks **I**, and at once puts its own children's PID namespace back. So I is PID 1 of the
job's namespace, and also the fork server's own child: the pid it reaps and reports, the
pidfd the daemon signals. (A first child that unshares and forks I would cost one more fork of
the fork server, about 2 ms here, and nothing else: I does the same steps, as root, first.)

I (``run_job_init``), in order:

1. blocks every signal (it takes those it serves with sigwaitinfo) and closes every fd it was
   not given;
2. enters the jail's network namespace (setns);
3. joins the job's cgroups, before it forks anything, so every process of the job is born
   limited and killable;
4. takes detached copies of the bind sources (``rootfs.open_bind_trees``) while still in the
   daemon's mount namespace, where the client's source fds were opened;
5. unshares new mount, IPC and UTS namespaces;
6. builds the job's file system and pivots into it (``rootfs.apply_fs_plan``; /proc shows the
   PID namespace of the process that mounts it, I's);
7. starts a session (a standby, ahead of its job: with the scheduler's autogroups on, a new
   session is a new task group, ~0.4 ms here); sets the hostname; takes stdin as its
   controlling terminal if it is a terminal no one else holds; with a ``TerminalPlan``, the
   job's stdio is first replaced by a pty of its own from the jail's devpts, whose master goes
   out on the socket passed as stdin (``netjail.kernel.pty``);
8. drops privileges (no capability, no supplementary group, the job's uid and gid,
   no_new_privs) and becomes non-dumpable, so the job, which runs as the same uid, cannot
   ptrace I or read it through /proc/1;
9. enters the job's cwd, then runs the caller's last steps (``ExecHook``: the seccomp filter);
10. spawns **K**, the command, with posix_spawn: a vfork-like clone in which only glibc runs,
    so no page table is copied (a fork of the fork server costs about 2 ms on this VM);
11. serves as init (``netjail.kernel.initloop``): reaps every child, forwards signals, and
    exits with K's status.

The seccomp filter is loaded in I, last before K's exec, because K is spawned by glibc and
runs no Python. So it binds I too. That costs I nothing: after step 9, I only spawns K,
waits, kills and writes, which the filter allows (it must allow clone without namespace
flags and execve for any job anyway).

Reporting (formats in ``netjail.kernel.jobplan``). A failed step is written to a
close-on-exec pipe, naming the step; EOF without a record means K exec'd: I closed its copy of
the pipe after spawning K, and K's closed on exec.

How the job ended. PID 1 of a namespace ignores every signal sent from inside it for which it
has no handler, itself included, so I cannot re-raise the signal that killed K. Once K ended,
I kills and reaps every other process of the namespace, writes K's wait status to a status
pipe, and exits 128+N, as a shell reports it. The fork server watches that pipe: the record
tells the daemon at once that the job is over (``Ended``), without waiting for I's own exit,
the teardown of a Python process's address space and of the job's namespaces (~2 ms here);
I's reaping (``read_job_exit``) follows with its rusage.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import gc
import os
import signal
import socket
import termios
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

import msgspec

from netjail.errors import NetjailError, SpawnError
from netjail.kernel import prefault, rootfs, syscalls
from netjail.kernel.fsplan import FsPlan, split_fs_plan
from netjail.kernel.initloop import serve_as_init
from netjail.kernel.jobplan import (
    JobExit,
    JobPlan,
    SpawnFailure,
    decode_job_exit,
    encode_failure,
    read_setup_failure,
)
from netjail.kernel.pty import open_job_pty
from netjail.kernel.standbychannel import STANDBY_READY, receive_plan

_ALL_SIGNALS = frozenset(signal.valid_signals())
_NAMESPACES = syscalls.CLONE_NEWNS | syscalls.CLONE_NEWIPC | syscalls.CLONE_NEWUTS
_plans = msgspec.msgpack.Decoder(JobPlan)
#: close_range's upper bound: above any fd a process can hold.
_FD_CEILING = 1 << 30


@dataclass(frozen=True)
class ExecHook:
    """A step I runs last before the command is spawned (the seccomp filter, which then binds
    I and the command); ``stage`` names it in a failure.

    ``run`` must not import anything: I is already inside the job's file system.
    """

    stage: str
    run: Callable[[], None]


@dataclass(frozen=True)
class StartedJob:
    """A job whose command exec'd: its init's pid, and the status pipe's read end."""

    init_pid: int
    status_fd: int


# ---------------------------------------------------------------- the fork server's side


def spawn_job(
    plan: JobPlan,
    stdio: Sequence[int],
    source_fds: Sequence[int] = (),
    hooks: Sequence[ExecHook] = (),
) -> StartedJob | SpawnFailure:
    """Fork a job's init and wait until its command exec'd, or until a step failed.

    Call from a single-threaded process (the fork server), which must reap the init and read
    ``read_job_exit`` then. ``stdio`` are the job's fds 0-2, ``source_fds`` the fds the plan's
    ``FdSource`` entries index; the caller keeps and closes both. On failure, nothing of the
    job is left.
    """
    report_r, report_w = os.pipe2(os.O_CLOEXEC)
    status_r, status_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        init_pid = fork_in_new_pid_namespace()
    except OSError as e:
        for fd in (report_r, report_w, status_r, status_w):
            os.close(fd)
        return SpawnFailure(stage="namespaces", errno=e.errno or 0, detail=e.strerror or str(e))
    if init_pid == 0:
        os.close(report_r)
        os.close(status_r)
        run_job_init(plan, stdio, source_fds, report_fd=report_w, status_fd=status_w, hooks=hooks)
    os.close(report_w)
    os.close(status_w)
    chunks = []
    try:
        while chunk := os.read(report_r, 4096):
            chunks.append(chunk)
    finally:
        os.close(report_r)
    failure = read_setup_failure(b"".join(chunks))
    if failure is None:
        return StartedJob(init_pid=init_pid, status_fd=status_r)
    os.close(status_r)
    # The init is ending (a step failed): make sure, and reap it.
    with contextlib.suppress(ProcessLookupError):
        os.kill(init_pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(init_pid, 0)
    return failure


def fork_in_new_pid_namespace() -> int:
    """fork(), the child being PID 1 of a new PID namespace; the caller's own stays as it was.

    unshare(CLONE_NEWPID) changes only the namespace the caller's next children are born in;
    setns to the caller's own one undoes that right after the fork.
    """
    own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    try:
        syscalls.unshare(syscalls.CLONE_NEWPID)
        pid = -1
        try:
            pid = os.fork()
        finally:
            if pid != 0:  # in the caller, whether the fork worked or not
                syscalls.setns(own, syscalls.CLONE_NEWPID)
        return pid
    finally:
        os.close(own)


def read_job_exit(status_fd: int, wait_status: int) -> JobExit:
    """How the job ended, once its init (status ``wait_status``) was reaped. Keeps the fd."""
    try:
        record = os.read(status_fd, 8)
    except BlockingIOError:
        record = b""
    return decode_job_exit(record, wait_status)


# ---------------------------------------------------------------- I, PID 1 of the jail


def run_job_init(
    plan: JobPlan,
    stdio: Sequence[int],
    source_fds: Sequence[int],
    *,
    report_fd: int,
    status_fd: int,
    hooks: Sequence[ExecHook] = (),
) -> NoReturn:
    """I: steps 1-11 of the module docstring. Runs as PID 1 of a fresh PID namespace, in a
    just-forked child of a single-threaded process; never returns."""
    stage = "signals"
    try:
        stage = _start_init({*stdio, *source_fds, report_fd, status_fd})
        stage = _enter_jail(plan.netns_path, plan.cgroup_procs)
    except BaseException as e:
        _report(report_fd, _failure_of(stage, e, plan))
        os._exit(127)
    _finish_job(plan, stdio, source_fds, report_fd=report_fd, status_fd=status_fd, hooks=hooks)


def run_standby_init(
    netns_path: str,
    cgroup_procs: Sequence[str],
    base: FsPlan,
    *,
    channel: int,
    report_fd: int,
    status_fd: int,
    hooks: Sequence[ExecHook] = (),
    hot: Sequence[tuple[int, int]] = (),
    learn_fd: int = -1,
) -> NoReturn:
    """A pool jail's I, ahead of any job: steps 1-6 with the ``base`` of every job's file
    system (``fsplan.split_fs_plan``) and its session (step 7's first part), then it copies
    the ``hot`` pages ahead (``prefault``), says so on ``channel`` and waits there for its one
    plan (``receive_plan``). With it come detached trees of the job's own binds (the daemon
    made them in its mount namespace): I adds the job's steps to its root, seals it, and goes
    on from step 7. Ends quietly if the channel closes first (the jail is destroyed unused).
    With ``learn_fd``, the pages its job's steps wrote go there after its status record."""
    stage = "signals"
    watch: prefault.PageWatch | None = None
    try:
        stage = _start_init({channel, report_fd, status_fd, learn_fd} - {-1})
        stage = _enter_jail(netns_path, cgroup_procs)
        trees = rootfs.open_bind_trees(base, ())
        stage = "namespaces"
        syscalls.unshare(_NAMESPACES)
        syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
        stage = "file system"
        rootfs.enter_new_root(base, trees)
        stage = "session"
        # Ahead of the plan: with the scheduler's autogroups on (the default), a new session
        # is a new task group, the costliest of the init's own steps.
        os.setsid()
        stage = "standby"
        prefault.populate(hot)
        if learn_fd >= 0:
            watch = prefault.PageWatch()
        sock = socket.socket(fileno=channel)
        sock.send(STANDBY_READY)
        received = receive_plan(sock)
        sock.close()
        if received is None:
            os._exit(0)
        plan, stdio, job_trees = received
        if plan.netns_path != netns_path or list(plan.cgroup_procs) != list(cgroup_procs):
            raise SpawnError("the plan is for another jail")
        prefix, steps = split_fs_plan(plan.fs)
        if prefix != base:
            raise SpawnError("the job's file system is not the one this pool jail was made for")
        stage = "file system"
        rootfs.finish_root(steps, job_trees)
    except BaseException as e:
        _report(report_fd, _failure_of(stage, e, None))
        os._exit(127)
    learned = None if watch is None else functools.partial(_tell_written, watch, learn_fd)
    _become_job(
        plan, stdio, report_fd=report_fd, status_fd=status_fd, hooks=hooks, after_record=learned
    )


def _tell_written(watch: prefault.PageWatch, learn_fd: int) -> None:
    """After the record (off the job's path): the pages the job's steps wrote, to the fork
    server (``prefault``); a pipe of at most 32 KB, empty, so the write never waits."""
    with contextlib.suppress(OSError):
        os.write(learn_fd, prefault.encode_pages(watch.written()))


def _start_init(keep: set[int]) -> str:
    """Step 1; the next stage's name."""
    # No collection in the init: it would touch every object, copying pages for nothing.
    gc.disable()
    _reset_signals()
    _close_fds_except(keep)
    # The fork server's 1-2 are the daemon's log: never the job uid's. I reports through
    # report_fd and status_fd only.
    null = os.open(os.devnull, os.O_RDWR)
    for fd in {0, 1, 2} - keep:
        os.dup2(null, fd)
    os.close(null)
    return "network namespace"


def _enter_jail(netns_path: str, cgroup_procs: Sequence[str]) -> str:
    """Steps 2-3; the next stage's name."""
    ns_fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    syscalls.setns(ns_fd, syscalls.CLONE_NEWNET)
    os.close(ns_fd)
    for procs in cgroup_procs:
        fd = os.open(procs, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)
    return "bind sources"


def _finish_job(
    plan: JobPlan,
    stdio: Sequence[int],
    source_fds: Sequence[int],
    *,
    report_fd: int,
    status_fd: int,
    hooks: Sequence[ExecHook],
) -> NoReturn:
    """Steps 4-11, in the jail's netns and cgroups already; never returns."""
    stage = "bind sources"
    try:
        trees = rootfs.open_bind_trees(plan.fs, source_fds)
        for fd in set(source_fds) - set(stdio):
            os.close(fd)
        stage = "namespaces"
        syscalls.unshare(_NAMESPACES)
        # Private first, so nothing mounted next propagates back to the host.
        syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
        stage = "file system"
        rootfs.apply_fs_plan(plan.fs, trees)
        stage = "session"
        os.setsid()
    except BaseException as e:
        _report(report_fd, _failure_of(stage, e, plan))
        os._exit(127)
    _become_job(plan, stdio, report_fd=report_fd, status_fd=status_fd, hooks=hooks)


def _become_job(
    plan: JobPlan,
    stdio: Sequence[int],
    *,
    report_fd: int,
    status_fd: int,
    hooks: Sequence[ExecHook],
    after_record: Callable[[], object] | None = None,
) -> NoReturn:
    """Steps 7-11, in the job's file system and a session of its own already; never
    returns."""
    stage = "hostname"
    try:
        syscalls.sethostname(plan.hostname)
        stage = "terminal"
        stdio, terminal = _own_terminal(plan, stdio)
        stage = "privileges"
        drop_privileges(plan.uid, plan.gid)
        syscalls.prctl(syscalls.PR_SET_DUMPABLE, 0)
        stage = "working directory"
        # After the privilege drop, so the job user's own permissions decide.
        os.chdir(plan.cwd)
        for hook in hooks:
            stage = hook.stage
            hook.run()
        stage = "exec"
        _use_search_path(plan.env)
        command = syscalls.spawn_command(
            plan.argv, plan.env, stdio, foreground_of=0 if terminal else None
        )
    except BaseException as e:
        _report(report_fd, _failure_of(stage, e, plan))
        os._exit(127)
    kept = {stdio[0]} if terminal else set()
    for fd in {report_fd, *stdio} - kept:
        with contextlib.suppress(OSError):
            os.close(fd)
    serve_as_init(command, status_fd, stdio[0] if terminal else None, after_record)


def _reset_signals() -> None:
    # I blocks every signal, and takes those it serves with sigwaitinfo: so no Python handler
    # inherited from the fork server or the daemon can ever run in I, and none of its signals is
    # lost (SIGCHLD at its default disposition would be, while unblocked). The command gets
    # every disposition at its default and an empty mask from posix_spawn.
    signal.pthread_sigmask(signal.SIG_SETMASK, _ALL_SIGNALS)
    signal.set_wakeup_fd(-1)
    # Never ignored, though: children would then be reaped by the kernel, their status lost.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)


def _close_fds_except(keep: set[int]) -> None:
    low = 3
    for fd in sorted(fd for fd in keep if fd >= low):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, _FD_CEILING)


def drop_privileges(uid: int, gid: int) -> None:
    """No capabilities, no supplementary groups, ``uid``/``gid``, no_new_privs."""
    syscalls.lock_out_capabilities()
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    syscalls.clear_capability_sets()
    syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)


def _own_terminal(plan: JobPlan, stdio: Sequence[int]) -> tuple[Sequence[int], bool]:
    """The job's stdio, and whether its stdin is I's controlling terminal: the plan's pty,
    made now in the jail's devpts, or else stdin if it is a terminal no one else holds."""
    if plan.terminal is not None:
        # The stdio that came is the channel the master goes out on (open_job_pty closes it),
        # not the job's: no other copy of it may reach the command.
        for fd in set(stdio[1:]) - {stdio[0]}:
            os.close(fd)
        stdio = [open_job_pty(plan.terminal, stdio[0], plan.uid, plan.gid)] * 3
    return stdio, _take_terminal(stdio[0])


def _take_terminal(fd: int) -> bool:
    """Make ``fd`` I's controlling terminal if it is a terminal no other session holds."""
    if not os.isatty(fd):
        return False
    try:
        fcntl.ioctl(fd, termios.TIOCSCTTY, 0)
    except OSError:
        # Another session's terminal (say, the client's own): signals go to every process.
        return False
    return True


def _use_search_path(env: dict[str, str]) -> None:
    # posix_spawnp looks the command up in the caller's PATH: make it the job's (glibc's
    # default without one is /bin:/usr/bin, as os.execvpe's).
    if "PATH" in env:
        os.environ["PATH"] = env["PATH"]
    else:
        os.environ.pop("PATH", None)


def _failure_of(stage: str, error: BaseException, plan: JobPlan | None) -> SpawnFailure:
    if isinstance(error, OSError):
        code, detail = error.errno or 0, error.strerror or str(error)
    elif isinstance(error, NetjailError):
        cause = error.__cause__
        code = (cause.errno or 0) if isinstance(cause, OSError) else 0
        detail = str(error)
    else:
        code, detail = 0, repr(error)
    if plan is None:
        pass
    elif stage == "working directory":
        detail = f"{plan.cwd}: {detail}"
    elif stage == "exec":
        detail = f"{plan.argv[0]}: {detail}"
    return SpawnFailure(stage=stage, errno=code, detail=detail)


def _report(report_fd: int, failure: SpawnFailure) -> None:
    with contextlib.suppress(OSError):
        os.write(report_fd, encode_failure(failure))
