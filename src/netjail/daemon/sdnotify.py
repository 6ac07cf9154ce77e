"""systemd readiness notification and socket activation, without libsystemd.

Both protocols are small and stable (see sd_notify(3) and sd_listen_fds(3)), so they are spoken
here directly rather than through a C library the daemon would otherwise not need:

- ``notify()`` sends one datagram to ``$NOTIFY_SOCKET``; outside systemd (the variable is unset)
  it does nothing, so the daemon calls it unconditionally.
- ``listen_fds()`` adopts the sockets systemd passed (fd 3 onwards) when ``$LISTEN_PID`` names
  this process, and unsets the variables so that no child (a job) believes they are its own.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterable, Mapping

from netjail.errors import ConfigError

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3
_LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def notify_address(value: str) -> str | None:
    """The socket address ``$NOTIFY_SOCKET`` names, or None when it names none we can use.

    ``/path`` is a file system socket; ``@name`` is an abstract one (a leading NUL byte).
    Other forms (systemd's ``vsock:`` for virtual machines) are not supported.
    """
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None


def notify(state: str) -> bool:
    """Send ``state`` (newline-separated ``KEY=value`` assignments) to the service manager.

    Returns True when it was sent; False when ``$NOTIFY_SOCKET`` is unset (not run by systemd)
    or unusable, or the send failed (logged), as sd_notify() does: a missed notification must
    not bring the daemon down, and under Type=notify systemd reports the missing READY itself.
    """
    value = os.environ.get("NOTIFY_SOCKET", "")
    if not value:
        return False
    address = notify_address(value)
    if address is None:
        log.warning("NOTIFY_SOCKET=%r is not a Unix socket address; not notifying", value)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode("utf-8"), address)
    except OSError as exc:
        log.warning("cannot notify the service manager at %r: %s", value, exc.strerror or exc)
        return False
    return True


def status_line(text: str) -> str:
    """``STATUS=text`` with the text on one printable line.

    The status can carry outside text (a path, an error message); a newline in it would start
    a new assignment such as ``MAINPID=`` or ``READY=1``, so control characters become spaces.
    """
    cleaned = "".join(ch if ch.isprintable() else " " for ch in text)
    return f"STATUS={cleaned}"


def notify_ready(status: str | None = None) -> bool:
    """Tell the service manager that start-up is complete (``READY=1``), with a status line."""
    state = "READY=1"
    if status is not None:
        state += "\n" + status_line(status)
    return notify(state)


def notify_status(text: str) -> bool:
    """Set the one-line status ``systemctl status`` shows."""
    return notify(status_line(text))


def notify_stopping() -> bool:
    """Tell the service manager the daemon is shutting down (``STOPPING=1``)."""
    return notify("STOPPING=1")


def count_listen_fds(environ: Mapping[str, str], pid: int) -> int:
    """How many fds systemd passed to process ``pid``, from ``LISTEN_PID``/``LISTEN_FDS``.

    0 when the variables are absent or meant for another process (a parent that passed its
    environment on); raises ConfigError when they are malformed.
    """
    listen_pid = environ.get("LISTEN_PID")
    if listen_pid is None:
        return 0
    try:
        target = int(listen_pid)
    except ValueError:
        raise ConfigError(f"LISTEN_PID={listen_pid!r} is not a process id") from None
    if target != pid:
        return 0
    listen_fds = environ.get("LISTEN_FDS")
    if listen_fds is None:
        return 0
    try:
        count = int(listen_fds)
    except ValueError:
        count = -1
    if count <= 0:
        raise ConfigError(f"LISTEN_FDS={listen_fds!r} is not a positive number of descriptors")
    return count


def listen_fds(*, first_fd: int = SD_LISTEN_FDS_START) -> list[socket.socket]:
    """The sockets systemd passed to this process, as sd_listen_fds(unset_environment=1).

    The LISTEN_* variables are removed from the environment whatever the outcome, and every
    passed fd is made close-on-exec, so that jobs inherit neither. ``first_fd`` exists for tests
    (systemd always starts at fd 3). Raises ConfigError when the variables are malformed or a
    passed fd is not an open socket.
    """
    try:
        count = count_listen_fds(os.environ, os.getpid())
    finally:
        for name in _LISTEN_VARIABLES:
            os.environ.pop(name, None)
    sockets: list[socket.socket] = []
    for fd in range(first_fd, first_fd + count):
        try:
            os.set_inheritable(fd, False)
            # socket() with fileno= asks the kernel for the family and type, and owns the fd.
            sockets.append(socket.socket(fileno=fd))
        except OSError as exc:
            raise ConfigError(
                f"LISTEN_FDS={count}, but fd {fd} is not an open socket ({exc.strerror or exc});"
                " check the .socket unit"
            ) from None
    return sockets


def find_unix_listener(sockets: Iterable[socket.socket], path: str) -> socket.socket | None:
    """The listening Unix stream socket among ``sockets`` that is bound to ``path``, if any."""
    for sock in sockets:
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            continue
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            continue
        name = sock.getsockname()
        if isinstance(name, str) and name and _same_path(name, path):
            return sock
    return None


def _same_path(bound: str, path: str) -> bool:
    if os.path.normpath(bound) == os.path.normpath(path):
        return True
    # The same socket reached through a symlink (/var/run -> /run): compare the inodes.
    try:
        first, second = os.stat(bound), os.stat(path)
    except OSError:
        return False
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)
