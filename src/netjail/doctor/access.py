"""The daemon's socket and the daemon: can this user reach netjaild, and does it answer? (pure)

The socket check only warns: it explains the daemon check, which FAILs when netjaild does not
answer hello and status, with the fix for why not (not running, stuck, closed to this user,
refusing this user, or another protocol version).
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from typing import Literal

from netjail import protocol as p
from netjail.doctor.result import Check
from netjail.errors import DaemonConnectionError, NetjailError, PermissionDeniedError
from netjail.statusview import describe_fork_server, fork_server_troubled
from netjail.text import sanitize

START_DAEMON_FIX = "start netjaild: sudo netjaild & (with systemd: sudo systemctl start netjaild)"


@dataclass(frozen=True)
class SocketInfo:
    """The daemon socket as the current user sees it."""

    path: str
    #: "unreachable": a directory on the way may not be searched by us.
    kind: Literal["socket", "missing", "unreachable", "other"]
    #: st_mode, owner and group names; meaningful when kind is "socket".
    mode: int = 0
    owner: str = ""
    group: str = ""
    gid: int = -1
    #: os.access(path, R_OK | W_OK): whether we may connect.
    usable: bool = False
    euid: int = 0
    user: str = ""
    #: The groups of this process, and the groups the user database puts the user in.
    session_gids: frozenset[int] = frozenset()
    member_gids: frozenset[int] = frozenset()


def _group_fix(group: str) -> str:
    return f"add yourself to the {group} group: sudo usermod -aG {group} $USER, then log in again"


def _socket_access_problem(info: SocketInfo) -> tuple[str, str]:
    """Why the current user may not connect to an existing socket, and what to do."""
    group = info.group or "netjail"
    if info.gid in info.member_gids and info.gid not in info.session_gids:
        return (
            f"you are in group {group}, but this login session is not yet",
            f"log in again (or start a shell with: newgrp {group})",
        )
    if info.mode & 0o060 == 0o060 and info.gid not in info.session_gids:
        return f"you ({info.user}) are not root and not in group {group}", _group_fix(group)
    return (
        "you may not open it (its mode, or a directory on the way)",
        f"check the permissions of {info.path} and its directories (netjaild makes the socket"
        " 0660 in a 0755 directory)",
    )


def check_socket(info: SocketInfo) -> Check:
    """Whether the daemon's socket exists and the current user may connect to it."""
    name = "socket"
    if info.kind == "missing":
        return Check.warn(
            name,
            f"{info.path} does not exist (netjaild is not running, or listens elsewhere)",
            "if netjaild listens elsewhere: --socket PATH or NETJAIL_SOCKET=PATH; otherwise"
            " start it (see the daemon check)",
        )
    if info.kind == "unreachable":
        return Check.warn(
            name,
            f"cannot reach {info.path}: a directory on the way is closed to you",
            f"make the directories of {info.path} searchable (netjaild makes its own 0755)",
        )
    if info.kind == "other":
        return Check.warn(
            name,
            f"{info.path} is not a socket",
            "point netjail at netjaild's socket: --socket PATH or NETJAIL_SOCKET",
        )
    shown = f"{info.path} ({stat.filemode(info.mode)} {info.owner}:{info.group})"
    if not info.usable:
        problem, fix = _socket_access_problem(info)
        return Check.warn(name, f"{shown}: {problem}", fix)
    if info.euid == 0:
        why = "root"
    elif info.owner == info.user:
        why = "its owner"
    elif info.gid in info.session_gids:
        why = f"group {info.group}"
    else:
        why = "it is open to every user"
    return Check.ok(name, f"{shown}: you may connect ({why})")


def _daemon_answered(name: str, answer: p.StatusReply, socket: SocketInfo) -> Check:
    """ok with what the daemon says of itself; a warning when its fork server is in trouble."""
    profile = (
        f", jobs get seccomp profile {sanitize(answer.seccomp_profile)}"
        if answer.seccomp_profile
        else ""
    )
    detail = (
        f"netjaild {answer.version} (pid {answer.pid}) answers on {socket.path},"
        f" up {answer.uptime_s:.0f}s{profile}"
    )
    if fork_server_troubled(answer):
        return Check.warn(
            name,
            f"{detail}; its fork server is {describe_fork_server(answer)}",
            "the daemon's log says why its fork server ended (journalctl -u netjaild); "
            "jobs in flight then failed, and it restarts it by itself",
        )
    return Check.ok(name, detail)


def check_daemon(answer: p.StatusReply | NetjailError, socket: SocketInfo) -> Check:
    """Whether netjaild answered hello and status on its socket; the fix depends on why not."""
    name = "daemon"
    if isinstance(answer, p.StatusReply):
        return _daemon_answered(name, answer, socket)
    detail = str(answer)
    if isinstance(answer, PermissionDeniedError):
        return Check.fail(
            name,
            f"netjaild refused you: {detail}",
            "ask its administrator to add you to allowed_uids or allowed_groups in"
            " /etc/netjail/netjaild.toml",
        )
    if isinstance(answer, DaemonConnectionError):
        if socket.kind == "socket" and not socket.usable:
            return Check.fail(name, detail, _socket_access_problem(socket)[1])
        if socket.kind == "socket":
            # The socket is there but nobody answers on it: a daemon that died, or one stuck.
            return Check.fail(
                name,
                detail,
                "restart netjaild (sudo systemctl restart netjaild, or sudo netjaild &); if that"
                " fails, see its log (journalctl -u netjaild)",
            )
        return Check.fail(name, detail, START_DAEMON_FIX)
    return Check.fail(
        name,
        detail,
        "see netjaild's log (journalctl -u netjaild); a netjail client and daemon of different"
        " versions may not understand each other: upgrade both",
    )
