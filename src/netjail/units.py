"""Sizes, durations and CPU counts as users write them ("512M", "30s", "0.5").

Pure: no I/O. Every parser takes text a client sent, so each bounds its input, rejects what it
does not understand with a one-line ``RequestError`` that says what is accepted, and never
echoes more than a short, printable excerpt of the input back.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from netjail.errors import RequestError

if TYPE_CHECKING:
    from fractions import Fraction

#: Binary multipliers: "M" means MiB, as in every memory-limit flag users already know.
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
#: Seconds per unit, as (numerator, denominator): exact, and no Fraction built at import.
_DURATION_UNITS = {"ms": (1, 1000), "s": (1, 1), "m": (60, 1), "h": (3600, 1)}

# Plain decimal notation only: no sign, exponent, "inf" or "nan", which float() would accept.
_NUMBER = r"(\d+(?:\.\d+)?)"
_SIZE_RE = re.compile(_NUMBER + r"\s*([KMGT]?)(?:I?B)?", re.IGNORECASE)
_DURATION_RE = re.compile(_NUMBER + r"\s*(ms|s|m|h)?", re.IGNORECASE)
_CPUS_RE = re.compile(_NUMBER)

# Longer input is never a real value; refusing it early also keeps int() and Fraction() away
# from digit strings long enough to be slow (or to hit Python's int-conversion limit).
_MAX_TEXT = 32
#: Largest size accepted: the kernel's page counters top out just below 2**63 bytes.
MAX_SIZE = (1 << 63) - 1
#: Longest duration accepted (one year); anything longer is a typo, not a timeout.
MAX_DURATION_S = 365 * 24 * 3600.0
#: The bounds of a CPU limit, wherever one is given (CLI, wire protocol, daemon config, cgroup
#: limits); the lower one because the kernel refuses a CFS quota below 1 ms per 100 ms period.
MIN_CPUS = 0.01
MAX_CPUS = 1024.0


def _excerpt(text: str) -> str:
    """A short, printable rendering of untrusted *text* for an error message."""
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in text[:_MAX_TEXT])
    return cleaned + ("…" if len(text) > _MAX_TEXT else "")


def _exact(number: str) -> Fraction:
    """The decimal ``number`` (already matched by _NUMBER), exactly."""
    # Imported here: every netjail command imports this module, few parse a number, and
    # fractions is a millisecond of the CLI's start.
    from fractions import Fraction  # noqa: PLC0415

    return Fraction(number)


def _match(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
    if len(text) > _MAX_TEXT:
        return None
    return pattern.fullmatch(text.strip())


def parse_size(text: str) -> int:
    """Parse a byte size such as "512M", "1.5G", "64m", "100KiB" or "4096" into bytes.

    Suffixes K, M, G and T are powers of 1024 and may be followed by "B" or "iB"; a bare number
    is bytes. Fractions are rounded down to whole bytes. The result is at least 1.
    """
    hint = (
        f"invalid size '{_excerpt(text)}': use a number with an optional K, M, G or T suffix,"
        " e.g. 512M"
    )
    match = _match(_SIZE_RE, text)
    if match is None:
        raise RequestError(hint)
    value = int(_exact(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])
    if value < 1:
        raise RequestError(f"{hint} (it must be at least one byte)")
    if value > MAX_SIZE:
        raise RequestError(f"{hint} (it must be below 8E)")
    return value


def parse_duration(text: str) -> float:
    """Parse a duration such as "30s", "5m", "1h", "1.5s", "250ms" or "10" (seconds) into seconds.

    The result is positive and at most one year.
    """
    hint = (
        f"invalid duration '{_excerpt(text)}': use a number with an optional ms, s, m or h suffix,"
        " e.g. 30s"
    )
    match = _match(_DURATION_RE, text)
    if match is None:
        raise RequestError(hint)
    unit = (match.group(2) or "s").lower()
    numerator, denominator = _DURATION_UNITS[unit]
    seconds = _exact(match.group(1)) * numerator / denominator
    if seconds <= 0:
        raise RequestError(f"{hint} (it must be more than zero)")
    if seconds > MAX_DURATION_S:
        raise RequestError(f"{hint} (it must be at most a year)")
    return float(seconds)


def parse_cpus(text: str) -> float:
    """Parse a CPU count such as "0.5" (half of one CPU) or "2"; from MIN_CPUS to MAX_CPUS."""
    hint = (
        f"invalid CPU count '{_excerpt(text)}': use a number of CPUs from {MIN_CPUS:g} to"
        f" {MAX_CPUS:g}, e.g. 0.5"
    )
    match = _match(_CPUS_RE, text)
    if match is None:
        raise RequestError(hint)
    cpus = float(_exact(match.group(1)))
    if not MIN_CPUS <= cpus <= MAX_CPUS:
        raise RequestError(hint)
    return cpus


def format_size(n: int) -> str:
    """Render *n* bytes in the largest unit it reaches: "64M", "4K", "100", "12.8M".

    Exact (it parses back to *n*) when *n* is a whole multiple of that unit; otherwise rounded
    to one decimal place, for display.
    """
    if n < 0:
        raise ValueError(f"negative size: {n}")
    for suffix in ("T", "G", "M", "K"):
        unit = _SIZE_UNITS[suffix]
        if n >= unit:
            if n % unit == 0:
                return f"{n // unit}{suffix}"
            return f"{n / unit:.1f}{suffix}"
    return str(n)
