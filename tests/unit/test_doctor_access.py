"""netjail doctor's socket and daemon checks, on made-up sockets and daemon answers."""

from __future__ import annotations

import stat

import msgspec

from netjail import protocol as p
from netjail.doctor.access import SocketInfo, check_daemon, check_socket
from netjail.doctor.result import Check, format_checks
from netjail.errors import DaemonConnectionError, PermissionDeniedError, ProtocolError

SOCK = "/run/netjail/netjail.sock"
NETJAIL_GID = 990
USER_GID = 1000


def lines(check: Check) -> list[str]:
    return format_checks([check])


# --------------------------------------------------------------------------------------------
# Socket and daemon


def sock(**overrides: object) -> SocketInfo:
    fields: dict[str, object] = {
        "path": SOCK,
        "kind": "socket",
        "mode": stat.S_IFSOCK | 0o660,
        "owner": "root",
        "group": "netjail",
        "gid": NETJAIL_GID,
        "usable": True,
        "euid": 1000,
        "user": "alice",
        "session_gids": frozenset({USER_GID, NETJAIL_GID}),
        "member_gids": frozenset({USER_GID, NETJAIL_GID}),
    }
    fields.update(overrides)
    return SocketInfo(**fields)  # type: ignore[arg-type]


def test_socket_usable_through_the_group_or_as_root() -> None:
    """ok, with the mode, owner and the reason we may connect."""
    assert lines(check_socket(sock())) == [
        f"ok    socket: {SOCK} (srw-rw---- root:netjail): you may connect (group netjail)"
    ]
    assert lines(check_socket(sock(euid=0, user="root", session_gids=frozenset({0}))))[0] == (
        f"ok    socket: {SOCK} (srw-rw---- root:netjail): you may connect (root)"
    )


def test_socket_usable_as_its_owner_or_by_everyone() -> None:
    """The socket's owner may connect as such; a 0666 socket is open to any user."""
    assert lines(check_socket(sock(owner="alice", session_gids=frozenset({USER_GID})))) == [
        f"ok    socket: {SOCK} (srw-rw---- alice:netjail): you may connect (its owner)"
    ]
    open_to_all = sock(mode=stat.S_IFSOCK | 0o666, session_gids=frozenset({USER_GID}))
    assert lines(check_socket(open_to_all)) == [
        f"ok    socket: {SOCK} (srw-rw-rw- root:netjail): you may connect (it is open to every"
        " user)"
    ]


def test_socket_missing_unreachable_or_not_a_socket() -> None:
    """Each says what is wrong with the path and what to do."""
    assert lines(check_socket(sock(kind="missing"))) == [
        f"warn  socket: {SOCK} does not exist (netjaild is not running, or listens elsewhere)",
        "  fix: if netjaild listens elsewhere: --socket PATH or NETJAIL_SOCKET=PATH; otherwise"
        " start it (see the daemon check)",
    ]
    assert lines(check_socket(sock(kind="unreachable"))) == [
        f"warn  socket: cannot reach {SOCK}: a directory on the way is closed to you",
        f"  fix: make the directories of {SOCK} searchable (netjaild makes its own 0755)",
    ]
    assert lines(check_socket(sock(kind="other")))[0] == f"warn  socket: {SOCK} is not a socket"


def test_socket_user_not_in_the_group() -> None:
    """Not in the socket's group: the usermod fix."""
    info = sock(
        usable=False,
        session_gids=frozenset({USER_GID}),
        member_gids=frozenset({USER_GID}),
    )
    assert lines(check_socket(info)) == [
        f"warn  socket: {SOCK} (srw-rw---- root:netjail): you (alice) are not root and not in"
        " group netjail",
        "  fix: add yourself to the netjail group: sudo usermod -aG netjail $USER, then log in"
        " again",
    ]


def test_socket_user_added_to_the_group_but_not_logged_in_again() -> None:
    """In the group per /etc/group but not in this session: log in again."""
    info = sock(usable=False, session_gids=frozenset({USER_GID}))
    assert lines(check_socket(info)) == [
        f"warn  socket: {SOCK} (srw-rw---- root:netjail): you are in group netjail, but this"
        " login session is not yet",
        "  fix: log in again (or start a shell with: newgrp netjail)",
    ]


def test_socket_closed_to_the_group() -> None:
    """A 0600 socket is closed even to its group: look at the permissions."""
    info = sock(mode=stat.S_IFSOCK | 0o600, usable=False)
    assert lines(check_socket(info)) == [
        f"warn  socket: {SOCK} (srw------- root:netjail): you may not open it (its mode, or a"
        " directory on the way)",
        f"  fix: check the permissions of {SOCK} and its directories (netjaild makes the socket"
        " 0660 in a 0755 directory)",
    ]


STATUS = p.StatusReply(
    version="0.3.0",
    pid=4242,
    uptime_s=61.6,
    jobs_running=0,
    jobs_total=2,
    events_seen=5,
    events_lost=0,
    cgroup_mode="v2",
)


