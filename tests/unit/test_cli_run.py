"""Tests for `netjail run` against the fake daemon of test_cli: signals go to the job, event
lines stay whole and go where --events says, the end-of-job lines, and a stopping daemon.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from netjail import protocol as p
from tests.unit.test_cli import (
    EV_TCP4,
    JOB,
    FakeDaemon,
    _event,
    _netjail,
    _report,
    fake_daemon,
)

STARTED = {"op": "started", "job": JOB, "pid": 4242}
HOLD = {"op": "_hold"}
SHUTDOWN = {"op": "error", "code": "shutdown", "message": "netjaild is stopping"}
SUMMARY = "netjail: blocked 1 destination: 203.0.113.9:443 (x1)"
CLI = [sys.executable, "-m", "netjail.cli", "--socket"]


@pytest.fixture
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeDaemon]:
    with fake_daemon(tmp_path_factory) as fake:
        yield fake


def _exit(**report: Any) -> dict[str, Any]:
    return {"op": "exit", "report": _report(**({"events": []} | report))}


def _event_message(event: dict[str, Any]) -> dict[str, Any]:
    return {"op": "event", "event": event}


def _spawn(daemon: FakeDaemon, *args: str) -> subprocess.Popen[str]:
    """`netjail run ARGS` with stderr on a pipe (stdout on /dev/null: the fake daemon holds the
    job's copy of it until released, which would keep a pipe open)."""
    env = {k: v for k, v in os.environ.items() if k != "NETJAIL_SOCKET"}
    return subprocess.Popen(
        [*CLI, daemon.path, "run", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 20
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _kills(daemon: FakeDaemon) -> list[int]:
    return [r.request.signal for r in daemon.received if isinstance(r.request, p.KillRequest)]


def _in_the_loop(daemon: FakeDaemon) -> list[dict[str, Any]]:
    """The start of a run script after which the CLI is known to be waiting on its job: it
    printed the event line (read by the test before it signals)."""
    daemon.script["kill"] = [{"op": "killed", "job": JOB}]
    return [STARTED, _event_message(EV_TCP4), HOLD]


# --- signals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT], ids=lambda s: s.name
)
def test_signals_go_to_the_job(daemon: FakeDaemon, sig: signal.Signals) -> None:
    """INT, TERM, HUP and QUIT sent to netjail become a kill request with that signal; the
    job killed by it makes netjail exit 128+N (130 for SIGINT)."""
    daemon.script["run"] = [*_in_the_loop(daemon), _exit(exit_code=None, signal=int(sig))]
    cli = _spawn(daemon, "--", "sleep", "20")
    assert cli.stderr is not None
    assert cli.stderr.readline() == "netjail: blocked tcp 203.0.113.9:443 uid=65534\n"
    cli.send_signal(sig)
    _wait_for(lambda: _kills(daemon) == [sig], "the kill request")
    daemon.release.set()
    _, stderr = cli.communicate(timeout=20)
    assert cli.returncode == 128 + sig
    assert "Traceback" not in stderr


def test_a_second_interrupt_within_two_seconds_kills_the_job(daemon: FakeDaemon) -> None:
    """A second SIGINT soon after the first sends SIGKILL, and says so in one line."""
    daemon.script["run"] = [*_in_the_loop(daemon), _exit(exit_code=None, signal=9)]
    cli = _spawn(daemon, "--", "sleep", "20")
    assert cli.stderr is not None
    cli.stderr.readline()
    cli.send_signal(signal.SIGINT)
    _wait_for(lambda: _kills(daemon) == [signal.SIGINT], "the first kill request")
    cli.send_signal(signal.SIGINT)
    _wait_for(lambda: _kills(daemon) == [signal.SIGINT, signal.SIGKILL], "the SIGKILL")
    daemon.release.set()
    _, stderr = cli.communicate(timeout=20)
    assert cli.returncode == 137
    assert stderr.splitlines()[0] == f"netjail: second interrupt: killing job {JOB} (SIGKILL)"


def test_an_interrupt_before_the_job_started_ends_netjail(daemon: FakeDaemon) -> None:
    """Before the daemon said the job started there is nothing to forward to: SIGINT ends
    netjail (130) with one line, and closing the connection ends anything started."""
    daemon.script["run"] = [HOLD]
    cli = _spawn(daemon, "--", "true")
    _wait_for(daemon.got_request.is_set, "the run request")
    cli.send_signal(signal.SIGINT)
    _, stderr = cli.communicate(timeout=20)
    daemon.release.set()
    assert cli.returncode == 130
    assert stderr == "netjail: interrupted before the job started\n"
    assert _kills(daemon) == []


# --- where event lines go, and how ---------------------------------------------------------


def _script(daemon: FakeDaemon, *events: dict[str, Any], **report: Any) -> None:
    daemon.script["run"] = [
        STARTED,
        *(_event_message(e) for e in events),
        _exit(**({"events": list(events)} | report)),
    ]


def test_event_lines_never_land_inside_the_jobs_lines(daemon: FakeDaemon) -> None:
    """The job's stderr line written in pieces, with an event in between, stays whole: the
    event line comes before or after it, never inside."""
    line = "curl: (7) Failed to connect to 203.0.113.9 port 443 after 0 ms: Couldn't connect"
    daemon.script["run"] = [
        STARTED,
        {"op": "_write", "fd": 2, "data": line[:45]},
        _event_message(EV_TCP4),
        {"op": "_sleep", "s": 0.1},
        {"op": "_write", "fd": 2, "data": line[45:] + "\n"},
        {"op": "_close_fds"},
        _exit(events=[EV_TCP4]),
    ]
    result = _netjail(daemon.path, "run", "--", "curl", "https://203.0.113.9/")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert sorted(lines[:2]) == sorted([line, "netjail: blocked tcp 203.0.113.9:443 uid=65534"])
    assert lines[2:] == [SUMMARY]


def test_the_jobs_output_ends_before_netjails_last_lines(daemon: FakeDaemon) -> None:
    """What the job wrote last (without a newline) comes before netjail's last lines (the final
    counts of events not streamed, the summary), which start on a line of their own."""
    daemon.script["run"] = [
        STARTED,
        {"op": "_write", "fd": 2, "data": "no newline"},
        {"op": "_close_fds"},
        _exit(events=[EV_TCP4]),
    ]
    result = _netjail(daemon.path, "run", "--", "true")
    assert result.stderr == (
        f"no newline\nnetjail: blocked tcp 203.0.113.9:443 uid=65534\n{SUMMARY}\n"
    )


def test_events_go_to_a_file(daemon: FakeDaemon, tmp_path: Path) -> None:
    """--events FILE: the event lines and the summary go there; stderr has none of them."""
    path = tmp_path / "events.log"
    _script(daemon, EV_TCP4)
    result = _netjail(daemon.path, "run", "--events", str(path), "--", "true")
    assert result.returncode == 0
    assert result.stderr == ""
    assert path.read_text().splitlines() == [
        "netjail: blocked tcp 203.0.113.9:443 uid=65534",
        SUMMARY,
    ]


def test_events_go_to_stdout_with_a_dash(daemon: FakeDaemon) -> None:
    """--events - prints them on stdout."""
    _script(daemon, EV_TCP4)
    result = _netjail(daemon.path, "run", "--events", "-", "--", "true")
    assert result.stdout.splitlines()[0] == "netjail: blocked tcp 203.0.113.9:443 uid=65534"
    assert result.stderr == ""


def test_events_go_to_a_file_descriptor(daemon: FakeDaemon, tmp_path: Path) -> None:
    """--events fd:N writes them to the caller's file descriptor N."""
    path = tmp_path / "fd3"
    _script(daemon, EV_TCP4)
    env = {k: v for k, v in os.environ.items() if k != "NETJAIL_SOCKET"}
    with path.open("wb") as f:
        fd = f.fileno()
        result = subprocess.run(
            [*CLI, daemon.path, "run", "--events", f"fd:{fd}", "--", "true"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=env,
            pass_fds=[fd],
            timeout=60,
            check=False,
        )
    assert result.stderr == ""
    assert path.read_text().splitlines()[0] == "netjail: blocked tcp 203.0.113.9:443 uid=65534"


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("/nonexistent/events.log", "--events /nonexistent/events.log: No such file or directory"),
        ("fd:99", "--events fd:99: file descriptor 99 is not open (Bad file descriptor)"),
        ("fd:three", "--events fd:three: use fd:N, N a file descriptor number, e.g. fd:3"),
    ],
)
def test_a_bad_events_target_fails_before_the_job(
    daemon: FakeDaemon, where: str, message: str
) -> None:
    """A --events that cannot be written is one line, exit 125, and no job."""
    result = _netjail(daemon.path, "run", "--events", where, "--", "true")
    assert result.returncode == 125
    assert result.stderr == f"netjail: {message}\n"
    assert [r for r in daemon.received if isinstance(r.request, p.RunRequest)] == []


def test_json_prints_events_as_json_lines(daemon: FakeDaemon) -> None:
    """--json prints each event as one JSON object per line, and no summary."""
    _script(daemon, EV_TCP4)
    result = _netjail(daemon.path, "run", "--json", "--", "true")
    assert [json.loads(line) for line in result.stderr.splitlines()] == [EV_TCP4]


def test_quiet_prints_no_summary_either(daemon: FakeDaemon) -> None:
    """--quiet silences the events and the summary of what was blocked."""
    _script(daemon, EV_TCP4)
    result = _netjail(daemon.path, "run", "--quiet", "--", "true")
    assert result.stderr == ""


def test_the_final_count_is_printed_at_the_end_off_a_terminal(daemon: FakeDaemon) -> None:
    """Off a terminal a line is printed when first seen, then again at the end if its count
    grew (the report's count is final); lines never streamed are printed at the end too."""
    live = _event("203.0.113.9", 443)
    final = _event("203.0.113.9", 443, count=3)
    unseen = _event("203.0.113.10", 80)
    daemon.script["run"] = [STARTED, _event_message(live), _exit(events=[final, unseen])]
    result = _netjail(daemon.path, "run", "--", "true")
    assert result.stderr.splitlines() == [
        "netjail: blocked tcp 203.0.113.9:443 uid=65534",
        "netjail: blocked tcp 203.0.113.9:443 uid=65534 x3",
        "netjail: blocked tcp 203.0.113.10:80 uid=65534",
        "netjail: blocked 2 destinations: 203.0.113.9:443 (x3), 203.0.113.10:80 (x1)",
    ]


def test_the_cwd_note_is_one_line(daemon: FakeDaemon, tmp_path: Path) -> None:
    """When the daemon started the job in its HOME instead, netjail says why and how to fix."""
    daemon.script["run"] = [{**STARTED, "cwd": "/home/job"}, _exit()]
    result = subprocess.run(
        [*CLI, daemon.path, "run", "true"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert result.stderr == (
        f"netjail: {tmp_path} is not in the jail's view, so the job runs in /home/job "
        f"(--ro-bind {tmp_path} or --bind {tmp_path} to run it there)\n"
    )


# --- a stopping daemon ---------------------------------------------------------------------


def test_a_daemon_stopping_before_the_report_says_so(daemon: FakeDaemon) -> None:
    """The daemon ending the job without a report (it is stopping): one line, exit 143."""
    daemon.script["run"] = [STARTED, SHUTDOWN]
    result = _netjail(daemon.path, "run", "--", "sleep", "20")
    assert result.returncode == 143
    assert result.stderr == (
        f"netjail: job {JOB} ended, and sent no report: netjaild is stopping\n"
    )


def test_a_daemon_stopping_after_the_report_says_so(daemon: FakeDaemon, tmp_path: Path) -> None:
    """The report (SIGTERM, marked shutdown), then the shutdown error: one line, exit 143, the
    report kept."""
    path = tmp_path / "r.json"
    stopped = _exit(exit_code=None, signal=15) | {"shutdown": True}
    daemon.script["run"] = [STARTED, stopped, SHUTDOWN]
    result = _netjail(daemon.path, "run", "--report", str(path), "--", "sleep", "20")
    assert result.returncode == 143
    assert result.stderr == f"netjail: job {JOB} ended: netjaild is stopping\n"
    assert json.loads(path.read_text())["signal"] == 15


def test_a_report_marked_shutdown_is_enough_to_say_why(daemon: FakeDaemon) -> None:
    """A report marked shutdown, and the connection closed with no error after it: the same
    one line, exit 143."""
    daemon.script["run"] = [STARTED, _exit(exit_code=0, signal=None) | {"shutdown": True}]
    result = _netjail(daemon.path, "run", "--", "sleep", "20")
    assert result.returncode == 143
    assert result.stderr == f"netjail: job {JOB} ended: netjaild is stopping\n"


def test_a_job_killed_by_sigterm_from_elsewhere_exits_143_quietly(daemon: FakeDaemon) -> None:
    """A SIGTERM from `netjail kill` while the daemon keeps serving (a report not marked
    shutdown): 143 at once, with nothing said and nothing more awaited."""
    daemon.script["run"] = [STARTED, _exit(exit_code=None, signal=15), HOLD]
    cli = _spawn(daemon, "--", "sleep", "20")
    assert cli.wait(timeout=20) == 143
    daemon.release.set()
    assert cli.stderr is not None
    assert cli.stderr.read() == ""
    cli.stderr.close()


def test_on_a_terminal_counts_are_printed_as_they_grow(daemon: FakeDaemon) -> None:
    """With stderr a terminal, a destination seen again gets its count printed while the job
    runs (not only at the end), and the job's own output still reaches the terminal."""
    again = _event("203.0.113.9", 443)
    daemon.script["run"] = [
        STARTED,
        _event_message(EV_TCP4),
        {"op": "_sleep", "s": 0.2},
        {"op": "_batch", "messages": [_event_message(again), _event_message(again)]},
        {"op": "_sleep", "s": 0.3},
        {"op": "_write", "fd": 2, "data": "job says hi\n"},
        {"op": "_close_fds"},
        _exit(events=[{**EV_TCP4, "count": 3}]),
    ]
    master, slave = os.openpty()
    env = {k: v for k, v in os.environ.items() if k != "NETJAIL_SOCKET"}
    try:
        cli = subprocess.Popen(
            [*CLI, daemon.path, "run", "--", "true"],
            stdin=subprocess.DEVNULL,
            stdout=slave,
            stderr=slave,
            env=env,
        )
        os.close(slave)
        slave = -1
        assert cli.wait(timeout=20) == 0
        out = b""
        while True:
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:  # EIO: every holder of the terminal's other side is gone
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    lines = out.decode().replace("\r\n", "\n").splitlines()
    first = "netjail: blocked tcp 203.0.113.9:443 uid=65534"
    assert lines[0] == first
    assert "job says hi" in lines
    # Printed before the job's last output, while it ran; the count was final by then.
    grown = [i for i, line in enumerate(lines) if line.startswith(first + " x")]
    assert lines[grown[-1]] == first + " x3"
    assert grown[-1] < lines.index("job says hi")
    assert lines[-1] == SUMMARY.replace("(x1)", "(x3)")
