"""The --ask prompt: its question, its answer, its terminal modes, and no terminal to ask on."""

from __future__ import annotations

import subprocess
import sys
import termios

from netjail import decisionprompt


def test_the_question_shows_a_sanitised_name_and_the_timeout() -> None:
    """A name with escape sequences or newlines is shown with them replaced, on one line."""
    text = decisionprompt.question_text("evil\x1b[2J\nname.test", 30.0)
    assert text == "netjail: allow evil?[2J?name.test? (no answer in 30s: no) [y/N] "


def test_only_y_allows() -> None:
    """y or Y allows; anything else (n, Enter, ^C as a key, an escape sequence, none) denies."""
    assert decisionprompt.answer_of(b"y")
    assert decisionprompt.answer_of(b"Y")
    assert not any(map(decisionprompt.answer_of, [b"n", b"\r", b"\x03", b"\x1b[A", b""]))


def test_key_attributes_turn_off_line_editing_and_echo_only() -> None:
    """One key, unechoed: ICANON and ECHO off, VMIN 1, every other flag as it was."""
    cc = [b"\x00"] * 32
    attrs = [1, termios.OPOST, 3, termios.ICANON | termios.ECHO | termios.ISIG, 5, 6, cc]
    changed = decisionprompt.key_attributes(attrs)
    assert changed[:3] == attrs[:3]
    assert changed[3] == termios.ISIG
    assert changed[6][termios.VMIN] == 1
    assert attrs[3] == termios.ICANON | termios.ECHO | termios.ISIG


def test_ask_without_a_terminal_is_a_one_line_error_before_the_job() -> None:
    """`run --ask` with no controlling terminal exits 125 with one line, without reaching a
    daemon (the socket named does not exist)."""
    cli = [sys.executable, "-m", "netjail.cli", "--socket", "/nonexistent/netjail.sock"]
    result = subprocess.run(
        [*cli, "run", "--ask", "--", "true"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        start_new_session=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 125
    assert result.stderr.decode().splitlines() == [
        "netjail: --ask needs a terminal to ask on (/dev/tty: No such device or address); "
        "decide with --allow/--deny instead"
    ]
