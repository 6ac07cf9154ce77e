"""Tests for `netjail events --follow` against the fake daemon of test_cli: only new events
unless --history, one line per destination, and counts that grow."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.unit.test_cli import EV_TCP4, JOB, FakeDaemon, fake_daemon

OLD = {**EV_TCP4, "time": "2001-01-01T00:00:00.000Z", "dst": "203.0.113.1"}
NEW = {**EV_TCP4, "time": "2099-01-01T00:00:00.000Z"}
#: A last new event: once its line is printed, every earlier one was.
MARK = {**NEW, "dst": "198.51.100.99"}


@pytest.fixture
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeDaemon]:
    with fake_daemon(tmp_path_factory) as fake:
        yield fake


def _follow(
    daemon: FakeDaemon, *events: dict[str, Any], until: str, args: tuple[str, ...] = ()
) -> list[str]:
    """The lines `events --follow ARGS` prints for ``events``, up to the one holding ``until``
    (then ^C)."""
    daemon.script["events"] = [*({"op": "event", "event": e} for e in events), {"op": "_hold"}]
    env = {k: v for k, v in os.environ.items() if k != "NETJAIL_SOCKET"}
    cli = subprocess.Popen(
        [sys.executable, "-m", "netjail.cli", "--socket", daemon.path, "events", "-f", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert cli.stdout is not None
    out = b""
    deadline = time.monotonic() + 20
    while until.encode() not in out:
        left = deadline - time.monotonic()
        assert left > 0, f"no {until!r} in {out!r}"
        if select.select([cli.stdout], [], [], left)[0]:
            chunk = os.read(cli.stdout.fileno(), 1 << 16)
            assert chunk, f"the CLI ended early: {out!r}"
            out += chunk
    cli.send_signal(signal.SIGINT)
    rest, stderr = cli.communicate(timeout=20)
    assert (cli.returncode, stderr) == (0, b"")
    return (out + rest).decode().splitlines()


def test_follow_shows_only_new_events(daemon: FakeDaemon) -> None:
    """Events the daemon saw before `events -f` started (its history) are not shown."""
    assert _follow(daemon, OLD, NEW, MARK, until="198.51.100.99")[:1] == [
        f"2099-01-01T00:00:00.000Z {JOB} blocked tcp 203.0.113.9:443 uid=65534"
    ]


def test_follow_with_history_shows_the_history_first(daemon: FakeDaemon) -> None:
    """--history shows the events seen before, then the new ones."""
    assert _follow(daemon, OLD, NEW, MARK, until="198.51.100.99", args=("--history",))[:2] == [
        f"2001-01-01T00:00:00.000Z {JOB} blocked tcp 203.0.113.1:443 uid=65534",
        f"2099-01-01T00:00:00.000Z {JOB} blocked tcp 203.0.113.9:443 uid=65534",
    ]


def test_follow_shows_counts(daemon: FakeDaemon) -> None:
    """A destination seen again is not a new line: its count is printed as it grows."""
    later = {**NEW, "time": "2099-01-01T00:00:05.000Z", "count": 2}
    assert _follow(daemon, NEW, later, until="x3") == [
        f"2099-01-01T00:00:00.000Z {JOB} blocked tcp 203.0.113.9:443 uid=65534",
        f"2099-01-01T00:00:05.000Z {JOB} blocked tcp 203.0.113.9:443 uid=65534 x3",
    ]
