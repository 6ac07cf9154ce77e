"""Test upstream servers: HTTP and HTTPS in a network namespace the tests create.

The namespace is linked to the host (where netjaild's proxy connects from) by a veth pair on a
/30 of a documentation range, checked to be unused on this host first (a CI machine's own
interfaces may well sit in a documentation range: this one's eth0 does). The servers' sockets
are made by a thread that entered the namespace, so they live there; they answer every request
with "hello from <Host>".
"""

from __future__ import annotations

import contextlib
import gzip
import http.server
import ipaddress
import json
import os
import secrets
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from netjail.kernel import syscalls
from netjail.protocol import BindMount

from .packageindex import index_response

LINK = ipaddress.ip_network("198.51.100.248/30")
HOST_ADDR = str(LINK[1])
UPSTREAM_ADDR = str(LINK[2])
NAMES = ["api.example.test", "a.example.test", "other.example.test", "example.test"]


@dataclass
class Upstream:
    netns: str
    address: str
    #: The test CA's certificate: a host file, so a job sees it only through ``ca_bind``.
    ca_file: str
    requests: list[str]
    #: The headers of every GET (names in lower case), in order.
    headers: list[dict[str, str]]

    @property
    def ca_bind(self) -> BindMount:
        """The CA certificate, bound read-only at its own path in the job."""
        return BindMount(source=self.ca_file, access="ro")


#: What GET /secret answers: a body and a header holding a Stripe-shaped live key.
SECRET_KEY = "sk_live_4eC39HqLyjWDarjtT1zdp7dc"  # noqa: S105 - a made-up key, to be redacted


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.server.requests.append(self.headers.get("Host", "?"))  # type: ignore[attr-defined]
        seen = {name.lower(): value for name, value in self.headers.items()}
        self.server.headers.append(seen)  # type: ignore[attr-defined]
        extra: dict[str, str] = {}
        package = index_response(self.path, self.headers.get("Host", "?"))
        if package is not None:
            body, extra["Content-Type"] = package
        elif self.path.startswith("/secret"):
            body = f"key={SECRET_KEY} card=4242 4242 4242 4242 ok\n".encode()
            extra["X-Echo-Key"] = SECRET_KEY
            if self.path == "/secret.gz":
                body = gzip.compress(body)
                extra["Content-Encoding"] = "gzip"
        elif self.path.startswith("/big"):
            body = b"x" * int(self.path.removeprefix("/big/") or "0")
        else:
            body = f"hello from {self.headers.get('Host', '?')}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        for name, value in extra.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        remaining = length
        while remaining:
            remaining -= len(self.rfile.read(min(remaining, 1 << 16)))
        body = f"got {length}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def assert_link_unused() -> None:
    """Refuse to run if any host address or route overlaps the test link (never clobber it)."""
    addresses = json.loads(
        subprocess.run(["ip", "-j", "addr"], capture_output=True, check=True).stdout
    )
    for link in addresses:
        for info in link.get("addr_info", []):
            net = ipaddress.ip_network(f"{info['local']}/{info['prefixlen']}", strict=False)
            if net.version == 4 and net.overlaps(LINK):
                raise RuntimeError(f"test link {LINK} overlaps {net} on {link['ifname']}")
    routes = json.loads(
        subprocess.run(["ip", "-j", "route"], capture_output=True, check=True).stdout
    )
    for route in routes:
        if route["dst"] != "default" and ipaddress.ip_network(route["dst"], strict=False).overlaps(
            LINK
        ):
            raise RuntimeError(f"test link {LINK} overlaps the route {route['dst']}")


def make_certificates(directory: str) -> tuple[str, str, str]:
    """A test CA and a server certificate for NAMES (and *.example.test)."""
    ca_key, ca = f"{directory}/ca.key", f"{directory}/ca.pem"
    key, csr, cert = f"{directory}/server.key", f"{directory}/server.csr", f"{directory}/server.pem"
    ext = f"{directory}/ext.cnf"

    def run(*argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True)

    run(
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=netjail test CA",
        "-keyout",
        ca_key,
        "-out",
        ca,
    )
    run(
        "openssl",
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=api.example.test",
        "-keyout",
        key,
        "-out",
        csr,
    )
    with open(ext, "w") as f:
        f.write("subjectAltName=" + ",".join(f"DNS:{n}" for n in [*NAMES, "*.example.test"]) + "\n")
    run(
        "openssl",
        "x509",
        "-req",
        "-in",
        csr,
        "-CA",
        ca,
        "-CAkey",
        ca_key,
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        ext,
        "-out",
        cert,
    )
    os.chmod(ca, 0o644)  # jobs read it (through a bind) as their own uid
    return ca, cert, key


@contextlib.contextmanager
def upstream_servers(directory: str) -> Iterator[Upstream]:
    """HTTP on :80 and :8080, HTTPS on :443 and :8443, in a fresh netns linked to the host."""
    assert_link_unused()
    name = f"njtest-up-{secrets.token_hex(3)}"
    host_if, peer_if = f"njh{secrets.token_hex(2)}", "njup0"
    ca, cert, key = make_certificates(directory)
    subprocess.run(["ip", "netns", "add", name], check=True)
    servers: list[http.server.ThreadingHTTPServer] = []
    requests: list[str] = []
    headers: list[dict[str, str]] = []
    try:
        subprocess.run(
            ["ip", "link", "add", host_if, "type", "veth", "peer", "name", peer_if, "netns", name],
            check=True,
        )
        subprocess.run(["ip", "addr", "add", f"{HOST_ADDR}/30", "dev", host_if], check=True)
        subprocess.run(["ip", "link", "set", host_if, "up"], check=True)
        for args in (
            ["addr", "add", f"{UPSTREAM_ADDR}/30", "dev", peer_if],
            ["link", "set", peer_if, "up"],
            ["link", "set", "lo", "up"],
        ):
            subprocess.run(["ip", "-n", name, *args], check=True)

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        ready = threading.Event()
        failure: list[BaseException] = []

        def make_servers() -> None:
            try:
                fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
                syscalls.setns(fd, syscalls.CLONE_NEWNET)  # this thread only
                os.close(fd)
                for port, tls in ((80, False), (8080, False), (443, True), (8443, True)):
                    server = http.server.ThreadingHTTPServer((UPSTREAM_ADDR, port), _Handler)
                    server.requests = requests  # type: ignore[attr-defined]
                    server.headers = headers  # type: ignore[attr-defined]
                    if tls:
                        server.socket = context.wrap_socket(server.socket, server_side=True)
                    servers.append(server)
            except BaseException as e:
                failure.append(e)
            finally:
                ready.set()

        # A thread of its own enters the namespace, so no test thread ever changes netns.
        maker = threading.Thread(target=make_servers)
        maker.start()
        ready.wait(10)
        maker.join()
        if failure:
            raise failure[0]
        for server in servers:
            threading.Thread(target=server.serve_forever, daemon=True).start()
        yield Upstream(
            netns=name, address=UPSTREAM_ADDR, ca_file=ca, requests=requests, headers=headers
        )
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
        subprocess.run(["ip", "netns", "del", name], check=False)
        subprocess.run(["ip", "link", "del", host_if], check=False, capture_output=True)
