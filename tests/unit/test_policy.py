"""Unit tests for netjail.policy: rule parsing, refusals and matching."""

from __future__ import annotations

import ipaddress

import pytest

from netjail.errors import RequestError
from netjail.policy import (
    DEFAULT_PORTS,
    CidrRule,
    NameRule,
    Policy,
    canonical_name,
    parse_rule,
)


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


# --- parsing and normalisation ---------------------------------------------------------------


def test_name_rule_defaults_to_web_ports() -> None:
    """A name rule without ports covers 80 and 443."""
    assert parse_rule("example.com") == NameRule("example.com", False, frozenset({80, 443}))


def test_name_rule_explicit_ports() -> None:
    """Ports after ':' replace the default, duplicates folded."""
    assert parse_rule("example.com:8443,22,22") == NameRule(
        "example.com", False, frozenset({22, 8443})
    )


def test_name_rule_any_port() -> None:
    """':*' means every port."""
    assert parse_rule("example.com:*") == NameRule("example.com", False, None)


def test_name_is_lowercased_and_trailing_dot_removed() -> None:
    """Case and one trailing dot do not make a different name."""
    assert parse_rule("  API.Example.COM.  ") == NameRule("api.example.com", False, DEFAULT_PORTS)


def test_unicode_name_becomes_punycode() -> None:
    """A Unicode name is stored as its IDNA punycode form."""
    assert parse_rule("Bücher.example") == parse_rule("xn--bcher-kva.example")
    assert parse_rule("bücher.example").name == "xn--bcher-kva.example"  # type: ignore[union-attr]


def test_ideographic_full_stop_separates_labels() -> None:
    """The dots IDNA recognises split labels as a client's encoder would."""
    assert canonical_name("bücher\u3002example") == "xn--bcher-kva.example"


def test_wildcard_rule() -> None:
    """'*.name' parses as a wildcard on the name."""
    assert parse_rule("*.Example.test:443") == NameRule("example.test", True, frozenset({443}))


def test_underscore_label_accepted() -> None:
    """Real host names carry '_'; it is accepted."""
    assert parse_rule("a_b.example.com").name == "a_b.example.com"  # type: ignore[union-attr]


def test_cidr_rules_v4_and_v6() -> None:
    """IPv4 and bracketed IPv6 networks with ports parse; a bare address is a /32 or /128."""
    assert parse_rule("10.0.0.0/8:5432") == CidrRule(
        ipaddress.IPv4Network("10.0.0.0/8"), frozenset({5432})
    )
    assert parse_rule("192.0.2.7:443") == CidrRule(
        ipaddress.IPv4Network("192.0.2.7/32"), frozenset({443})
    )
    assert parse_rule("[2001:DB8::/32]:443,80") == CidrRule(
        ipaddress.IPv6Network("2001:db8::/32"), frozenset({80, 443})
    )
    assert parse_rule("[2001:db8::1]:*") == CidrRule(ipaddress.IPv6Network("2001:db8::1/128"), None)


@pytest.mark.parametrize(
    "text",
    ["example.com:443", "*.example.com:*", "10.0.0.0/8:22,5432", "[2001:db8::/32]:443"],
)
def test_rule_text_round_trips(text: str) -> None:
    """str(rule) is canonical rule text that parses back to the same rule."""
    assert str(parse_rule(text)) == text
    assert parse_rule(str(parse_rule(text))) == parse_rule(text)


