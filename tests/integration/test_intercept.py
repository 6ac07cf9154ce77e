"""Interception end to end: TLS terminated with the job's CA, every request checked.

A daemon of its own verifies upstreams against the test CA (``[proxy] upstream_ca``); jobs get
no CA bundle from the test: they trust the job's CA through the bundle and variables netjail
sets. Each feature is driven from curl, /usr/bin/python3 (urllib), and /usr/bin/node (fetch and
https), all printing ``STATUS REASON`` on their first line and the body after it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

from netjail import Client, JobResult
from netjail.protocol import Event

from .conftest import Daemon, start_daemon, stop_daemon
from .upstream import SECRET_KEY, UPSTREAM_ADDR, Upstream

pytestmark = pytest.mark.usefixtures("no_leaks")

PY = "/usr/bin/python3"
NODE = "/usr/bin/node"
API = "api.example.test"
#: A name whose address answers nothing (a documentation address): only a mock can answer it.
DOWN = "a.example.test"
TOOLS = ["curl", "python", "node-fetch", "node-https"]

_PYTHON = """
import sys, urllib.request, urllib.error
method, url = sys.argv[1], sys.argv[2]
headers = dict(h.split(": ", 1) for h in sys.argv[3:])
data = b"{}" if method == "POST" else None
request = urllib.request.Request(url, data=data, method=method, headers=headers)
try:
    r = urllib.request.urlopen(request, timeout=20)
except urllib.error.HTTPError as e:
    r = e
print(r.status, r.headers.get("x-netjail-reason"))
sys.stdout.write(r.read().decode())
"""
_NODE_FETCH = """
const [method, url, ...hs] = process.argv.slice(1);
const headers = Object.fromEntries(hs.map((h) => h.split(": ")));
const body = method === "POST" ? "{}" : undefined;
fetch(url, { method, headers, body }).then(async (r) => {
  console.log(r.status, r.headers.get("x-netjail-reason"));
  process.stdout.write(await r.text());
}).catch((e) => { console.log("error", e.cause ? e.cause.code : e.message); });
"""
_NODE_HTTPS = """
const https = require("https");
const [method, url, ...hs] = process.argv.slice(1);
const headers = Object.fromEntries(hs.map((h) => h.split(": ")));
// The SNI is the URL's name even when a Host header names another (node takes it from Host).
const req = https.request(url, { method, headers, servername: new URL(url).hostname }, (r) => {
  let text = "";
  r.on("data", (d) => (text += d));
  r.on("end", () => {
    console.log(r.statusCode, r.headers["x-netjail-reason"] || null);
    process.stdout.write(text);
  });
});
req.on("error", (e) => console.log("error", e.code));
if (method === "POST") req.write("{}");
req.end();
"""


def command(tool: str, method: str, url: str, *headers: str) -> list[str]:
    """argv that requests ``url`` and prints ``STATUS REASON`` then the body."""
    if tool == "curl":
        fmt = "%{http_code} %header{x-netjail-reason}\n"
        argv = ["curl", "-sS", "--max-time", "20", "-X", method, "-o", "/dev/stderr"]
        argv += [f"-w{fmt}", url, *(x for h in headers for x in ("-H", h))]
        # The body goes to stderr and is appended after the status line by sh.
        return ["sh", "-c", 'out=$("$@" 2>/tmp/body); echo "$out"; cat /tmp/body', "sh", *argv]
    script = {"python": _PYTHON, "node-fetch": _NODE_FETCH, "node-https": _NODE_HTTPS}[tool]
    interpreter = PY if tool == "python" else NODE
    flag = "-c" if tool == "python" else "-e"
    return [interpreter, flag, script, method, url, *headers]


#: How long the daemon waits for a live decision (test_request_decisions sees it run out).
DECISION_TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def intercepting(upstream: Upstream) -> Iterator[Daemon]:
    """A daemon that verifies upstreams against the test CA, and waits DECISION_TIMEOUT_S for
    a live decision."""
    base = tempfile.mkdtemp(prefix="netjail-icpt-", dir="/run")
    os.chmod(base, 0o755)  # noqa: S103 - clients reach the socket
    config = (
        f'[proxy]\nupstream_ca = "{upstream.ca_file}"\n'
        f'[policy]\ndecision_timeout = "{DECISION_TIMEOUT_S:g}s"\n'
    )
    daemon = start_daemon(base, config_extra=config)
    try:
        yield daemon
    finally:
        stop_daemon(daemon)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def client(intercepting: Daemon) -> Client:
    """The module daemon's client (the leak check asks it too)."""
    return intercepting.client()


