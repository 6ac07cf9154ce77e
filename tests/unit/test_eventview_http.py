"""How the CLI shows an intercepted request's event."""

from __future__ import annotations

from netjail.eventview import format_event, summarize_blocked
from netjail.protocol import Event


def request(verdict: str, method: str, path: str, status: int, **extra: object) -> Event:
    return Event(
        job="j-1",
        time="2026-12-01T00:00:00.000Z",
        kind="http",
        verdict=verdict,  # type: ignore[arg-type]
        proto="tcp",
        family=4,
        dst="198.18.0.2",
        port=443,
        uid=1000,
        count=1,
        via="proxy",
        domain="api.stripe.com",
        method=method,
        path=path,
        status=status,
        **extra,  # type: ignore[arg-type]
    )


def test_a_mocked_request_reads_verdict_method_name_path_status() -> None:
    """netjail: mocked POST api.stripe.com/v1/customers 201."""
    assert format_event(request("mocked", "POST", "/v1/customers", 201)) == (
        "mocked POST api.stripe.com/v1/customers 201"
    )


def test_a_blocked_request_names_its_reason_and_rule() -> None:
    """The reason in parentheses, the rule after a colon."""
    event = request(
        "blocked", "GET", "/admin", 403, reason="deny_request", detail="--deny-request GET x/a*"
    )
    assert format_event(event) == (
        "blocked GET api.stripe.com/admin 403 (deny_request): --deny-request GET x/a*"
    )


def test_the_summary_names_refused_requests_without_an_allow_hint() -> None:
    """No --allow could help a refused request: the summary gives no hint for it."""
    event = request("blocked", "GET", "/admin", 403, reason="deny_request")
    assert summarize_blocked([event]) == "blocked 1 destination: GET api.stripe.com/admin (x1)"
