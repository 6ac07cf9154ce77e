"""Properties of the policy (netjail.policy) on hostile and generated input: parsing raises only
RequestError, a parsed rule's text parses back to the same rule, and the matchers never raise
and let deny win."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netjail.errors import RequestError
from netjail.policy import MAX_RULES, Policy, parse_rule

#: Pieces rules are made of, so that generated text is often close to valid.
LABEL = st.from_regex(r"[a-z0-9](?:[a-z0-9_-]{0,10}[a-z0-9])?", fullmatch=True)
NAME = st.lists(LABEL, min_size=1, max_size=4).map(".".join)
PORTS = st.one_of(
    st.just("*"),
    st.lists(st.integers(0, 70000), min_size=1, max_size=5).map(lambda ps: ",".join(map(str, ps))),
    st.text(max_size=6),
)
NEAR_RULES = st.one_of(
    st.builds(lambda n, p: f"{n}:{p}", NAME, PORTS),
    st.builds(lambda n, p: f"*.{n}:{p}", NAME, PORTS),
    NAME,
    NAME.map("*.{}".format),
    st.builds(lambda n, p: f"tcp://{n}:{p}", NAME, PORTS),
    st.builds(
        lambda a, prefix, p: f"{ipaddress.IPv4Address(a)}/{prefix}:{p}",
        st.integers(0, 2**32 - 1),
        st.integers(0, 33),
        PORTS,
    ),
    st.builds(
        lambda a, prefix, p: f"[{ipaddress.IPv6Address(a)}/{prefix}]:{p}",
        st.integers(0, 2**128 - 1),
        st.integers(0, 129),
        PORTS,
    ),
    st.sampled_from(["*", "*.com", "*.co.uk", "straße.example", "xn--strae-oqa.example", "::1"]),
)
HOSTILE = st.text(max_size=80) | NEAR_RULES | st.text(max_size=600).map(lambda t: t * 2)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(HOSTILE)
def test_parsing_any_text_gives_a_rule_or_a_request_error(text: str) -> None:
    """parse_rule raises nothing but RequestError, one line naming the rule; a rule it gives
    has a canonical text that parses back to it."""
    try:
        rule = parse_rule(text)
    except RequestError as e:
        message = str(e)
    else:
        assert parse_rule(str(rule)) == rule
        return
    assert message.startswith("invalid rule ")
    assert "\n" not in message


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(NEAR_RULES)
def test_a_parsed_rules_text_parses_back_to_the_same_rule(text: str) -> None:
    """str(rule) is the rule's canonical text: parsing it gives the same rule again."""
    try:
        rule = parse_rule(text)
    except RequestError:
        return
    assert parse_rule(str(rule)) == rule
    assert str(parse_rule(str(rule))) == str(rule)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(HOSTILE, max_size=5), st.lists(HOSTILE, max_size=5))
def test_policy_parse_gives_a_policy_or_a_request_error_naming_the_list(
    allow: list[str], deny: list[str]
) -> None:
    """Policy.parse raises only RequestError, naming which list the bad rule is in."""
    try:
        policy = Policy.parse(allow, deny)
    except RequestError as e:
        message = str(e)
    else:
        assert len(policy.allow) == len(allow)
        assert len(policy.deny) == len(deny)
        return
    assert message.startswith(("invalid allow rule ", "invalid deny rule "))


def test_too_many_rules_is_a_request_error() -> None:
    """More than MAX_RULES rules in a list is refused, with advice."""
    with pytest.raises(RequestError, match="too many allow rules"):
        Policy.parse(["example.test"] * (MAX_RULES + 1))


HOSTILE_NAMES = st.one_of(
    st.text(max_size=300),
    NAME,
    NAME.map(str.upper),
    NAME.map(lambda n: n + "."),
    st.binary(max_size=60).map(lambda b: b.decode("latin-1")),
)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(NEAR_RULES, max_size=4),
    st.lists(NEAR_RULES, max_size=4),
    HOSTILE_NAMES,
    st.integers(-5, 70000),
)
def test_the_matchers_never_raise_and_deny_wins(
    allow: list[str], deny: list[str], name: str, port: int
) -> None:
    """For any name and port: the matchers answer without raising, a name a deny rule covers on
    a port is never allowed there, and name_verdict is true exactly when some port is."""
    try:
        policy = Policy.parse(allow, deny)
        denying = Policy.parse(deny)
    except RequestError:
        return
    access = policy.access(name, port)
    assert access in ("denied", "checked", "unverified")
    assert policy.allows(name, port) == (access != "denied")
    if denying.allows(name, port):
        assert access == "denied"
    if access != "denied":
        assert policy.name_verdict(name)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(NEAR_RULES, max_size=4),
    st.lists(NEAR_RULES, max_size=4),
    st.integers(0, 2**32 - 1) | st.integers(0, 2**128 - 1),
    st.integers(-5, 70000),
)
def test_address_checks_never_raise_and_a_denied_address_is_not_allowed(
    allow: list[str], deny: list[str], number: int, port: int
) -> None:
    """allows_address and denies_address answer for any address and port; deny wins."""
    try:
        policy = Policy.parse(allow, deny)
    except RequestError:
        return
    address = ipaddress.ip_address(number)
    if policy.denies_address(address, port):
        assert not policy.allows_address(address, port)
