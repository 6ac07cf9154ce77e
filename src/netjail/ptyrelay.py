"""``netjail run -t``: the CLI's side of a job's own pty.

The job's pty is made inside its jail (``netjail.kernel.pty``) and its master arrives with
``started``. From then on the CLI is the job's terminal emulator, as ssh and ``docker run -it``
are: the user's terminal is put in raw mode (every key, ^C and ^Z included, is a byte for the
job's pty, whose line discipline turns ^C into SIGINT for the job's foreground group), what
the user types goes to the master (``KeyRelay``), what the job writes comes back from it
through a ``Relay`` (so netjail's own lines still go in only between the job's lines, ending
in ``\\r\\n`` while the terminal is raw), and a new window size is set on the master, which
makes the kernel send SIGWINCH to the job's foreground group. The terminal is restored before
netjail prints anything after the job, whatever ended it.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import termios
from collections.abc import Container
from typing import Any

from netjail import protocol as p
from netjail.client import RunningJob
from netjail.relay import Relay, Sink, copy_window_size, same_file, window_size_of

#: What a job reads at the end of the user's input (stdin not a terminal, or hung up): the
#: pty's end-of-file character (VEOF, ^D by default), as a user would type it.
EOF_KEY = b"\x04"
#: Most typed bytes held for the job while it does not read them; stdin is not read past this.
MAX_PENDING_KEYS = 1 << 16
#: How often typed input the job's pty did not take yet is offered again.
KEYS_RETRY_S = 0.01

_IFLAG, _OFLAG, _CFLAG, _LFLAG, _CC = 0, 1, 2, 3, 6


def raw_attributes(attrs: list[Any]) -> list[Any]:
    """``attrs`` (as termios.tcgetattr gives them) made raw, as cfmakeraw(3) does: no input
    or output processing, no echo, no signals from keys, bytes passed one at a time."""
    raw = list(attrs)
    iflag, oflag, cflag, lflag = (int(raw[i]) for i in (_IFLAG, _OFLAG, _CFLAG, _LFLAG))
    iflag &= ~(
        termios.IGNBRK
        | termios.BRKINT
        | termios.PARMRK
        | termios.ISTRIP
        | termios.INLCR
        | termios.IGNCR
        | termios.ICRNL
        | termios.IXON
    )
    oflag &= ~termios.OPOST
    lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
    cflag = (cflag & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
    raw[_IFLAG], raw[_OFLAG], raw[_CFLAG], raw[_LFLAG] = iflag, oflag, cflag, lflag
    cc = list(raw[_CC])
    cc[termios.VMIN] = 1
    cc[termios.VTIME] = 0
    raw[_CC] = cc
    return raw


class RawTerminal:
    """The user's terminal ``fd`` in raw mode from ``enter`` until ``restore`` (which may be
    called any number of times; only the first after ``enter`` does anything)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._saved: list[Any] | None = None

    @property
    def active(self) -> bool:
        return self._saved is not None

    def enter(self) -> None:
        if not os.isatty(self.fd):
            return
        saved = termios.tcgetattr(self.fd)
        termios.tcsetattr(self.fd, termios.TCSANOW, raw_attributes(saved))
        self._saved = saved

    def restore(self) -> None:
        saved, self._saved = self._saved, None
        if saved is not None:
            # After what was written is out, so it was all shown as raw output.
            with contextlib.suppress(termios.error, OSError):
                termios.tcsetattr(self.fd, termios.TCSADRAIN, saved)


