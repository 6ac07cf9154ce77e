"""A job's namespaces, and PID 1 of its jail: what the fork server's child does for each job.

The fork server calls ``spawn_job``, which forks **C** (``run_job_child``). C, in order:

1. resets every signal and closes every fd it was not given;
2. enters the jail's network namespace (setns);
3. joins the job's cgroups, so everything after it is born limited and killable;
4. takes detached copies of the bind sources (``rootfs.open_bind_trees``) while it is still in
   the daemon's mount namespace, where the client's source fds were opened;
5. unshares new PID, mount, IPC and UTS namespaces;
6. forks **I**, PID 1 of the new PID namespace, reports I's host pid and exits.

I is reparented to the fork server (a child subreaper) and is, from then on, the job's main
process as the fork server sees it: the pid it reaps and reports, the pidfd the daemon signals.
I builds the job's file system and pivots into it (``rootfs.apply_fs_plan``: /proc is mounted
here because it shows the PID namespace of the process that mounts it), sets the hostname,
starts a session, drops privileges, and forks **K**, the command. K sets up stdio and its
cwd, runs the caller's last steps (the seccomp filter) and execs. I then serves as init.

Reporting (formats in ``netjail.kernel.jobplan``). Set-up records go back on one
close-on-exec pipe: C's with I's host pid, and at most one failure naming the step. EOF means
K exec'd: C has exited, I closed its copy after forking K, and K's closed on exec.

How the job ended. PID 1 of a namespace ignores every signal sent from inside it for which it
has no handler, itself included, so I cannot re-raise the signal that killed K. I exits 128+N,
as a shell reports it, after writing K's wait status to a status pipe; the fork server reads
it when it reaps I (``read_job_exit``).

The seccomp filter is loaded in K only. I runs nothing but this module's loop, its only
inputs are signals and wait statuses, and it is non-dumpable, so a job cannot ptrace it or
read its memory; a filter in I would defend nothing a job can reach, and a filter mistake there
(say, a denied wait4) would wedge the end of every job instead of failing one exec.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import os
import signal
import termios
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

from netjail.errors import NetjailError
from netjail.kernel import rootfs, syscalls
from netjail.kernel.jobplan import (
    FailureRecord,
    InitRecord,
    JobExit,
    JobPlan,
    SpawnFailure,
    decode_job_exit,
    encode_job_status,
    encode_record,
    read_setup_report,
)

#: What I passes on to the job: to the terminal's foreground process group when the job's
#: stdin is its controlling terminal, otherwise to every process of the namespace.
FORWARDED_SIGNALS = frozenset(
    {
        signal.SIGINT,
        signal.SIGTERM,
        signal.SIGHUP,
        signal.SIGQUIT,
        signal.SIGUSR1,
        signal.SIGUSR2,
        signal.SIGWINCH,
        signal.SIGCONT,
    }
)
#: I takes these with sigwaitinfo, not with handlers: blocked from before K is forked, none is
#: lost in between and no Python runs at an arbitrary point. (Blocked, they are queued even
#: though PID 1 would otherwise ignore them.)
_WAITED = FORWARDED_SIGNALS | {signal.SIGCHLD}
#: SIGTTOU blocked too, so K may make itself the terminal's foreground group (tcsetpgrp).
_INIT_MASK = _WAITED | {signal.SIGTTOU}
_NAMESPACES = (
    syscalls.CLONE_NEWPID | syscalls.CLONE_NEWNS | syscalls.CLONE_NEWIPC | syscalls.CLONE_NEWUTS
)
#: close_range's upper bound: above any fd a process can hold.
_FD_CEILING = 1 << 30


@dataclass(frozen=True)
class ExecHook:
    """A step K runs last before exec (the seccomp filter); ``stage`` names it in a failure.

    ``run`` must not import anything: K is already inside the job's file system.
    """

    stage: str
    run: Callable[[], None]


@dataclass(frozen=True)
class StartedJob:
    """A job whose command exec'd: its init's host pid, and the status pipe's read end."""

    init_pid: int
    status_fd: int


# ---------------------------------------------------------------- the fork server's side


