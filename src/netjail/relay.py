"""Relaying a job's output so that netjail's own lines never land inside the job's lines.

The job writes straight to the files it was given (the user's terminal, a pipe, a log), and
not always a line at a time: curl writes its error message in pieces. A line netjail wrote to
the same file could land inside one of the job's. So when netjail's lines go to a file the job
also writes to, the job gets a pipe in its place (a pty when that file is a terminal, so that
the job still sees a terminal, of the same size: ``StdioPlan``), and netjail copies what comes
out of it (``Relay``), letting its own lines in only where one of the job's ends: after a
newline, or, on a terminal, after a carriage return that starts a progress bar's next frame.
Each of netjail's lines is written with one ``write``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import selectors
import stat
import struct
import termios
from collections.abc import Sequence


class Sink:
    """Where netjail's event lines go: a file descriptor, a terminal or not."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.is_tty = os.isatty(fd)


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data``: one ``write`` unless the file takes less (a full pipe)."""
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            # Someone made the file non-blocking (it is shared with other processes).
            selector = selectors.DefaultSelector()
            selector.register(fd, selectors.EVENT_WRITE)
            selector.select()
            selector.close()
            continue
        view = view[written:]


# After a newline; or, on a terminal, after a carriage return that is not part of "\r\n": the
# next frame of a progress bar starts there, at the start of the line.
_BOUNDARY = re.compile(rb"\n")
_TTY_BOUNDARY = re.compile(rb"\n|\r(?=[^\n])")


class Relay:
    """Copies what the job writes to ``source`` (the read end of its pipe, or its pty's
    master) to ``dest``, and lets netjail's lines in only between the job's lines."""

    def __init__(self, source: int, dest: int, *, dest_is_tty: bool) -> None:
        self.source = source
        self.dest = dest
        self.dest_is_tty = dest_is_tty
        self._boundary = _TTY_BOUNDARY if dest_is_tty else _BOUNDARY
        #: Whether the job's output, as written so far, ends at the start of a line.
        self.at_line_start = True
        #: netjail's lines waiting for the job's current line to end.
        self.held: list[bytes] = []
        #: Whether the job's output may still bring data (False at its end, or when ``dest``
        #: failed).
        self.open = True
        self.broken = False
        self.finished = False
        #: How netjail's lines end here: ``\r\n`` on a terminal in raw mode.
        self.newline = b"\n"

    def fileno(self) -> int:
        return self.source

    def pump(self) -> None:
        """Copy what the job wrote (one read), and the held lines where a job line ends."""
        try:
            data = os.read(self.source, 1 << 16)
        except BlockingIOError:
            return
        except OSError:
            # EIO: the pty's other side is closed, every process of the job is gone.
            data = b""
        if not data:
            self._stop()
            return
        if self.held:
            match = self._boundary.search(data)
            if match is not None:
                self._write(data[: match.end()])
                self._write_held(after_cr=data[match.end() - 1 : match.end()] == b"\r")
                data = data[match.end() :]
        if data:
            self._write(data)
            self.at_line_start = data.endswith(b"\n")

    def insert(self, line: bytes) -> None:
        """Write ``line`` (netjail's, ending in a newline) now if the job is between lines,
        else as soon as its current line ends (or at once, on a line of its own, once the job
        has ended)."""
        if line.endswith(b"\n"):
            line = line[:-1] + self.newline
        if self.finished and not self.at_line_start:
            self._write(self.newline)
            self.at_line_start = True
        if self.at_line_start:
            self._write(line)
        else:
            self.held.append(line)

    def finish(self) -> None:
        """The job is over: write the held lines, and any later ones, on lines of their own."""
        self.finished = True
        if self.held:
            if not self.at_line_start:
                self._write(self.newline)
            self._write_held(after_cr=False)

    def _write_held(self, *, after_cr: bool) -> None:
        held, self.held = self.held, []
        if after_cr:
            # The cursor is back at the start of a progress bar's line: clear what is left of
            # the bar after netjail's line.
            held = [line.removesuffix(self.newline) + b"\x1b[K" + self.newline for line in held]
        self._write(b"".join(held))
        self.at_line_start = True

    def _write(self, data: bytes) -> None:
        if self.broken:
            return
        try:
            write_all(self.dest, data)
        except OSError:
            # The user's end is gone (a closed pipe, a hung-up terminal): the loop then closes
            # the job's, so that the job's next write fails as it would have without netjail.
            self.broken = True
            self.open = False

    def _stop(self) -> None:
        self.open = False

    def close(self) -> None:
        """Close the job's output (once the loop no longer waits on it)."""
        if self.source >= 0:
            os.close(self.source)
            self.source = -1


def _identity(fd: int) -> tuple[int, int] | None:
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    if stat.S_ISCHR(st.st_mode) and not os.isatty(fd):
        # /dev/null and the like: nothing can be spliced there that anyone reads.
        return None
    return st.st_dev, st.st_ino


def same_file(fd: int, other: int) -> bool:
    """Whether ``fd`` and ``other`` are the same file (one terminal, pipe or regular file)."""
    mine = _identity(fd)
    return mine is not None and mine == _identity(other)


def window_size_of(fd: int) -> tuple[int, int] | None:
    """The rows and columns of the terminal ``fd``; None when it is none."""
    try:
        size = fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8)
    except OSError:
        return None
    rows, cols = struct.unpack("HH", size[:4])
    return rows, cols


