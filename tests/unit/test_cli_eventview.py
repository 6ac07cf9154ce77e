"""Tests for netjail.eventview: one line per destination, its count, and the end summary."""

from __future__ import annotations

from typing import Any

import pytest

from netjail import protocol as p
from netjail.eventview import EventBoard, board_of, format_event, summarize_blocked

JOB = "j-0123abcd"


def _event(**fields: Any) -> p.Event:
    base: dict[str, Any] = {
        "job": JOB,
        "time": "2026-01-01T00:00:00.000Z",
        "kind": "egress",
        "verdict": "blocked",
        "proto": "tcp",
        "family": 4,
        "dst": "203.0.113.9",
        "port": 443,
        "uid": 65534,
        "count": 1,
        "via": "nflog",
    }
    return p.Event(**(base | fields))


def _dns(name: str | None, qtype: str | None = "A", **fields: Any) -> p.Event:
    dns: dict[str, Any] = {
        "kind": "dns",
        "via": "dns",
        "proto": "udp",
        "dst": "127.0.0.1",
        "port": 53,
        "uid": None,
        "domain": name,
        "qtype": qtype,
        "reason": "not_allowed",
    }
    return _event(**(dns | fields))


def test_a_and_aaaa_of_a_name_are_one_line() -> None:
    """The A and AAAA lookups of a name make one line naming both types, counted as lookups."""
    board = EventBoard()
    first = board.add(_dns("api.stripe.com", "A"))
    assert first is not None
    assert board.add(_dns("api.stripe.com", "AAAA")) is None
    assert [line.text() for line in board.lines()] == ["blocked dns api.stripe.com A,AAAA"]
    board.add(_dns("api.stripe.com", "A"))
    board.add(_dns("api.stripe.com", "AAAA"))
    assert first.count == 2
    assert first.text() == "blocked dns api.stripe.com A,AAAA x2"


def test_two_hundred_names_are_two_hundred_lines() -> None:
    """200 blocked names, each looked up as A and AAAA, are 200 lines, not 400."""
    board = EventBoard()
    new = [board.add(_dns(f"n{i}.example", qtype)) for i in range(200) for qtype in ("A", "AAAA")]
    assert sum(line is not None for line in new) == 200
    assert len(board.lines()) == 200


def test_destinations_stay_apart() -> None:
    """Different addresses, ports, verdicts, reasons or jobs are different lines."""
    events = [
        _event(),
        _event(port=80),
        _event(dst="203.0.113.10"),
        _event(verdict="allowed", via="proxy"),
        _event(reason="foreign_resolver"),
        _event(job="j-99999999"),
        _dns("a.example"),
        _dns("a.example", reason="invalid_name"),
    ]
    assert len(board_of(events).lines()) == len(events)


def test_an_allowed_names_nodata_answer_is_on_its_a_line() -> None:
    """An allowed name's A answer and AAAA "nodata" are one line."""
    board = board_of(
        [
            _dns("pypi.org", "A", verdict="allowed", reason=None),
            _dns("pypi.org", "AAAA", verdict="allowed", reason="nodata"),
        ]
    )
    assert [line.text() for line in board.lines()] == ["allowed dns pypi.org A,AAAA"]


def test_grown_lists_printed_lines_whose_count_grew() -> None:
    """Only lines already printed whose count went up since are listed for an update."""
    board = EventBoard()
    line = board.add(_event())
    assert line is not None
    assert board.grown() == []  # not printed yet: nothing to update
    line.shown = line.count
    assert board.grown() == []
    board.add(_event(count=2))
    assert board.grown() == [line]
    assert line.text() == "blocked tcp 203.0.113.9:443 uid=65534 x3"


def test_summary_names_destinations_with_counts_and_the_allow_that_fixes_names() -> None:
    """The summary lists names and addresses with counts; only names get an --allow hint."""
    events = [
        _dns("api.stripe.com", "A", count=3),
        _dns("api.stripe.com", "AAAA", count=3),
        _event(),
    ]
    assert summarize_blocked(events) == (
        "blocked 2 destinations: api.stripe.com (x3), 203.0.113.9:443 (x1); "
        "allow with --allow api.stripe.com"
    )


