"""The CLI's one-line rendering of events (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from netjail import protocol as p
from netjail.cli import format_event


def event(**fields: Any) -> p.Event:
    base: dict[str, Any] = {
        "job": "j-1",
        "time": "2026-11-22T07:00:00Z",
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


@pytest.mark.parametrize(
    ("fields", "line"),
    [
        ({}, "blocked tcp 203.0.113.9:443 uid=65534"),
        ({"family": 6, "dst": "2001:db8::1", "port": 22}, "blocked tcp [2001:db8::1]:22 uid=65534"),
        ({"proto": "icmp", "port": None}, "blocked icmp 203.0.113.9 uid=65534"),
        ({"count": 3}, "blocked tcp 203.0.113.9:443 uid=65534 x3"),
        (
            {"dst": "198.18.0.3", "domain": "api.stripe.com"},
            "blocked tcp api.stripe.com (198.18.0.3):443 uid=65534",
        ),
        (
            {"via": "proxy", "dst": "198.18.0.3", "domain": "a.test", "reason": "sni_mismatch"},
            "blocked tcp a.test (198.18.0.3):443 uid=65534 (sni_mismatch)",
        ),
        (
            {
                "via": "proxy",
                "verdict": "allowed",
                "dst": "198.18.0.2",
                "domain": "pypi.org",
                "bytes_out": 517,
                "bytes_in": 6120,
            },
            "allowed tcp pypi.org (198.18.0.2):443 uid=65534 out=517 in=6120",
        ),
        (
            {
                "verdict": "redirected",
                "proto": "udp",
                "dst": "8.8.8.8",
                "port": 53,
                "reason": "foreign_resolver",
            },
            "redirected udp 8.8.8.8:53 uid=65534 (foreign_resolver)",
        ),
    ],
)
def test_egress_lines(fields: dict[str, Any], line: str) -> None:
    assert format_event(event(**fields)) == line


def dns(**fields: Any) -> p.Event:
    return event(kind="dns", via="dns", proto="udp", dst="127.0.0.1", port=53, **fields)


def test_dns_lines_name_the_query() -> None:
    assert format_event(dns(domain="api.stripe.com", qtype="A")) == "blocked dns api.stripe.com A"
    # not_allowed is what "blocked" already says; other reasons are shown, counts folded.
    blocked = dns(domain="x.test", qtype="TXT", reason="not_allowed", count=4)
    assert format_event(blocked) == "blocked dns x.test TXT x4"
    assert (
        format_event(dns(domain="a.test", qtype="A", verdict="allowed")) == "allowed dns a.test A"
    )


def test_a_query_without_a_name_reads_as_a_query() -> None:
    assert format_event(dns(reason="short_header")) == "blocked dns query (short_header)"


def test_hostile_names_are_sanitised() -> None:
    line = format_event(dns(domain="evil\x1b[31m.test\nnetjail: allowed", qtype="A\r"))
    assert "\x1b" not in line
    assert "\n" not in line
    assert "\r" not in line
