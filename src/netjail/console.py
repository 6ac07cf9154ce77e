"""The console of ``netjail run``: the job's output, netjail's own lines, and signals, on one
thread, from the request to the exit status.

**Whole lines.** The job's output is relayed where netjail's lines go to the same file
(``netjail.relay``), and the event lines are let in between the job's lines.

**Signals.** SIGINT, SIGTERM, SIGHUP and SIGQUIT go to the whole job (a kill request; the job's
init passes the signal to every process of the job, or to the foreground group of its
terminal). A second SIGINT within ``SECOND_INTERRUPT_S`` kills the job. They are taken with
``signal.set_wakeup_fd`` and handled in the loop, never inside a signal handler.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import time
from collections.abc import Callable, Sequence
from typing import BinaryIO, Literal

import msgspec

from netjail import protocol as p
from netjail.client import Client, JobResult, RunningJob
from netjail.errors import NetjailError, ShutdownError
from netjail.eventview import EventBoard, board_of, summarize_blocked
from netjail.ptyrelay import NO_KEYS, PtyPlan
from netjail.relay import Sink, StdioPlan, write_all
from netjail.text import sanitize
from netjail.units import format_size

#: Exit statuses of `netjail run` besides the command's own (128+N when a signal N killed it).
#: netjail's own failures (daemon unreachable, bad request), as docker run's.
EXIT_NETJAIL = 125
#: --timeout fired, as timeout(1)'s.
EXIT_TIMEOUT = 124
#: Killed for reaching --memory (as for SIGKILL; stderr says which).
EXIT_OOM = 137
#: netjaild stopped while the job ran (it sends every job SIGTERM first): 128 + SIGTERM.
EXIT_SHUTDOWN = 143

#: A second SIGINT within this many seconds of the first kills the job (SIGKILL).
SECOND_INTERRUPT_S = 2.0
#: Most often counts that grew are printed again (`run` on a terminal, `events --follow`).
REFRESH_S = 1.0
#: How long the job's last output may take to come out of the relay once the job has ended.
DRAIN_S = 2.0
#: After a report marked ``shutdown`` (netjaild ended the job because it is stopping), the most
#: to wait for the ``shutdown`` error, which the daemon sends straight after it.
SHUTDOWN_WAIT_S = 2.0
#: The words for a stop when no ``shutdown`` error came after the report.
STOPPING = "netjaild is stopping"
#: Signals passed on to the job.
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)

#: Answers a live decision (``--ask``): the question, and the signal pipe that cuts it short.
Decide = Callable[[p.DecideQuestion, int], bool]

#: How events are printed: lines for people, or one JSON object per event.
EventFormat = Literal["text", "json"]
#: Which events are printed: those that were not let through, or all of them (--verbose).
EventChoice = Literal["blocked", "all"]


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


def say(message: str) -> None:
    """One line of netjail's on stderr, in one write (not through a relay: for when no job's
    output can be in the way, before or after the job)."""
    with contextlib.suppress(OSError):
        write_all(2, f"netjail: {sanitize(message, 2000)}\n".encode(errors="replace"))


class JobEnd:
    """How the job ended for the client: its result (None when the daemon sent no report), and
    the daemon's words when it ended the job because it was stopping."""

    def __init__(self, job: str, result: JobResult | None, shutdown: str | None) -> None:
        self.job = job
        self.result = result
        self.shutdown = shutdown


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

    def __init__(
        self,
        client: Client,
        display: Display,
        plan: StdioPlan | PtyPlan,
        decide: Decide | None = None,
    ) -> None:
        self.client = client
        self.display = display
        self.plan = plan
        self.decide = decide
        self.board = EventBoard()
        self.next_refresh = 0.0
        self.last_interrupt: float | None = None
        self.signals = Signals(self.say)

    # Lines: netjail's own on stderr, events on the sink; each through the relay when the job
    # writes to the same file.

    def say(self, text: str) -> None:
        line = f"netjail: {sanitize(text, 2000)}".encode(errors="replace")
        if self.plan.relay is not None and 2 in self.plan.relayed:
            self.plan.relay.insert(line + b"\n")
        else:
            with contextlib.suppress(OSError):
                write_all(2, line + self.plan.newline(2))

    def emit(self, text: str) -> None:
        sink = self.display.sink
        if sink is None:
            return
        line = text.encode(errors="replace")
        if self.plan.relay is not None and self.plan.sink_relayed:
            self.plan.relay.insert(line + b"\n")
        else:
            with contextlib.suppress(OSError):
                write_all(sink.fd, line + self.plan.newline(sink.fd))

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
            if self.plan.resize_tells_job:
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
                self.plan.attach(running)
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
                shutdown = self._shutdown_after(running, exit_message)
        finally:
            # Whatever ended the job, what it wrote comes out before netjail's last lines,
            # and those are written on the user's terminal as it was.
            self._drain()
            self.plan.restore()
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
        keys = self.plan.keys or NO_KEYS
        try:
            while True:
                keys.watch(selector)
                # Messages already received (read with the one before) are not announced by
                # the socket again.
                wait = 0.0 if running.buffered else self.timeout(time.monotonic())
                ready = {key.fileobj for key, _mask in selector.select(keys.wait(wait))}
                keys.serve(ready)
                if running in ready or running.buffered:
                    for message in running.receive():
                        if isinstance(message, p.Exit):
                            return message
                        if isinstance(message, p.DecideQuestion):
                            running.decide(message, self._ask(message))
                        else:
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

    def _ask(self, question: p.DecideQuestion) -> bool:
        """The user's answer (no questions come unless ``decide`` was asked for). The loop
        waits meanwhile: no key is relayed to the job, and none of its output comes out."""
        if self.decide is None:
            return False
        relay = self.plan.relay
        if relay is not None and not relay.at_line_start:
            # The question goes on a line of its own, not after the job's unfinished one.
            with contextlib.suppress(OSError):
                write_all(relay.dest, relay.newline)
            relay.at_line_start = True
        return self.decide(question, self.signals.fileno())

    def _shutdown_after(self, running: RunningJob, exit_message: p.Exit) -> str | None:
        """The daemon's shutdown message if it ended the job because it is stopping.

        Such a report is marked ``shutdown``, and the ``shutdown`` error comes straight after
        it: no other report makes netjail wait for anything.
        """
        if not exit_message.shutdown:
            return None
        selector = selectors.DefaultSelector()
        selector.register(running, selectors.EVENT_READ)
        deadline = time.monotonic() + SHUTDOWN_WAIT_S
        try:
            while (left := deadline - time.monotonic()) > 0:
                if not running.buffered and not selector.select(left):
                    break
                running.receive()
        except ShutdownError as e:
            return str(e)
        except NetjailError:
            pass
        finally:
            selector.close()
        return STOPPING

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


