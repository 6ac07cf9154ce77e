"""What one doctor check found, and how ``netjail doctor`` shows the findings (pure)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from netjail.text import sanitize

Status = Literal["ok", "warn", "FAIL"]

#: Exit status of ``netjail doctor`` when a blocker FAILs.
EXIT_BLOCKER = 1


@dataclass(frozen=True)
class Check:
    """The result of one check: one line of ``netjail doctor``, plus a fix unless it is ok."""

    check: str
    status: Status
    detail: str
    fix: str | None = None

    @classmethod
    def ok(cls, check: str, detail: str) -> Check:
        """Nothing to do."""
        return cls(check, "ok", detail)

    @classmethod
    def warn(cls, check: str, detail: str, fix: str) -> Check:
        """Jobs can run, but get less than they could (or this is not where netjaild runs)."""
        return cls(check, "warn", detail, fix)

    @classmethod
    def fail(cls, check: str, detail: str, fix: str) -> Check:
        """A blocker: no job can run until it is fixed."""
        return cls(check, "FAIL", detail, fix)


def format_checks(checks: Iterable[Check]) -> list[str]:
    """The lines ``netjail doctor`` prints: ``<status>  <check>: <detail>``, then the fix.

    Details can carry text from outside (a socket path, the daemon's error message), so every
    line is sanitized before it reaches a terminal.
    """
    lines = []
    for check in checks:
        lines.append(sanitize(f"{check.status:<4}  {check.check}: {check.detail}", 1000))
        if check.fix is not None:
            lines.append(sanitize(f"  fix: {check.fix}", 1000))
    return lines


def checks_to_json(checks: Iterable[Check]) -> str:
    """The checks as a JSON list of ``{check, status, detail, fix}`` (fix is null when ok)."""
    return json.dumps([dataclasses.asdict(check) for check in checks], indent=2)


def has_blocker(checks: Iterable[Check]) -> bool:
    """Whether any check FAILed: only blockers do, so netjail cannot run jobs here."""
    return any(check.status == "FAIL" for check in checks)
