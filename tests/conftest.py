"""Set-up for the whole suite, unit and integration alike."""

from __future__ import annotations

import signal

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """Give SIGINT a handler, so the CLIs the tests start can be interrupted.

    A suite started in the background of a non-interactive shell (`cmd &`, nohup) has SIGINT
    ignored, and an ignored signal stays ignored across fork and exec: the tests' ^C would
    then reach nothing. A handler is reset to the default at exec.
    """
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
