"""The metrics endpoint of a real daemon, scraped after real jobs; and a port in use at start."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from netjail import Client, JobResult

from .conftest import Daemon, launch_daemon, note_stopped, start_daemon, stop_daemon
from .upstream import UPSTREAM_ADDR, Upstream

PY = "/usr/bin/python3"
NAME = "api.example.test"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def metrics_daemon() -> Iterator[tuple[Daemon, int]]:
    """A netjaild of its own (so the counts are this module's alone) that serves metrics."""
    base = tempfile.mkdtemp(prefix="netjail-test-metrics-", dir="/run")
    os.chmod(base, 0o755)  # noqa: S103 - the socket's directory must be reachable
    port = free_port()
    daemon = start_daemon(base, config_extra=f'metrics_listen = "127.0.0.1:{port}"\n')
    try:
        yield daemon, port
    finally:
        stop_daemon(daemon)
        daemon.job_ids()  # read before the log goes with the directory
        shutil.rmtree(base, ignore_errors=True)
    assert daemon.process.returncode == 0, daemon.log()


@pytest.fixture
def client(metrics_daemon: tuple[Daemon, int]) -> Client:
    """The leak check and the jobs use the metrics daemon."""
    return metrics_daemon[0].client()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as answer:
        text = answer.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def run(client: Client, argv: list[str], **kwargs: object) -> JobResult:
    return client.run(argv, stdio="capture", cwd="/", on_event=lambda e: None, **kwargs)  # type: ignore[arg-type]


@pytest.mark.usefixtures("no_leaks")
def test_a_scrape_counts_the_jobs_their_outcomes_events_and_proxied_bytes(
    client: Client, metrics_daemon: tuple[Daemon, int], upstream: Upstream
) -> None:
    """After four jobs: started and ended by outcome, none running, start latencies observed,
    blocked and allowed events by kind, the proxied connection and its bytes; the self-test's
    probe is not counted."""
    port = metrics_daemon[1]
    assert scrape(port)[("netjail_jobs_started_total", ())] == 0
    assert run(client, ["true"]).exit_code == 0
    assert run(client, ["false"]).exit_code == 1
    assert run(client, ["sh", "-c", "kill -9 $$"]).signal == 9
    connect = (
        "import socket\ntry: socket.create_connection(('203.0.113.9', 80))\nexcept OSError: pass"
    )
    blocked = f'{PY} -c "{connect}"'
    fetch = f"curl -sS --max-time 10 http://{NAME}/x"
    result = run(
        client,
        ["sh", "-c", f"{blocked}; {fetch}"],
        allow=[NAME],
        add_hosts=[f"{NAME}:{UPSTREAM_ADDR}"],
    )
    assert result.exit_code == 0, result.stderr
    [proxied] = [e for e in result.events if e.via == "proxy"]
    seen = scrape(port)
    assert seen[("netjail_jobs_started_total", ())] == 4
    assert seen[("netjail_job_start_failures_total", ())] == 0
    assert seen[("netjail_jobs_ended_total", (("outcome", "exited"),))] == 2
    assert seen[("netjail_jobs_ended_total", (("outcome", "failed"),))] == 1
    assert seen[("netjail_jobs_ended_total", (("outcome", "signaled"),))] == 1
    assert seen[("netjail_job_start_seconds_count", ())] == 4
    assert 0 < seen[("netjail_job_start_seconds_sum", ())] < 20
    assert seen[("netjail_events_total", (("kind", "egress"), ("verdict", "blocked")))] >= 1
    assert seen[("netjail_events_total", (("kind", "dns"), ("verdict", "allowed")))] >= 1
    assert seen[("netjail_proxy_connections_total", (("verdict", "allowed"),))] == 1
    assert seen[("netjail_proxy_bytes_total", (("direction", "out"),))] == proxied.bytes_out
    assert seen[("netjail_proxy_bytes_total", (("direction", "in"),))] == proxied.bytes_in
    assert seen[("netjail_events_lost_total", ())] == 0
    # The REJECTed TCP connect is over before its sender can be looked up.
    assert seen[("netjail_events_unattributed_total", (("reason", "gone"),))] >= 1
    # The warm pool (jail.pool_size, 4 by default): between none ready (all being rebuilt) and 4.
    assert 0 <= seen[("netjail_pool_size", ())] <= 4


def test_a_metrics_port_in_use_stops_the_start_with_a_clear_error() -> None:
    """A daemon whose metrics_listen is taken exits 1 and says which address, and why."""
    base = tempfile.mkdtemp(prefix="netjail-test-metrics-busy-", dir="/run")
    os.chmod(base, 0o755)  # noqa: S103 - as above
    try:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            daemon = launch_daemon(base, config_extra=f'metrics_listen = "127.0.0.1:{port}"\n')
            assert daemon.process.wait(30) == 1
        note_stopped(daemon)
        assert (
            f"netjaild: listen for metrics on 127.0.0.1:{port} (metrics_listen): "
            "Address already in use"
        ) in daemon.log()
    finally:
        shutil.rmtree(base, ignore_errors=True)
