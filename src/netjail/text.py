"""Making untrusted text safe to log or print (pure)."""

from __future__ import annotations

import unicodedata

_ELLIPSIS = "…"
#: The ASCII characters that are not printable (all of category Cc), each to "?".
_ASCII_CONTROLS = dict.fromkeys((*range(0x20), 0x7F), "?")


def sanitize(text: str, limit: int = 256) -> str:
    """Replace control and other non-printable characters, and bound the length.

    Used on everything that comes from a job or a client (argv, DNS names, paths) before it
    reaches a log line or a terminal, so it cannot forge lines or send escape sequences.
    """
    head = text[: limit + 1]
    if head.isascii():
        # Most of what is sanitised (names, paths, argv): done in C, not character by
        # character (an event's argv took ~30 µs), with the same result.
        cleaned = head.translate(_ASCII_CONTROLS)
    else:
        cleaned = "".join(
            ch if ch == " " or (ch.isprintable() and unicodedata.category(ch)[0] != "C") else "?"
            for ch in head
        )
    if len(cleaned) > limit:
        return cleaned[:limit] + _ELLIPSIS
    return cleaned


def sanitize_argv(argv: list[str], limit: int = 512) -> str:
    """One printable line for a command line."""
    return sanitize(" ".join(argv), limit)