def run_job(
    client: Client,
    request: p.RunRequest,
    fds: Sequence[int],
    display: Display,
    decide: Decide | None = None,
) -> JobEnd:
    """Run the job of ``request`` with ``fds`` as its stdio (or, with stdio "tty", a pty of
    its own relayed to this terminal), showing it as ``display`` says, and return how it
    ended; ``decide`` answers the live decisions of a request with ``decide``. Raises the
    daemon's errors (NetjailError) from before the job started, or from a connection lost
    while it ran."""
    plan = PtyPlan(display.sink) if request.stdio == "tty" else StdioPlan(fds, display.sink)
    session = _Session(client, display, plan, decide)
    return session.run(request)


def conclude(end: JobEnd, report_out: BinaryIO | None) -> int:
    """Write the report (if asked for), say how the job ended when the exit status alone does
    not, and return ``netjail run``'s exit status."""
    if end.result is None:
        say(f"job {end.job} ended, and sent no report: {end.shutdown}")
        return EXIT_SHUTDOWN
    result = end.result
    report = result.report
    if report_out is not None:
        with report_out:
            report_out.write(msgspec.json.format(msgspec.json.encode(report), indent=2) + b"\n")
    if result.lost_events:
        say(f"{result.lost_events} events lost (see the report)")
    if end.shutdown is not None:
        say(f"job {report.job} ended: {end.shutdown}")
        return EXIT_SHUTDOWN
    if result.timed_out:
        limit = report.limits.timeout_s if report.limits else None
        shown = f"{limit:g}s" if limit is not None else "?"
        say(f"job {report.job} killed: timeout {shown} reached")
        return EXIT_TIMEOUT
    if result.oom_killed:
        memory = report.limits.memory_bytes if report.limits else None
        shown = format_size(memory) if memory else "?"
        say(f"job {report.job} killed: memory limit {shown} reached")
        return EXIT_OOM
    if result.signal is not None:
        return 128 + result.signal
    return result.exit_code if result.exit_code is not None else EXIT_NETJAIL
