"""A job's DNS stub (netjail.daemon.dnsstub) on real loopback sockets: UDP and TCP answers,
the events it records, its TCP bounds, and closing."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import re
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass

import dns.message
import dns.rcode
import dns.rdatatype
import msgspec
import pytest

from netjail.daemon import dnsstub
from netjail.daemon.dnsstub import DnsStub
from netjail.dnsanswer import BlockedRcode, SyntheticPool
from netjail.policy import Policy
from netjail.protocol import Event, Verdict

from .daemonfakes import run

JOB = "j-0000d115"
RFC3339_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@dataclass
class RunningStub:
    stub: DnsStub
    events: list[Event]
    udp4: tuple[str, int]
    udp6: tuple[str, int]
    tcp: tuple[str, int]
    sockets: list[socket.socket]


def bound(family: socket.AddressFamily, kind: socket.SocketKind, host: str) -> socket.socket:
    sock = socket.socket(family, kind)
    sock.bind((host, 0))
    sock.setblocking(False)
    return sock


@contextlib.asynccontextmanager
async def dns_stub(blocked_rcode: BlockedRcode = "NXDOMAIN") -> AsyncIterator[RunningStub]:
    """A stub allowing allowed.example, on UDP 127.0.0.1 and ::1 and TCP 127.0.0.1."""
    events: list[Event] = []
    stub = DnsStub(
        job_id=JOB,
        uid=1000,
        policy=Policy.parse(["allowed.example"]),
        pool=SyntheticPool(),
        blocked_rcode=blocked_rcode,
        record=events.append,
    )
    udp4 = bound(socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1")
    udp6 = bound(socket.AF_INET6, socket.SOCK_DGRAM, "::1")
    tcp = bound(socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1")
    tcp.listen(8)
    sockets = [udp4, udp6, tcp]
    try:
        await stub.start([udp4, udp6], [tcp])
        yield RunningStub(
            stub=stub,
            events=events,
            udp4=udp4.getsockname(),
            udp6=udp6.getsockname()[:2],
            tcp=tcp.getsockname(),
            sockets=sockets,
        )
    finally:
        stub.close()
        for sock in sockets:
            sock.close()


def query(name: str, rdtype: str = "A", ident: int = 4242) -> bytes:
    return dns.message.make_query(name, rdtype, id=ident).to_wire()


async def ask_udp(
    address: tuple[str, int], wire: bytes, family: socket.AddressFamily = socket.AF_INET
) -> bytes:
    """Send one datagram to the stub; the first datagram back."""
    loop = asyncio.get_running_loop()
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        await loop.sock_sendto(sock, wire, address)
        reply, _ = await loop.sock_recvfrom(sock, 65535)
        return reply


async def ask_tcp(writer: asyncio.StreamWriter, reader: asyncio.StreamReader, wire: bytes) -> bytes:
    writer.write(len(wire).to_bytes(2, "big") + wire)
    await writer.drain()
    length = int.from_bytes(await reader.readexactly(2), "big")
    return await reader.readexactly(length)


def dns_event(
    *,
    proto: str,
    family: int,
    verdict: Verdict,
    domain: str | None,
    qtype: str | None,
    reason: str | None,
) -> Event:
    """The event the stub records, with its time blanked (see timeless)."""
    return Event(
        job=JOB,
        time="",
        kind="dns",
        verdict=verdict,
        proto=proto,
        family=family,
        dst=None,
        port=53,
        uid=1000,
        count=1,
        via="dns",
        domain=domain,
        qtype=qtype,
        reason=reason,
    )


def timeless(events: list[Event]) -> list[Event]:
    """The events with their times checked for form and then blanked."""
    assert all(RFC3339_MS.fullmatch(event.time) for event in events), events
    return [msgspec.structs.replace(event, time="") for event in events]


# ---------------------------------------------------------------------- UDP


def test_udp_an_allowed_name_gets_a_synthetic_address_and_is_reported() -> None:
    """An A query for an allowed name: the pool's first address, TTL 5, and one allowed
    event."""

    async def main() -> None:
        async with dns_stub() as running:
            reply = dns.message.from_wire(await ask_udp(running.udp4, query("allowed.example")))
            assert reply.id == 4242
            assert reply.rcode() == dns.rcode.NOERROR
            assert [rrset.to_text() for rrset in reply.answer] == [
                "allowed.example. 5 IN A 198.18.0.1"
            ]
            assert timeless(running.events) == [
                dns_event(
                    proto="udp",
                    family=4,
                    verdict="allowed",
                    domain="allowed.example",
                    qtype="A",
                    reason=None,
                )
            ]

    run(main())


@pytest.mark.parametrize(
    ("blocked_rcode", "rcode"),
    [("NXDOMAIN", dns.rcode.NXDOMAIN), ("REFUSED", dns.rcode.REFUSED)],
)
def test_udp_a_blocked_name_gets_the_configured_answer(
    blocked_rcode: BlockedRcode, rcode: dns.rcode.Rcode
) -> None:
    """A name no rule allows gets NXDOMAIN or REFUSED, as configured, and a blocked event."""

    async def main() -> None:
        async with dns_stub(blocked_rcode) as running:
            reply = dns.message.from_wire(await ask_udp(running.udp4, query("blocked.example")))
            assert (reply.rcode(), reply.answer) == (rcode, [])
            assert timeless(running.events) == [
                dns_event(
                    proto="udp",
                    family=4,
                    verdict="blocked",
                    domain="blocked.example",
                    qtype="A",
                    reason="not_allowed",
                )
            ]

    run(main())


def test_udp_over_ipv6_is_reported_as_family_6() -> None:
    """A query on the ::1 socket is answered there and reported with family 6."""

    async def main() -> None:
        async with dns_stub() as running:
            wire = query("allowed.example", "AAAA")
            reply = dns.message.from_wire(await ask_udp(running.udp6, wire, socket.AF_INET6))
            assert (reply.rcode(), reply.answer) == (dns.rcode.NOERROR, [])
            assert timeless(running.events) == [
                dns_event(
                    proto="udp",
                    family=6,
                    verdict="allowed",
                    domain="allowed.example",
                    qtype="AAAA",
                    reason="nodata",
                )
            ]

    run(main())


def test_udp_a_datagram_too_short_to_answer_is_reported_but_not_answered() -> None:
    """Two bytes are no header: no reply (the next reply is the next query's), one event."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with dns_stub() as running:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)
                await loop.sock_sendto(sock, b"\x12\x34", running.udp4)
                await loop.sock_sendto(sock, query("allowed.example", ident=7), running.udp4)
                reply, _ = await loop.sock_recvfrom(sock, 65535)
            assert dns.message.from_wire(reply).id == 7
            assert timeless(running.events) == [
                dns_event(
                    proto="udp",
                    family=4,
                    verdict="blocked",
                    domain=None,
                    qtype=None,
                    reason="short_header",
                ),
                dns_event(
                    proto="udp",
                    family=4,
                    verdict="allowed",
                    domain="allowed.example",
                    qtype="A",
                    reason=None,
                ),
            ]

    run(main())


def test_udp_a_query_without_a_question_gets_formerr() -> None:
    """A header with no question is answered FORMERR (header only) and reported."""

    async def main() -> None:
        async with dns_stub() as running:
            header = struct.pack("!HHHHHH", 99, 0x0100, 0, 0, 0, 0)
            reply = await ask_udp(running.udp4, header)
            ident, flags, *counts = struct.unpack("!HHHHHH", reply)
            assert (ident, flags & 0x8000, flags & 0x000F, counts) == (
                99,
                0x8000,
                dns.rcode.FORMERR,
                [0, 0, 0, 0],
            )
            assert timeless(running.events) == [
                dns_event(
                    proto="udp",
                    family=4,
                    verdict="blocked",
                    domain=None,
                    qtype=None,
                    reason="question_count",
                )
            ]

    run(main())


# ---------------------------------------------------------------------- TCP


def test_tcp_answers_several_queries_on_one_connection() -> None:
    """Length-prefixed queries on one TCP connection are each answered and reported."""

    async def main() -> None:
        async with dns_stub() as running:
            reader, writer = await asyncio.open_connection(*running.tcp)
            try:
                allowed = dns.message.from_wire(
                    await ask_tcp(writer, reader, query("allowed.example", ident=1))
                )
                blocked = dns.message.from_wire(
                    await ask_tcp(writer, reader, query("blocked.example", ident=2))
                )
            finally:
                writer.close()
            assert (allowed.id, allowed.rcode()) == (1, dns.rcode.NOERROR)
            assert [rrset.to_text() for rrset in allowed.answer] == [
                "allowed.example. 5 IN A 198.18.0.1"
            ]
            assert (blocked.id, blocked.rcode()) == (2, dns.rcode.NXDOMAIN)
            assert timeless(running.events) == [
                dns_event(
                    proto="tcp",
                    family=4,
                    verdict="allowed",
                    domain="allowed.example",
                    qtype="A",
                    reason=None,
                ),
                dns_event(
                    proto="tcp",
                    family=4,
                    verdict="blocked",
                    domain="blocked.example",
                    qtype="A",
                    reason="not_allowed",
                ),
            ]

    run(main())


def test_tcp_a_message_that_gets_no_answer_ends_the_connection() -> None:
    """A TCP message too short to answer is reported, and the stub hangs up."""

    async def main() -> None:
        async with dns_stub() as running:
            reader, writer = await asyncio.open_connection(*running.tcp)
            try:
                writer.write(b"\x00\x02\x12\x34")
                await writer.drain()
                assert await reader.read() == b""
            finally:
                writer.close()
            assert timeless(running.events) == [
                dns_event(
                    proto="tcp",
                    family=4,
                    verdict="blocked",
                    domain=None,
                    qtype=None,
                    reason="short_header",
                )
            ]

    run(main())


def test_tcp_connections_beyond_the_bound_are_closed_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past the connection bound a new connection is closed unserved; the first still works."""
    monkeypatch.setattr(dnsstub, "_TCP_MAX_CONNECTIONS", 1)

    async def main() -> None:
        async with dns_stub() as running:
            first_reader, first_writer = await asyncio.open_connection(*running.tcp)
            try:
                await ask_tcp(first_writer, first_reader, query("allowed.example", ident=1))
                second_reader, second_writer = await asyncio.open_connection(*running.tcp)
                try:
                    assert await second_reader.read() == b""
                finally:
                    second_writer.close()
                again = await ask_tcp(first_writer, first_reader, query("allowed.example", ident=3))
                assert dns.message.from_wire(again).id == 3
            finally:
                first_writer.close()
            assert len(running.events) == 2

    run(main())


class _OutOfDescriptors(socket.socket):
    """A listener whose first ``failures`` accepts fail with EMFILE (the connection stays
    queued, as the kernel leaves it), counting every call."""

    failures = 1
    calls = 0

    def accept(self) -> tuple[socket.socket, object]:
        type(self).calls += 1
        if type(self).failures:
            type(self).failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return super().accept()


def test_tcp_out_of_descriptors_pauses_accepting_then_serves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """accept() failing with EMFILE stops the stub watching the listener (it would spin: the
    connection stays queued) until a retry, which then serves the connection."""
    monkeypatch.setattr(dnsstub, "_ACCEPT_RETRY_S", 0.2)

    async def main() -> None:
        stub = DnsStub(
            job_id=JOB,
            uid=1000,
            policy=Policy.parse(["allowed.example"]),
            pool=SyntheticPool(),
            blocked_rcode="NXDOMAIN",
            record=lambda event: None,
        )
        listener = _OutOfDescriptors(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        try:
            await stub.start([], [listener])
            reader, writer = await asyncio.open_connection(*listener.getsockname())
            try:
                await asyncio.sleep(0.1)
                # One failed accept, then no more tries while paused (a spin makes thousands).
                assert _OutOfDescriptors.calls == 1
                answer = await asyncio.wait_for(
                    ask_tcp(writer, reader, query("allowed.example", ident=7)), 5
                )
                assert dns.message.from_wire(answer).id == 7
            finally:
                writer.close()
        finally:
            stub.close()
        assert listener.fileno() == -1  # the stub owns its listeners: closed with it

    run(main())


def test_tcp_an_idle_connection_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection that sends nothing within the idle limit is closed, with no event."""
    monkeypatch.setattr(dnsstub, "_TCP_IDLE_S", 0.01)

    async def main() -> None:
        async with dns_stub() as running:
            reader, writer = await asyncio.open_connection(*running.tcp)
            try:
                assert await reader.read() == b""
            finally:
                writer.close()
            assert running.events == []

    run(main())


def test_tcp_a_connection_is_closed_after_its_query_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After the most queries one connection may make, the stub hangs up."""
    monkeypatch.setattr(dnsstub, "_TCP_MAX_QUERIES", 2)

    async def main() -> None:
        async with dns_stub() as running:
            reader, writer = await asyncio.open_connection(*running.tcp)
            try:
                for ident in (1, 2):
                    await ask_tcp(writer, reader, query("allowed.example", ident=ident))
                assert await reader.read() == b""
            finally:
                writer.close()
            assert len(running.events) == 2

    run(main())


# ---------------------------------------------------------------------- close


def test_close_stops_serving_and_closes_every_socket() -> None:
    """close(): the UDP sockets are closed, the TCP listener refuses, open connections end."""

    async def main() -> None:
        async with dns_stub() as running:
            reader, writer = await asyncio.open_connection(*running.tcp)
            try:
                await ask_tcp(writer, reader, query("allowed.example"))
                running.stub.close()
                assert await reader.read() == b""
            finally:
                writer.close()
            udp4, udp6, _tcp = running.sockets
            assert (udp4.fileno(), udp6.fileno()) == (-1, -1)
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection(*running.tcp)

    run(main())
