"""The name check tried as an attacker would (issue 11): each bypass is blocked and reported.

The job is allowed api.example.test only, and tries to reach other hosts behind the same
upstream server (in a test netns, see upstream.py) by every trick that used to pass the check:
a silence, lax HTTP forms, the h2c preface, CONNECT after CRLF, a TLS record that is not a
handshake; and, on the upstream side, names resolving into ranges no rule opens on that port.
"""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator

import pytest

from netjail import Client, Event, JobResult

from .test_policy import API, PY, by_kind, run
from .upstream import Upstream

pytestmark = pytest.mark.usefixtures("no_leaks")

#: Connects to argv[1]:argv[2], waits argv[3] seconds, sends the bytes argv[4] (hex), closes
#: its side if argv[5] is "shut", and prints what came back: "reset", "closed" or "got N".
SEND = """\
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
time.sleep(float(sys.argv[3]))
s.sendall(bytes.fromhex(sys.argv[4]))
if sys.argv[5] == "shut":
    s.shutdown(socket.SHUT_WR)
try:
    data = s.recv(65536)
    print(f"got {len(data)}" if data else "closed")
except ConnectionResetError:
    print("reset")
"""

ATTACKER = "other.example.test"


def send(
    client: Client,
    upstream: Upstream,
    data: bytes,
    *,
    port: int = 80,
    wait_s: float = 0,
    shut: bool = False,
    allow: list[str] | None = None,
) -> JobResult:
    argv = [PY, "-c", SEND, API, str(port), str(wait_s), data.hex(), "shut" if shut else "keep"]
    return run(client, upstream, argv, allow if allow is not None else [API])


def blocked_connection(result: JobResult) -> Event:
    """The one proxied connection of the job, checked to be blocked and counted by name."""
    [conn] = by_kind(result, "egress", "proxy")
    assert (conn.verdict, conn.domain) == ("blocked", API)
    assert result.report.domains[API].blocked >= 1
    assert result.report.domains[API].bytes_in == 0
    return conn


def test_silence_then_a_client_hello_for_another_name_is_blocked(
    client: Client, upstream: Upstream
) -> None:
    """2.5 s of silence, then a ClientHello for other.example.test: still checked, sni_mismatch."""
    code = (
        "import socket, ssl, time\n"
        f"s = socket.create_connection(('{API}', 443), timeout=20)\n"
        "time.sleep(2.5)\n"
        "context = ssl.create_default_context()\n"
        "context.check_hostname = False\n"
        "context.verify_mode = ssl.CERT_NONE\n"
        "try:\n"
        f"    context.wrap_socket(s, server_hostname='{ATTACKER}')\n"
        "    print('handshake')\n"
        "except OSError:\n"
        "    print('refused')\n"
    )
    result = run(client, upstream, [PY, "-c", code], [API])
    assert result.stdout == b"refused\n", result.stderr
    assert blocked_connection(result).reason == "sni_mismatch"
    assert ATTACKER not in upstream.requests


def test_nothing_complete_before_the_close_is_no_hello(client: Client, upstream: Upstream) -> None:
    """Half a ClientHello and the job's side closed: no_hello, and nothing is relayed."""
    result = send(client, upstream, bytes([0x16, 3, 1, 0, 200, 1]), port=443, shut=True)
    assert result.stdout in (b"reset\n", b"closed\n"), result.stderr
    assert blocked_connection(result).reason == "no_hello"


LAX = {
    "leading-crlf": b"\r\nGET / HTTP/1.1\r\nHost: other.example.test\r\n\r\n",
    "double-space": b"GET  / HTTP/1.1\r\nHost: other.example.test\r\n\r\n",
    "tabs": b"GET\t/\tHTTP/1.1\r\nHost: other.example.test\r\n\r\n",
    "http-1.2": b"GET / HTTP/1.2\r\nHost: other.example.test\r\n\r\n",
    "lowercase-version": b"GET / http/1.1\r\nHost: other.example.test\r\n\r\n",
    "bare-lf": b"GET / HTTP/1.1\nHost: other.example.test\n\n",
    "crlf-connect": (
        b"\r\nCONNECT other.example.test:80 HTTP/1.1\r\nHost: other.example.test:80\r\n\r\n"
        b"GET / HTTP/1.1\r\nHost: other.example.test\r\n\r\n"
    ),
    "tls-record-first": (
        b"\x17\x03\x03\x00\x05hello" + b"GET / HTTP/1.1\r\nHost: other.example.test\r\n\r\n"
    ),
}


