"""Event intake: logged packets and the stub's and proxy's findings become folded Events.

One ``EventIntake`` per daemon holds what all jobs share: the recent history (for ``netjail
events``), the followers (``events --follow``), the daemon-wide counters, and the routing of
kernel-log records to jobs. Each job has a ``JobFeed``: its folded events, its sinks (the
client streaming them), and the count of what was lost on the way. Nothing is dropped silently:
whatever cannot be kept is counted, per job.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from netjail.daemon.attribution import Origin, SocketOwners, socket_end
from netjail.daemon.events import JobEvents, rfc3339
from netjail.dnsanswer import SyntheticPool
from netjail.errors import KmsgError
from netjail.kernel import firewall, kmsg, nflog
from netjail.protocol import DomainSummary, Event, Via

#: Recent events across all jobs kept for ``netjail events`` without --follow.
HISTORY_EVENTS = 10_000
#: NFLOG messages read per wake-up, so one busy job cannot starve the loop.
_NFLOG_BATCH = 64
_NFLOG_RECV = 65536
#: Once a job's domain summary holds this many names, further names that are only blocked are
#: summed under OTHER_NAMES. Allowed names always get their own entry: their number is bounded
#: by the job's synthetic pool.
MAX_BLOCKED_NAMES = 10_000
OTHER_NAMES = "(other names)"

EventSink = Callable[[Event], None]


@dataclass(frozen=True)
class Seen:
    """An event of the history, with the uid of the client whose job it was."""

    owner_uid: int
    event: Event


@dataclass(eq=False)
class JobFeed:
    """One job's events: folded, streamed to its sinks, and what was lost, counted."""

    job_id: str
    owner_uid: int
    #: The job's synthetic addresses: a logged packet to one is named by its domain.
    pool: SyntheticPool = field(default_factory=SyntheticPool)
    events: JobEvents = field(default_factory=JobEvents)
    sinks: list[EventSink] = field(default_factory=list)
    #: Per domain: attempts allowed and blocked, bytes relayed. Counted from every event as
    #: it arrives, before folding or the event cap, so no allowed connection is ever missing.
    domains: dict[str, DomainSummary] = field(default_factory=dict)
    #: Counts NFLOG messages lost before they reached us (sequence gaps, ENOBUFS).
    nflog_seq: nflog.SequenceTracker = field(default_factory=nflog.SequenceTracker)
    #: Which of the job's processes sent each new event.
    owners: SocketOwners = field(default_factory=SocketOwners)

    @property
    def lost(self) -> int:
        return self.events.lost


