"""The daemon's exec'd helper processes (the fork server, the nftables helper): how they are
started, and how one that ended is described.

Both are exec'd, never merely forked: either may have to be (re)started while the daemon runs
threads, and only a fresh interpreter is safe then. A helper runs as root, so it imports nothing
from the working directory (``-P``) or the user's site-packages (``-s``), and gets no variable
of the daemon's environment but ``PYTHONPATH``, set to where the daemon's own ``netjail``
package is: the helper runs the daemon's code, even a daemon run from a source tree (a
benchmark's older commit, say) rather than the installed package.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

import netjail


def helper_command(module: str) -> list[str]:
    """How the daemon starts the helper that is ``module`` (``python -s -P -m MODULE``)."""
    return [sys.executable, "-s", "-P", "-m", module]


def helper_env() -> dict[str, str]:
    """The whole environment a helper gets: the path to the daemon's own netjail package."""
    return {"PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(netjail.__file__)))}


def describe_exit(status: int | None) -> str:
    """How a helper ended, from its Popen returncode, as a sentence's predicate."""
    if status is None:
        return "ended"
    if status < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-status).name}"
        return f"was killed by signal {-status}"
    return f"exited with status {status}"
