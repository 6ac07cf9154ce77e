"""Redaction: the @secrets set, the Luhn check, user regexes."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netjail.errors import RequestError
from netjail.httppolicy import parse_http_policy
from netjail.redaction import luhn_valid, redact


def secrets_for(host: str = "a.com") -> tuple:  # type: ignore[type-arg]
    return parse_http_policy(redact=[f"{host}:@secrets"]).redactions


@pytest.mark.parametrize(
    "number", [b"4242424242424242", b"4111111111111111", b"378282246310005", b"6011111111111117"]
)
def test_luhn_accepts_real_test_card_numbers(number: bytes) -> None:
    """Well-known test card numbers pass the Luhn check."""
    assert luhn_valid(number)


def test_luhn_refuses_a_changed_digit_and_non_digits() -> None:
    """One digit off fails; anything but digits fails."""
    assert not luhn_valid(b"4242424242424241")
    assert not luhn_valid(b"42424242x4242424")
    assert not luhn_valid(b"")


@pytest.mark.parametrize(
    "secret",
    [
        b"sk_live_4eC39HqLyjWDarjtT1zdp7dc",
        b"rk_test_51H8abcdefghijkl",
        b"AKIAIOSFODNN7EXAMPLE",
        b"ghp_" + b"a" * 36,
        b"xoxb-1234567890-abcdef",
        b"AIza" + b"B" * 35,
        b"sk-ant-" + b"c" * 30,
        b"4242 4242 4242 4242",
        b"4242-4242-4242-4242",
        b"-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----",
    ],
)
def test_secrets_set_redacts_each_shape(secret: bytes) -> None:
    """Every shape of @secrets becomes [REDACTED], with the text around it kept."""
    data, count = redact(b"before " + secret + b" after", secrets_for())
    assert data == b"before [REDACTED] after"
    assert count == 1


def test_bearer_tokens_lose_only_the_token() -> None:
    """'Authorization: Bearer xyz…' keeps the scheme word."""
    data, _ = redact(b"Authorization: Bearer abc.def-ghi_123", secrets_for())
    assert data == b"Authorization: Bearer [REDACTED]"


def test_card_like_numbers_failing_luhn_are_kept() -> None:
    """Order ids and timestamps that are not card numbers stay."""
    text = b"order 4242424242424241 at 1700000000000"
    assert redact(text, secrets_for()) == (text, 0)


def test_user_regex_redacts_and_refuses_empty_matches() -> None:
    """NAME:REGEX redacts its matches; a regex matching empty text, or a bad one, is refused."""
    [redaction] = parse_http_policy(redact=["a.com:tok_[0-9]+"]).redactions
    assert redact(b"x tok_12 y tok_3", [redaction]) == (b"x [REDACTED] y [REDACTED]", 2)
    with pytest.raises(RequestError, match="matches empty"):
        parse_http_policy(redact=["a.com:x*"])
    with pytest.raises(RequestError, match="bad regex"):
        parse_http_policy(redact=["a.com:(x"])
    with pytest.raises(RequestError):
        parse_http_policy(redact=["a.com"])


@given(st.binary(max_size=300), st.text(alphabet="0123456789ABCDEFabcdefXYZxyz", min_size=14))
def test_no_stripe_live_key_survives_redaction(noise: bytes, tail: str) -> None:
    """Whatever surrounds it, an sk_live_ key is gone after @secrets, and redact never raises."""
    key = b"sk_live_" + tail.encode()
    data, count = redact(noise + b" " + key + b" " + noise, secrets_for())
    assert key not in data
    assert count >= 1


def test_a_clients_regex_runs_on_a_linear_time_engine_and_unsupported_syntax_is_refused() -> None:
    """A --redact regex is compiled by RE2, never by Python's backtracking re (where
    ``(a|a)*b`` doubles its time with each byte), and a backreference is refused."""
    policy = parse_http_policy(redact=["a.com:(a|a)*b"])
    finders = [f for r in policy.redactions for f in r.finders]
    assert finders
    assert not any(isinstance(f.pattern, re.Pattern) for f in finders)
    assert redact(b"a" * 100_000 + b"c", policy.redactions) == (b"a" * 100_000 + b"c", 0)
    with pytest.raises(RequestError, match=r"bad regex.*no backreferences"):
        parse_http_policy(redact=[r"a.com:(x)\1"])
