"""Metrics: what is counted, what is read at scrape time, the endpoint, and its config keys."""

from __future__ import annotations

import ipaddress
import socket
import urllib.request

import msgspec
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from netjail.daemon.config import parse_config
from netjail.daemon.configvalues import ListenAddress
from netjail.daemon.metrics import DaemonState, Metrics, MetricsServer, outcome_of
from netjail.errors import ConfigError
from netjail.protocol import Event, Report

from .daemonfakes import egress_event

LOOPBACK = ipaddress.IPv4Address("127.0.0.1")


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, by name and labels."""
    text = generate_latest(metrics.registry).decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def event(**fields: object) -> Event:
    """A blocked NFLOG attempt, with ``fields`` changed."""
    return msgspec.structs.replace(egress_event(443), **fields)


def report(**fields: object) -> Report:
    base: dict[str, object] = {
        "job": "j-1",
        "argv": ["true"],
        "uid": 1,
        "gid": 1,
        "exit_code": 0,
        "signal": None,
        "wall_s": 0.1,
        "events": [],
        "lost_events": 0,
    }
    return Report(**(base | fields))  # type: ignore[arg-type]


def test_events_are_counted_by_kind_and_verdict_and_the_proxys_by_bytes() -> None:
    """Each event adds its count under its kind and verdict; proxy connections add their bytes."""
    metrics = Metrics()
    metrics.count_event(event(count=3))
    metrics.count_event(event(kind="dns", verdict="allowed", via="dns"))
    metrics.count_event(event(verdict="allowed", via="proxy", bytes_out=10, bytes_in=200))
    seen = samples(metrics)
    assert seen[("netjail_events_total", (("kind", "egress"), ("verdict", "blocked")))] == 3
    assert seen[("netjail_events_total", (("kind", "dns"), ("verdict", "allowed")))] == 1
    assert seen[("netjail_proxy_connections_total", (("verdict", "allowed"),))] == 1
    assert seen[("netjail_proxy_bytes_total", (("direction", "out"),))] == 10
    assert seen[("netjail_proxy_bytes_total", (("direction", "in"),))] == 200


def test_outcomes_name_what_ended_the_job() -> None:
    """A limit that ended a job wins over how it ended; then signal, then the exit status."""
    assert outcome_of(report()) == "exited"
    assert outcome_of(report(exit_code=2)) == "failed"
    assert outcome_of(report(exit_code=None, signal=9)) == "signaled"
    assert outcome_of(report(exit_code=None, signal=9, timed_out=True)) == "timed_out"
    assert outcome_of(report(exit_code=None, signal=9, oom_killed=True)) == "oom_killed"


def test_starts_ends_and_state_read_at_scrape_time() -> None:
    """Starts, their latency and ends are counted; running jobs and losses are read when asked,
    and the pool's gauge appears only once a pool gives its size."""
    metrics = Metrics()
    running = [2]
    metrics.watch(
        DaemonState(
            jobs_running=lambda: running[0],
            events_lost=lambda: 7,
            events_unattributed=lambda: {"gone": 4},
        )
    )
    metrics.count_start(0.025)
    metrics.count_end("failed")
    seen = samples(metrics)
    assert seen[("netjail_jobs_started_total", ())] == 1
    assert seen[("netjail_job_start_seconds_count", ())] == 1
    assert seen[("netjail_job_start_seconds_bucket", (("le", "0.03"),))] == 1
    assert seen[("netjail_job_start_seconds_bucket", (("le", "0.02"),))] == 0
    assert seen[("netjail_jobs_ended_total", (("outcome", "failed"),))] == 1
    assert seen[("netjail_jobs_running", ())] == 2
    assert seen[("netjail_events_lost_total", ())] == 7
    assert seen[("netjail_events_unattributed_total", (("reason", "gone"),))] == 4
    assert seen[("netjail_events_unattributed_total", (("reason", "budget"),))] == 0
    assert ("netjail_pool_size", ()) not in seen
    metrics.pool_size = lambda: 3
    running[0] = 0
    seen = samples(metrics)
    assert seen[("netjail_pool_size", ())] == 3
    assert seen[("netjail_jobs_running", ())] == 0


def test_the_endpoint_serves_the_registry_and_refuses_a_port_in_use() -> None:
    """/metrics answers with the registry's text; a second listener on the port is a ConfigError
    that names metrics_listen."""
    metrics = Metrics()
    metrics.count_start(0.01)
    server = MetricsServer.start(metrics, ListenAddress(LOOPBACK, 0))
    try:
        url = f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as answer:
            text = answer.read().decode()
        assert "netjail_jobs_started_total 1.0" in text
        with pytest.raises(ConfigError, match=r"metrics_listen.*in use"):
            MetricsServer.start(metrics, ListenAddress(LOOPBACK, server.port))
    finally:
        server.close()
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", server.port)) != 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9464", ListenAddress(LOOPBACK, 9464)),
        ("[::1]:9464", ListenAddress(ipaddress.IPv6Address("::1"), 9464)),
    ],
)
def test_metrics_listen_takes_an_address_and_port(text: str, expected: ListenAddress) -> None:
    """metrics_listen is ADDRESS:PORT, IPv6 in brackets."""
    config = parse_config({"metrics_listen": text})
    assert config.metrics_listen == expected
    assert str(expected) == text


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"metrics_listen": "localhost:9464"}, "with an IP address"),
        ({"metrics_listen": "::1:9464"}, "in brackets"),
        ({"metrics_listen": "127.0.0.1:0"}, "port from 1 to 65535"),
        ({"metrics_listen": "127.0.0.1"}, "ADDRESS:PORT"),
        ({"metrics_listen": "0.0.0.0:9464"}, "not a loopback address"),
        ({"metrics_allow_remote": "yes"}, "true or false"),
    ],
)
def test_bad_metrics_settings_are_refused(data: dict[str, object], problem: str) -> None:
    """A bad address, or one beyond loopback without metrics_allow_remote, stops the start."""
    with pytest.raises(ConfigError, match=problem):
        parse_config(data)


def test_a_remote_listener_needs_metrics_allow_remote() -> None:
    """With metrics_allow_remote = true, a non-loopback metrics_listen is accepted."""
    config = parse_config({"metrics_listen": "0.0.0.0:9464", "metrics_allow_remote": True})
    assert config.metrics_listen == ListenAddress(ipaddress.IPv4Address(0), 9464)