# --- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "invalid rule '': empty rule"),
        (
            "*",
            "invalid rule '*': '*' alone would allow every name; name a domain, e.g. *.example.com",
        ),
        (
            "*.com",
            "invalid rule '*.com': a wildcard directly over the public suffix 'com' is too broad;"
            " name a domain, e.g. *.example.com",
        ),
        (
            "*.co.uk",
            "invalid rule '*.co.uk': a wildcard directly over the public suffix 'co.uk' is too"
            " broad; name a domain, e.g. *.example.com",
        ),
        (
            "exa mple.com",
            "invalid rule 'exa mple.com': label 'exa mple' may only hold letters, digits, '_'"
            " and inner '-'",
        ),
        (
            "a..example.com",
            "invalid rule 'a..example.com': empty label (two dots in a row, or a leading dot)",
        ),
        (
            ".example.com",
            "invalid rule '.example.com': empty label (two dots in a row, or a leading dot)",
        ),
        (
            "example.com..",
            "invalid rule 'example.com..': empty label (two dots in a row, or a leading dot)",
        ),
        (
            "-a.example.com",
            "invalid rule '-a.example.com': label '-a' may only hold letters, digits, '_' and"
            " inner '-'",
        ),
        (
            "example.com:0",
            "invalid rule 'example.com:0': bad port '0': a port is a number from 1 to 65535",
        ),
        (
            "example.com:65536",
            "invalid rule 'example.com:65536': bad port '65536': a port is a number from 1 to"
            " 65535",
        ),
        (
            "example.com:abc",
            "invalid rule 'example.com:abc': bad port 'abc': a port is a number from 1 to 65535",
        ),
        (
            "example.com:80,",
            "invalid rule 'example.com:80,': bad port '': a port is a number from 1 to 65535",
        ),
        ("example.com:", "invalid rule 'example.com:': empty port list after ':'"),
        (
            "a*.example.com",
            "invalid rule 'a*.example.com': '*' may only be the whole first label, as in"
            " *.example.com",
        ),
        (
            "*.*.example.com",
            "invalid rule '*.*.example.com': '*' may only be the whole first label, as in"
            " *.example.com",
        ),
        (
            "api.*.example.com",
            "invalid rule 'api.*.example.com': '*' may only be the whole first label, as in"
            " *.example.com",
        ),
        (
            "example.123",
            "invalid rule 'example.123': the last label is all digits; for an address write a"
            " CIDR rule with its ports, e.g. 192.0.2.0/24:443",
        ),
        (
            "10.0.0.0/8",
            "invalid rule '10.0.0.0/8': an address rule needs its ports, e.g. 10.0.0.0/8:443",
        ),
        (
            "10.0.0.1/8:443",
            "invalid rule '10.0.0.1/8:443': 10.0.0.1/8 has host bits set; write the network"
            " address",
        ),
        (
            "0.0.0.0/0:443",
            "invalid rule '0.0.0.0/0:443': /0 is too broad; the shortest prefix allowed is /8",
        ),
        (
            "300.0.0.0/8:443",
            "invalid rule '300.0.0.0/8:443': '300.0.0.0/8' is not a valid IPv4 network",
        ),
        (
            "[2001:db8::/32]",
            "invalid rule '[2001:db8::/32]': expected ':' and ports after ']', e.g."
            " [2001:db8::/32]:443",
        ),
        (
            "2001:db8::/32:443",
            "invalid rule '2001:db8::/32:443': write an IPv6 rule in brackets with its ports,"
            " e.g. [2001:db8::/32]:443",
        ),
        (
            "[::/0]:443",
            "invalid rule '[::/0]:443': /0 is too broad; the shortest prefix allowed is /16",
        ),
        (
            "[::ffff:10.0.0.0/104]:443",
            "invalid rule '[::ffff:10.0.0.0/104]:443': write IPv4-mapped addresses as an IPv4"
            " rule, e.g. 192.0.2.0/24:443",
        ),
        (
            "[10.0.0.0/8]:443",
            "invalid rule '[10.0.0.0/8]:443': '10.0.0.0/8' is not a valid IPv6 network",
        ),
        (
            "straße.de",
            "invalid rule 'straße.de': label 'straße' means different names under IDNA 2003 and"
            " 2008; write the xn-- form you mean",
        ),
    ],
)
def test_refused_rules(text: str, message: str) -> None:
    """Malformed and over-broad rules are refused with one clear line."""
    with pytest.raises(RequestError) as caught:
        parse_rule(text)
    assert caught.value.message == message


def test_label_longer_than_63_refused() -> None:
    """A label of 64 characters is refused."""
    with pytest.raises(RequestError, match=r"label longer than 63 characters$"):
        parse_rule("a" * 64 + ".example.com")


def test_label_of_63_accepted() -> None:
    """A label of exactly 63 characters is fine."""
    assert parse_rule("a" * 63 + ".example.com").name == "a" * 63 + ".example.com"  # type: ignore[union-attr]


def test_name_longer_than_253_refused() -> None:
    """A name of 254 characters is refused; one of 253 is accepted."""
    name_253 = ".".join(["a" * 63] * 3 + ["b" * 61])
    assert len(name_253) == 253
    assert parse_rule(name_253).name == name_253  # type: ignore[union-attr]
    with pytest.raises(RequestError, match=r"name longer than 253 characters$"):
        parse_rule(name_253 + "b")


def test_overlong_rule_text_refused() -> None:
    """Rule text longer than the bound is refused before any parsing."""
    with pytest.raises(RequestError, match=r"longer than 512 characters$"):
        parse_rule("a" * 600)


def test_error_message_is_bounded_and_one_line() -> None:
    """A refused rule's message quotes it escaped and cut, on one line."""
    with pytest.raises(RequestError) as caught:
        parse_rule("bad\nname\x1b[31m" + "x" * 200)
    assert "\n" not in caught.value.message
    assert "\x1b" not in caught.value.message
    assert len(caught.value.message) < 250


