"""The console of ``netjail run``: the job's output, netjail's own lines, and signals, on one
thread.

**Whole lines.** The job writes straight to the files it was given (the user's terminal, a pipe,
a log), and not always a line at a time: curl writes its error message in pieces. A line
netjail wrote to the same file could land inside one of the job's. So when netjail's lines go
to a file the job also writes to, the job gets a pipe in its place (a pty when that file is a
terminal, so that the job still sees a terminal, of the same size), and netjail copies what
comes out of it (``Relay``), letting its own lines in only where one of the job's ends: after a
newline, or, on a terminal, after a carriage return that starts a progress bar's next frame.
Each of netjail's lines is written with one ``write``.

**Signals.** SIGINT, SIGTERM, SIGHUP and SIGQUIT go to the whole job (a kill request; the job's
init passes the signal to every process of the job, or to the foreground group of its
terminal). A second SIGINT within ``SECOND_INTERRUPT_S`` kills the job. They are taken with
``signal.set_wakeup_fd`` and handled in the loop, never inside a signal handler.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import selectors
import signal
import stat
import termios
import time
from collections.abc import Callable, Sequence
from typing import Literal

import msgspec

from netjail import protocol as p
from netjail.client import Client, JobResult, RunningJob
from netjail.errors import NetjailError, ShutdownError
from netjail.eventview import EventBoard, board_of, summarize_blocked
from netjail.text import sanitize

#: A second SIGINT within this many seconds of the first kills the job (SIGKILL).
SECOND_INTERRUPT_S = 2.0
#: Most often live counts are refreshed on a terminal.
REFRESH_S = 1.0
#: How long the job's last output may take to come out of the relay once the job has ended.
DRAIN_S = 2.0
#: After a report that says SIGTERM (which netjaild sends every job when it stops), how long to
#: wait for its ``shutdown`` error, which follows once every job has ended.
SHUTDOWN_WAIT_S = 0.3
#: Signals passed on to the job.
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)

#: How events are printed: lines for people, or one JSON object per event.
EventFormat = Literal["text", "json"]
#: Which events are printed: those that were not let through, or all of them (--verbose).
EventChoice = Literal["blocked", "all"]


class Sink:
    """Where event lines go: a file descriptor (closed at the end if ``owned``)."""

    def __init__(self, fd: int, *, owned: bool) -> None:
        self.fd = fd
        self.owned = owned
        self.is_tty = os.isatty(fd)


class Display:
    """What ``netjail run`` prints of events, and where."""

    def __init__(
        self,
        sink: Sink | None,
        *,
        form: EventFormat = "text",
        choice: EventChoice = "blocked",
        deny: Sequence[str] = (),
    ) -> None:
        #: None: --quiet, no event is printed.
        self.sink = sink
        self.form = form
        self.choice = choice
        #: The job's --deny rules, so that the summary never suggests an --allow they defeat.
        self.deny = deny

    def wants(self, event: p.Event) -> bool:
        return self.sink is not None and (self.choice == "all" or event.verdict != "allowed")


class JobEnd:
    """How the job ended for the client: its result (None when the daemon sent no report), and
    the daemon's words when it ended the job because it was stopping."""

    def __init__(self, job: str, result: JobResult | None, shutdown: str | None) -> None:
        self.job = job
        self.result = result
        self.shutdown = shutdown


# --- writing -------------------------------------------------------------------------------


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
        if self.finished and not self.at_line_start:
            self._write(b"\n")
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
                self._write(b"\n")
            self._write_held(after_cr=False)

    def _write_held(self, *, after_cr: bool) -> None:
        held, self.held = self.held, []
        if after_cr:
            # The cursor is back at the start of a progress bar's line: clear what is left of
            # the bar after netjail's line.
            held = [line[:-1] + b"\x1b[K\n" for line in held]
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
    """The job's stdin, stdout and stderr, and the relay between the job and the sink."""

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

    def close_job_ends(self) -> None:
        for fd in self.job_ends:
            os.close(fd)
        self.job_ends.clear()

    def resize(self) -> None:
        if self.relay is not None and self.terminal is not None and self.relay.source >= 0:
            copy_window_size(self.terminal, self.relay.source)


# --- signals -------------------------------------------------------------------------------


