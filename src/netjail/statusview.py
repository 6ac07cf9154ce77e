"""How the daemon's status reads, for `netjail status` and `netjail doctor` (pure)."""

from __future__ import annotations

from netjail import protocol as p
from netjail.text import sanitize


def describe_fork_server(status: p.StatusReply) -> str | None:
    """The fork server's state in words, sanitised; None from a daemon that does not say."""
    if status.fork_server is None:
        return None
    text = sanitize(status.fork_server, 20)
    if status.fork_server == "down":
        text += ", a new one starts shortly (jobs are refused until then)"
    elif status.fork_server == "starting":
        text += " (a new one, not yet serving)"
    if status.fork_server_restarts:
        times = "time" if status.fork_server_restarts == 1 else "times"
        text += f"; restarted {status.fork_server_restarts} {times}"
    if status.fork_server_last_exit is not None:
        text += f"; the last one {sanitize(status.fork_server_last_exit, 200)}"
    return text


def fork_server_troubled(status: p.StatusReply) -> bool:
    """Whether the fork server is not serving, or had to be restarted."""
    return status.fork_server not in (None, "up") or bool(status.fork_server_restarts)