def test_daemon_answers() -> None:
    """A status reply: ok, with version, pid, socket and uptime."""
    assert lines(check_daemon(STATUS, sock())) == [
        f"ok    daemon: netjaild 0.3.0 (pid 4242) answers on {SOCK}, up 62s"
    ]


def test_daemon_says_which_seccomp_profile_its_jobs_get() -> None:
    """A daemon that names its seccomp profile: doctor shows it, sanitised."""
    status = msgspec.structs.replace(STATUS, seccomp_profile="netjail-default-1")
    assert lines(check_daemon(status, sock())) == [
        f"ok    daemon: netjaild 0.3.0 (pid 4242) answers on {SOCK}, up 62s,"
        " jobs get seccomp profile netjail-default-1"
    ]


def test_daemon_not_running_is_a_blocker() -> None:
    """No socket: FAIL with the client's message and how to start netjaild."""
    error = DaemonConnectionError(
        f"cannot connect to {SOCK}: No such file or directory (is netjaild running?)"
    )
    check = check_daemon(error, sock(kind="missing"))
    assert check.status == "FAIL"
    assert lines(check) == [
        f"FAIL  daemon: cannot connect to {SOCK}: No such file or directory (is netjaild running?)",
        "  fix: start netjaild: sudo netjaild & (with systemd: sudo systemctl start netjaild)",
    ]


def test_daemon_socket_left_by_a_dead_daemon() -> None:
    """A socket nobody answers on: restart netjaild, and its log if that fails."""
    error = DaemonConnectionError(f"cannot connect to {SOCK}: Connection refused")
    assert lines(check_daemon(error, sock()))[1] == (
        "  fix: restart netjaild (sudo systemctl restart netjaild, or sudo netjaild &); if that"
        " fails, see its log (journalctl -u netjaild)"
    )


def test_daemon_denied_by_the_socket_permissions() -> None:
    """EACCES on connect: the fix is the group, as for the socket check."""
    error = DaemonConnectionError(
        f"cannot connect to {SOCK}: Permission denied (are you root or in the netjail group?)"
    )
    info = sock(usable=False, session_gids=frozenset({USER_GID}), member_gids=frozenset())
    assert lines(check_daemon(error, info)) == [
        f"FAIL  daemon: cannot connect to {SOCK}: Permission denied (are you root or in the"
        " netjail group?)",
        "  fix: add yourself to the netjail group: sudo usermod -aG netjail $USER, then log in"
        " again",
    ]


def test_daemon_refuses_the_user() -> None:
    """Refused by allowed_uids/allowed_groups: ask the administrator."""
    error = PermissionDeniedError("this user may not use netjail (allowed_uids/allowed_groups)")
    assert lines(check_daemon(error, sock())) == [
        "FAIL  daemon: netjaild refused you: this user may not use netjail"
        " (allowed_uids/allowed_groups)",
        "  fix: ask its administrator to add you to allowed_uids or allowed_groups in"
        " /etc/netjail/netjaild.toml",
    ]


def test_daemon_speaking_another_protocol() -> None:
    """A protocol error: the log, and a version mismatch as the likely cause."""
    check = check_daemon(ProtocolError("expected hello from the daemon, got Exit"), sock())
    assert lines(check) == [
        "FAIL  daemon: expected hello from the daemon, got Exit",
        "  fix: see netjaild's log (journalctl -u netjaild); a netjail client and daemon of"
        " different versions may not understand each other: upgrade both",
    ]


def test_daemon_whose_fork_server_was_restarted_is_a_warning() -> None:
    """A fork server that ended and was replaced: a warning that says how it ended."""
    status = msgspec.structs.replace(
        STATUS, fork_server="up", fork_server_restarts=1, fork_server_last_exit="was killed by X"
    )
    check = check_daemon(status, sock())
    assert (check.status, check.detail) == (
        "warn",
        f"netjaild 0.3.0 (pid 4242) answers on {SOCK}, up 62s; its fork server is up; "
        "restarted 1 time; the last one was killed by X",
    )


def test_daemon_whose_fork_server_is_down_is_a_warning() -> None:
    """A fork server that is down (a new one not started yet): a warning saying so."""
    status = msgspec.structs.replace(
        STATUS, fork_server="down", fork_server_restarts=0, fork_server_last_exit="exited\x1b[2J"
    )
    assert check_daemon(status, sock()).detail == (
        f"netjaild 0.3.0 (pid 4242) answers on {SOCK}, up 62s; its fork server is down, a new "
        "one starts shortly (jobs are refused until then); the last one exited?[2J"
    )


def test_daemon_whose_fork_server_is_up_and_never_restarted_is_ok() -> None:
    """fork_server "up" with no restart changes nothing."""
    status = msgspec.structs.replace(STATUS, fork_server="up", fork_server_restarts=0)
    assert lines(check_daemon(status, sock())) == [
        f"ok    daemon: netjaild 0.3.0 (pid 4242) answers on {SOCK}, up 62s"
    ]