class Signals:
    """SIGINT, SIGTERM, SIGHUP, SIGQUIT and SIGWINCH, as bytes on a pipe the loop waits on.

    Before the job has started there is no job to pass them to: the first of the forwarded ones
    ends netjail (128+N), and the daemon, seeing the connection close, ends anything it
    started.
    """

    def __init__(self, say: Callable[[str], None]) -> None:
        self._say = say
        self.started = False
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        for sig in (*FORWARDED, signal.SIGWINCH):
            signal.signal(sig, self._handle)
        signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)

    def _handle(self, signum: int, _frame: object) -> None:
        if not self.started and signum != signal.SIGWINCH:
            self._say("interrupted before the job started")
            raise SystemExit(128 + signum)

    def fileno(self) -> int:
        return self._read

    def received(self) -> list[int]:
        """The signals that arrived since the last call, in order."""
        with contextlib.suppress(BlockingIOError):
            return list(os.read(self._read, 1024))
        return []


# --- the loop ------------------------------------------------------------------------------


class _Session:
    """One job's console, from the request to its report."""

    def __init__(self, client: Client, display: Display, plan: StdioPlan) -> None:
        self.client = client
        self.display = display
        self.plan = plan
        self.board = EventBoard()
        self.next_refresh = 0.0
        self.last_interrupt: float | None = None
        self.forwarded: set[int] = set()
        self.signals = Signals(self.say)

    # Lines: netjail's own on stderr, events on the sink; each through the relay when the job
    # writes to the same file.

    def say(self, text: str) -> None:
        line = f"netjail: {sanitize(text, 2000)}\n".encode(errors="replace")
        if self.plan.relay is not None and 2 in self.plan.relayed:
            self.plan.relay.insert(line)
        else:
            with contextlib.suppress(OSError):
                write_all(2, line)

    def emit(self, text: str) -> None:
        sink = self.display.sink
        if sink is None:
            return
        line = text.encode(errors="replace") + b"\n"
        if self.plan.relay is not None:
            self.plan.relay.insert(line)
        else:
            with contextlib.suppress(OSError):
                write_all(sink.fd, line)

    def on_event(self, event: p.Event) -> None:
        if not self.display.wants(event):
            return
        if self.display.form == "json":
            self.emit(msgspec.json.encode(event).decode())
            return
        line = self.board.add(event)
        if line is not None:
            self.emit(f"netjail: {line.text()}")
            line.shown = line.count

    def refresh(self, now: float) -> None:
        """On a terminal, the counts that grew, at most once per REFRESH_S."""
        sink = self.display.sink
        if sink is None or not sink.is_tty or self.display.form != "text":
            return
        if now < self.next_refresh:
            return
        grown = self.board.grown()
        for line in grown:
            self.emit(f"netjail: {line.text()}")
            line.shown = line.count
        if grown:
            self.next_refresh = now + REFRESH_S

    def timeout(self, now: float) -> float | None:
        sink = self.display.sink
        if sink is None or not sink.is_tty or not self.board.grown():
            return None
        return max(0.0, self.next_refresh - now)

    # Signals.

    def on_signals(self, job: str, signals: list[int]) -> None:
        if signal.SIGWINCH in signals:
            self.plan.resize()
            self._kill(job, signal.SIGWINCH)
        for sig in signals:
            if sig == signal.SIGWINCH:
                continue
            if sig == signal.SIGINT:
                now = time.monotonic()
                if self.last_interrupt is not None and now - self.last_interrupt < (
                    SECOND_INTERRUPT_S
                ):
                    self.say(f"second interrupt: killing job {job} (SIGKILL)")
                    self._kill(job, signal.SIGKILL)
                    continue
                self.last_interrupt = now
            self.forwarded.add(sig)
            self._kill(job, sig)

    def _kill(self, job: str, sig: int) -> None:
        # Its own connection, and a short wait: the loop is waiting on the job meanwhile.
        with contextlib.suppress(NetjailError):
            Client(self.client.socket, timeout=5).kill(job, int(sig))

    # The whole run.

    def run(self, request: p.RunRequest) -> JobEnd:
        try:
            running = self.client.start(request, self.plan.fds)
        finally:
            self.plan.close_job_ends()
        try:
            with running:
                self.signals.started = True
                if running.cwd is not None:
                    here = sanitize(request.cwd or "?")
                    self.say(
                        f"{here} is not in the jail's view, so the job runs in {running.cwd} "
                        f"(--ro-bind {here} or --bind {here} to run it there)"
                    )
                try:
                    exit_message = self._loop(running)
                except ShutdownError as e:
                    return JobEnd(running.job, None, str(e))
                shutdown = self._shutdown_after(running, exit_message.report)
        finally:
            # Whatever ended the job, what it wrote comes out before netjail's last lines.
            self._drain()
        result = JobResult(exit_message.report, exit_message.dropped_events)
        self._finish(result)
        return JobEnd(running.job, result, shutdown)

    def _loop(self, running: RunningJob) -> p.Exit:
        selector = selectors.DefaultSelector()
        selector.register(running, selectors.EVENT_READ)
        selector.register(self.signals, selectors.EVENT_READ)
        relay = self.plan.relay
        if relay is not None:
            selector.register(relay, selectors.EVENT_READ)
        try:
            while True:
                # Messages already received (read with the one before) are not announced by
                # the socket again.
                wait = 0.0 if running.buffered else self.timeout(time.monotonic())
                ready = {key.fileobj for key, _mask in selector.select(wait)}
                if running in ready or running.buffered:
                    for message in running.receive():
                        if isinstance(message, p.Exit):
                            return message
                        self.on_event(message.event)
                if self.signals in ready:
                    self.on_signals(running.job, self.signals.received())
                if relay is not None and relay in ready:
                    relay.pump()
                    if not relay.open:
                        selector.unregister(relay)
                        relay.close()
                self.refresh(time.monotonic())
        finally:
            selector.close()

    def _shutdown_after(self, running: RunningJob, report: p.Report) -> str | None:
        """The daemon's shutdown message if it ended the job because it is stopping.

        It sends every job SIGTERM, then each report, then, once all have ended, the
        ``shutdown`` error: so only after a report that says SIGTERM (which this client did
        not forward) is it worth waiting, a little, for that error.
        """
        if report.signal != signal.SIGTERM or report.timed_out or self.forwarded:
            return None
        selector = selectors.DefaultSelector()
        selector.register(running, selectors.EVENT_READ)
        deadline = time.monotonic() + SHUTDOWN_WAIT_S
        try:
            while (left := deadline - time.monotonic()) > 0:
                if not running.buffered and not selector.select(left):
                    return None
                running.receive()
        except ShutdownError as e:
            return str(e)
        except NetjailError:
            return None
        finally:
            selector.close()
        return None

    def _drain(self) -> None:
        """Copy the job's last output: every process of the job is gone, so its ends of the
        relay are closed and the relay reaches its end (within DRAIN_S, whatever happens)."""
        relay = self.plan.relay
        if relay is None:
            return
        selector = selectors.DefaultSelector()
        if relay.open:
            selector.register(relay, selectors.EVENT_READ)
        deadline = time.monotonic() + DRAIN_S
        try:
            while relay.open and (left := deadline - time.monotonic()) > 0:
                if selector.select(left):
                    relay.pump()
        finally:
            selector.close()
        relay.close()
        relay.finish()

    def _finish(self, result: JobResult) -> None:
        """The final counts (those that grew since they were printed, and lines never
        streamed), then the summary of what was blocked."""
        if self.display.sink is None or self.display.form != "text":
            return
        final = board_of(e for e in result.events if self.display.wants(e))
        for line in final.lines():
            live = self.board.get(line.first)
            if live is None or live.shown < line.count:
                self.emit(f"netjail: {line.text()}")
        summary = summarize_blocked(result.events, self.display.deny)
        if summary is not None:
            self.emit(f"netjail: {summary}")


def run_job(client: Client, request: p.RunRequest, fds: Sequence[int], display: Display) -> JobEnd:
    """Run the job of ``request`` with ``fds`` as its stdio, showing it as ``display`` says,
    and return how it ended. Raises the daemon's errors (NetjailError) from before the job
    started, or from a connection lost while it ran."""
    plan = StdioPlan(fds, display.sink)
    session = _Session(client, display, plan)
    return session.run(request)
