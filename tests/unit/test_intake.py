"""Event intake: folding, history with owners, followers, counters, losses, domain counts."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

from netjail.daemon.attribution import SocketEnd
from netjail.daemon.intake import MAX_BLOCKED_NAMES, OTHER_NAMES, EventIntake
from netjail.errors import KmsgError
from netjail.kernel import kmsg
from netjail.kernel.nflog import PacketSource, PacketSummary
from netjail.protocol import DomainSummary, Event, EventProcess, Verdict

NFLOG_CAPTURE = Path(__file__).parent / "data" / "nflog_capture.json"


def event(
    job: str,
    *,
    verdict: Verdict = "blocked",
    domain: str | None = None,
    port: int = 443,
    bytes_out: int | None = None,
    bytes_in: int | None = None,
) -> Event:
    return Event(
        job=job,
        time="2026-12-01T00:00:00.000Z",
        kind="egress",
        verdict=verdict,
        proto="tcp",
        family=4,
        dst="198.18.0.1",
        port=port,
        uid=65534,
        count=1,
        via="proxy",
        domain=domain,
        bytes_out=bytes_out,
        bytes_in=bytes_in,
    )


def test_new_events_go_to_the_sink_followers_and_history_with_their_owner() -> None:
    """A new event is streamed to the job's sink and to followers, and kept with its owner."""
    intake = EventIntake()
    sunk: list[Event] = []
    followed: list[Event] = []
    intake.followers.append(followed.append)
    feed = intake.open_feed("j-1", 1000, sunk.append)
    first = event("j-1", port=1)
    intake.record(feed, first, now=0.0)
    intake.record(feed, event("j-1", port=1), now=1.0)  # a repeat: folded
    assert sunk == followed == [first]
    assert first.count == 2
    assert [(s.owner_uid, s.event) for s in intake.history] == [(1000, first)]
    assert intake.events_seen == 2


def test_owner_of_knows_running_jobs_and_the_history() -> None:
    """A job's owner is known while it runs, then from the history; unknown otherwise."""
    intake = EventIntake()
    feed = intake.open_feed("j-1", 1000, None)
    assert intake.owner_of("j-1") == 1000
    intake.record(feed, event("j-1"), now=0.0)
    intake.close_feed(feed)
    assert intake.open_feed_ids() == []
    assert intake.owner_of("j-1") == 1000
    assert intake.owner_of("j-2") is None


def test_a_closed_feed_adds_its_losses_to_the_daemon_count_once() -> None:
    """Lost events of a job are counted daemon-wide when it ends, and only once."""
    intake = EventIntake()
    feed = intake.open_feed("j-1", 0, None)
    feed.events.lost = 4
    intake.close_feed(feed)
    intake.close_feed(feed)
    assert intake.events_lost == 4


def test_domain_counts_survive_the_event_cap() -> None:
    """Every allowed connection is counted in the domain summary, even past the event cap."""
    intake = EventIntake()
    feed = intake.open_feed("j-1", 0, None)
    feed.events.max_events = 2
    for port in range(5):
        intake.record(
            feed,
            event("j-1", verdict="allowed", domain="pkgs.example", port=port, bytes_out=10),
            now=0.0,
        )
    intake.record(feed, event("j-1", domain="other.example", port=9), now=0.0)
    assert len(feed.events.events) == 2
    assert feed.lost == 4
    assert feed.events.not_kept == {"egress": 4}
    assert feed.domains == {
        "pkgs.example": DomainSummary(allowed=5, blocked=0, bytes_out=50, bytes_in=0),
        "other.example": DomainSummary(allowed=0, blocked=1),
    }


def test_blocked_only_names_past_the_bound_are_summed_under_other_names() -> None:
    """A flood of distinct blocked names cannot grow the summary without bound."""
    intake = EventIntake()
    feed = intake.open_feed("j-1", 0, None)
    for i in range(MAX_BLOCKED_NAMES + 3):
        intake.record(feed, event("j-1", domain=f"n{i}.example"), now=float(i))
    intake.record(feed, event("j-1", verdict="allowed", domain="late.example"), now=0.0)
    assert len(feed.domains) == MAX_BLOCKED_NAMES + 2
    assert feed.domains[OTHER_NAMES].blocked == 3
    assert feed.domains["late.example"].allowed == 1


def test_nflog_sequence_gaps_are_counted_as_lost() -> None:
    """Messages missing between two NFLOG sequence numbers are lost events of that job."""
    datagrams = [bytes.fromhex(h) for h in json.loads(NFLOG_CAPTURE.read_text())]
    intake = EventIntake()
    feed = intake.open_feed("j-test", 65534, None)
    intake.handle_nflog(feed, datagrams[0])
    intake.handle_nflog(feed, datagrams[4])
    assert feed.lost == 3
    assert [(e.dst, e.proto, e.via) for e in feed.events.events] == [
        ("203.0.113.9", "tcp", "nflog"),
        ("2001:db8::5", "icmpv6", "nflog"),
    ]