class KeyRelay:
    """What the user types (``source``, netjail's stdin), written to the job's pty master
    (non-blocking: held while the job does not read, and stdin not read past a bound)."""

    def __init__(self, source: int, master: int) -> None:
        self.source = source
        self.master = master
        self.pending = bytearray()
        #: Whether stdin may still bring input.
        self.open = True
        self._watched = False

    def fileno(self) -> int:
        return self.source

    @property
    def wants_input(self) -> bool:
        return self.open and len(self.pending) < MAX_PENDING_KEYS

    def watch(self, selector: selectors.BaseSelector) -> None:
        """Have ``selector`` wait on stdin only while what is typed can be taken."""
        if self.wants_input == self._watched:
            return
        if self.wants_input:
            selector.register(self, selectors.EVENT_READ)
        else:
            selector.unregister(self)
        self._watched = self.wants_input

    def wait(self, wait: float | None) -> float | None:
        """``wait``, or less while typed bytes wait for the job to read: they are offered
        again after KEYS_RETRY_S."""
        if not self.pending:
            return wait
        return KEYS_RETRY_S if wait is None else min(wait, KEYS_RETRY_S)

    def serve(self, ready: Container[object]) -> None:
        """Take what was typed (when stdin is among ``ready``), or offer what is held again."""
        if self in ready:
            self.pump()
        elif self.pending:
            self.flush()

    def pump(self) -> None:
        """Read what was typed (stdin is readable) and pass it on."""
        try:
            data = os.read(self.source, 1 << 14)
        except BlockingIOError:
            return
        except OSError:
            data = b""  # EIO: the user's terminal hung up
        if not data:
            self.open = False
            data = EOF_KEY
        self.pending += data
        self.flush()

    def flush(self) -> None:
        """Write what is held, as far as the pty takes it now."""
        while self.pending:
            try:
                written = os.write(self.master, self.pending)
            except BlockingIOError:
                return
            except OSError:
                # The job's side is gone: nothing will read this.
                self.pending.clear()
                return
            del self.pending[:written]


class _NoKeys:
    """A job whose stdin is not netjail's to relay: nothing to wait on or pass on."""

    def watch(self, selector: selectors.BaseSelector) -> None:
        pass

    def wait(self, wait: float | None) -> float | None:
        return wait

    def serve(self, ready: Container[object]) -> None:
        pass


NO_KEYS = _NoKeys()


class PtyPlan:
    """The job's stdio as a pty of its own: nothing is passed with the request, and, once the
    job runs, its master is relayed to netjail's stdout and fed from its stdin."""

    #: The kernel sends SIGWINCH itself when the pty's size changes.
    resize_tells_job = False

    def __init__(self, sink: Sink | None) -> None:
        self.fds: list[int] = []
        self.sink = sink
        self.relay: Relay | None = None
        self.keys: KeyRelay | None = None
        #: netjail's own lines (stderr, 2) go through the relay when stderr is the same file
        #: as the stdout the job's output goes to.
        self.relayed: tuple[int, ...] = (1, 2) if same_file(1, 2) else (1,)
        #: Whether event lines go through the relay (the sink is the job's stdout).
        self.sink_relayed = sink is not None and same_file(sink.fd, 1)
        self.terminal = next((fd for fd in (0, 1, 2) if os.isatty(fd)), None)
        self.raw = RawTerminal(0)

    def attach(self, running: RunningJob) -> None:
        """Start being the job's terminal: relay its master, and put the user's one in raw
        mode."""
        master = running.terminal
        if master is None:
            return
        os.set_blocking(master, False)
        # The relay closes its own copy when the job's side is gone; the keys go to the
        # running job's, which it closes.
        self.relay = Relay(os.dup(master), 1, dest_is_tty=os.isatty(1))
        self.keys = KeyRelay(0, master)
        self.raw.enter()
        if self.raw.active:
            self.relay.newline = b"\r\n"

    def newline(self, fd: int) -> bytes:
        """How netjail's lines written straight to ``fd`` end: ``\\r\\n`` on the terminal while
        it is raw."""
        return b"\r\n" if self.raw.active and os.isatty(fd) else b"\n"

    def restore(self) -> None:
        self.raw.restore()
        if self.relay is not None:
            self.relay.newline = b"\n"

    def close_job_ends(self) -> None:
        """Nothing of the job's is held here (its pty comes from the daemon)."""

    def resize(self) -> None:
        if self.relay is not None and self.terminal is not None and self.relay.source >= 0:
            copy_window_size(self.terminal, self.relay.source)


def window_size() -> p.WindowSize | None:
    """The size of the user's terminal (the first of stdin, stdout, stderr that is one), for
    the job's pty; None when none is a terminal."""
    for fd in (0, 1, 2):
        size = window_size_of(fd)
        if size is not None:
            rows, cols = size
            return p.WindowSize(rows=rows, cols=cols)
    return None


def wants_tty(asked: bool | None) -> bool:
    """-t/-T as given, or by default when stdin and stdout are terminals (the job then sees
    what the user would: a terminal on both, and job control)."""
    if asked is not None:
        return asked
    return os.isatty(0) and os.isatty(1)
