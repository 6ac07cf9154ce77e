"""Per-job event log: folds repeats into counts, bounds memory, counts what it drops (pure)."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from netjail.protocol import Event

#: A repeat of the same attempt within this many seconds of the last one increments ``count``
#: (SYN retransmits, resolver retries) instead of making a new event.
FOLD_WINDOW_S = 2.0
#: Distinct events kept per job; beyond this they are counted in ``lost_events``.
MAX_EVENTS_PER_JOB = 10_000


def rfc3339(timestamp: float) -> str:
    """UTC RFC 3339 with milliseconds, e.g. 2026-11-22T06:40:01.123Z."""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def event_key(event: Event) -> Hashable:
    """What makes two events "the same attempt"."""
    return (
        event.kind,
        event.verdict,
        event.proto,
        event.dst,
        event.port,
        event.uid,
        event.domain,
        event.qtype,
        event.reason,
        event.method,
        event.path,
        event.status,
    )


@dataclass
class JobEvents:
    """The folded events of one job, in first-seen order."""

    max_events: int = MAX_EVENTS_PER_JOB
    window_s: float = FOLD_WINDOW_S
    events: list[Event] = field(default_factory=list)
    #: Attempts not in ``events``: lost on the way (NFLOG gaps, ENOBUFS, kernel log) and
    #: dropped for lack of room; the second kind is also in ``not_kept`` by event kind.
    lost: int = 0
    not_kept: dict[str, int] = field(default_factory=dict)
    _last: dict[Hashable, tuple[Event, float]] = field(default_factory=dict)

    def add(self, event: Event, now: float) -> Event | None:
        """Record ``event`` seen at monotonic time ``now``.

        Returns the event if it is new (to be streamed), or None when it was folded into an
        earlier one's count or dropped for lack of room (counted in ``lost``).
        """
        key = event_key(event)
        previous = self._last.get(key)
        if previous is not None and now - previous[1] <= self.window_s:
            previous[0].count += event.count
            self._last[key] = (previous[0], now)
            return None
        if len(self.events) >= self.max_events:
            self.lost += event.count
            self.not_kept[event.kind] = self.not_kept.get(event.kind, 0) + event.count
            return None
        self.events.append(event)
        self._last[key] = (event, now)
        return event
