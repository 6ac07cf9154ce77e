"""netjaild's Prometheus metrics (prometheus-client), served only when ``metrics_listen`` is set.

Counters are counted as things happen, on the daemon's loop: jobs started (and their start
latency), jobs ended by outcome, events by kind and verdict (every attempt, before folding),
proxied connections and their bytes. What is state, not a count of happenings, is read when
Prometheus scrapes (``_StateCollector``): jobs running, lost and unattributed events, the warm
pool's size. Each daemon has its own registry, never prometheus-client's global one.

The endpoint is prometheus-client's own WSGI server, on a thread of its own: a scrape never
waits for the loop, and a failed request ends only that request. The state it reads is the
loop's, as plain integers and a copy of a dict's values, which the GIL keeps whole.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from netjail.daemon.configvalues import ListenAddress
from netjail.errors import ConfigError, map_os_errors
from netjail.protocol import Event, Report

#: How a job ended, as ``netjail_jobs_ended_total{outcome}`` says it.
Outcome = Literal["exited", "failed", "signaled", "timed_out", "oom_killed", "error"]
#: Job start latency buckets (seconds): a job starts in tens of milliseconds here.
START_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


def outcome_of(report: Report) -> Outcome:
    """The outcome a report stands for: the limit that ended it first, then how it ended."""
    if report.timed_out:
        return "timed_out"
    if report.oom_killed:
        return "oom_killed"
    if report.signal is not None:
        return "signaled"
    return "exited" if report.exit_code == 0 else "failed"


@dataclass(frozen=True)
class DaemonState:
    """What the collector reads at scrape time; callables, so it reads the values of then."""

    jobs_running: Callable[[], int]
    events_lost: Callable[[], int]
    events_unattributed: Callable[[], dict[str, int]]


def _no_pool() -> int | None:
    return None


class Metrics:
    """The daemon's metrics: one registry, its counters, and the state read at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.jobs_started = Counter(
            "netjail_jobs_started",
            "Jobs whose jail was built and command started.",
            registry=registry,
        )
        self.job_start_failures = Counter(
            "netjail_job_start_failures",
            "Jobs that never started: their jail could not be built (fail closed) or the "
            "daemon was busy.",
            registry=registry,
        )
        self.jobs_ended = Counter(
            "netjail_jobs_ended", "Jobs that ended, by outcome.", ["outcome"], registry=registry
        )
        self.job_start_seconds = Histogram(
            "netjail_job_start_seconds",
            "From a run request's start to the job's command running (the jail built).",
            buckets=START_BUCKETS,
            registry=registry,
        )
        self.events = Counter(
            "netjail_events",
            "Egress attempts seen (every one, before folding), by kind and verdict.",
            ["kind", "verdict"],
            registry=registry,
        )
        self.proxy_connections = Counter(
            "netjail_proxy_connections",
            "Connections the proxy took, by verdict.",
            ["verdict"],
            registry=registry,
        )
        self.proxy_bytes = Counter(
            "netjail_proxy_bytes",
            "Bytes the proxy relayed: out (job to upstream) and in.",
            ["direction"],
            registry=registry,
        )
        #: The warm pool's jails ready now (None: there is no pool); set by the job manager.
        self.pool_size: Callable[[], int | None] = _no_pool
        self._state: DaemonState | None = None
        registry.register(_StateCollector(self))

    def watch(self, state: DaemonState) -> None:
        """Read these at scrape time (the job manager's and the intake's state)."""
        self._state = state

    def count_event(self, event: Event) -> None:
        """One event as it arrives (folded repeats each arrive too, with their own count)."""
        self.events.labels(event.kind, event.verdict).inc(event.count)
        if event.via == "proxy" and event.kind == "egress":
            self.proxy_connections.labels(event.verdict).inc(event.count)
            self.proxy_bytes.labels("out").inc(event.bytes_out or 0)
            self.proxy_bytes.labels("in").inc(event.bytes_in or 0)

    def count_start(self, seconds: float) -> None:
        self.jobs_started.inc()
        self.job_start_seconds.observe(seconds)

    def count_end(self, outcome: Outcome) -> None:
        self.jobs_ended.labels(outcome).inc()


class _StateCollector(Collector):
    """The metrics read from the daemon's state when Prometheus asks."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterator[Metric]:
        return iter(())  # the families are only known at collection (the pool may be absent)

    def collect(self) -> Iterator[Metric]:
        state = self._metrics._state
        if state is not None:
            yield GaugeMetricFamily(
                "netjail_jobs_running", "Jobs running now.", value=state.jobs_running()
            )
            yield CounterMetricFamily(
                "netjail_events_lost",
                "Events that never reached a job's record (NFLOG gaps and overruns, the "
                "kernel log, the per-job cap), running jobs included.",
                value=state.events_lost(),
            )
            unattributed = CounterMetricFamily(
                "netjail_events_unattributed",
                "New events whose sending process could not be named, by why: gone, budget, "
                "unsupported.",
                labels=["reason"],
            )
            for reason in ("gone", "budget", "unsupported"):
                unattributed.add_metric([reason], state.events_unattributed().get(reason, 0))
            yield unattributed
        size = self._metrics.pool_size()
        if size is not None:
            yield GaugeMetricFamily(
                "netjail_pool_size", "Warm jails ready to be claimed.", value=size
            )


class MetricsServer:
    """The endpoint, serving ``/metrics`` (any path, as prometheus-client does) until closed."""

    def __init__(self, server: WSGIServer) -> None:
        self._server = server

    @classmethod
    def start(cls, metrics: Metrics, address: ListenAddress) -> MetricsServer:
        """Listen on ``address``; ConfigError naming it if that is not possible."""
        with map_os_errors(
            ConfigError,
            f"listen for metrics on {address} (metrics_listen)",
            "is another process using it? choose another metrics_listen",
        ):
            server, _thread = start_http_server(
                address.port, str(address.host), registry=metrics.registry
            )
        return cls(server)

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