def test_a_packet_to_a_synthetic_address_is_named() -> None:
    """A logged packet to an address the stub handed out carries the name it stands for."""
    intake = EventIntake()
    feed = intake.open_feed("j-test", 65534, None)
    address = feed.pool.address_for("pkgs.example")
    intake.record_packet(
        feed,
        prefix="netjail j-test ",
        uid=65534,
        summary=PacketSummary(4, "tcp", str(address), 22),
        via="nflog",
        now=0.0,
    )
    (only,) = feed.events.events
    assert (only.domain, only.dst, only.port) == ("pkgs.example", str(address), 22)
    assert ipaddress.ip_address(only.dst) in ipaddress.ip_network("198.18.0.0/15")


def test_kernel_packets_without_a_uid_are_not_the_jobs() -> None:
    """Packets with no socket owner (the kernel's own) make no event."""
    intake = EventIntake()
    feed = intake.open_feed("j-test", 0, None)
    intake.record_packet(
        feed,
        prefix="netjail j-test ",
        uid=None,
        summary=PacketSummary(6, "icmpv6", "ff02::2", None),
        via="nflog",
        now=0.0,
    )
    assert feed.events.events == []


def test_a_redirected_dns_packet_is_a_dns_event() -> None:
    """A packet logged by the DNS divert rule is 'redirected', reason foreign_resolver."""
    intake = EventIntake()
    feed = intake.open_feed("j-test", 0, None)
    intake.record_packet(
        feed,
        prefix="netjail j-test dns ",
        uid=0,
        summary=PacketSummary(4, "udp", "8.8.8.8", 53),
        via="kmsg",
        now=0.0,
    )
    (only,) = feed.events.events
    assert (only.kind, only.verdict, only.reason, only.via) == (
        "dns",
        "redirected",
        "foreign_resolver",
        "kmsg",
    )


class _FakeKmsg:
    def __init__(self, records: list[kmsg.KmsgRecord], lost: int) -> None:
        self._records = records
        self._lost = lost

    def read_records(self) -> tuple[list[kmsg.KmsgRecord], int]:
        return self._records, self._lost


def test_kernel_log_losses_count_for_every_running_job() -> None:
    """Lost kernel-log records cannot be attributed, so every routed job counts them."""
    intake = EventIntake()
    feeds = [intake.open_feed(f"j-{i}", 0, None) for i in range(2)]
    intake.attach_kmsg(_FakeKmsg([], 3), _no_failure)  # type: ignore[arg-type]
    intake.read_kmsg()
    assert [feed.lost for feed in feeds] == [3, 3]


def _no_failure(reason: str) -> None:
    raise AssertionError(f"unexpected kernel-log failure: {reason}")


class _BrokenKmsg:
    def read_records(self) -> tuple[list[kmsg.KmsgRecord], int]:
        raise KmsgError("cannot read the kernel log: Bad file descriptor")


def test_a_kernel_log_that_cannot_be_read_fails_closed() -> None:
    """Reading stops, every running job counts a possible loss, and the daemon is told once."""
    intake = EventIntake()
    feeds = [intake.open_feed(f"j-{i}", 0, None) for i in range(2)]
    told: list[str] = []
    intake.attach_kmsg(_BrokenKmsg(), told.append)  # type: ignore[arg-type]
    intake.read_kmsg()
    intake.read_kmsg()
    assert told == ["cannot read the kernel log: Bad file descriptor"]
    assert [feed.lost for feed in feeds] == [1, 1]
    assert intake.kmsg_reader is None


def test_without_a_kernel_log_reader_read_kmsg_does_nothing() -> None:
    """read_kmsg is a no-op with log_backend = "nflog"."""
    intake = EventIntake()
    feed = intake.open_feed("j-1", 0, None)
    intake.read_kmsg()
    assert (feed.lost, feed.events.events) == (0, [])


def test_forget_history_clears_counters() -> None:
    """After the self-test, counters and history start from zero."""
    intake = EventIntake()
    feed = intake.open_feed("j-1", 0, None)
    intake.record(feed, event("j-1"), now=0.0)
    intake.events_lost = 2
    intake.forget_history()
    assert (list(intake.history), intake.events_seen, intake.events_lost) == ([], 0, 0)


def test_only_new_events_are_attributed_and_a_closed_feed_adds_its_misses() -> None:
    """The sender is looked up once per new event (a folded repeat costs nothing), from the
    packet's source; a job's misses join the daemon's count when its feed closes."""
    intake = EventIntake()
    feed = intake.open_feed("j-test", 65534, None)
    asked: list[object] = []
    process = EventProcess(pid=5, comm="curl")

    def owner_of(origin: object) -> EventProcess | None:
        asked.append(origin)
        return process

    feed.owners.owner_of = owner_of  # type: ignore[method-assign]
    for now in (0.0, 0.5):
        intake.record_packet(
            feed,
            prefix="netjail j-test ",
            uid=65534,
            summary=PacketSummary(4, "udp", "192.0.2.1", 9),
            via="nflog",
            now=now,
            source=PacketSource("169.254.77.1", 40000),
        )
    (only,) = feed.events.events
    assert (only.count, only.process) == (2, process)
    assert asked == [
        SocketEnd(
            "udp",
            ipaddress.IPv4Address("169.254.77.1"),
            40000,
            ipaddress.IPv4Address("192.0.2.1"),
            9,
        )
    ]
    feed.owners.misses["gone"] = 3
    intake.close_feed(feed)
    assert intake.unattributed == {"gone": 3}
    assert intake.unattributed_by_reason() == {"gone": 3}
