"""A job's own pty: allocated by its init inside the jail, its master handed out.

With stdio "tty" the job's stdin, stdout and stderr are the slave of a pty from the jail's
own devpts instance (the private /dev/pts that ``fsplan`` mounts with ``newinstance``). So
``tty`` in the job names a device that exists in its /dev, the pty's numbers say nothing of
the host's, and the slave is the controlling terminal of the job's session: job control
works. The init opens it after the pivot, as root, gives the slave to the job's uid and gid
(as login gives a user their terminal), and sends the master to the daemon on the Unix socket
it got as its stdin, which the daemon hands to the client with ``started``. The client relays
it and sets its size; the daemon copies no byte of it.

Runs in the job's init, inside the job's file system: nothing here may import anything.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import termios

from netjail.kernel.fdpass import recv_with_fds, send_with_fds
from netjail.kernel.jobplan import TerminalPlan

#: <asm-generic/ioctls.h>: unlockpt(3)'s ioctl, and the one that opens a master's slave
#: without a path lookup (Linux 4.13); neither is in Python's termios module.
TIOCSPTLCK = 0x40045431
TIOCGPTPEER = 0x5441
#: <asm-generic/termbits.h>: the line discipline erases whole UTF-8 characters (the job's
#: LANG is C.UTF-8 unless asked otherwise).
IUTF8 = 0o040000
_OPEN_FLAGS = os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC


def pack_window_size(rows: int, cols: int) -> bytes:
    """struct winsize for TIOCSWINSZ: rows, columns, and no pixel sizes."""
    return struct.pack("HHHH", rows, cols, 0, 0)


def open_job_pty(terminal: TerminalPlan, channel: int, uid: int, gid: int) -> int:
    """Open a pty in the current /dev/ptmx, of ``terminal``'s size, its slave owned by
    ``uid``/``gid``; send the master on the Unix socket ``channel`` and close both; return
    the slave (close-on-exec). Raises OSError when any of it fails."""
    master = os.open("/dev/ptmx", _OPEN_FLAGS)
    try:
        fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))
        slave = fcntl.ioctl(master, TIOCGPTPEER, _OPEN_FLAGS)
        try:
            os.fchown(slave, uid, gid)
            fcntl.ioctl(slave, termios.TIOCSWINSZ, pack_window_size(terminal.rows, terminal.cols))
            attrs = termios.tcgetattr(slave)
            attrs[0] |= IUTF8
            termios.tcsetattr(slave, termios.TCSANOW, attrs)
            with socket.socket(fileno=channel) as sock:
                send_with_fds(sock, b"pty", [master])
        except BaseException:
            os.close(slave)
            raise
    finally:
        os.close(master)
    return slave


def receive_master(channel: socket.socket) -> int:
    """The master the job's init sent on ``channel`` (already there once the job runs);
    OSError when none came."""
    channel.setblocking(False)
    try:
        _data, fds = recv_with_fds(channel, 16, 4)
    except BlockingIOError:
        fds = []
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise OSError(0, "the job's init sent no pty")
    return fds[0]
