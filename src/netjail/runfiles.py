"""What `netjail run` takes from its command line and its process before the job starts:
the files it names (--report, --events, --mock bodies), --inject-header values from the
environment, its working directory and its stdio. Each is opened or read now, so a bad one
fails before the job runs (RequestError, exit 125), not after it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import BinaryIO

from netjail.errors import RequestError


def _reason(error: Exception) -> str:
    """The OS's words for ``error``; a path with a NUL byte (ValueError) is no file at all."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return "not a usable path" if isinstance(error, ValueError) else str(error)


def open_report(path: str | None) -> BinaryIO | None:
    """Where --report goes (``-``: stdout), opened now: a path that cannot be written fails
    before the job runs (RequestError, exit 125), not after it, when the report would be lost."""
    if path is None:
        return None
    try:
        if path == "-":
            return os.fdopen(os.dup(1), "wb")
        return open(path, "wb")
    except (OSError, ValueError) as e:
        raise RequestError(f"--report {path}: {_reason(e)}") from None


def expand_mocks(mocks: Sequence[str]) -> list[str]:
    """--mock options with each ``:@FILE`` body read now (UTF-8 text; RequestError, exit 125)."""
    if not mocks:
        return []
    from netjail.httppolicy import expand_mock_file  # noqa: PLC0415 - only runs that mock

    def read(path: str) -> str:
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except (OSError, ValueError) as e:
            raise RequestError(f"--mock body @{path}: {_reason(e)}") from None

    return [expand_mock_file(text, read) for text in mocks]


def expand_headers(injections: Sequence[str]) -> list[str]:
    """--inject-header options with ``$VAR`` taken from this process's environment."""
    if not injections:
        return []
    from netjail.httppolicy import expand_header_value  # noqa: PLC0415 - only runs that inject

    return [expand_header_value(text, os.environ) for text in injections]


def open_events(where: str | None) -> int:
    """The file descriptor --events names (FILE, ``-`` for stdout, ``fd:N``; default stderr),
    opened now, so that a bad one fails before the job runs (RequestError, exit 125)."""
    if where is None:
        return 2
    if where == "-":
        return 1
    if where.startswith("fd:"):
        number = where.removeprefix("fd:")
        if not (number.isdigit() and len(number) < 10):
            raise RequestError(f"--events {where}: use fd:N, N a file descriptor number, e.g. fd:3")
        try:
            os.fstat(int(number))
        except OSError as e:
            raise RequestError(
                f"--events {where}: file descriptor {int(number)} is not open ({e.strerror})"
            ) from None
        return int(number)
    try:
        return os.open(where, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    except (OSError, ValueError) as e:
        raise RequestError(f"--events {where}: {_reason(e)}") from None


def current_directory() -> str:
    """The CLI's working directory, for the job (RequestError when it is gone)."""
    try:
        return os.getcwd()
    except OSError as e:
        raise RequestError(
            f"the current directory cannot be used ({e.strerror}): cd elsewhere or use --cwd DIR"
        ) from None


def stdio_fds() -> list[int]:
    """The CLI's stdin, stdout and stderr, for the job; /dev/null in place of a closed one."""
    fds = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:
            fds.append(os.open(os.devnull, os.O_RDWR))
    return fds
