"""Each egress event names the process of the job that sent it: its pid, comm, exe and argv."""

from __future__ import annotations

import time

import pytest

from netjail import Client, JobResult

from .conftest import Daemon
from .upstream import UPSTREAM_ADDR, Upstream

pytestmark = pytest.mark.usefixtures("no_leaks")

PY = "/usr/bin/python3"
#: Allowed on 443 only: the stub answers them, and a connection to port 80 is the proxy's to
#: block. One each, so that the two refusals are not folded into one event.
PY_NAME = "py.example.test"
CURL_NAME = "curl.example.test"
#: python3 sends a UDP datagram to a blocked documentation address (sendto fails with EPERM,
#: the REJECT), then tries port 80 of the name; it keeps its sockets open a moment after, as a
#: client that handles the error and goes on would.
PY_SCRIPT = (
    "import socket, time\n"
    "u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "try: u.sendto(b'x', ('192.0.2.10', 9))\n"
    "except OSError: pass\n"
    "t = socket.socket()\n"
    f"try: t.connect(('{PY_NAME}', 80)); t.recv(1)\n"
    "except OSError: pass\n"
    "time.sleep(0.5)\n"
)
CURL = f"curl -s --max-time 5 http://{CURL_NAME}:80/from-curl"


def run(client: Client, argv: list[str], **kwargs: object) -> JobResult:
    return client.run(argv, stdio="capture", cwd="/", on_event=lambda e: None, **kwargs)  # type: ignore[arg-type]


def test_two_binaries_in_one_job_are_each_named(client: Client) -> None:
    """python3 and curl in one job, each blocked: the logged datagram and both refused
    connections each name their own process (pid in the job's namespace, comm, exe, argv)."""
    script = f'{PY} -c "$0" & {CURL}; wait'
    allow = [f"{PY_NAME}:443", f"{CURL_NAME}:443"]
    result = run(client, ["sh", "-c", script, PY_SCRIPT], allow=allow)
    [datagram] = [e for e in result.events if e.dst == "192.0.2.10"]
    proxied = [e for e in result.events if e.via == "proxy"]
    assert datagram.verdict == "blocked"
    assert datagram.process is not None, result.events
    assert (datagram.process.comm, datagram.process.exe) == ("python3", "/usr/bin/python3.11")
    assert datagram.process.argv[:2] == [PY, "-c"]
    senders = {}
    for event in proxied:
        assert (event.verdict, event.reason, event.port) == ("blocked", "port_not_allowed", 80)
        assert event.process is not None, result.events
        senders[event.process.comm] = event.process
    assert set(senders) == {"python3", "curl"}, proxied
    assert senders["curl"].exe == "/usr/bin/curl"
    assert senders["curl"].argv[-1] == f"http://{CURL_NAME}:80/from-curl"
    assert senders["python3"].pid == datagram.process.pid
    # Pids as the job sees them: small and distinct, and neither is the job's init (1).
    assert 1 < senders["python3"].pid < 100
    assert 1 < senders["curl"].pid < 100
    assert senders["python3"].pid != senders["curl"].pid


def test_dns_queries_name_the_asking_process(client: Client) -> None:
    """A blocked name looked up by python3 and another by curl: each query names its asker."""
    getaddrinfo = (
        "import socket\ntry: socket.getaddrinfo('py.example.test', 80)\nexcept OSError: pass"
    )
    lookup = f'{PY} -c "{getaddrinfo}"'
    curl = "curl -s --max-time 2 http://curl.example.test/"
    result = run(client, ["sh", "-c", f"{lookup}; {curl}; true"])
    queries = [e for e in result.events if e.kind == "dns" and e.via == "dns"]
    names = {(e.domain, e.process.comm if e.process else None) for e in queries}
    assert ("py.example.test", "python3") in names, queries
    assert ("curl.example.test", "curl") in names, queries


def test_proxied_connection_names_its_process(
    client: Client, daemon: Daemon, upstream: Upstream
) -> None:
    """A connection through the proxy, allowed and relayed, names the curl that made it."""
    name = "api.example.test"
    result = run(
        client,
        ["curl", "-sS", "--max-time", "10", f"http://{name}/x"],
        allow=[name],
        add_hosts=[f"{name}:{UPSTREAM_ADDR}"],
    )
    assert result.exit_code == 0, result.stderr
    [conn] = [e for e in result.events if e.via == "proxy"]
    assert conn.verdict == "allowed"
    assert conn.process is not None
    assert (conn.process.comm, conn.process.pid) == ("curl", 2)


def test_a_logged_datagram_is_named_with_every_log_backend(backend_daemon: Daemon) -> None:
    """NFLOG and the kernel log both give the datagram's source, so each backend names its
    sender (the iptables and kmsg daemons as well as the default)."""
    hold = (
        "import socket, time\n"
        "u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "try: u.sendto(b'x', ('198.51.100.20', 9))\n"
        "except OSError: pass\n"
        "time.sleep(0.5)\n"
    )
    client = backend_daemon.client()
    result = run(client, [PY, "-c", hold])
    [datagram] = [e for e in result.events if e.dst == "198.51.100.20"]
    assert datagram.process is not None, result.events
    assert (datagram.process.comm, datagram.process.pid) == ("python3", 2)
    # The leak check waits for the suite's daemon only: wait here until this one tore it down.
    deadline = time.monotonic() + 10
    while client.ps() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert client.ps() == []