@pytest.mark.parametrize("data", LAX.values(), ids=LAX.keys())
def test_lax_openings_are_blocked_as_unparsed(
    client: Client, upstream: Upstream, data: bytes
) -> None:
    """Each form a lenient server would take for a request to other.example.test: unparsed."""
    result = send(client, upstream, data)
    assert result.stdout == b"reset\n", result.stderr
    assert blocked_connection(result).reason == "unparsed"
    assert ATTACKER not in upstream.requests


H2C = {
    "preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "upgrade": (
        f"GET / HTTP/1.1\r\nHost: {API}\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        "Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
    ).encode(),
}


@pytest.mark.parametrize("data", H2C.values(), ids=H2C.keys())
def test_h2c_is_refused(client: Client, upstream: Upstream, data: bytes) -> None:
    """HTTP/2 in cleartext, by preface or by Upgrade, is refused: h2c_refused."""
    result = send(client, upstream, data)
    assert result.stdout == b"reset\n", result.stderr
    assert blocked_connection(result).reason == "h2c_refused"


def test_other_protocols_need_a_tcp_rule(client: Client, upstream: Upstream) -> None:
    """An SSH greeting to a port a name rule allows is unparsed: such a port needs tcp://."""
    result = send(client, upstream, b"SSH-2.0-OpenSSH_9.2p1\r\n", port=8080, allow=[f"{API}:8080"])
    assert result.stdout == b"reset\n", result.stderr
    assert blocked_connection(result).reason == "unparsed"


def test_a_tcp_rule_relays_unchecked_and_says_so(client: Client, upstream: Upstream) -> None:
    """With tcp://api.example.test:8080 the bytes go as they are; the event says unverified."""
    request = b"GET / HTTP/1.1\r\nHost: raw.example.test\r\nConnection: close\r\n\r\n"
    result = send(client, upstream, request, port=8080, allow=[f"tcp://{API}:8080"])
    assert result.stdout is not None
    assert result.stdout.startswith(b"got "), result.stderr
    [conn] = by_kind(result, "egress", "proxy")
    assert (conn.verdict, conn.domain, conn.port, conn.reason) == (
        "allowed",
        API,
        8080,
        "unverified",
    )
    assert "raw.example.test" in upstream.requests
    assert result.report.domains[API].allowed >= 1


@contextlib.contextmanager
def loopback_http_server() -> Iterator[int]:
    """An HTTP server on the host's 127.0.0.1 (where the proxy connects from), on a free port."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"hello from the host\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# loopback.example.test is 127.0.0.1 in the suite daemon's [hosts] table (conftest.TEST_CONFIG).
LOOPBACK = "loopback.example.test"


def test_a_cidr_rule_opens_only_its_port(client: Client) -> None:
    """127.0.0.1/32:PORT lets a name resolving there through on PORT, not on 80."""
    with loopback_http_server() as port:
        code = (
            "import urllib.request\n"
            f"print(urllib.request.urlopen('http://{LOOPBACK}:{port}/', timeout=20).read())\n"
            "try:\n"
            f"    urllib.request.urlopen('http://{LOOPBACK}/', timeout=20)\n"
            "except OSError:\n"
            "    print('refused')\n"
        )
        result = client.run(
            [PY, "-c", code],
            allow=[f"{LOOPBACK}:80,{port}", f"127.0.0.1/32:{port}"],
            stdio="capture",
            cwd="/",
            on_event=lambda e: None,
        )
    assert result.stdout == b"b'hello from the host\\n'\nrefused\n", result.stderr
    verdicts = sorted((e.port, e.verdict, e.reason) for e in by_kind(result, "egress", "proxy"))
    assert verdicts == [(80, "blocked", "upstream_forbidden"), (port, "allowed", None)]
    assert result.report.domains[LOOPBACK].blocked >= 1


def test_upstream_forbidden_names_the_address_and_the_fix(client: Client) -> None:
    """upstream_forbidden says which address was refused, why, and the fix (Event.detail)."""
    result = client.run(
        ["curl", "-sS", "--max-time", "20", "http://metadata.example.test/"],
        allow=["metadata.example.test"],
        stdio="capture",
        cwd="/",
        on_event=lambda e: None,
    )
    [conn] = by_kind(result, "egress", "proxy")
    assert (conn.verdict, conn.reason) == ("blocked", "upstream_forbidden")
    assert result.report.domains["metadata.example.test"].blocked >= 1
    assert conn.detail == (
        "metadata.example.test is 169.254.169.254, the cloud metadata address, in the"
        " daemon's [hosts] table; if that is intended:"
        " --add-host metadata.example.test:169.254.169.254"
    )