def spawn_job(
    plan: JobPlan,
    stdio: Sequence[int],
    source_fds: Sequence[int] = (),
    hooks: Sequence[ExecHook] = (),
) -> StartedJob | SpawnFailure:
    """Fork a job and wait until its command exec'd, or until a step failed.

    Call from a single-threaded process that is a child subreaper (the fork server): I is
    reparented to it, so it must reap I, and read ``read_job_exit`` then. ``stdio`` are the
    job's fds 0-2, ``source_fds`` the fds the plan's ``FdSource`` entries index; the caller
    keeps and closes both. On failure, nothing of the job is left.
    """
    report_r, report_w = os.pipe2(os.O_CLOEXEC)
    status_r, status_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    child = os.fork()
    if child == 0:
        os.close(report_r)
        os.close(status_r)
        run_job_child(plan, stdio, source_fds, report_fd=report_w, status_fd=status_w, hooks=hooks)
    os.close(report_w)
    os.close(status_w)
    chunks = []
    try:
        while chunk := os.read(report_r, 4096):
            chunks.append(chunk)
    finally:
        os.close(report_r)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(child, 0)
    report = read_setup_report(b"".join(chunks))
    if report.failure is None and report.init_pid is not None:
        return StartedJob(init_pid=report.init_pid, status_fd=status_r)
    os.close(status_r)
    if report.init_pid is not None:
        # C has exited, so I is our child now: end it (if a step failed, it is ending) and reap.
        with contextlib.suppress(ProcessLookupError):
            os.kill(report.init_pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(report.init_pid, 0)
    return report.failure or SpawnFailure(stage="init", errno=0, detail="the job's init never ran")


def read_job_exit(status_fd: int, wait_status: int) -> JobExit:
    """How the job ended, once its init (status ``wait_status``) was reaped. Keeps the fd."""
    try:
        record = os.read(status_fd, 8)
    except BlockingIOError:
        record = b""
    return decode_job_exit(record, wait_status)


# ---------------------------------------------------------------- C, the fork server's child


def run_job_child(
    plan: JobPlan,
    stdio: Sequence[int],
    source_fds: Sequence[int],
    *,
    report_fd: int,
    status_fd: int,
    hooks: Sequence[ExecHook] = (),
) -> NoReturn:
    """C: enter the jail's namespaces and fork its init (see the module docstring).

    Runs in a freshly forked child of a single-threaded process; never returns.
    """
    stage = "signals"
    try:
        # No collection in the children: it would touch every object, copying pages for nothing.
        gc.disable()
        _reset_signals()
        stage = "file descriptors"
        _close_fds_except({*stdio, *source_fds, report_fd, status_fd})
        stage = "network namespace"
        ns_fd = os.open(plan.netns_path, os.O_RDONLY | os.O_CLOEXEC)
        syscalls.setns(ns_fd, syscalls.CLONE_NEWNET)
        os.close(ns_fd)
        stage = "cgroup"
        for procs in plan.cgroup_procs:
            fd = os.open(procs, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)
        stage = "bind sources"
        trees = rootfs.open_bind_trees(plan.fs, source_fds)
        for fd in set(source_fds):
            os.close(fd)
        stage = "namespaces"
        syscalls.unshare(_NAMESPACES)
        stage = "init"
        init_pid = os.fork()
        if init_pid == 0:
            _run_init(plan, stdio, trees, report_fd=report_fd, status_fd=status_fd, hooks=hooks)
        _report(report_fd, InitRecord(pid=init_pid))
    except BaseException as e:
        _report(report_fd, FailureRecord(_failure_of(stage, e, plan)))
        os._exit(127)
    os._exit(0)


def _reset_signals() -> None:
    # The job gets every disposition at its default and nothing blocked: Python ignores SIGPIPE
    # and SIGXFSZ, the daemon handles others, and an ignored signal would survive exec.
    signal.set_wakeup_fd(-1)
    for sig in signal.valid_signals():
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


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


# ---------------------------------------------------------------- I, PID 1 of the jail


def _run_init(
    plan: JobPlan,
    stdio: Sequence[int],
    trees: Sequence[int],
    *,
    report_fd: int,
    status_fd: int,
    hooks: Sequence[ExecHook],
) -> NoReturn:
    stage = "mount namespace"
    try:
        # Private first, so nothing mounted next propagates back to the host.
        syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
        stage = "file system"
        rootfs.apply_fs_plan(plan.fs, trees)
        stage = "hostname"
        syscalls.sethostname(plan.hostname)
        stage = "session"
        os.setsid()
        terminal = _take_terminal(stdio[0])
        stage = "privileges"
        drop_privileges(plan.uid, plan.gid)
        # A job runs as I's uid; non-dumpable, I cannot be ptraced or read through /proc/1 by
        # it (setresuid makes I so for a job uid other than 0; this covers uid 0 too).
        syscalls.prctl(syscalls.PR_SET_DUMPABLE, 0)
        stage = "init"
        signal.pthread_sigmask(signal.SIG_BLOCK, _INIT_MASK)
        command = os.fork()
        if command == 0:
            _run_command(plan, stdio, report_fd, terminal, hooks)
    except BaseException as e:
        _report(report_fd, FailureRecord(_failure_of(stage, e, plan)))
        os._exit(127)
    kept = {stdio[0]} if terminal else set()
    for fd in {report_fd, *stdio} - kept:
        with contextlib.suppress(OSError):
            os.close(fd)
    _serve_as_init(command, status_fd, stdio[0] if terminal else None)


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


def _serve_as_init(command: int, status_fd: int, terminal: int | None) -> NoReturn:
    """Reap every child, forward signals, and end with the command."""
    while True:
        sig = signal.sigwaitinfo(_WAITED).si_signo
        if sig != signal.SIGCHLD:
            _forward(sig, terminal)
            continue
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid == command:
                _end(status, status_fd)


def _forward(sig: int, terminal: int | None) -> None:
    # kill(-1) from PID 1 reaches every process of the namespace but PID 1 itself.
    target = -1
    if terminal is not None:
        with contextlib.suppress(OSError):
            target = -os.tcgetpgrp(terminal)
    with contextlib.suppress(OSError):
        os.kill(target, sig)


def _end(status: int, status_fd: int) -> NoReturn:
    with contextlib.suppress(OSError):
        os.write(status_fd, encode_job_status(status))
    # When PID 1 exits, the kernel SIGKILLs every process left in its namespace and reaps them
    # before the exit completes: by the time the fork server sees I end, the job's orphans and
    # daemons are gone too.
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


# ---------------------------------------------------------------- K, the command


def _run_command(
    plan: JobPlan,
    stdio: Sequence[int],
    report_fd: int,
    terminal: bool,
    hooks: Sequence[ExecHook],
) -> NoReturn:
    stage = "stdio"
    try:
        for target, fd in enumerate(stdio):
            os.dup2(fd, target)
        stage = "process group"
        os.setpgid(0, 0)
        if terminal:
            os.tcsetpgrp(0, os.getpid())
        stage = "working directory"
        # After the privilege drop (in I), so the job user's own permissions decide.
        os.chdir(plan.cwd)
        os.closerange(3, report_fd)
        os.closerange(report_fd + 1, _FD_CEILING)
        for hook in hooks:
            stage = hook.stage
            hook.run()
        stage = "exec"
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        os.execvpe(plan.argv[0], plan.argv, plan.env)  # noqa: S606 - exec is the point
    except BaseException as e:
        _report(report_fd, FailureRecord(_failure_of(stage, e, plan)))
    os._exit(127)


def _failure_of(stage: str, error: BaseException, plan: JobPlan) -> SpawnFailure:
    if isinstance(error, OSError):
        code, detail = error.errno or 0, error.strerror or str(error)
    elif isinstance(error, NetjailError):
        cause = error.__cause__
        code = (cause.errno or 0) if isinstance(cause, OSError) else 0
        detail = str(error)
    else:
        code, detail = 0, repr(error)
    if stage == "working directory":
        detail = f"{plan.cwd}: {detail}"
    elif stage == "exec":
        detail = f"{plan.argv[0]}: {detail}"
    return SpawnFailure(stage=stage, errno=code, detail=detail)


def _report(report_fd: int, record: InitRecord | FailureRecord) -> None:
    with contextlib.suppress(OSError):
        os.write(report_fd, encode_record(record))