def test_policy_parse_names_the_list() -> None:
    """Policy.parse says which list the bad rule is in."""
    with pytest.raises(RequestError) as caught:
        Policy.parse(["example.com"], ["*.com"])
    assert caught.value.message.startswith("invalid deny rule '*.com': a wildcard directly")


def test_policy_parse_bounds_rule_count() -> None:
    """More than MAX_RULES rules in a list is refused."""
    with pytest.raises(RequestError, match="too many allow rules"):
        Policy.parse([f"h{i}.example.com" for i in range(1025)])


def test_non_string_rule_refused() -> None:
    """A rule that is not a string is a RequestError, not a crash."""
    with pytest.raises(RequestError, match="a rule must be a string"):
        parse_rule(42)  # type: ignore[arg-type]


# --- matching names --------------------------------------------------------------------------


def test_nothing_allowed_without_rules() -> None:
    """An empty policy lets nothing out."""
    policy = Policy.parse([])
    assert not policy.allows("example.com", 443)
    assert not policy.name_verdict("example.com")
    assert not policy.allows_address(ip("192.0.2.1"), 443)


def test_default_ports_80_and_443() -> None:
    """A name rule without ports allows 80 and 443 only."""
    policy = Policy.parse(["example.com"])
    assert policy.allows("example.com", 80)
    assert policy.allows("example.com", 443)
    assert not policy.allows("example.com", 8080)
    assert not policy.allows("example.com", 22)


def test_explicit_ports_only() -> None:
    """Listed ports are allowed, the defaults are not."""
    policy = Policy.parse(["example.com:8443,22"])
    assert policy.allows("example.com", 8443)
    assert policy.allows("example.com", 22)
    assert not policy.allows("example.com", 443)


def test_match_ignores_case_and_trailing_dot() -> None:
    """Queried names match in any case, with or without a trailing dot."""
    policy = Policy.parse(["api.example.com"])
    assert policy.allows("API.Example.Com.", 443)
    assert policy.name_verdict("api.EXAMPLE.com.")


def test_match_unicode_against_punycode() -> None:
    """A punycode query matches a Unicode rule, and the other way round."""
    assert Policy.parse(["bücher.example"]).allows("xn--bcher-kva.example", 443)
    assert Policy.parse(["xn--bcher-kva.example"]).allows("BÜCHER.example", 443)


def test_exact_rule_does_not_match_subdomains() -> None:
    """A name rule is that name only."""
    policy = Policy.parse(["example.test"])
    assert not policy.allows("a.example.test", 443)
    assert not policy.allows("notexample.test", 443)


def test_wildcard_matches_subdomains_not_the_name() -> None:
    """'*.example.test' allows a.example.test and a.b.example.test, not example.test."""
    policy = Policy.parse(["*.example.test"])
    assert policy.allows("a.example.test", 443)
    assert policy.allows("a.b.example.test", 443)
    assert not policy.allows("example.test", 443)
    assert not policy.allows("badexample.test", 443)
    assert not policy.allows("example.test.evil.test", 443)


def test_deny_beats_allow() -> None:
    """A name allowed by a wildcard but denied by name is refused on every port."""
    policy = Policy.parse(["*.example.test:*"], ["secret.example.test"])
    assert policy.allows("public.example.test", 443)
    assert not policy.allows("secret.example.test", 443)
    assert not policy.allows("secret.example.test", 8443)
    assert not policy.name_verdict("secret.example.test")


def test_deny_wildcard_beats_exact_allow() -> None:
    """A deny wildcard wins over an exact allow of a name under it."""
    policy = Policy.parse(["api.example.test"], ["*.example.test"])
    assert not policy.allows("api.example.test", 443)
    assert not policy.name_verdict("api.example.test")


def test_deny_with_ports_denies_only_those() -> None:
    """A deny rule with ports leaves the other allowed ports open."""
    policy = Policy.parse(["example.com:80,443"], ["example.com:80"])
    assert not policy.allows("example.com", 80)
    assert policy.allows("example.com", 443)
    assert policy.name_verdict("example.com")


def test_name_verdict_false_when_every_allowed_port_denied() -> None:
    """A name whose every allowed port is denied may not be resolved."""
    policy = Policy.parse(["example.com:80,443"], ["example.com:443", "example.com:80"])
    assert not policy.name_verdict("example.com")


def test_name_verdict_any_port_allow_minus_some_denied() -> None:
    """An all-ports allow with a few ports denied still resolves."""
    policy = Policy.parse(["example.com:*"], ["example.com:22"])
    assert policy.name_verdict("example.com")
    assert not policy.allows("example.com", 22)
    assert policy.allows("example.com", 2222)


