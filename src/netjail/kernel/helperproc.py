"""The daemon's exec'd helper processes (the fork server, the nftables helper): how they are
started, and how one that ended is described.

Both are exec'd, never merely forked: either may have to be (re)started while the daemon runs
threads, and only a fresh interpreter is safe then. ``-I`` (isolated mode) keeps the helper from
importing anything from the working directory, the user's site-packages or PYTHON* variables:
it runs as root.
"""

from __future__ import annotations

import contextlib
import signal
import sys


def helper_command(module: str) -> list[str]:
    """How the daemon starts the helper that is ``module`` (``python -I -m MODULE``)."""
    return [sys.executable, "-I", "-m", module]


def describe_exit(status: int | None) -> str:
    """How a helper ended, from its Popen returncode, as a sentence's predicate."""
    if status is None:
        return "ended"
    if status < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-status).name}"
        return f"was killed by signal {-status}"
    return f"exited with status {status}"
