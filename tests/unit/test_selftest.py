"""The self-test's verdict on a probe job's report (pure)."""

from __future__ import annotations

from netjail.daemon.selftest import PROBE_ADDRESS, PROBE_NAME, PROBE_PORT, evaluate, probe_argv
from netjail.protocol import Event, Report


def event(kind: str, proto: str | None, domain: str | None = None, via: str = "nflog") -> Event:
    return Event(
        job="j-1",
        time="2026-11-22T00:00:00.000Z",
        kind=kind,
        verdict="blocked",
        proto=proto,
        family=4,
        dst=PROBE_ADDRESS if kind == "egress" else None,
        port=PROBE_PORT if kind == "egress" else 53,
        uid=0,
        count=1,
        via=via,
        domain=domain,
        qtype="A" if kind == "dns" else None,
    )


GOOD_EVENTS = [
    event("egress", "tcp"),
    event("egress", "udp"),
    event("dns", "udp", PROBE_NAME, "dns"),
]


def report(stdout: bytes, events: list[Event], exit_code: int = 0) -> Report:
    return Report(
        job="j-1",
        argv=probe_argv(),
        uid=0,
        gid=0,
        exit_code=exit_code,
        signal=None,
        wall_s=0.1,
        events=events,
        lost_events=0,
        stdout=stdout,
        stderr=b"",
    )


def test_a_working_jail_passes() -> None:
    """All three attempts rejected and all three reported: no problem."""
    assert evaluate(report(b"tcp refused\nudp rejected\ndns failed\n", GOOD_EVENTS), "nflog") == []


def test_a_connect_that_got_through_fails_the_test() -> None:
    """A TCP connect that was not refused is reported as not rejected."""
    problems = evaluate(report(b"tcp connected\nudp rejected\ndns failed\n", GOOD_EVENTS), "nflog")
    assert problems == [
        "the probe's attempts were not all rejected (expected tcp refused, udp rejected, "
        "dns failed; got tcp connected, udp rejected, dns failed)"
    ]


def test_missing_nflog_events_are_named_with_a_hint() -> None:
    """Rejected but unreported attempts fail the test, naming NFLOG and what to check."""
    problems = evaluate(
        report(b"tcp refused\nudp rejected\ndns failed\n", GOOD_EVENTS[2:]), "nflog"
    )
    assert problems == [
        "NFLOG events not received for the blocked TCP attempt: nfnetlink_log missing?",
        "NFLOG events not received for the blocked UDP attempt: nfnetlink_log missing?",
    ]


def test_missing_kernel_log_events_point_at_the_sysctl() -> None:
    """With the kmsg backend the hint is nf_log_all_netns."""
    problems = evaluate(report(b"tcp refused\nudp rejected\ndns failed\n", GOOD_EVENTS[1:]), "kmsg")
    assert problems == [
        "kernel log (LOG/kmsg) events not received for the blocked TCP attempt: "
        "is nf_log_all_netns=1?"
    ]


def test_an_unreported_dns_lookup_fails_the_test() -> None:
    """The stub must report the probe's lookup."""
    problems = evaluate(
        report(b"tcp refused\nudp rejected\ndns failed\n", GOOD_EVENTS[:2]), "nflog"
    )
    assert problems == ["the DNS stub did not report the probe's lookup"]


def test_a_probe_that_crashed_says_what_it_printed() -> None:
    """A probe that exits non-zero with no output fails with its stderr shown."""
    bad = report(b"", GOOD_EVENTS, exit_code=1)
    bad.stderr = b"Traceback: boom"
    assert evaluate(bad, "nflog") == [
        "the probe's attempts were not all rejected (expected tcp refused, udp rejected, "
        "dns failed; got Traceback: boom)"
    ]
