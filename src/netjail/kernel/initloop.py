"""Step 11 of a job's init (netjail.kernel.jailinit): PID 1 of the job's namespace once the
command runs. It reaps every child, forwards the signals it takes, and, when the command
ends, kills and reaps the rest of the namespace, writes the command's wait status to the
status pipe, and exits with it as a shell reports it (128+N for a signal N)."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from typing import NoReturn

from netjail.kernel.jobplan import encode_job_status

#: What I passes on to the job: to the terminal's foreground process group when the job's
#: stdin is I's controlling terminal, otherwise to every process of the namespace.
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
#: I takes these with sigwaitinfo, not with handlers: blocked from I's start, none is lost and
#: no Python runs at an arbitrary point. Blocked, they are queued even though PID 1 would
#: otherwise ignore them. (Every other signal stays blocked and pending in I.)
_WAITED = FORWARDED_SIGNALS | {signal.SIGCHLD}


def serve_as_init(
    command: int,
    status_fd: int,
    terminal: int | None,
    after_record: Callable[[], object] | None = None,
) -> NoReturn:
    """Reap every child, forward signals, and end with the command (``after_record`` runs
    after the status record, before I exits: off the job's path)."""
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
                _end(status, status_fd, after_record)


def _forward(sig: int, terminal: int | None) -> None:
    # kill(-1) from PID 1 reaches every process of the namespace but PID 1 itself.
    target = -1
    if terminal is not None:
        with contextlib.suppress(OSError):
            target = -os.tcgetpgrp(terminal)
    with contextlib.suppress(OSError):
        os.kill(target, sig)


def _end(status: int, status_fd: int, after_record: Callable[[], object] | None) -> NoReturn:
    # The rest of the job goes before the record: so whoever reads it knows that nothing of the
    # job runs any more, while I's own exit is still under way (the teardown of its address
    # space and namespaces, ~2 ms here: the daemon reports without waiting for it).
    _kill_the_rest()
    with contextlib.suppress(OSError):
        os.write(status_fd, encode_job_status(status))
    if after_record is not None:
        with contextlib.suppress(Exception):
            after_record()
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


def _kill_the_rest() -> None:
    """SIGKILL every other process of the namespace and reap them all, as the kernel would at
    I's exit: kill(-1) from PID 1 reaches every process of the namespace but I, and a fork
    under way either completes before it (its child is killed) or fails (its parent has the
    signal pending). Every process of the namespace is I's descendant, and an orphan is I's
    child (a subreaper among them is killed too), so no child left means none left at all."""
    while True:
        with contextlib.suppress(OSError):
            os.kill(-1, signal.SIGKILL)
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return
