"""Tests for netjail.text: making untrusted text safe for logs and terminals."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netjail.text import sanitize, sanitize_argv


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("a\x1b[31mred", "a?[31mred", id="escape"),
        pytest.param("line1\nline2", "line1?line2", id="newline"),
        pytest.param("a\rb", "a?b", id="carriage-return"),
        pytest.param("a\x00b", "a?b", id="nul"),
        pytest.param("a\tb", "a?b", id="tab"),
        pytest.param("a\x7fb", "a?b", id="delete"),
        pytest.param("a\x9bb", "a?b", id="c1-csi"),
        pytest.param("evil\u202etxt.exe", "evil?txt.exe", id="bidi-override"),
        pytest.param("a\u200bb", "a?b", id="zero-width-space"),
        pytest.param("a\u2028b", "a?b", id="line-separator"),
        pytest.param("a\ud800b", "a?b", id="lone-surrogate"),
    ],
)
def test_sanitize_replaces_control_characters(text: str, expected: str) -> None:
    """Control, format and separator characters (other than space) become "?"."""
    assert sanitize(text) == expected


def test_sanitize_keeps_printable_unicode() -> None:
    """Printable text in any script, with spaces and emoji, is kept as is."""
    text = "naïve café 例え ελληνικά кириллица 🙂 a b"
    assert sanitize(text) == text


@pytest.mark.parametrize("length", [0, 1, 255, 256])
def test_sanitize_keeps_text_up_to_the_limit(length: int) -> None:
    """Text no longer than the limit is not shortened."""
    assert sanitize("x" * length) == "x" * length


def test_sanitize_bounds_the_length_with_an_ellipsis() -> None:
    """Text longer than the limit is cut to the limit and ends with "…"."""
    assert sanitize("x" * 257) == "x" * 256 + "…"
    assert sanitize("abcdef", limit=3) == "abc…"
    assert sanitize("y" * 10_000_000, limit=10) == "y" * 10 + "…"


def test_sanitize_bounds_before_replacing() -> None:
    """Control characters beyond the limit do not matter; those within are replaced."""
    assert sanitize("ab\ncd\x1b", limit=4) == "ab?c…"


def test_sanitize_argv_joins_with_spaces_and_cleans() -> None:
    """sanitize_argv renders a command line as one clean line."""
    assert sanitize_argv(["sh", "-c", "echo a\necho b"]) == "sh -c echo a?echo b"
    assert sanitize_argv(["x" * 600]) == "x" * 512 + "…"


@given(st.text(alphabet=st.characters(max_codepoint=0x7F)), st.integers(0, 300))
def test_ascii_takes_the_fast_path_with_the_same_result(text: str, limit: int) -> None:
    """ASCII text (done by str.translate) keeps its printable characters and has every
    control character replaced, as the character-by-character rule does."""
    head = text[: limit + 1]
    expected = "".join(ch if " " <= ch <= "~" else "?" for ch in head)
    if len(expected) > limit:
        expected = expected[:limit] + "…"
    assert sanitize(text, limit) == expected
