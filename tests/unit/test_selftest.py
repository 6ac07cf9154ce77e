"""The self-test: its verdict on a probe job's report (pure), and the probe job it runs
(over a stub JobManager)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import msgspec

from netjail.daemon.config import Config, Limits
from netjail.daemon.config import Policy as ConfigPolicy
from netjail.daemon.pipeline import Job
from netjail.daemon.selftest import (
    PROBE_ADDRESS,
    PROBE_ADDRESS6,
    PROBE_NAME,
    PROBE_PORT,
    evaluate,
    probe_argv,
    run_self_test,
)
from netjail.daemon.spec import DEFAULT_PATH, CapturedStdio, FixedUser
from netjail.errors import JailError
from netjail.kernel.peer import PeerCred
from netjail.protocol import AppliedLimits, Event, EventKind, Report, Via

from .daemonfakes import make_daemon, run


def event(
    kind: EventKind, proto: str | None, domain: str | None = None, via: Via = "nflog"
) -> Event:
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
    msgspec.structs.replace(event("egress", "tcp"), family=6, dst=PROBE_ADDRESS6),
    event("egress", "udp"),
    event("dns", "udp", PROBE_NAME, "dns"),
]
GOOD_OUTPUT = b"tcp refused\ntcp6 refused\nudp rejected\ndns failed\n"
EXPECTED = "expected tcp refused, tcp6 refused, udp rejected, dns failed"


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
    """All four attempts rejected and all four reported: no problem."""
    assert evaluate(report(GOOD_OUTPUT, GOOD_EVENTS), "nflog") == []


def test_a_connect_that_got_through_fails_the_test() -> None:
    """A TCP connect that was not refused is reported as not rejected."""
    output = b"tcp connected\ntcp6 refused\nudp rejected\ndns failed\n"
    assert evaluate(report(output, GOOD_EVENTS), "nflog") == [
        f"the probe's attempts were not all rejected ({EXPECTED}; got tcp connected, tcp6 refused,"
        " udp rejected, dns failed)"
    ]


def test_an_ipv6_connect_that_was_not_refused_fails_the_test() -> None:
    """IPv6 is proved too: a TCP connect over IPv6 that failed otherwise (no route: nothing
    was logged) is not a rejection."""
    output = b"tcp refused\ntcp6 OSError\nudp rejected\ndns failed\n"
    events = [GOOD_EVENTS[0], *GOOD_EVENTS[2:]]
    assert evaluate(report(output, events), "nflog") == [
        f"the probe's attempts were not all rejected ({EXPECTED}; got tcp refused, tcp6 OSError,"
        " udp rejected, dns failed)",
        "NFLOG events not received for the blocked TCP (IPv6) attempt: nfnetlink_log missing?",
    ]


def test_missing_nflog_events_are_named_with_a_hint() -> None:
    """Rejected but unreported attempts fail the test, naming NFLOG and what to check."""
    problems = evaluate(report(GOOD_OUTPUT, GOOD_EVENTS[3:]), "nflog")
    assert problems == [
        "NFLOG events not received for the blocked TCP attempt: nfnetlink_log missing?",
        "NFLOG events not received for the blocked TCP (IPv6) attempt: nfnetlink_log missing?",
        "NFLOG events not received for the blocked UDP attempt: nfnetlink_log missing?",
    ]


def test_missing_kernel_log_events_point_at_the_sysctl() -> None:
    """With the kmsg backend the hint is nf_log_all_netns."""
    problems = evaluate(report(GOOD_OUTPUT, GOOD_EVENTS[1:]), "kmsg")
    assert problems == [
        "kernel log (LOG/kmsg) events not received for the blocked TCP attempt: "
        "is nf_log_all_netns=1?"
    ]


def test_an_unreported_dns_lookup_fails_the_test() -> None:
    """The stub must report the probe's lookup."""
    problems = evaluate(report(GOOD_OUTPUT, GOOD_EVENTS[:3]), "nflog")
    assert problems == ["the DNS stub did not report the probe's lookup"]


def test_a_probe_that_crashed_says_what_it_printed() -> None:
    """A probe that exits non-zero with no output fails with its stderr shown."""
    bad = report(b"", GOOD_EVENTS, exit_code=1)
    bad.stderr = b"Traceback: boom"
    assert evaluate(bad, "nflog") == [
        f"the probe's attempts were not all rejected ({EXPECTED}; got Traceback: boom)"
    ]


def test_the_right_output_with_a_failing_exit_status_fails_the_test() -> None:
    """The output alone is not enough: the probe must also exit 0."""
    bad = report(GOOD_OUTPUT, GOOD_EVENTS, exit_code=3)
    assert evaluate(bad, "nflog") == [
        f"the probe's attempts were not all rejected ({EXPECTED}; got tcp refused, tcp6 refused,"
        " udp rejected, dns failed)"
    ]


def test_a_probe_that_left_nothing_names_every_missing_part() -> None:
    """No output, no stderr and no events: one line for each missing part, in order."""
    bad = report(b"", [])
    bad.exit_code = None
    bad.stdout = None
    bad.stderr = None
    assert evaluate(bad, "nflog") == [
        f"the probe's attempts were not all rejected ({EXPECTED}; got nothing)",
        "NFLOG events not received for the blocked TCP attempt: nfnetlink_log missing?",
        "NFLOG events not received for the blocked TCP (IPv6) attempt: nfnetlink_log missing?",
        "NFLOG events not received for the blocked UDP attempt: nfnetlink_log missing?",
        "the DNS stub did not report the probe's lookup",
    ]


