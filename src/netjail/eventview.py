"""What the CLI shows of events: one line per destination, its count, and the end summary (pure).

A *line* stands for every event about one destination of one job, whatever the DNS record
type: the A and AAAA lookups of a name are one line, ``blocked dns api.stripe.com A,AAAA``, and
a lookup's count is that of its most-asked type (one ``getaddrinfo`` is one lookup, not two).
``EventBoard`` keeps the lines as events arrive and says which are new (print them now) and
whose count has grown since it was last shown (print an update, at most once a second, or the
final count at the end). ``summarize_blocked`` is the job's last line when anything was
blocked: the destinations by name with their counts, and the ``--allow`` that would let each
name through; bare addresses get no hint.

Every string here comes from a job (names, record types, details) and is sanitised before it
reaches a line.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence

import msgspec

from netjail.protocol import Event
from netjail.text import sanitize

#: Most destinations the summary names; the rest are counted ("and 12 more").
SUMMARY_DESTINATIONS = 10
#: Why the proxy refused a connection to a name that a ``tcp://`` rule would let through: the
#: protocol proves no name (SSH, PostgreSQL…), so only a raw rule can allow it.
_RAW_TCP_REASONS = frozenset({"no_hello", "unparsed"})
#: Reasons after which an ``--allow NAME`` would let a name through; others (a mismatched SNI,
#: an upstream that resolves to a forbidden address) need something else, said in the line.
_ALLOWABLE_REASONS = frozenset({None, "not_allowed", "port_not_allowed"})
_QTYPE_ORDER = {"A": 0, "AAAA": 1}


def format_event(event: Event) -> str:
    """One human line for an event.

    ``blocked tcp 203.0.113.9:443 uid=65534``, ``blocked tcp api.stripe.com (198.18.0.3):443
    uid=65534``, ``blocked dns api.stripe.com A``, ``allowed tcp pypi.org (198.18.0.2):443
    uid=65534 out=517 in=6120``, ``redirected udp 8.8.8.8:53 uid=65534 (foreign_resolver)``,
    ``blocked dns query (short_header)``; with the sending process when known: ``blocked tcp
    api.stripe.com (198.18.0.3):443 by node (pid 12) uid=65534``.
    """
    if event.kind == "http":
        return _format_request(event)
    if event.kind == "dns" and event.via == "dns":
        # A query too broken to have a name (or a type) reads "blocked dns query (malformed)".
        text = f"{event.verdict} dns {sanitize(event.domain) if event.domain else 'query'}"
        if event.qtype:
            text += f" {sanitize(event.qtype)}"
        text += _by(event)
        if event.reason and event.reason != "not_allowed" and event.verdict == "blocked":
            text += f" ({sanitize(event.reason)})"
        return text + (f" x{event.count}" if event.count > 1 else "")
    text = f"{event.verdict} {event.proto} {_where(event)}{_by(event)}"
    if event.uid is not None:
        text += f" uid={event.uid}"
    if event.verdict == "allowed" and event.bytes_out is not None:
        text += f" out={event.bytes_out} in={event.bytes_in}"
    if event.reason:
        # An allowed event's reason says how it was let through ("unverified": raw TCP by a
        # tcp:// rule, the name not checked).
        text += f" ({sanitize(event.reason)})"
    if event.count > 1:
        text += f" x{event.count}"
    if event.detail and event.verdict != "allowed":
        text += f": {sanitize(event.detail)}"
    return text


def _format_request(event: Event) -> str:
    """``mocked POST api.stripe.com/v1/customers 201``, ``blocked GET api.example.com/admin 403
    (deny_request): --deny-request GET api.example.com/admin*``."""
    text = f"{event.verdict} {_request(event)}"
    if event.status is not None:
        text += f" {event.status}"
    text += _by(event)
    if event.verdict == "allowed" and event.bytes_in is not None:
        text += f" out={event.bytes_out} in={event.bytes_in}"
    if event.reason:
        text += f" ({sanitize(event.reason)})"
    if event.count > 1:
        text += f" x{event.count}"
    if event.detail and event.verdict == "blocked":
        text += f": {sanitize(event.detail)}"
    return text


def _request(event: Event) -> str:
    """``POST api.stripe.com/v1/customers``."""
    method = sanitize(event.method or "?", 32)
    return f"{method} {sanitize(event.domain or '?')}{sanitize(event.path or '', 200)}"


def _by(event: Event) -> str:
    """`` by node (pid 12)``: the process that sent it (its pid inside the job), if known."""
    if event.process is None:
        return ""
    return f" by {sanitize(event.process.comm, 15) or '?'} (pid {event.process.pid})"


def _where(event: Event) -> str:
    """``name (address):port``, ``address:port``, ``[v6 address]:port`` or a bare address."""
    dst = sanitize(event.dst) if event.dst else "?"
    port = f":{event.port}" if event.port is not None else ""
    if event.domain:
        return f"{sanitize(event.domain)} ({dst}){port}"
    if event.family == 6 and port:
        return f"[{dst}]{port}"
    return f"{dst}{port}"


def line_key(event: Event) -> Hashable:
    """What makes two events one line: the daemon's folding key without the DNS record type,
    and, for DNS, without what an allowed answer's type said (an AAAA ``nodata`` next to an A
    answer is the same name let through)."""
    if event.kind == "dns":
        reason = event.reason if event.verdict == "blocked" else None
        return ("dns", event.job, event.verdict, event.domain, reason)
    if event.kind == "http":
        return (
            "http",
            event.job,
            event.verdict,
            event.method,
            event.domain,
            event.path,
            event.status,
            event.reason,
        )
    return (
        "egress",
        event.job,
        event.verdict,
        event.proto,
        event.dst,
        event.port,
        event.uid,
        event.domain,
        event.reason,
    )


class Line:
    """The events of one destination: the first (whose fields the line shows), the record types
    seen, and the attempts counted so far."""

    def __init__(self, first: Event) -> None:
        self.first = first
        #: Attempts by DNS record type (None for everything that is not a DNS query).
        self.attempts: dict[str | None, int] = {}
        #: The count last printed (0: not printed yet).
        self.shown = 0
        self.latest = first

    def add(self, event: Event) -> None:
        self.attempts[event.qtype] = self.attempts.get(event.qtype, 0) + event.count
        self.latest = event

    @property
    def count(self) -> int:
        """Attempts: lookups for a name (its most-asked record type), packets or connections
        for the rest."""
        return max(self.attempts.values(), default=0)

    def text(self) -> str:
        """The line as it is printed now: the first event, with every record type seen and
        the count so far."""
        # A before AAAA whichever the resolver asked first; other types as they came.
        qtypes = sorted((q for q in self.attempts if q), key=lambda q: _QTYPE_ORDER.get(q, 2))
        shown = msgspec.structs.replace(
            self.first, count=self.count, qtype=",".join(qtypes) if qtypes else None
        )
        return format_event(shown)


class EventBoard:
    """The lines of the events seen so far, in first-seen order."""

    def __init__(self) -> None:
        self._lines: dict[Hashable, Line] = {}

    def add(self, event: Event) -> Line | None:
        """Count ``event``; return its line when the line is new (to be printed now)."""
        key = line_key(event)
        line = self._lines.get(key)
        if line is None:
            line = self._lines[key] = Line(event)
            line.add(event)
            return line
        line.add(event)
        return None

    def lines(self) -> list[Line]:
        return list(self._lines.values())

    def get(self, event: Event) -> Line | None:
        """The line ``event`` belongs to, if one is on the board."""
        return self._lines.get(line_key(event))

    def grown(self) -> list[Line]:
        """Lines printed before whose count has grown since."""
        return [line for line in self._lines.values() if 0 < line.shown < line.count]


def board_of(events: Iterable[Event]) -> EventBoard:
    """The lines of ``events`` (a report's, whose counts are final)."""
    board = EventBoard()
    for event in events:
        board.add(event)
    return board


class _Destination:
    def __init__(self, label: str, hint: str | None) -> None:
        self.label = label
        self.hint = hint
        self.count = 0


def _destination(event: Event) -> tuple[str, str | None]:
    """How the summary names what ``event`` tried to reach, and the rule that would allow it
    (None for addresses, and for names refused for another reason than the policy)."""
    name = sanitize(event.domain) if event.domain else None
    if event.kind == "dns":
        if name is None:
            return f"dns query ({sanitize(event.reason or 'malformed')})", None
        allowable = event.reason in _ALLOWABLE_REASONS
        return name, f"--allow {name}" if allowable else None
    if name is None:
        return _where(event), None
    label = f"{name}:{event.port}" if event.port is not None else name
    if event.port is None:
        return label, None
    if event.reason in _RAW_TCP_REASONS:
        return label, f"--allow tcp://{name}:{event.port}"
    return label, f"--allow {label}" if event.reason in _ALLOWABLE_REASONS else None


def summarize_blocked(events: Iterable[Event], deny: Sequence[str] = ()) -> str | None:
    """``blocked 2 destinations: api.stripe.com (x3), 203.0.113.9:443 (x1); allow with --allow
    api.stripe.com``, or None when nothing was blocked.

    ``deny`` are the job's own --deny rules: a name they refuse gets no --allow hint, which
    could not help (deny wins).
    """
    destinations: dict[str, _Destination] = {}
    for line in board_of(e for e in events if e.verdict == "blocked").lines():
        # A refused request names its rule in its own line; no --allow would help it.
        label, hint = (
            (_request(line.first), None) if line.first.kind == "http" else _destination(line.first)
        )
        destination = destinations.get(label)
        if destination is None:
            destination = destinations[label] = _Destination(label, hint)
        destination.count += line.count
    if not destinations:
        return None
    listed = list(destinations.values())
    shown = listed[:SUMMARY_DESTINATIONS]
    noun = "destination" if len(listed) == 1 else "destinations"
    text = f"blocked {len(listed)} {noun}: " + ", ".join(f"{d.label} (x{d.count})" for d in shown)
    if len(listed) > len(shown):
        text += f", and {len(listed) - len(shown)} more (see the report)"
    hints = [d.hint for d in shown if d.hint and not _denied(d.hint, deny)]
    if hints:
        text += "; allow with " + " ".join(dict.fromkeys(hints))
    return text


def _denied(hint: str, deny: Sequence[str]) -> bool:
    """Whether the job's --deny rules would still refuse what ``hint`` (``--allow RULE``) opens."""
    if not deny:
        return False
    # Imported here: the policy parser (IDNA, ipaddress) is needed only for this check.
    from netjail import policy  # noqa: PLC0415
    from netjail.errors import RequestError  # noqa: PLC0415

    rule = hint.removeprefix("--allow ")
    target = rule.removeprefix("tcp://")
    name, _, port = target.partition(":")
    try:
        verdict = policy.Policy.parse([rule], list(deny))
    except RequestError:
        return False
    if port:
        return not verdict.allows(name, int(port))
    return not verdict.name_verdict(name)
