"""Redaction of response bodies and headers: ``--redact NAME:REGEX`` and ``@secrets`` (pure).

``@secrets`` is a built-in named set of shapes that are secrets wherever they appear: Stripe
secret and restricted keys (``sk_live_…``, ``rk_test_…``), AWS access key ids (``AKIA…``,
``ASIA…``), GitHub, Slack, Google and OpenAI/Anthropic-style API keys, the token of an
``Authorization: Bearer`` value, PEM private keys, and card numbers (13 to 19 digits, spaces or
dashes between them allowed) that pass the Luhn check. Each match becomes ``[REDACTED]``.

Patterns run on bytes, so a body in any ASCII-compatible encoding is redacted. A client's regex
is compiled from its UTF-8 text by RE2 (google-re2), whose matching takes time linear in the
body: Python's backtracking ``re`` would let a pattern such as ``(a|a)*b`` hold the daemon's
loop for hours. What RE2 does not support (backreferences, lookaround) is refused.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import re2

from netjail.errors import RequestError
from netjail.policy import NameRule

#: What a match becomes.
REPLACEMENT: Final = b"[REDACTED]"
#: The name of the built-in set.
SECRETS: Final = "@secrets"


@dataclass(frozen=True, slots=True)
class Finder:
    """One shape to redact: ``group`` of each match of ``pattern`` that ``accept`` accepts."""

    #: A built-in ``re`` pattern (reviewed here), or a client's, compiled by RE2.
    pattern: re.Pattern[bytes] | Any
    group: int = 0
    accept: Callable[[bytes], bool] | None = None


def luhn_valid(digits: bytes) -> bool:
    """Whether a string of ASCII digits passes the Luhn check (card numbers do)."""
    if not digits.isdigit():
        return False
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = char - 0x30
        if index % 2:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def _card(match: bytes) -> bool:
    digits = match.replace(b" ", b"").replace(b"-", b"")
    return 13 <= len(digits) <= 19 and luhn_valid(digits)


SECRET_FINDERS: Final = (
    Finder(re.compile(rb"\b(?:sk|rk)_(?:live|test)_[0-9A-Za-z]{10,}")),
    Finder(re.compile(rb"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")),
    Finder(re.compile(rb"\b(?:gh[pousr]_[0-9A-Za-z]{36,}|github_pat_[0-9A-Za-z_]{22,})")),
    Finder(re.compile(rb"\bxox[abprs]-[0-9A-Za-z-]{10,}")),
    Finder(re.compile(rb"\bAIza[0-9A-Za-z_-]{35}")),
    Finder(re.compile(rb"\bsk-(?:ant-|proj-)?[0-9A-Za-z_-]{20,}")),
    Finder(re.compile(rb"(?i)\bbearer[ \t]+([0-9A-Za-z._~+/-]{8,}=*)"), group=1),
    Finder(
        re.compile(
            rb"-----BEGIN [A-Z ]{0,32}PRIVATE KEY-----"
            rb".{0,16384}?-----END [A-Z ]{0,32}PRIVATE KEY-----",
            re.DOTALL,
        )
    ),
    Finder(re.compile(rb"(?<![0-9])[0-9](?:[ -]?[0-9]){12,18}(?![0-9])"), accept=_card),
)


@dataclass(frozen=True, slots=True)
class Redaction:
    """What to redact from the responses of ``host``."""

    host: NameRule
    #: The option's text after the name: a regex or ``@secrets``.
    source: str
    finders: tuple[Finder, ...]


def parse_redaction(host: NameRule, source: str, text: str) -> Redaction:
    """The redaction ``source`` (a regex or ``@secrets``) for ``host``; RequestError naming
    the option ``text`` when the regex is bad or matches empty text."""
    if source == SECRETS:
        return Redaction(host, source, SECRET_FINDERS)
    options = re2.Options()
    options.log_errors = False  # the error is the client's, in its reply, not the daemon's log
    try:
        pattern = re2.compile(source.encode(), options=options)
    except re2.error as exc:
        why = (
            exc.args[0].decode("utf-8", "replace")
            if exc.args and isinstance(exc.args[0], bytes)
            else exc
        )
        raise RequestError(
            f"invalid --redact {text[:80]!r}: bad regex ({why}; RE2 syntax: no"
            " backreferences or lookaround)"
        ) from None
    if pattern.fullmatch(b"") is not None:
        raise RequestError(f"invalid --redact {text[:80]!r}: the regex matches empty text")
    return Redaction(host, source, (Finder(pattern),))


def redact(data: bytes, redactions: Sequence[Redaction]) -> tuple[bytes, int]:
    """``data`` with every match of every redaction replaced, and how many were."""
    count = 0
    for redaction in redactions:
        for finder in redaction.finders:
            data, found = _apply(finder, data)
            count += found
    return data, count


def _apply(finder: Finder, data: bytes) -> tuple[bytes, int]:
    found = 0

    def replace(match: Any) -> bytes:
        nonlocal found
        whole: bytes = match.group(0)
        part: bytes = match.group(finder.group)
        if finder.accept is not None and not finder.accept(part):
            return whole
        found += 1
        start = match.start(finder.group) - match.start()
        return whole[:start] + REPLACEMENT + whole[start + len(part) :]

    result: bytes = finder.pattern.sub(replace, data)
    return result, found