class EventIntake:
    """Where every job's events arrive; owned by the daemon's one asyncio loop."""

    def __init__(self) -> None:
        self.history: deque[Seen] = deque(maxlen=HISTORY_EVENTS)
        self.followers: list[EventSink] = []
        #: Told of every event as it arrives, before folding (the metrics).
        self.observers: list[EventSink] = []
        self.events_seen = 0
        self.events_lost = 0
        #: Lookups of the sending process that found none, by why, from jobs that have ended.
        self.unattributed: dict[str, int] = {}
        self._feeds: dict[str, JobFeed] = {}
        self._kmsg: kmsg.KmsgReader | None = None
        self._on_kmsg_failure: Callable[[str], None] = _ignore

    def forget_history(self) -> None:
        """Clear counters and history (after the start-up self-test)."""
        self.history.clear()
        self.events_seen = self.events_lost = 0
        self.unattributed.clear()

    def open_feed(self, job_id: str, owner_uid: int, sink: EventSink | None) -> JobFeed:
        """A new job's feed; routed from now on (kernel-log events may come before it runs)."""
        feed = JobFeed(job_id=job_id, owner_uid=owner_uid)
        if sink is not None:
            feed.sinks.append(sink)
        self._feeds[job_id] = feed
        return feed

    def close_feed(self, feed: JobFeed) -> None:
        """The job is over: its losses join the daemon's count, and it is routed no more."""
        if self._feeds.pop(feed.job_id, None) is not None:
            self.events_lost += feed.lost
            for reason, count in feed.owners.misses.items():
                self.unattributed[reason] = self.unattributed.get(reason, 0) + count
            feed.owners.close()

    def lost_total(self) -> int:
        """Events lost so far, by ended and running jobs."""
        return self.events_lost + sum(feed.lost for feed in list(self._feeds.values()))

    def unattributed_by_reason(self) -> dict[str, int]:
        """New events whose process could not be named so far (running jobs': by why)."""
        running = dict(self.unattributed)
        for feed in list(self._feeds.values()):
            for reason, count in list(feed.owners.misses.items()):
                running[reason] = running.get(reason, 0) + count
        return running

    def open_feed_ids(self) -> list[str]:
        """The jobs whose events are being routed (running, or being built)."""
        return list(self._feeds)

    def owner_of(self, job_id: str) -> int | None:
        """The uid whose job ``job_id`` is or was, if it is running or still in the history."""
        feed = self._feeds.get(job_id)
        if feed is not None:
            return feed.owner_uid
        for seen in self.history:
            if seen.event.job == job_id:
                return seen.owner_uid
        return None

    # ------------------------------------------------------------------ recording

    def record(
        self,
        feed: JobFeed,
        event: Event,
        now: float | None = None,
        origin: Origin | None = None,
    ) -> None:
        """Fold ``event`` into the job's events; stream it if it is new, with the process that
        sent it from ``origin`` when it names none yet."""
        self.events_seen += 1
        for observe in self.observers:
            observe(event)
        _count_domain(feed.domains, event)
        new = feed.events.add(event, time.monotonic() if now is None else now)
        if new is None:
            return
        if origin is not None and new.process is None:
            new.process = feed.owners.owner_of(origin)
        self.history.append(Seen(feed.owner_uid, new))
        for sink in [*feed.sinks, *self.followers]:
            sink(new)

    def recorder(self, feed: JobFeed) -> Callable[[Event], None]:
        """A callback that records into ``feed`` (for the DNS stub and the proxy)."""

        def record(event: Event) -> None:
            self.record(feed, event)

        return record

    def record_packet(
        self,
        feed: JobFeed,
        *,
        prefix: str,
        uid: int | None,
        summary: nflog.PacketSummary,
        via: Via,
        now: float,
        source: nflog.PacketSource | None = None,
    ) -> None:
        """One packet the jail's ruleset logged (from NFLOG or the kernel log) as an event."""
        if uid is None:
            return  # the kernel's own packets (no socket): not the job's attempts
        # A DNS packet to a foreign resolver, logged by the divert chain on its way to the
        # stub: it never left, and the stub reports the query itself.
        redirected = prefix.endswith(f" {firewall.DNS_REDIRECT_MARK} ")
        self.record(
            feed,
            Event(
                job=feed.job_id,
                time=rfc3339(time.time()),
                kind="dns" if redirected else "egress",
                verdict="redirected" if redirected else "blocked",
                domain=_synthetic_name(feed.pool, summary.dst),
                reason="foreign_resolver" if redirected else None,
                proto=summary.proto,
                family=summary.family,
                dst=summary.dst,
                port=summary.port,
                uid=uid,
                count=1,
                via=via,
            ),
            now,
            socket_end(
                summary.proto,
                source.src if source else None,
                source.sport if source else None,
                summary.dst,
                summary.port,
            ),
        )

    # ------------------------------------------------------------------ NFLOG

    def read_nflog(self, feed: JobFeed, sock: socket.socket) -> bool:
        """Read what is queued on a jail's NFLOG socket, at most a batch per call (so one busy
        job cannot starve the loop); True if more may be queued."""
        for _ in range(_NFLOG_BATCH):
            try:
                data = sock.recv(_NFLOG_RECV)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    # The kernel dropped messages for us (socket buffer full).
                    feed.events.lost += feed.nflog_seq.overrun()
                    continue
                return False  # the socket is gone (torn down): nothing more to read
            self.handle_nflog(feed, data)
        return True

    def drain_nflog(self, feed: JobFeed, sock: socket.socket) -> None:
        """Read everything queued on a jail's NFLOG socket (at the job's end: the socket goes
        with the jail, and whatever is still in it would be lost)."""
        while self.read_nflog(feed, sock):
            pass

    def handle_nflog(self, feed: JobFeed, data: bytes) -> None:
        """One datagram of NFLOG messages: sequence gaps counted, packets recorded."""
        batch = nflog.parse_netlink_messages(data)
        now = time.monotonic()
        for packet in batch.packets:
            if packet.seq is not None:
                feed.events.lost += feed.nflog_seq.record(packet.seq)
            summary = nflog.parse_ip_packet(packet.payload)
            if summary is not None:
                self.record_packet(
                    feed,
                    prefix=packet.prefix,
                    uid=packet.uid,
                    summary=summary,
                    via="nflog",
                    now=now,
                    source=nflog.parse_ip_source(packet.payload),
                )

    # ------------------------------------------------------------------ kernel log

    def attach_kmsg(self, reader: kmsg.KmsgReader, on_failure: Callable[[str], None]) -> None:
        """Take events from the kernel log (log_backend = "kmsg") instead of NFLOG sockets.

        ``on_failure`` is told, once, if the kernel log can no longer be read: the daemon
        then stops, since a jail that blocks without reporting is not one.
        """
        self._kmsg = reader
        self._on_kmsg_failure = on_failure

    @property
    def kmsg_reader(self) -> kmsg.KmsgReader | None:
        return self._kmsg

    def read_kmsg(self) -> None:
        """Route what the kernel log holds to the jobs it names (a no-op without kmsg)."""
        if self._kmsg is None:
            return
        try:
            records, lost = self._kmsg.read_records()
        except KmsgError as e:
            # It would fail again on every wake-up: stop reading, and count what may be lost.
            self._kmsg = None
            for feed in self._feeds.values():
                feed.events.lost += 1
            self._on_kmsg_failure(str(e))
            return
        if lost:
            # Lost kernel-log records cannot be attributed to a job: every running job may
            # have lost events, so each counts them (an upper bound, never an undercount).
            for feed in self._feeds.values():
                feed.events.lost += lost
        now = time.monotonic()
        for record in records:
            packet = kmsg.parse_logged_packet(record)
            if packet is None:
                continue
            routed = self._feeds.get(packet.job_id)
            if routed is not None:
                self.record_packet(
                    routed,
                    prefix=packet.prefix,
                    uid=packet.uid,
                    summary=packet.summary,
                    via="kmsg",
                    now=now,
                    source=packet.source,
                )


def _ignore(_reason: str) -> None:
    """No kernel-log reader is attached, so nothing can fail."""


def _synthetic_name(pool: SyntheticPool, dst: str) -> str | None:
    try:
        return pool.name_for(ipaddress.ip_address(dst))
    except ValueError:
        return None


def _count_domain(domains: dict[str, DomainSummary], event: Event) -> None:
    if event.domain is None or event.verdict == "redirected":
        return
    name = event.domain
    if name not in domains and event.verdict == "blocked" and len(domains) >= MAX_BLOCKED_NAMES:
        name = OTHER_NAMES
    entry = domains.setdefault(name, DomainSummary())
    if event.verdict == "allowed":
        entry.allowed += event.count
    elif event.verdict == "mocked":
        entry.mocked += event.count
    else:
        entry.blocked += event.count
    entry.bytes_out += event.bytes_out or 0
    entry.bytes_in += event.bytes_in or 0
