"""Tests for netjail.units: sizes, durations and CPU counts as users write them."""

from __future__ import annotations

import pytest

from netjail.errors import RequestError
from netjail.units import format_size, parse_cpus, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512M", 512 * 1024**2),
        ("2G", 2 * 1024**3),
        ("64m", 64 * 1024**2),
        ("1.5G", 1536 * 1024**2),
        ("4096", 4096),
        ("100K", 102400),
        ("1T", 1024**4),
        ("512MB", 512 * 1024**2),
        ("512MiB", 512 * 1024**2),
        ("100kib", 102400),
        ("4096B", 4096),
        (" 8M ", 8 * 1024**2),
        ("0.5K", 512),
        ("1.0001K", 1024),
    ],
)
def test_parse_size_accepts_numbers_with_binary_suffixes(text: str, expected: int) -> None:
    """parse_size reads K/M/G/T as powers of 1024, with optional B/iB, and rounds down."""
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text",
    ["12Q", "", "M", "-1M", "0", "0M", "0.0001", "1e6", "inf", "nan", "+5M", "5 M B", "1" * 40],
)
def test_parse_size_rejects_garbage_zero_and_negatives(text: str) -> None:
    """parse_size refuses anything but a positive decimal number with a known suffix."""
    with pytest.raises(RequestError, match="use a number with an optional K, M, G or T suffix"):
        parse_size(text)


def test_parse_size_message_is_the_documented_one_liner() -> None:
    """parse_size's error names the input and shows an example of what is accepted."""
    with pytest.raises(RequestError) as info:
        parse_size("12Q")
    assert str(info.value) == (
        "invalid size '12Q': use a number with an optional K, M, G or T suffix, e.g. 512M"
    )


def test_parse_size_error_does_not_echo_control_characters_or_long_input() -> None:
    """parse_size's error shows a short, printable excerpt of hostile input."""
    with pytest.raises(RequestError) as info:
        parse_size("\x1b[31m" + "A" * 100)
    assert str(info.value) == (
        f"invalid size '?[31m{'A' * 27}…': use a number with an optional K, M, G or T suffix,"
        " e.g. 512M"
    )


def test_parse_size_rejects_sizes_beyond_the_kernel_counter() -> None:
    """parse_size refuses sizes the kernel's page counters cannot hold."""
    with pytest.raises(RequestError, match="below 8E"):
        parse_size("9000000T")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        ("250ms", 0.25),
        ("10", 10.0),
        ("2.5", 2.5),
        ("1H", 3600.0),
    ],
)
def test_parse_duration_accepts_units(text: str, expected: float) -> None:
    """parse_duration reads ms, s, m and h; a bare number is seconds."""
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["0", "0s", "-1s", "5x", "", "s", "1e3", "2d", "9999999h"])
def test_parse_duration_rejects_zero_negative_garbage_and_huge(text: str) -> None:
    """parse_duration refuses non-positive, unknown-unit and absurdly long durations."""
    with pytest.raises(RequestError, match=r"optional ms, s, m or h suffix, e\.g\. 30s"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "expected"), [("0.5", 0.5), ("2", 2.0), ("0.01", 0.01), ("1024", 1024.0)]
)
def test_parse_cpus_accepts_fractions_of_cpus(text: str, expected: float) -> None:
    """parse_cpus reads a positive CPU count up to 1024."""
    assert parse_cpus(text) == expected


@pytest.mark.parametrize("text", ["0", "-1", "0.001", "1025", "half", "", "1e1"])
def test_parse_cpus_rejects_out_of_range_and_garbage(text: str) -> None:
    """parse_cpus refuses zero, negatives, sub-quota values, more than 1024 and garbage."""
    with pytest.raises(RequestError, match=r"use a number of CPUs from 0\.01 to 1024"):
        parse_cpus(text)


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (64 * 1024**2, "64M"),
        (1024**3, "1G"),
        (4096, "4K"),
        (100, "100"),
        (0, "0"),
        (3 * 1024**4, "3T"),
        (1536 * 1024**2, "1.5G"),
        (13_456_789, "12.8M"),
    ],
)
def test_format_size_uses_the_largest_unit(n: int, expected: str) -> None:
    """format_size is exact for whole multiples of a unit and one decimal otherwise."""
    assert format_size(n) == expected


@pytest.mark.parametrize("n", [1, 1023, 1024, 64 << 20, 1536 << 20, 5 << 40])
def test_format_size_round_trips_through_parse_size(n: int) -> None:
    """parse_size(format_size(n)) == n for sizes format_size renders exactly."""
    assert parse_size(format_size(n)) == n


def test_format_size_rejects_negative() -> None:
    """format_size refuses a negative byte count (a caller bug, not user input)."""
    with pytest.raises(ValueError, match="negative"):
        format_size(-1)
