"""`netjail run --ask` against a real daemon, driven from a pty as a user's shell would: the
question on the terminal for each name no rule covers, one key for each answer, with a pty of
the job's own (-t) and without (-T), and the decisions in the report."""

from __future__ import annotations

import json
import os
import tempfile

import pytest

from .test_cli_terminal import NETJAIL, Terminal, terminal  # noqa: F401 - the fixture
from .upstream import UPSTREAM_ADDR, Upstream

pytestmark = pytest.mark.usefixtures("no_leaks")

SCRIPT = (
    "curl -sS --max-time 20 http://a.example.test/; "
    "curl -sS --max-time 20 http://other.example.test/ || echo refused"
)


@pytest.mark.parametrize("mode", ["-t", "-T"])
def test_ask_prompts_for_each_uncovered_name_and_obeys_the_key(
    terminal: type[Terminal],  # noqa: F811 - the fixture's own
    upstream: Upstream,
    mode: str,
) -> None:
    """y at the first question lets a.example.test through, n at the second denies
    other.example.test; each is asked once, and the report names both decisions."""
    with tempfile.TemporaryDirectory() as directory:
        report_path = os.path.join(directory, "report.json")
        hosts = [
            arg
            for name in ("a.example.test", "other.example.test")
            for arg in ("--add-host", f"{name}:{UPSTREAM_ADDR}")
        ]
        options = [mode, "--ask", "--cwd", "/", "--report", report_path, *hosts]
        t = terminal([*NETJAIL, "run", *options, "--", "sh", "-c", SCRIPT])
        t.read_until(b"netjail: allow a.example.test? (no answer in 30s: no) [y/N] ")
        t.press(b"y")
        t.read_until(b"netjail: allow other.example.test? (no answer in 30s: no) [y/N] ")
        t.press(b"n")
        assert t.wait() == 0
        with open(report_path, "rb") as f:
            report = json.load(f)
    lines = t.lines()
    assert "hello from a.example.test" in lines, lines
    assert lines[-1] != "hello from other.example.test"
    assert "refused" in lines
    assert t.output.count(b"allow a.example.test?") == 1
    assert t.output.count(b"allow other.example.test?") == 1
    reasons = {(e["domain"], e.get("reason")) for e in report["events"] if e["kind"] == "dns"}
    assert ("a.example.test", "decided_allow") in reasons
    assert ("other.example.test", "decided_deny") in reasons
