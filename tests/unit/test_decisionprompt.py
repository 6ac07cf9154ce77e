"""The --ask prompt: its question, its answer, its terminal modes, and no terminal to ask on."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import termios
import threading

import pytest

from netjail import decisionprompt
from netjail import protocol as p


def test_the_question_shows_a_sanitised_name_and_the_timeout() -> None:
    """A name with escape sequences or newlines is shown with them replaced, on one line."""
    text = decisionprompt.question_text(_question("evil\x1b[2J\nname.test"), 30.0)
    assert text == "netjail: allow evil?[2J?name.test? (no answer in 30s: no) [y/N] "


def test_a_question_about_a_request_shows_its_method_name_and_path_sanitised() -> None:
    """A request's question reads METHOD NAME/PATH; control characters in the method or the
    path are replaced and a long path is cut short, so nothing the job sent can draw on the
    terminal or push the question off its line."""
    request = p.AskedRequest(method="GET", path="/simple/foo")
    text = decisionprompt.question_text(_question("pypi.org", request), 30.0)
    assert text == "netjail: allow GET pypi.org/simple/foo? (no answer in 30s: no) [y/N] "
    hostile = p.AskedRequest(method="G\x1bET", path="/a\r\n\x1b]0;x\x07" + "b" * 500)
    text = decisionprompt.question_text(_question("pypi.org", hostile), 5.0)
    expected_path = "/a??" + "?]0;x?" + "b" * 190 + "…"
    assert text == f"netjail: allow G?ET pypi.org{expected_path}? (no answer in 5s: no) [y/N] "


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


class _Pty:
    """A pty whose slave is the prompt's terminal and whose master is the user's keyboard."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()

    def shown(self) -> bytes:
        out = b""
        while select.select([self.master], [], [], 0.2)[0]:
            out += os.read(self.master, 4096)
        return out

    def close(self) -> None:
        os.close(self.master)
        os.close(self.slave)


def _question(
    domain: str = "a.example.test",
    request: p.AskedRequest | None = None,
    timeout_s: float | None = None,
) -> p.DecideQuestion:
    return p.DecideQuestion(job="j1", id=0, domain=domain, request=request, timeout_s=timeout_s)


@pytest.mark.parametrize(("key", "allowed", "echo"), [(b"y", True, b"y"), (b"n", False, b"n")])
def test_a_key_answers_and_the_terminal_modes_are_restored(
    key: bytes, allowed: bool, echo: bytes
) -> None:
    """The question is shown, the key answers it, and the terminal's modes are as before."""
    pty = _Pty()
    try:
        before = termios.tcgetattr(pty.slave)
        prompt = decisionprompt.DecisionPrompt(pty.slave, timeout_s=10)
        threading.Timer(0.1, os.write, (pty.master, key)).start()
        assert prompt.ask(_question()) is allowed
        shown = pty.shown()
        assert shown.startswith(b"netjail: allow a.example.test? (no answer in 10s: no) [y/N] ")
        assert shown.endswith(echo + b"\r\n")  # OPOST on: the pty turns \n into \r\n
        assert termios.tcgetattr(pty.slave) == before
    finally:
        pty.close()


def test_no_key_within_the_timeout_denies() -> None:
    """No key before the timeout is a deny, and says so."""
    pty = _Pty()
    try:
        prompt = decisionprompt.DecisionPrompt(pty.slave, timeout_s=0.05)
        assert prompt.ask(_question()) is False
        assert pty.shown().endswith(b"no answer: denied\r\n")
    finally:
        pty.close()


def test_the_daemon_s_timeout_in_the_question_is_the_one_shown_and_kept() -> None:
    """A question that says how long the daemon waits is asked for that long, not for the
    prompt's default: the user is told the daemon's time, and the prompt gives up with it."""
    pty = _Pty()
    try:
        prompt = decisionprompt.DecisionPrompt(pty.slave, timeout_s=600)
        assert prompt.ask(_question(timeout_s=0.05)) is False
        shown = pty.shown()
        assert b"(no answer in 0.05s: no)" in shown
        assert shown.endswith(b"no answer: denied\r\n")
    finally:
        pty.close()


def test_a_signal_on_the_pipe_denies_and_is_left_for_the_loop() -> None:
    """A readable signal pipe (^C with -T) ends the question as a deny; its byte stays unread."""
    pty = _Pty()
    read, write = os.pipe()
    try:
        os.write(write, b"\x02")
        prompt = decisionprompt.DecisionPrompt(pty.slave, timeout_s=10)
        assert prompt.ask(_question(), read) is False
        assert os.read(read, 1) == b"\x02"
    finally:
        pty.close()
        os.close(read)
        os.close(write)


def test_a_key_typed_before_the_question_does_not_answer_it() -> None:
    """Typeahead (or bytes a terminal sent before the question) is dropped, not taken as y."""
    pty = _Pty()
    try:
        os.write(pty.master, b"y")
        prompt = decisionprompt.DecisionPrompt(pty.slave, timeout_s=0.05)
        assert prompt.ask(_question()) is False
        assert pty.shown().endswith(b"no answer: denied\r\n")
    finally:
        pty.close()
