"""Structured log lines on stderr: ``text`` (key=value) or ``json`` (one object per line)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, Literal, TextIO

from netjail.text import sanitize


class Logger:
    """Writes one line per record; every value is sanitised (it may come from a job)."""

    def __init__(self, fmt: Literal["text", "json"] = "text", stream: TextIO | None = None) -> None:
        self.format = fmt
        self.stream = stream or sys.stderr

    def __call__(self, level: str, message: str, **fields: Any) -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z"
        clean = {k: _clean(v) for k, v in fields.items()}
        if self.format == "json":
            line = json.dumps({"time": now, "level": level, "msg": message, **clean})
        else:
            parts = [now, level.upper(), message]
            parts += [
                f"{k}={json.dumps(v) if isinstance(v, str) and ' ' in v else v}"
                for k, v in clean.items()
            ]
            line = " ".join(str(x) for x in parts)
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed stderr must never take the daemon down


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return sanitize(value, 512)
    if isinstance(value, list | tuple):
        return sanitize(" ".join(str(v) for v in value), 512)
    if isinstance(value, int | float | bool) or value is None:
        return value
    return sanitize(str(value), 512)


def loop_error_handler(
    log: Logger,
) -> Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None]:
    """An asyncio exception handler that logs one line instead of a multi-line traceback.

    It catches what no task handled (a bug, or a job finding an unforeseen path): the line
    names the error and the innermost frame, so a job cannot flood the log with tracebacks.
    """

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        where = ""
        if isinstance(error, BaseException) and error.__traceback__ is not None:
            frame = traceback.extract_tb(error.__traceback__)[-1]
            where = f"{os.path.basename(frame.filename)}:{frame.lineno}"
        log(
            "error",
            "unhandled error in the event loop",
            detail=str(context.get("message", "")),
            error=repr(error) if error is not None else "",
            where=where,
        )

    return handle
