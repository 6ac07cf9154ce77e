"""``netjail run --ask``: the user decides, on the controlling terminal, each name no rule
covers, and each request to an intercepted name that its ``--allow-request`` rules miss.

The question is asked on /dev/tty, never on the job's stdin or netjail's stdout (either may be
a pipe), as sudo and ssh ask for passwords. It is one line and one key: ``y`` allows the name
or the request, any other key denies it, and no key before the daemon's timeout (the
question's, or ``DECISION_TIMEOUT_S`` from a daemon that does not say) is a deny, as the
daemon's own. The console's loop waits while the prompt does, so no key reaches the job and
none of its output comes out meanwhile; the terminal's modes are restored after.
"""

from __future__ import annotations

import contextlib
import os
import select
import termios
import time
from typing import Any

from netjail import protocol as p
from netjail.errors import RequestError
from netjail.text import sanitize

#: Where the question is asked: the controlling terminal, whatever stdio is.
TERMINAL = "/dev/tty"
#: The longest name shown (a DNS name is at most 253 characters).
MAX_SHOWN_NAME = 253
#: The longest request path shown (the daemon sends at most ``protocol.MAX_ASKED_PATH``).
MAX_SHOWN_PATH = 200
#: Most bytes of one key press read (an escape sequence, or a paste, is one answer).
MAX_KEY_BYTES = 64

_IFLAG, _OFLAG, _LFLAG, _CC = 0, 1, 3, 6


def open_prompt() -> DecisionPrompt:
    """The prompt on this process's controlling terminal; RequestError when it has none."""
    try:
        fd = os.open(TERMINAL, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise RequestError(
            f"--ask needs a terminal to ask on ({TERMINAL}: {e.strerror}); "
            "decide with --allow/--deny instead"
        ) from None
    return DecisionPrompt(fd)


def key_attributes(attrs: list[Any]) -> list[Any]:
    """``attrs`` changed to read one key unechoed (no line editing); signals from keys stay
    as they were (raw with -t, where ^C is a key; cooked with -T, where it is SIGINT)."""
    changed = list(attrs)
    lflag = int(changed[_LFLAG])
    changed[_LFLAG] = lflag & ~(termios.ICANON | termios.ECHO)
    cc = list(changed[_CC])
    cc[termios.VMIN] = 1
    cc[termios.VTIME] = 0
    changed[_CC] = cc
    return changed


def question_text(question: p.DecideQuestion, timeout_s: float) -> str:
    """The one-line question about a name, or about one request to it (sanitised: both come
    from the job): ``netjail: allow GET pypi.org/simple/foo? …``."""
    subject = sanitize(question.domain, MAX_SHOWN_NAME)
    if question.request is not None:
        method = sanitize(question.request.method, p.MAX_ASKED_METHOD)
        subject = f"{method} {subject}{sanitize(question.request.path, MAX_SHOWN_PATH)}"
    return f"netjail: allow {subject}? (no answer in {timeout_s:g}s: no) [y/N] "


def answer_of(keys: bytes) -> bool:
    """Whether the key pressed allows the name: ``y`` or ``Y`` only."""
    return keys[:1] in (b"y", b"Y")


class DecisionPrompt:
    """Questions on the terminal ``fd`` (closed with ``close``)."""

    def __init__(self, fd: int, timeout_s: float = p.DECISION_TIMEOUT_S) -> None:
        self.fd = fd
        self.timeout_s = timeout_s

    def ask(self, question: p.DecideQuestion, interrupts: int | None = None) -> bool:
        """Ask about ``question``'s name or request and return the answer: True for ``y``;
        False for any other key, for no key within the question's timeout (``timeout_s`` when
        it names none), or when ``interrupts`` (a signal pipe) becomes readable (^C with -T),
        which is left unread for the caller."""
        try:
            saved = termios.tcgetattr(self.fd)
        except termios.error:
            return False
        newline = b"\n" if int(saved[_OFLAG]) & termios.OPOST else b"\r\n"
        timeout_s = question.timeout_s if question.timeout_s is not None else self.timeout_s
        deadline = time.monotonic() + timeout_s
        try:
            termios.tcsetattr(self.fd, termios.TCSANOW, key_attributes(saved))
            # Only a key pressed after the question answers it, not one typed before.
            termios.tcflush(self.fd, termios.TCIFLUSH)
            self._write(question_text(question, timeout_s).encode(errors="replace"))
            keys = self._read_key(deadline, interrupts)
            if keys is None:
                self._write(b"no answer: denied" + newline)
                return False
            allowed = answer_of(keys)
            self._write((b"y" if allowed else b"n") + newline)
            return allowed
        except OSError:
            return False  # the terminal is gone: nobody allowed the name
        finally:
            with contextlib.suppress(termios.error, OSError):
                termios.tcsetattr(self.fd, termios.TCSADRAIN, saved)

    def _read_key(self, deadline: float, interrupts: int | None) -> bytes | None:
        watched = [self.fd] if interrupts is None else [self.fd, interrupts]
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select(watched, [], [], left)
            if interrupts is not None and interrupts in ready:
                return b""
            if self.fd in ready:
                return os.read(self.fd, MAX_KEY_BYTES)
        return None

    def _write(self, data: bytes) -> None:
        while data:
            written = os.write(self.fd, data)
            data = data[written:]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
