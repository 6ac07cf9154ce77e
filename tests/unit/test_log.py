"""The daemon's log lines, and the event loop's last-resort error handler."""

from __future__ import annotations

import asyncio
import io
import json
import re

from netjail.daemon.log import Logger, loop_error_handler


def test_text_lines_are_one_line_and_sanitised() -> None:
    """A text line is time, level, message and key=value pairs, control characters as "?"."""
    out = io.StringIO()
    Logger("text", out)("info", "job started", cmd="evil\n\x1b[2Jline", uid=7)
    [line] = out.getvalue().splitlines()
    stamp, rest = line.split(" ", 1)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", stamp)
    assert rest == "INFO job started cmd=evil??[2Jline uid=7"


def test_json_lines_parse() -> None:
    """A JSON line is one object with the level, the message and each value in its type."""
    out = io.StringIO()
    Logger("json", out)("warning", "slow", ms=12.5)
    record = json.loads(out.getvalue())
    assert (record["level"], record["msg"], record["ms"]) == ("warning", "slow", 12.5)


def test_an_unhandled_task_error_becomes_one_line_naming_where() -> None:
    """An error no task handled is logged as one line with the error and the frame it came from."""
    out = io.StringIO()
    log = Logger("json", out)

    async def broken() -> None:
        raise ConnectionResetError(104, "Connection reset by peer\nspoofed line")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(loop_error_handler(log))
        task = loop.create_task(broken())
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert task.done()
        del task  # never retrieved: asyncio hands it to the handler when it is collected

    asyncio.run(main())
    [line] = out.getvalue().splitlines()
    record = json.loads(line)
    assert record["msg"] == "unhandled error in the event loop"
    assert record["detail"] == "Task exception was never retrieved"
    assert record["error"].startswith("ConnectionResetError(104,")
    assert record["where"] == f"test_log.py:{broken.__code__.co_firstlineno + 1}"
