"""What every ``netjail`` command shares: its client, and failure as one line and an exit status."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click

from netjail.client import Client
from netjail.console import EXIT_NETJAIL, say
from netjail.errors import ExecError, NetjailError

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = EXIT_NETJAIL) -> NoReturn:
    """Say ``message`` on stderr and exit with ``code``."""
    say(message)
    sys.exit(code)


def open_client(ctx: click.Context) -> Client:
    """A client of the daemon at the socket the ``--socket`` option chose."""
    return Client(ctx.obj["socket"])


def handle_errors(func: F) -> F:
    """``func`` with netjail's errors turned into one line and their exit status."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ExecError as e:
            fail(str(e), e.exit_code)
        except NetjailError as e:
            fail(str(e))

    return wrapper  # type: ignore[return-value]