def test_summary_is_none_when_nothing_was_blocked() -> None:
    """Allowed and redirected events make no summary."""
    events = [
        _event(verdict="allowed", via="proxy", domain="pypi.org"),
        _event(verdict="redirected", proto="udp", port=53, reason="foreign_resolver"),
    ]
    assert summarize_blocked(events) is None


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        pytest.param(
            _event(via="proxy", dst="198.18.0.3", domain="db.example", reason="port_not_allowed"),
            "blocked 1 destination: db.example:443 (x1); allow with --allow db.example:443",
            id="port",
        ),
        pytest.param(
            _event(
                via="proxy", dst="198.18.0.3", port=5432, domain="db.example", reason="no_hello"
            ),
            "blocked 1 destination: db.example:5432 (x1); allow with --allow tcp://db.example:5432",
            id="raw-tcp",
        ),
        pytest.param(
            _event(via="proxy", dst="198.18.0.3", domain="a.example", reason="sni_mismatch"),
            "blocked 1 destination: a.example:443 (x1)",
            id="no-hint-for-a-mismatch",
        ),
        pytest.param(
            _event(family=6, dst="2001:db8::1", port=22),
            "blocked 1 destination: [2001:db8::1]:22 (x1)",
            id="ipv6",
        ),
        pytest.param(
            _event(proto="icmp", port=None), "blocked 1 destination: 203.0.113.9 (x1)", id="icmp"
        ),
        pytest.param(
            _dns(None, None, reason="short_header"),
            "blocked 1 destination: dns query (short_header) (x1)",
            id="malformed-query",
        ),
        pytest.param(
            _dns("evil\x1b[2J.example"),
            "blocked 1 destination: evil?[2J.example (x1); allow with --allow evil?[2J.example",
            id="sanitised",
        ),
    ],
)
def test_summary_shapes(event: p.Event, expected: str) -> None:
    """Each kind of blocked destination is named as the user would allow it, if it can be."""
    assert summarize_blocked([event]) == expected


def test_summary_gives_no_hint_that_a_deny_rule_would_defeat() -> None:
    """A name the job's own --deny refuses gets no --allow hint (deny wins); others still do."""
    events = [_dns("api.stripe.com"), _dns("pypi.org")]
    assert summarize_blocked(events, deny=["*.stripe.com", "api.stripe.com"]) == (
        "blocked 2 destinations: api.stripe.com (x1), pypi.org (x1); allow with --allow pypi.org"
    )


def test_summary_is_bounded() -> None:
    """Past SUMMARY_DESTINATIONS names, the rest are only counted."""
    events = [_dns(f"n{i}.example") for i in range(25)]
    summary = summarize_blocked(events)
    assert summary is not None
    assert summary.startswith("blocked 25 destinations: n0.example (x1), ")
    assert ", and 15 more (see the report); allow with --allow n0.example " in summary
    assert "n10.example" not in summary


def test_format_event_sanitises_the_address_too() -> None:
    """Every field a line shows is sanitised, the destination address included."""
    assert format_event(_event(dst="203.0.113.9\n")) == "blocked tcp 203.0.113.9?:443 uid=65534"


def test_a_comes_before_aaaa_whichever_was_asked_first() -> None:
    """A line names A before AAAA even when the resolver asked for AAAA first."""
    board = board_of([_dns("x.example", "AAAA"), _dns("x.example", "TXT"), _dns("x.example", "A")])
    assert [line.text() for line in board.lines()] == ["blocked dns x.example A,AAAA,TXT"]


def test_an_event_names_the_process_that_sent_it() -> None:
    """A known sender reads ``by COMM (pid N)``, its name sanitised; DNS lines say it too."""
    node = p.EventProcess(pid=12, comm="node", exe="/usr/bin/node", argv=["node", "a.js"])
    assert format_event(_event(domain="api.stripe.com", process=node)) == (
        "blocked tcp api.stripe.com (203.0.113.9):443 by node (pid 12) uid=65534"
    )
    evil = p.EventProcess(pid=3, comm="x\x1b[2J")
    assert format_event(_dns("a.example", process=evil)) == (
        "blocked dns a.example A by x?[2J (pid 3)"
    )
    assert "by" not in format_event(_event())
