"""Structured log lines on stderr: ``text`` (key=value) or ``json`` (one object per line)."""

from __future__ import annotations

import json
import sys
import time
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
