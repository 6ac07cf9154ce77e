"""The start-up self-test: prove the jail blocks and reports before serving anyone.

A probe job (uid 0, so it can run the daemon's own interpreter; it still has no capabilities)
tries a TCP connect over IPv4 and over IPv6, a UDP send and a DNS lookup. Each must be
rejected (refused, EPERM, NXDOMAIN) AND reported as an event. If either half is missing the
daemon refuses to serve:
a jail that silently lets traffic through, or one that blocks without telling, is not one.
"""

from __future__ import annotations

import asyncio
import os
import sys

from netjail.daemon.config import Config
from netjail.daemon.jobs import JobManager
from netjail.daemon.spec import DEFAULT_PATH, CapturedStdio, FixedUser, JobSpec, applied_limits
from netjail.errors import NetjailError
from netjail.kernel.peer import PeerCred
from netjail.protocol import Report

#: Documentation addresses (RFC 5737): never routed anywhere, rejected inside the jail.
PROBE_ADDRESS = "203.0.113.1"
#: The IPv6 documentation prefix (RFC 3849), as an event names it.
PROBE_ADDRESS6 = "2001:db8::1"
PROBE_PORT = 9
PROBE_NAME = "netjail-self-test.invalid"

PROBE = f"""
import socket
tcp = ((socket.AF_INET, "{PROBE_ADDRESS}", "tcp"), (socket.AF_INET6, "{PROBE_ADDRESS6}", "tcp6"))
for family, address, name in tcp:
    s = socket.socket(family)
    s.settimeout(5)
    try:
        s.connect((address, {PROBE_PORT}))
        print(name, "connected")
    except ConnectionRefusedError:
        print(name, "refused")
    except OSError as e:
        print(name, type(e).__name__)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    u.sendto(b"netjail self-test", ("{PROBE_ADDRESS}", {PROBE_PORT}))
    print("udp sent")
except PermissionError:
    print("udp rejected")
try:
    socket.getaddrinfo("{PROBE_NAME}", 80, socket.AF_INET)
    print("dns resolved")
except socket.gaierror:
    print("dns failed")
"""

_EXPECTED_OUTPUT = ["tcp refused", "tcp6 refused", "udp rejected", "dns failed"]
#: Each blocked attempt that must come back as an event: (protocol, address, its name).
_ATTEMPTS = (
    ("tcp", PROBE_ADDRESS, "TCP"),
    ("tcp", PROBE_ADDRESS6, "TCP (IPv6)"),
    ("udp", PROBE_ADDRESS, "UDP"),
)


def probe_argv() -> list[str]:
    """The probe's command line: this interpreter, isolated (-I) and without site (-S)."""
    return [os.path.realpath(sys.executable), "-I", "-S", "-c", PROBE]


def evaluate(report: Report, log_backend: str) -> list[str]:
    """What is wrong with a probe's report, one line each; [] when the jail works. Pure."""
    problems: list[str] = []
    output = (report.stdout or b"").decode(errors="replace").split()
    lines = [" ".join(output[i : i + 2]) for i in range(0, len(output), 2)]
    if report.exit_code != 0 or lines != _EXPECTED_OUTPUT:
        got = ", ".join(lines) or (report.stderr or b"").decode(errors="replace").strip()[-200:]
        expected = ", ".join(_EXPECTED_OUTPUT)
        problems.append(
            f"the probe's attempts were not all rejected (expected {expected}; "
            f"got {got or 'nothing'})"
        )
    source = "NFLOG" if log_backend == "nflog" else "kernel log (LOG/kmsg)"
    hint = "nfnetlink_log missing?" if log_backend == "nflog" else "is nf_log_all_netns=1?"
    for proto, address, name in _ATTEMPTS:
        if not any(
            e.kind == "egress"
            and e.verdict == "blocked"
            and e.proto == proto
            and e.dst == address
            and e.port == PROBE_PORT
            for e in report.events
        ):
            problems.append(f"{source} events not received for the blocked {name} attempt: {hint}")
    if not any(
        e.kind == "dns" and e.domain == PROBE_NAME and e.verdict == "blocked" for e in report.events
    ):
        problems.append("the DNS stub did not report the probe's lookup")
    return problems


async def run_self_test(jobs: JobManager, config: Config) -> list[str]:
    """Run the probe job through the normal job path; return the problems found."""
    limits = applied_limits(
        config.limits, memory=None, cpus=None, pids=None, timeout=20.0, kill_grace=0.5
    )
    spec = JobSpec(
        argv=probe_argv(),
        env={"PATH": DEFAULT_PATH},
        cwd="/",
        user=FixedUser(0, 0),
        owner=PeerCred(pid=os.getpid(), uid=0, gid=0),
        limits=limits,
        stdio=CapturedStdio(4096),
        blocked_dns_answer=config.policy.blocked_dns_answer,
    )
    try:
        job = await jobs.start(spec, [], None)
        report = await asyncio.wait_for(asyncio.shield(job.finished), 60)
        # Ready means nothing of the probe is left: its jail is gone too.
        await asyncio.wait_for(job.removed.wait(), 60)
    except (NetjailError, TimeoutError) as e:
        return [f"the probe job could not run: {e}"]
    return evaluate(report, config.log_backend)
