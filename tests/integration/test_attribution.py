"""Each egress event names the process of the job that sent it: its pid, comm, exe and argv."""

from __future__ import annotations

import pytest

from netjail import Client, Event, JobResult

from .conftest import Daemon
from .upstream import UPSTREAM_ADDR, Upstream

pytestmark = pytest.mark.usefixtures("no_leaks")

PY = "/usr/bin/python3"
#: A UDP datagram that the job's python3 sends to a blocked documentation address, holding its
#: socket open a moment after (as a client waiting for an answer would).
PY_SENDTO = (
    "import socket, time\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "s.sendto(b'x', ('192.0.2.10', 9))\n"
    "time.sleep(1)\n"
)
#: curl's TFTP client: a UDP request to a blocked documentation address, then it waits.
CURL_TFTP = "curl -s --max-time 1 tftp://198.51.100.10/file"


def run(client: Client, argv: list[str], **kwargs: object) -> JobResult:
    return client.run(argv, stdio="capture", cwd="/", on_event=lambda e: None, **kwargs)  # type: ignore[arg-type]


def event_to(result: JobResult, dst: str) -> Event:
    [event] = [e for e in result.events if e.dst == dst]
    return event


def test_two_binaries_in_one_job_are_each_named(client: Client) -> None:
    """python3 and curl in one job, each sending to its own blocked address: each event names
    its own process (pid in the job's namespace, comm, exe, argv)."""
    script = f'{PY} -c "$0" & {CURL_TFTP} & wait'
    result = run(client, ["sh", "-c", script, PY_SENDTO])
    by_python = event_to(result, "192.0.2.10")
    by_curl = event_to(result, "198.51.100.10")
    assert by_python.verdict == by_curl.verdict == "blocked"
    assert by_python.process is not None, result.events
    assert by_curl.process is not None, result.events
    assert (by_python.process.comm, by_python.process.exe) == ("python3", "/usr/bin/python3.11")
    assert by_python.process.argv[:2] == [PY, "-c"]
    assert (by_curl.process.comm, by_curl.process.exe) == ("curl", "/usr/bin/curl")
    assert by_curl.process.argv[-1] == "tftp://198.51.100.10/file"
    # Pids as the job sees them: small, distinct, and neither is the job's init (1).
    assert 1 < by_python.process.pid < 100
    assert 1 < by_curl.process.pid < 100
    assert by_python.process.pid != by_curl.process.pid


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