def test_events_about_other_attempts_do_not_count() -> None:
    """Only blocked egress to the probe's address and port, and a blocked lookup of the
    probe's name, prove the jail reports."""
    elsewhere = [
        msgspec.structs.replace(GOOD_EVENTS[0], port=PROBE_PORT + 1),
        msgspec.structs.replace(GOOD_EVENTS[1], dst="2001:db8::2"),
        msgspec.structs.replace(GOOD_EVENTS[2], dst="203.0.113.2"),
        msgspec.structs.replace(GOOD_EVENTS[2], verdict="allowed"),
        msgspec.structs.replace(GOOD_EVENTS[3], verdict="allowed"),
        msgspec.structs.replace(GOOD_EVENTS[3], domain="other.invalid"),
    ]
    assert evaluate(report(GOOD_OUTPUT, elsewhere), "kmsg") == [
        "kernel log (LOG/kmsg) events not received for the blocked TCP attempt: "
        "is nf_log_all_netns=1?",
        "kernel log (LOG/kmsg) events not received for the blocked TCP (IPv6) attempt: "
        "is nf_log_all_netns=1?",
        "kernel log (LOG/kmsg) events not received for the blocked UDP attempt: "
        "is nf_log_all_netns=1?",
        "the DNS stub did not report the probe's lookup",
    ]


# ---------------------------------------------------------------------- run_self_test


def probe_report(job: Job) -> Report:
    return msgspec.structs.replace(report(GOOD_OUTPUT, GOOD_EVENTS), job=job.id)


def test_run_self_test_runs_the_probe_as_root_with_capture_and_the_configs_limits(
    tmp_path: Path,
) -> None:
    """The probe job: this interpreter as uid 0, owned by the daemon, captured, with a 20 s
    timeout, the config's other limits and DNS answer; a good report means no problem."""
    config = Config(
        limits=Limits(max_memory=64 << 20),
        policy=ConfigPolicy(blocked_dns_answer="REFUSED"),
    )
    daemon = make_daemon(str(tmp_path), config)
    daemon.jobs.on_start = lambda job: daemon.jobs.finish(job, probe_report(job))

    async def main() -> list[str]:
        return await run_self_test(daemon.jobs, config)

    try:
        assert run(main()) == []
    finally:
        daemon.close()
    [call] = daemon.jobs.starts
    assert (call.stdio, call.streamed) == ([], False)
    spec = call.spec
    assert (spec.argv, spec.env, spec.cwd, spec.user) == (
        probe_argv(),
        {"PATH": DEFAULT_PATH},
        "/",
        FixedUser(0, 0),
    )
    assert spec.owner == PeerCred(pid=os.getpid(), uid=0, gid=0)
    assert spec.limits == AppliedLimits(
        memory_bytes=64 << 20,
        cpus=None,
        pids=Limits().default_pids,
        timeout_s=20.0,
        kill_grace_s=0.5,
    )
    assert spec.stdio == CapturedStdio(4096)
    assert (spec.policy.allow, spec.policy.deny) == ((), ())
    assert spec.blocked_dns_answer == "REFUSED"


def test_run_self_test_returns_the_problems_of_the_probes_report(tmp_path: Path) -> None:
    """The report is judged with the configured log backend's wording."""
    daemon = make_daemon(str(tmp_path))
    unreported = report(GOOD_OUTPUT, GOOD_EVENTS[3:])
    daemon.jobs.on_start = lambda job: daemon.jobs.finish(job, unreported)
    try:
        assert run(run_self_test(daemon.jobs, Config(log_backend="kmsg"))) == [
            "kernel log (LOG/kmsg) events not received for the blocked TCP attempt: "
            "is nf_log_all_netns=1?",
            "kernel log (LOG/kmsg) events not received for the blocked TCP (IPv6) attempt: "
            "is nf_log_all_netns=1?",
            "kernel log (LOG/kmsg) events not received for the blocked UDP attempt: "
            "is nf_log_all_netns=1?",
        ]
    finally:
        daemon.close()


def test_run_self_test_reports_a_probe_that_could_not_start(tmp_path: Path) -> None:
    """A probe job that cannot start is one problem naming the error."""
    daemon = make_daemon(str(tmp_path))
    daemon.jobs.start_error = JailError("cannot build the jail: no nftables")
    try:
        assert run(run_self_test(daemon.jobs, Config())) == [
            "the probe job could not run: cannot build the jail: no nftables"
        ]
    finally:
        daemon.close()


def test_run_self_test_reports_a_probe_whose_report_failed(tmp_path: Path) -> None:
    """A probe whose supervision failed is one problem naming the error."""
    daemon = make_daemon(str(tmp_path))

    def fail(job: Job) -> None:
        job.finished.set_exception(JailError(f"job {job.id} failed: boom"))

    daemon.jobs.on_start = fail
    try:
        assert run(run_self_test(daemon.jobs, Config())) == [
            "the probe job could not run: job j-00000001 failed: boom"
        ]
    finally:
        daemon.close()


def test_run_self_test_waits_until_the_probes_jail_is_gone(tmp_path: Path) -> None:
    """The verdict comes only once the probe is removed, so nothing of it is left at READY."""
    daemon = make_daemon(str(tmp_path))
    started: list[Job] = []

    def report_only(job: Job) -> None:
        job.finished.set_result(probe_report(job))
        started.append(job)

    daemon.jobs.on_start = report_only

    async def main() -> list[str]:
        testing = asyncio.ensure_future(run_self_test(daemon.jobs, Config()))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not testing.done()
        started[0].removed.set()
        return await testing

    try:
        assert run(main()) == []
    finally:
        daemon.close()
