"""Live decisions on requests end to end: a request to an intercepted name that no
--allow-request matches waits for the client (the library's on_decide, sync and async, or the
CLI's --ask on a terminal), then goes upstream or gets a 403 with the reason.

The jobs run on test_intercept's daemon, which verifies upstreams against the test CA and waits
DECISION_TIMEOUT_S (``policy.decision_timeout``) for a decision, so that the timeout is seen
within the test.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time

import pytest

from netjail import AsyncClient, JobResult
from netjail.protocol import AskedRequest, DecideQuestion, Event

from .conftest import Daemon
from .test_cli_terminal import NETJAIL, Terminal
from .test_intercept import API, client, intercepting  # noqa: F401 - the fixtures
from .test_intercept import DECISION_TIMEOUT_S as TIMEOUT_S
from .upstream import UPSTREAM_ADDR, Upstream

pytestmark = pytest.mark.usefixtures("no_leaks")

#: GETs each path given (in order, one connection each) and prints "PATH STATUS REASON BODY".
FETCH = """
import sys, urllib.request, urllib.error
for path in sys.argv[1:]:
    try:
        r = urllib.request.urlopen("https://api.example.test" + path, timeout=20)
    except urllib.error.HTTPError as e:
        r = e
    body = r.read().decode().strip()
    print(path, r.status, r.headers.get("x-netjail-reason"), body if r.status == 200 else "")
"""
ALLOW_V1 = f"GET {API}/v1/*"


def run_fetch(daemon: Daemon, paths: list[str], decide: object, kind: str = "sync") -> JobResult:
    """FETCH of ``paths`` as a job that allows GET /v1/* and decides the rest with ``decide``."""
    options: dict[str, object] = {
        "allow_requests": [ALLOW_V1],
        "add_hosts": [f"{API}:{UPSTREAM_ADDR}"],
        "stdio": "capture",
        "cwd": "/",
        "on_event": lambda e: None,
        "on_decide": decide,
    }
    argv = ["/usr/bin/python3", "-c", FETCH, *paths]
    if kind == "async":
        return asyncio.run(AsyncClient(daemon.socket).run(argv, **options))  # type: ignore[arg-type]
    return daemon.client().run(argv, **options)  # type: ignore[arg-type]


def requests_of(result: JobResult) -> list[Event]:
    return [e for e in result.events if e.kind == "http"]


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_the_client_allows_or_denies_a_request_no_rule_allows(
    intercepting: Daemon,  # noqa: F811 - the fixture's own
    upstream: Upstream,
    kind: str,
) -> None:
    """A request --allow-request misses is put to on_decide with its method and path: allowed,
    the upstream answers it; denied, 403 decided_deny, never relayed; the same path later is
    answered without a question; a request the rule allows is never asked about."""
    asked: list[DecideQuestion] = []

    def decide(question: DecideQuestion) -> bool:
        asked.append(question)
        return question.request is not None and question.request.path == "/v2/yes"

    before = upstream.requests.count(API)
    paths = ["/v1/ok", "/v2/yes", "/v2/no", "/v2/yes?again=1", "/v2/no"]
    result = run_fetch(intercepting, paths, decide, kind)
    lines = (result.stdout or b"").decode().splitlines()
    hello = f"hello from {API}"
    denied = "decided_deny: no --allow-request matches, and the client denied it"
    assert lines == [
        f"/v1/ok 200 None {hello}",
        f"/v2/yes 200 None {hello}",
        f"/v2/no 403 {denied} ",
        f"/v2/yes?again=1 200 None {hello}",
        f"/v2/no 403 {denied} ",
    ], result.stderr
    assert [(q.domain, q.request, q.timeout_s) for q in asked] == [
        (API, AskedRequest(method="GET", path="/v2/yes"), TIMEOUT_S),
        (API, AskedRequest(method="GET", path="/v2/no"), TIMEOUT_S),
    ]
    assert upstream.requests.count(API) - before == 3
    reasons = [(e.verdict, e.path, e.status, e.reason, e.count) for e in requests_of(result)]
    assert ("allowed", "/v2/yes", 200, "decided_allow", 1) in reasons
    assert ("blocked", "/v2/no", 403, "decided_deny", 2) in reasons
    assert ("allowed", "/v1/ok", 200, None, 1) in reasons


def test_no_decision_in_time_denies_the_request_with_the_reason(
    intercepting: Daemon,  # noqa: F811 - the fixture's own
    upstream: Upstream,
) -> None:
    """A client that answers too late: the request gets 403 decision_timeout after the
    daemon's wait, the late answer changes nothing, and the path is not asked again."""
    asked: list[DecideQuestion] = []

    def decide(question: DecideQuestion) -> bool:
        asked.append(question)
        time.sleep(TIMEOUT_S + 0.5)
        return True

    before = upstream.requests.count(API)
    result = run_fetch(intercepting, ["/v2/slow", "/v2/slow"], decide)
    lines = (result.stdout or b"").decode().splitlines()
    late = f"decision_timeout: no --allow-request matches, and no decision came in {TIMEOUT_S:g}s"
    assert lines == [f"/v2/slow 403 {late} "] * 2, result.stderr
    assert len(asked) == 1
    assert upstream.requests.count(API) == before
    [event] = requests_of(result)
    assert (event.verdict, event.status, event.reason, event.count) == (
        "blocked",
        403,
        "decision_timeout",
        2,
    )


def test_ask_prompts_for_a_request_and_obeys_the_key(
    intercepting: Daemon,  # noqa: F811 - the fixture's own
) -> None:
    """netjail run --ask shows METHOD NAME/PATH and the daemon's timeout; y relays the
    request, n gets it a 403; the report says what was decided."""
    env = {**os.environ, "NETJAIL_SOCKET": intercepting.socket, "TERM": "xterm"}
    with tempfile.TemporaryDirectory() as directory:
        report_path = os.path.join(directory, "report.json")
        options = ["-T", "--ask", "--cwd", "/", "--report", report_path]
        options += ["--allow-request", ALLOW_V1, "--add-host", f"{API}:{UPSTREAM_ADDR}"]
        argv = [*NETJAIL, "run", *options, "--", "/usr/bin/python3", "-c", FETCH]
        t = Terminal([*argv, "/v2/yes", "/v2/no"], env)
        try:
            t.read_until(f"netjail: allow GET {API}/v2/yes? (no answer in 3s: no) [y/N] ".encode())
            t.press(b"y")
            t.read_until(f"netjail: allow GET {API}/v2/no? (no answer in 3s: no) [y/N] ".encode())
            t.press(b"n")
            assert t.wait() == 0
        finally:
            t.close()
        with open(report_path, "rb") as f:
            report = json.load(f)
    lines = t.lines()
    assert f"/v2/yes 200 None hello from {API}" in lines, lines
    assert any(line.startswith("/v2/no 403 decided_deny") for line in lines), lines
    reasons = {(e["path"], e.get("reason")) for e in report["events"] if e["kind"] == "http"}
    assert reasons == {("/v2/yes", "decided_allow"), ("/v2/no", "decided_deny")}