def run(client: Client, argv: list[str], **options: object) -> JobResult:
    hosts = [f"{API}:{UPSTREAM_ADDR}", "other.example.test:" + UPSTREAM_ADDR, f"{DOWN}:192.0.2.1"]
    return client.run(
        argv,
        add_hosts=hosts,
        stdio="capture",
        cwd="/",
        on_event=lambda e: None,
        **options,  # type: ignore[arg-type]
    )


def status_line(result: JobResult) -> tuple[str, str]:
    """The printed status and reason, and the body after them."""
    out = (result.stdout or b"").decode()
    first, _, body = out.partition("\n")
    return first.strip(), body


def requests_of(result: JobResult) -> list[Event]:
    return [e for e in result.events if e.kind == "http"]


@pytest.mark.parametrize("tool", TOOLS)
def test_intercepted_https_works_with_no_ca_from_the_user(client: Client, tool: str) -> None:
    """The job trusts the job's CA unasked; the request is relayed and reported by method."""
    result = run(client, command(tool, "GET", f"https://{API}/x"), intercept=[API])
    first, body = status_line(result)
    assert first.split()[0] == "200", (result.stdout, result.stderr)
    assert body == f"hello from {API}\n"
    [event] = requests_of(result)
    assert (event.verdict, event.method, event.domain, event.path, event.status) == (
        "allowed",
        "GET",
        API,
        "/x",
        200,
    )
    assert event.bytes_in == len(body)
    # Named while the job checked netjail's certificate (its socket open, waiting).
    assert event.process is not None
    assert event.process.comm == {"curl": "curl", "python": "python3"}.get(tool, "node")
    # The domain summary counts the request as well as the name's DNS answers.
    lookups = sum(e.count for e in result.events if e.kind == "dns" and e.verdict == "allowed")
    assert result.report.domains[API].allowed == lookups + 1


def test_the_system_bundle_path_holds_the_job_ca(client: Client) -> None:
    """Without the variables, curl's default bundle (the system one) still trusts the CA."""
    argv = [
        "env",
        "-u",
        "CURL_CA_BUNDLE",
        "-u",
        "SSL_CERT_FILE",
        *command("curl", "GET", f"https://{API}/"),
    ]
    result = run(client, argv, intercept=[API])
    assert status_line(result)[0].startswith("200"), (result.stdout, result.stderr)


# fetch refuses to set a Host header of its own (a forbidden header name), so it cannot front.
@pytest.mark.parametrize("tool", ["curl", "python", "node-https"])
def test_host_in_tls_fronting_is_blocked(client: Client, upstream: Upstream, tool: str) -> None:
    """SNI api.example.test with Host other.example.test: 403 host_mismatch, never relayed."""
    before = upstream.requests.count("other.example.test")
    argv = command(tool, "GET", f"https://{API}/", "Host: other.example.test")
    result = run(client, argv, intercept=[API])
    first, body = status_line(result)
    assert first.startswith("403 host_mismatch"), (result.stdout, result.stderr)
    assert "other.example.test" in body
    assert upstream.requests.count("other.example.test") == before
    [event] = requests_of(result)
    assert (event.verdict, event.reason) == ("blocked", "host_mismatch")


@pytest.mark.parametrize("tool", TOOLS)
def test_a_request_level_deny_gives_403_with_the_reason(client: Client, tool: str) -> None:
    """--deny-request: 403, X-Netjail-Reason names the rule; other paths go through."""
    rule = f"GET {API}/admin*"
    script = command(tool, "GET", f"https://{API}/admin/users")
    result = run(client, script, deny_requests=[rule])
    first, _ = status_line(result)
    assert first.startswith("403 deny_request: --deny-request GET api.example.test/admin*"), (
        result.stdout,
        result.stderr,
    )
    [event] = requests_of(result)
    assert (event.verdict, event.status, event.path) == ("blocked", 403, "/admin/users")
    assert result.report.domains[API].blocked == 1


