"""Tests for netjail.daemon.events: folding repeats, bounding memory, timestamps."""

from __future__ import annotations

import re

import pytest

from netjail.daemon.events import FOLD_WINDOW_S, JobEvents, rfc3339
from netjail.protocol import Event


def _event(port: int | None = 443, dst: str = "203.0.113.9", count: int = 1) -> Event:
    return Event(
        job="j-1",
        time="2026-01-01T00:00:00.000Z",
        kind="egress",
        verdict="blocked",
        proto="tcp",
        family=4,
        dst=dst,
        port=port,
        uid=65534,
        count=count,
        via="nflog",
    )


def test_first_event_is_new() -> None:
    """The first event of a kind is recorded and returned for streaming."""
    log = JobEvents()
    event = _event()
    assert log.add(event, now=100.0) is event
    assert log.events == [event]
    assert log.lost == 0


def test_repeats_within_the_window_fold_into_count() -> None:
    """A repeat within the window adds to the first event's count and is not streamed."""
    log = JobEvents(window_s=2.0)
    first = _event()
    log.add(first, now=100.0)
    assert log.add(_event(), now=101.0) is None
    assert log.add(_event(count=3), now=103.0) is None  # 2 s after the previous repeat
    assert log.events == [first]
    assert first.count == 5


def test_repeat_after_the_window_is_a_new_event() -> None:
    """A repeat more than the window after the last one starts a new event."""
    log = JobEvents(window_s=2.0)
    first = _event()
    log.add(first, now=100.0)
    later = _event()
    assert log.add(later, now=102.5) is later
    assert log.events == [first, later]
    assert (first.count, later.count) == (1, 1)


def test_repeat_folds_into_the_newest_event_of_its_kind() -> None:
    """After a new event starts, further repeats fold into it, not into the old one."""
    log = JobEvents(window_s=2.0)
    first, second = _event(), _event()
    log.add(first, now=100.0)
    log.add(second, now=110.0)
    assert log.add(_event(), now=111.0) is None
    assert (first.count, second.count) == (1, 2)


def test_default_window_is_two_seconds() -> None:
    """By default repeats fold for FOLD_WINDOW_S (2 s) after the last one."""
    assert FOLD_WINDOW_S == 2.0
    log = JobEvents()
    log.add(_event(), now=0.0)
    assert log.add(_event(), now=2.0) is None
    assert log.add(_event(), now=4.5) is not None


@pytest.mark.parametrize(
    ("a", "b"),
    [
        pytest.param(_event(port=443), _event(port=80), id="port"),
        pytest.param(_event(dst="203.0.113.9"), _event(dst="203.0.113.10"), id="dst"),
        pytest.param(_event(port=None), _event(port=0), id="no-port-vs-zero"),
    ],
)
def test_different_attempts_are_different_events(a: Event, b: Event) -> None:
    """Events differing in destination or port are kept apart even within the window."""
    log = JobEvents()
    assert log.add(a, now=100.0) is a
    assert log.add(b, now=100.1) is b
    assert log.events == [a, b]
    assert (a.count, b.count) == (1, 1)


def test_cap_counts_dropped_events_in_lost() -> None:
    """Beyond max_events, new events are dropped and counted in lost."""
    log = JobEvents(max_events=2)
    kept = [_event(port=1), _event(port=2)]
    for event in kept:
        log.add(event, now=100.0)
    assert log.add(_event(port=3), now=100.0) is None
    assert log.add(_event(port=4), now=100.0) is None
    assert log.events == kept
    assert log.lost == 2


def test_cap_still_folds_repeats_of_kept_events() -> None:
    """At the cap, repeats of kept events still fold into their count, not into lost."""
    log = JobEvents(max_events=1)
    kept = _event(port=1)
    log.add(kept, now=100.0)
    assert log.add(_event(port=1), now=100.5) is None
    assert kept.count == 2
    assert log.lost == 0


def test_cap_counts_a_late_repeat_of_a_kept_event_as_lost() -> None:
    """At the cap, a repeat after the window would be new, so it is counted as lost."""
    log = JobEvents(max_events=1)
    kept = _event(port=1)
    log.add(kept, now=100.0)
    assert log.add(_event(port=1), now=200.0) is None
    assert kept.count == 1
    assert log.lost == 1


@pytest.mark.parametrize(
    ("timestamp", "text"),
    [
        (0.0, "1970-01-01T00:00:00.000Z"),
        (1.5, "1970-01-01T00:00:01.500Z"),
        (1_700_000_000.25, "2023-11-14T22:13:20.250Z"),
        (1_800_000_000.125, "2027-01-15T08:00:00.125Z"),
    ],
)
def test_rfc3339_is_utc_with_milliseconds(timestamp: float, text: str) -> None:
    """rfc3339 renders UTC with exactly three fractional digits and a "Z"."""
    assert rfc3339(timestamp) == text


def test_rfc3339_shape() -> None:
    """Any timestamp renders as YYYY-MM-DDTHH:MM:SS.mmmZ."""
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", rfc3339(1_234_567_890.987654))
