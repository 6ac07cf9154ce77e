"""Live decisions end to end: the client decides, while the job runs, names no rule covers."""

from __future__ import annotations

import pytest

from netjail import Client
from netjail.protocol import DecideQuestion

from .upstream import UPSTREAM_ADDR, Upstream

pytestmark = pytest.mark.usefixtures("no_leaks")


def test_a_name_allowed_live_is_reachable_and_a_denied_one_is_not(
    client: Client, upstream: Upstream
) -> None:
    """on_decide is asked once per name; its answer holds the query, then DNS and proxy obey."""
    asked: list[str] = []

    def decide(question: DecideQuestion) -> bool:
        asked.append(question.domain)
        return question.domain == "a.example.test"

    script = (
        "curl -sS --max-time 20 http://a.example.test/; "
        "curl -sS --max-time 20 http://a.example.test/again; "
        "curl -sS --max-time 20 http://other.example.test/ || echo refused"
    )
    hosts = [f"{name}:{UPSTREAM_ADDR}" for name in ("a.example.test", "other.example.test")]
    result = client.run(
        ["sh", "-c", script],
        allow=["api.example.test"],
        add_hosts=hosts,
        stdio="capture",
        cwd="/",
        on_decide=decide,
    )
    out = (result.stdout or b"").decode()
    assert out.startswith("hello from a.example.test\nhello from a.example.test\n"), result.stderr
    assert out.endswith("refused\n")
    assert sorted(asked) == ["a.example.test", "other.example.test"]
    reasons = {(e.domain, e.reason) for e in result.events if e.kind == "dns"}
    assert ("a.example.test", "decided_allow") in reasons
    assert ("other.example.test", "decided_deny") in reasons