def test_allow_request_denies_what_it_does_not_list(client: Client) -> None:
    """With an --allow-request for a host, its other requests get 403 not_allowed_request."""
    script = f"""
import urllib.request, urllib.error
for path in ("/v1/ok", "/v2/no"):
    try:
        r = urllib.request.urlopen("https://{API}" + path, timeout=20)
    except urllib.error.HTTPError as e:
        r = e
    print(path, r.status, r.headers.get("x-netjail-reason"))
"""
    result = run(client, [PY, "-c", script], allow_requests=[f"GET {API}/v1/*"])
    lines = (result.stdout or b"").decode().splitlines()
    assert lines == [
        "/v1/ok 200 None",
        "/v2/no 403 not_allowed_request: no --allow-request matches",
    ]


@pytest.mark.parametrize("tool", TOOLS)
def test_redaction_removes_a_live_key_from_a_response(client: Client, tool: str) -> None:
    """--redact NAME:@secrets: the sk_live_ key and the card number are gone from the body."""
    result = run(client, command(tool, "GET", f"https://{API}/secret"), redact=[f"{API}:@secrets"])
    first, body = status_line(result)
    assert first.startswith("200"), (result.stdout, result.stderr)
    assert body == "key=[REDACTED] card=[REDACTED] ok\n"
    assert SECRET_KEY not in (result.stdout or b"").decode()


def test_redaction_decodes_gzip_and_covers_headers(client: Client) -> None:
    """A gzip body is decoded, redacted and sent plain; a header holding the key is redacted."""
    argv = ["curl", "-sS", "--max-time", "20", "-i", "-H", "Accept-Encoding: gzip"]
    argv.append(f"https://{API}/secret.gz")
    result = run(client, argv, redact=[f"{API}:@secrets"])
    out = (result.stdout or b"").decode(errors="replace")
    assert "key=[REDACTED] card=[REDACTED] ok" in out, (out, result.stderr)
    assert SECRET_KEY not in out
    assert "x-echo-key: [REDACTED]" in out.replace("X-Echo-Key", "x-echo-key")


@pytest.mark.parametrize("tool", TOOLS)
def test_a_mock_answers_with_the_upstream_unreachable(client: Client, tool: str) -> None:
    """--mock answers without contacting the upstream (whose address answers nothing)."""
    mock = f'POST {DOWN}/v1/customers=201:{{"id":"cus_mock"}}'
    result = run(client, command(tool, "POST", f"https://{DOWN}/v1/customers"), mocks=[mock])
    first, body = status_line(result)
    assert first.split()[0] == "201", (result.stdout, result.stderr)
    assert json.loads(body) == {"id": "cus_mock"}
    [event] = requests_of(result)
    assert (event.verdict, event.method, event.path, event.status) == (
        "mocked",
        "POST",
        "/v1/customers",
        201,
    )
    assert result.report.domains[DOWN].mocked == 1


@pytest.mark.parametrize("tool", TOOLS)
def test_an_injected_header_reaches_the_upstream_and_not_the_job(
    client: Client, upstream: Upstream, tool: str
) -> None:
    """--inject-header: the upstream gets the header; the job's env and files never hold it."""
    secret = f"injected-{tool}-7f3a9c"
    probe = f"! grep -rqs {secret} /proc/self/environ /etc/ssl /run /home/job /tmp"
    argv = ["sh", "-c", f'{probe} || echo LEAKED; exec "$@"', "sh"]
    argv += command(tool, "GET", f"https://{API}/headers", "X-Api-Key: placeholder")
    result = run(client, argv, inject_headers=[f"{API}:X-Api-Key={secret}"])
    first, _ = status_line(result)
    assert first.startswith("200"), (result.stdout, result.stderr)
    assert b"LEAKED" not in (result.stdout or b"")
    seen = [h for h in upstream.headers if h.get("x-api-key") == secret]
    assert len(seen) == 1
    assert not any(h.get("x-api-key") == "placeholder" for h in upstream.headers)


def test_keep_alive_requests_are_each_checked(client: Client) -> None:
    """Two requests on one connection: each is decided and reported on its own."""
    script = f"""
import http.client, ssl
c = http.client.HTTPSConnection("{API}", context=ssl.create_default_context(), timeout=20)
for path in ("/a", "/admin"):
    c.request("GET", path)
    r = c.getresponse()
    r.read()
    print(path, r.status)
"""
    result = run(client, [PY, "-c", script], deny_requests=[f"GET {API}/admin"])
    assert (result.stdout or b"").decode().splitlines() == ["/a 200", "/admin 403"], result.stderr
    assert [(e.path, e.verdict) for e in requests_of(result)] == [
        ("/a", "allowed"),
        ("/admin", "blocked"),
    ]


