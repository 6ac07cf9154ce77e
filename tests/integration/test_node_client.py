"""The Node.js client's own tests (clients/node/test, Node's built-in runner) against the real
daemon, so that the suite's one command runs them too."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import Daemon

pytestmark = pytest.mark.usefixtures("no_leaks")

NODE_CLIENT = Path(__file__).resolve().parents[2] / "clients" / "node"
#: Fewer passing tests than this means the runner found or ran less than it should.
AT_LEAST_PASSED = 20


def test_the_node_clients_tests_pass_against_the_daemon(daemon: Daemon) -> None:
    """`node --test` over clients/node/test passes against the real daemon, skipping nothing;
    on failure the assertion shows node's whole output."""
    # NETJAIL_TEST_NODE: another node to run them with (e.g. Debian 12's 18 where 20 is installed).
    node = os.environ.get("NETJAIL_TEST_NODE") or shutil.which("node")
    assert node is not None, "node is missing: scripts/bootstrap installs it (Debian's nodejs)"
    files = sorted(str(path) for path in (NODE_CLIENT / "test").glob("*.test.*js"))
    completed = subprocess.run(
        [node, "--test", "--test-reporter=tap", *files],
        cwd=NODE_CLIENT,
        env={**os.environ, "NETJAIL_SOCKET": daemon.socket},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = completed.stdout + completed.stderr
    counts = {name: int(n) for name, n in re.findall(r"^# (\w+) (\d+)$", output, re.MULTILINE)}
    assert completed.returncode == 0, output
    assert (counts.get("fail"), counts.get("skipped"), counts.get("cancelled")) == (0, 0, 0), output
    assert counts.get("pass", 0) >= AT_LEAST_PASSED, output
