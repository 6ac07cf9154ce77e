"""The job's pty as its init makes it (``netjail.kernel.pty``), on this machine's own
/dev/ptmx, unprivileged: the slave's size, owner and modes, and the master sent on a socket."""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import termios

import pytest

from netjail.kernel.jobplan import TerminalPlan
from netjail.kernel.pty import IUTF8, open_job_pty, pack_window_size, receive_master


def test_the_window_size_packs_as_struct_winsize() -> None:
    """Rows, then columns, then two zero pixel sizes, each an unsigned short."""
    assert pack_window_size(24, 80) == struct.pack("HHHH", 24, 80, 0, 0)
    assert pack_window_size(65535, 1) == b"\xff\xff\x01\x00\x00\x00\x00\x00"


def test_the_master_goes_out_on_the_channel_and_the_slave_is_ready_for_the_job() -> None:
    """The slave has the size asked for, belongs to the uid and gid given, erases UTF-8
    characters whole; the master arrives on the channel's other end and talks to it."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    slave = open_job_pty(TerminalPlan(rows=33, cols=101), theirs.detach(), os.getuid(), os.getgid())
    try:
        master = receive_master(ours)
        try:
            size = fcntl.ioctl(slave, termios.TIOCGWINSZ, b"\0" * 8)
            assert struct.unpack("HHHH", size)[:2] == (33, 101)
            st = os.fstat(slave)
            assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
            assert termios.tcgetattr(slave)[0] & IUTF8
            assert fcntl.fcntl(slave, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            os.write(master, b"typed\n")
            assert os.read(slave, 100) == b"typed\n"
        finally:
            os.close(master)
    finally:
        os.close(slave)
        ours.close()


def test_no_master_on_the_channel_is_an_error() -> None:
    """receive_master refuses a channel on which nothing (or no fd) came, without waiting."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with ours, theirs:
        with pytest.raises(OSError, match="sent no pty"):
            receive_master(ours)
        theirs.send(b"pty")
        with pytest.raises(OSError, match="sent no pty"):
            receive_master(ours)