def test_plain_http_to_an_intercepted_name_is_checked_too(client: Client) -> None:
    """An http:// request to an intercepted name is decided like an https:// one."""
    result = run(
        client, command("curl", "GET", f"http://{API}/admin"), deny_requests=[f"GET {API}/admin"]
    )
    assert status_line(result)[0].startswith("403 deny_request"), (result.stdout, result.stderr)


def test_quic_is_refused_at_once_so_clients_fall_back_to_tcp(client: Client) -> None:
    """UDP to an intercepted name's port 443 gets an immediate error, and a blocked event."""
    script = f"""
import socket
address = socket.getaddrinfo("{API}", 443, socket.AF_INET)[0][4][0]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.connect((address, 443))
try:
    s.send(b"\\xc0QUIC initial")
    s.recv(100)
    print("answered")
except TimeoutError:
    print("timeout")
except OSError as e:
    print("refused", e.errno)
"""
    result = run(client, [PY, "-c", script], intercept=[API])
    out = (result.stdout or b"").decode()
    assert out.startswith("refused"), (out, result.stderr)
    assert any(
        e.kind == "egress" and e.proto == "udp" and e.port == 443 and e.verdict == "blocked"
        for e in result.events
    )


def test_pip_downloads_through_interception(client: Client) -> None:
    """pip, given only an index URL, fetches a wheel from an intercepted HTTPS index."""
    argv = [PY, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "-q", "-d", "/tmp/w"]
    argv += ["--index-url", f"https://{API}/simple", "nj-demo"]
    result = run(client, ["sh", "-c", '"$@" && ls /tmp/w', "sh", *argv], intercept=[API])
    assert result.exit_code == 0, result.stderr
    assert (result.stdout or b"").decode().split() == ["nj_demo-1.0-py3-none-any.whl"]
    paths = [e.path for e in requests_of(result)]
    assert "/simple/nj-demo/" in paths
    assert "/files/nj_demo-1.0-py3-none-any.whl" in paths


def test_npm_installs_through_interception(client: Client) -> None:
    """npm, given only a registry URL, installs a package from an intercepted registry."""
    argv = ["npm", "install", "--no-audit", "--no-fund", "--prefix", "/tmp/n"]
    argv += ["--registry", f"https://{API}/", "nj-demo"]
    script = '"$@" >/dev/null && node -p "require(\'/tmp/n/node_modules/nj-demo\')"'
    result = run(client, ["sh", "-c", script, "sh", *argv], intercept=[API])
    assert result.exit_code == 0, result.stderr
    assert (result.stdout or b"").decode().strip() == "42"
    assert "/nj-demo/-/nj-demo-1.0.0.tgz" in [e.path for e in requests_of(result)]


def test_a_tcp_rule_does_not_switch_off_the_request_rules_of_an_intercepted_name(
    client: Client,
) -> None:
    """--allow tcp://NAME:443 with --intercept NAME still has every request decided."""
    argv = command("curl", "GET", f"https://{API}/secret")
    result = run(
        client, argv, intercept=[API], allow=[f"tcp://{API}:443"], deny_requests=[f"GET {API}/*"]
    )
    assert status_line(result)[0].startswith("403 deny_request"), (result.stdout, result.stderr)


def test_plain_http_never_carries_an_injected_header(client: Client, upstream: Upstream) -> None:
    """http:// to a host with --inject-header is 403 inject_needs_tls; the header is not sent."""
    before = len(upstream.headers)
    argv = command("curl", "GET", f"http://{API}/x")
    result = run(client, argv, inject_headers=[f"{API}:X-Vault-Token=s3cret-9d2e"])
    assert status_line(result)[0].startswith("403 inject_needs_tls"), (result.stdout, result.stderr)
    assert not any(h.get("x-vault-token") for h in upstream.headers[before:])


def test_a_job_that_refuses_netjail_s_certificate_is_blocked_and_named(
    client: Client, upstream: Upstream
) -> None:
    """A client that trusts only another CA (as a pinning one would) ends the handshake: the
    connection is a blocked tls_refused event, naming the process that refused it."""
    argv = ["curl", "-sS", "--max-time", "20", "--cacert", upstream.ca_file, f"https://{API}/"]
    result = run(client, argv, intercept=[API], binds=[upstream.ca_bind])
    assert result.exit_code != 0
    [event] = [e for e in result.events if e.reason == "tls_refused"]
    assert (event.kind, event.verdict, event.domain) == ("egress", "blocked", API)
    assert event.process is not None
    assert event.process.comm == "curl"