def test_name_verdict_is_some_port_allowed() -> None:
    """name_verdict(n) holds exactly when allows(n, p) holds for some port p."""
    policy = Policy.parse(
        ["*.example.test:80,443", "api.example.test:8443", "solo.example.org:22"],
        ["*.internal.example.test", "api.example.test:443", "solo.example.org:22"],
    )
    names = [
        "api.example.test",
        "www.example.test",
        "db.internal.example.test",
        "solo.example.org",
        "example.test",
        "other.example",
    ]
    ports = [22, 80, 443, 8443]
    for name in names:
        assert policy.name_verdict(name) == any(policy.allows(name, p) for p in ports), name


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".",
        "..",
        "a..example.com",
        "example.com\x00.evil",
        "example.com evil",
        "a" * 64 + ".example.com",
        "x" * 1_000_000,
        "\ud800.example.com",
        "*.example.com",
        "xn--.example.com",
        "192.0.2.1",
        "[::1]",
        "example.com:443",
        "ex\u202eample.com",
    ],
)
def test_hostile_names_never_match_or_raise(name: str) -> None:
    """Garbage names are simply not allowed."""
    policy = Policy.parse(["*.example.com:*", "example.com:*"])
    assert not policy.allows(name, 443)
    assert not policy.name_verdict(name)


@pytest.mark.parametrize("thing", [None, 42, b"example.com", ["example.com"]])
def test_non_string_names_never_raise(thing: object) -> None:
    """Matchers given a non-string return False."""
    policy = Policy.parse(["example.com"])
    assert not policy.allows(thing, 443)  # type: ignore[arg-type]
    assert not policy.name_verdict(thing)  # type: ignore[arg-type]
    assert canonical_name(thing) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("port", [0, -1, 65536, True, 443.0, "443", None])
def test_bad_ports_never_match(port: object) -> None:
    """Out-of-range or non-int ports are not allowed."""
    policy = Policy.parse(["example.com:*", "10.0.0.0/8:*"])
    assert not policy.allows("example.com", port)  # type: ignore[arg-type]
    assert not policy.allows_address(ip("10.0.0.1"), port)  # type: ignore[arg-type]


def test_canonical_name_values() -> None:
    """canonical_name lowercases, strips one dot and punycodes, or says None."""
    assert canonical_name("WWW.Example.COM.") == "www.example.com"
    assert canonical_name("bücher.example") == "xn--bcher-kva.example"
    assert canonical_name("xn--bcher-kva.example") == "xn--bcher-kva.example"
    assert canonical_name("example.com..") is None
    assert canonical_name("1.2.3.4") is None


# --- matching addresses ----------------------------------------------------------------------


def test_cidr_allows_v4() -> None:
    """An IPv4 CIDR rule allows its addresses on its ports only."""
    policy = Policy.parse(["10.0.0.0/8:5432"])
    assert policy.allows_address(ip("10.1.2.3"), 5432)
    assert not policy.allows_address(ip("10.1.2.3"), 443)
    assert not policy.allows_address(ip("11.0.0.1"), 5432)


def test_cidr_allows_v6() -> None:
    """An IPv6 CIDR rule allows its addresses, never IPv4 ones."""
    policy = Policy.parse(["[2001:db8::/32]:443"])
    assert policy.allows_address(ip("2001:db8:1::5"), 443)
    assert not policy.allows_address(ip("2001:db9::1"), 443)
    assert not policy.allows_address(ip("192.0.2.1"), 443)


def test_ipv4_mapped_address_matches_ipv4_rule() -> None:
    """::ffff:a.b.c.d is matched as a.b.c.d, for allow and deny alike."""
    policy = Policy.parse(["10.0.0.0/8:443"], ["10.9.0.0/16:*"])
    assert policy.allows_address(ip("::ffff:10.1.2.3"), 443)
    assert not policy.allows_address(ip("::ffff:10.9.0.1"), 443)


def test_cidr_deny_beats_allow() -> None:
    """A deny CIDR carves a hole in an allowed range."""
    policy = Policy.parse(["10.0.0.0/8:*"], ["10.0.0.0/24:22"])
    assert not policy.allows_address(ip("10.0.0.5"), 22)
    assert policy.allows_address(ip("10.0.0.5"), 443)
    assert policy.allows_address(ip("10.0.1.5"), 22)


def test_name_rules_do_not_allow_addresses() -> None:
    """allows_address looks at CIDR rules only."""
    policy = Policy.parse(["example.com:*"])
    assert not policy.allows_address(ip("93.184.216.34"), 443)


def test_cidr_rules_do_not_allow_names() -> None:
    """A CIDR rule never makes a name resolvable."""
    policy = Policy.parse(["10.0.0.0/8:443"])
    assert not policy.name_verdict("10.0.0.1")
    assert not policy.allows("10.0.0.1", 443)
