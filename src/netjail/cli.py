"""``netjail``: the command-line client, a thin layer over ``netjail.client``.

The group and how the process ends are here; ``run`` is in ``netjail.runcommand``, the other
commands in ``netjail.commands`` (each of which imports what only it needs when it runs).
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, NoReturn

import click

from netjail.clicontext import fail
from netjail.client import DEFAULT_SOCKET, default_socket
from netjail.commands import doctor, events, kill, ps, status
from netjail.console import say
from netjail.runcommand import run

__all__ = ["doctor", "events", "kill", "main", "ps", "run", "status"]


class _Commands(click.Group):
    """netjail's commands, none of which ever ends in a traceback."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        # Called with no arguments, as the `netjail` program (not by a test runner that passes
        # its own): the process is ours to end.
        owns_process = not args and "args" not in kwargs
        try:
            try:
                return super().main(*args, **kwargs)
            except Exception as e:  # the last line of defence: one line, never a traceback
                fail(f"internal error ({type(e).__name__}: {e}); please report it")
        except SystemExit as e:
            if owns_process:
                _exit_now(e.code)
            raise


def _exit_now(code: str | int | None) -> NoReturn:
    """Exit with ``code`` without tearing the interpreter down: freeing every module costs
    netjail about as much as a fifth of its start (7-10 ms here), on every command. Nothing is
    left to run at exit but the flush of stdio, done first (unless coverage is measuring this
    process, whose data is saved at exit)."""
    if "coverage" in sys.modules:
        sys.exit(code)
    if isinstance(code, str):
        say(code)
    exit_status = code if isinstance(code, int) else (0 if code is None else 1)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(exit_status & 0xFF)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--socket",
    default=None,
    metavar="PATH",
    help=f"netjaild's socket [env NETJAIL_SOCKET; default {DEFAULT_SOCKET}]",
)
@click.version_option(package_name="netjail", prog_name="netjail")
@click.pass_context
def main(ctx: click.Context, socket: str | None) -> None:
    """Run commands in a network jail that blocks and reports every egress attempt."""
    ctx.obj = {"socket": socket or default_socket()}


for _command in (run, events, ps, kill, status, doctor):
    main.add_command(_command)


if __name__ == "__main__":
    main()