def copy_window_size(terminal: int, pty: int) -> None:
    """Give ``pty`` the size of ``terminal`` (rows, columns, pixels)."""
    with contextlib.suppress(OSError):
        size = fcntl.ioctl(terminal, termios.TIOCGWINSZ, b"\0" * 8)
        fcntl.ioctl(pty, termios.TIOCSWINSZ, size)


def _open_pty(terminal: int) -> tuple[int, int]:
    master, slave = os.openpty()
    # The job's bytes reach the user's terminal unchanged, and are processed (\n to \r\n) once,
    # there, not also in this pty.
    attrs = termios.tcgetattr(slave)
    attrs[1] &= ~termios.OPOST
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    copy_window_size(terminal, slave)
    return master, slave


class StdioPlan:
    """The job's stdin, stdout and stderr (the fds passed with the request), and the relay
    between the job and the sink. (``netjail.ptyrelay.PtyPlan`` is the other plan: a pty.)"""

    #: The job's terminal is not the relay's pty: SIGWINCH is sent to the job by netjail.
    resize_tells_job = True
    #: Typed input goes straight to the job (its stdin is netjail's).
    keys = None

    def __init__(self, fds: Sequence[int], sink: Sink | None) -> None:
        self.fds = list(fds)
        self.relay: Relay | None = None
        #: Which of the job's stdio (1, 2) go through the relay.
        self.relayed: tuple[int, ...] = ()
        #: The job's ends of the relay, closed here once the daemon has its copies.
        self.job_ends: list[int] = []
        #: The user's terminal the relay's pty takes its size from.
        self.terminal: int | None = None
        target = _identity(sink.fd) if sink is not None else None
        shared = [i for i in (1, 2) if target is not None and _identity(self.fds[i]) == target]
        if sink is None or not shared:
            return
        if sink.is_tty:
            source, job_end = _open_pty(sink.fd)
            self.terminal = sink.fd
        else:
            source, job_end = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(source, False)
        self.relay = Relay(source, sink.fd, dest_is_tty=sink.is_tty)
        self.job_ends.append(job_end)
        self.relayed = tuple(shared)
        for i in shared:
            self.fds[i] = job_end

    @property
    def sink_relayed(self) -> bool:
        """Whether event lines go through the relay (the job writes to the sink too)."""
        return self.relay is not None

    def attach(self, running: object) -> None:
        """Nothing to take from the started job: its stdio was passed with the request."""

    def newline(self, fd: int) -> bytes:
        return b"\n"

    def restore(self) -> None:
        """Nothing of the user's terminal was changed."""

    def close_job_ends(self) -> None:
        for fd in self.job_ends:
            os.close(fd)
        self.job_ends.clear()

    def resize(self) -> None:
        if self.relay is not None and self.terminal is not None and self.relay.source >= 0:
            copy_window_size(self.terminal, self.relay.source)
