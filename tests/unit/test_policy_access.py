"""Unit tests for netjail.policy: raw tcp:// rules, access(), and the address questions the
proxy's upstream guard asks (denies_address, allows_address with its ports)."""

from __future__ import annotations

import ipaddress
import re

import pytest

from netjail.errors import RequestError
from netjail.policy import Policy, TcpRule, parse_rule


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def test_denies_address_follows_deny_cidr_rules_and_their_ports() -> None:
    """The upstream guard's first question: a deny CIDR rule covers this address on this port."""
    policy = Policy.parse(["10.0.0.0/8:5432"], ["10.66.0.0/16:22", "[2001:db8::/32]:*"])
    assert policy.denies_address(ip("10.66.0.1"), 22)
    assert policy.denies_address(ip("::ffff:10.66.0.1"), 22)
    assert not policy.denies_address(ip("10.66.0.1"), 443)
    assert policy.denies_address(ip("2001:db8::1"), 443)
    assert not policy.denies_address(ip("10.1.2.3"), 5432)


@pytest.mark.parametrize("thing", ["10.1.2.3", None, 10])
def test_denies_address_refuses_what_is_not_an_address(thing: object) -> None:
    """A malformed address counts as denied: the guard fails closed."""
    assert Policy.parse([]).denies_address(thing, 443)  # type: ignore[arg-type]


def test_cidr_rule_opens_only_its_ports() -> None:
    """10.9.9.0/24:5432 allows an address in it on 5432, not on 80 or 443 (issue 11, item 4)."""
    policy = Policy.parse(["10.9.9.0/24:5432", "db.example"])
    assert policy.allows_address(ip("10.9.9.7"), 5432)
    assert not policy.allows_address(ip("10.9.9.7"), 443)
    assert not policy.allows_address(ip("10.9.9.7"), 80)


# --- raw TCP rules ---------------------------------------------------------------------------


def test_tcp_rule_parses_with_its_ports() -> None:
    """tcp://NAME:PORTS is a TcpRule; the scheme is case-insensitive, the name canonical."""
    assert parse_rule("tcp://DB.Example.:5432") == TcpRule("db.example", False, frozenset({5432}))
    assert parse_rule("TCP://*.cache.example:6379,6380") == TcpRule(
        "cache.example", True, frozenset({6379, 6380})
    )
    assert str(parse_rule("tcp://*.cache.example:6380,6379")) == "tcp://*.cache.example:6379,6380"


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ("tcp://db.example", "a tcp:// rule must list its ports"),
        ("tcp://db.example:*", "a tcp:// rule must list its ports"),
        ("tcp://db.example:", "empty port list"),
        ("tcp://db.example:0", "bad port '0'"),
        ("tcp://10.0.0.7:5432", "an address rule is raw TCP already"),
        ("tcp://[2001:db8::1]:5432", "an address rule is raw TCP already"),
        ("tcp://*:5432", "'*' alone would allow every name"),
        ("tcp://*.com:5432", "too broad"),
        ("tcp://exa mple.com:5432", "may only hold letters"),
    ],
)
def test_bad_tcp_rules_are_refused(rule: str, message: str) -> None:
    """A raw rule must name a domain and list its ports."""
    with pytest.raises(RequestError, match=re.escape(message)):
        parse_rule(rule)


def test_access_tells_checked_from_raw() -> None:
    """access(): a name rule's ports are checked, a tcp:// rule's raw, anything else denied."""
    policy = Policy.parse(["db.example", "tcp://db.example:5432", "tcp://*.cache.example:6379"])
    assert policy.access("db.example", 443) == "checked"
    assert policy.access("db.example", 5432) == "unverified"
    assert policy.access("db.example", 6379) == "denied"
    assert policy.access("a.cache.example", 6379) == "unverified"
    assert policy.access("cache.example", 6379) == "denied"
    assert policy.allows("db.example", 5432)
    assert not policy.allows("a.cache.example", 443)


def test_raw_rule_wins_on_its_ports() -> None:
    """Where a name rule and a tcp:// rule both cover a port, the connection is raw."""
    policy = Policy.parse(["db.example:*", "tcp://db.example:443"])
    assert policy.access("db.example", 443) == "unverified"
    assert policy.access("db.example", 80) == "checked"


def test_raw_rule_makes_the_name_resolvable() -> None:
    """A name with only a tcp:// rule still gets a synthetic address."""
    policy = Policy.parse(["tcp://db.example:5432"])
    assert policy.name_verdict("db.example")
    assert not policy.name_verdict("other.example")


def test_deny_beats_a_raw_rule_and_tcp_scheme_in_deny_denies_all() -> None:
    """A deny rule refuses raw connections too; a tcp:// deny rule is a plain deny."""
    policy = Policy.parse(
        ["tcp://db.example:5432,5433", "api.example:*"], ["db.example:5433", "tcp://api.example:22"]
    )
    assert policy.access("db.example", 5432) == "unverified"
    assert policy.access("db.example", 5433) == "denied"
    assert policy.access("api.example", 22) == "denied"
    assert policy.access("api.example", 443) == "checked"


def test_access_of_bad_names_and_ports_is_denied() -> None:
    """Hostile names and ports give 'denied', never an exception."""
    policy = Policy.parse(["tcp://db.example:5432"])
    assert policy.access("db..example", 5432) == "denied"
    assert policy.access(None, 5432) == "denied"  # type: ignore[arg-type]
    assert policy.access("db.example", 0) == "denied"
    assert policy.access("db.example", True) == "denied"
