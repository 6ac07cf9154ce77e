"""A job's DNS stub: answers every query the job makes (UDP and TCP, 127.0.0.1 and ::1).

The answers come from ``netjail.dnsanswer`` (pure); this module only moves bytes, within
bounds: datagrams of at most 64 KiB, TCP messages length-prefixed, a few TCP connections at a
time, each idle-limited. Nothing here ever sends a query anywhere: allowed names get synthetic
addresses, and the proxy resolves the real ones on the host side when a connection comes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from netjail.daemon.attribution import Origin, OwnerLookup, peer_end, unknown_owner
from netjail.daemon.decisions import NameDecisions
from netjail.daemon.events import rfc3339
from netjail.dnsanswer import BlockedRcode, DnsOutcome, SyntheticPool, answer_query
from netjail.policy import Policy
from netjail.protocol import Event

_MAX_DATAGRAM = 65535
#: Datagrams handled per wake-up, so a flooding job cannot starve the loop.
_BURST = 64
_TCP_IDLE_S = 10.0
_TCP_MAX_CONNECTIONS = 32
_TCP_MAX_QUERIES = 100
#: accept() errors that leave the connection queued: wait this long before accepting again.
_ACCEPT_PAUSES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_ACCEPT_RETRY_S = 1.0


class DnsStub:
    """Serves one job's DNS sockets on the running loop."""

    def __init__(
        self,
        *,
        job_id: str,
        uid: int,
        policy: Policy,
        pool: SyntheticPool,
        blocked_rcode: BlockedRcode,
        record: Callable[[Event], None],
        owner_of: OwnerLookup = unknown_owner,
        decisions: NameDecisions | None = None,
    ) -> None:
        self._job_id = job_id
        self._uid = uid
        self._policy = policy
        self._pool = pool
        self._blocked_rcode: BlockedRcode = blocked_rcode
        self._record = record
        self._owner_of = owner_of
        self._udp: list[socket.socket] = []
        self._listeners: list[socket.socket] = []
        self._accept_retries: set[asyncio.TimerHandle] = set()
        self._tcp_tasks: set[asyncio.Task[None]] = set()
        self._decisions = decisions
        self._held: set[asyncio.Task[None]] = set()

    async def start(self, udp: list[socket.socket], tcp: list[socket.socket]) -> None:
        """Serve ``udp`` and the listeners ``tcp`` (the stub owns them from now on).

        Readers on the loop, for TCP too: ``asyncio.start_server`` would skip a round of the
        loop before it returns, and on a job's start path that lets whatever else is ready run
        first (a pool refill, another job's teardown: ~0.9 ms p50 of a warm job's start)."""
        loop = asyncio.get_running_loop()
        for sock in udp:
            self._udp.append(sock)
            loop.add_reader(sock.fileno(), self._on_datagram, sock)
        for listener in tcp:
            listener.setblocking(False)
            self._listeners.append(listener)
            loop.add_reader(listener.fileno(), self._on_connection, listener)

    def close(self) -> None:
        """Stop serving; close every socket (the jail is going away)."""
        loop = asyncio.get_running_loop()
        for sock in (*self._udp, *self._listeners):
            with contextlib.suppress(Exception):
                loop.remove_reader(sock.fileno())
            sock.close()
        self._udp.clear()
        self._listeners.clear()
        for handle in self._accept_retries:
            handle.cancel()
        self._accept_retries.clear()
        for task in (*self._tcp_tasks, *self._held):
            task.cancel()

    def _on_connection(self, listener: socket.socket) -> None:
        """Accept what is queued on ``listener``, within bounds: at most a burst per wake-up,
        at most ``_TCP_MAX_CONNECTIONS`` served at once (one more is closed at once)."""
        for _ in range(_BURST):
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _ACCEPT_PAUSES:
                    # Out of descriptors or memory: the connection stays queued and the
                    # listener readable, so stop watching it for a while rather than spin.
                    self._pause_accepting(listener)
                return  # ECONNABORTED and the like: that connection is gone
            if len(self._tcp_tasks) >= _TCP_MAX_CONNECTIONS:
                conn.close()
                continue
            task = asyncio.ensure_future(self._on_tcp_socket(conn))
            self._tcp_tasks.add(task)
            task.add_done_callback(self._tcp_tasks.discard)

    def _pause_accepting(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(listener.fileno())

        def resume() -> None:
            self._accept_retries.discard(handle)
            if listener in self._listeners:
                loop.add_reader(listener.fileno(), self._on_connection, listener)

        handle = loop.call_later(_ACCEPT_RETRY_S, resume)
        self._accept_retries.add(handle)

    async def _on_tcp_socket(self, conn: socket.socket) -> None:
        try:
            reader, writer = await asyncio.open_connection(sock=conn)
        except OSError:
            conn.close()
            return
        except BaseException:  # cancelled: the jail is going away
            conn.close()
            raise
        await self._on_tcp(reader, writer)

    def _answer(self, query: bytes, proto: str, family: int, origin: Origin) -> bytes | None:
        outcome = answer_query(query, self._policy, self._pool, blocked_rcode=self._blocked_rcode)
        self._report(outcome, proto, family, origin)
        return outcome.reply

    def _undecided(self, query: bytes) -> str | None:
        """The name a query must wait for a decision on, if any: refused for want of a rule,
        and no rule names it."""
        if self._decisions is None:
            return None
        outcome = answer_query(query, self._policy, self._pool, blocked_rcode=self._blocked_rcode)
        name = outcome.domain
        if outcome.reason != "not_allowed" or name is None or not self._decisions.undecided(name):
            return None
        return name

    async def _answer_decided(
        self, query: bytes, name: str, proto: str, family: int, origin: Origin
    ) -> bytes | None:
        """The answer once the client has decided on ``name``, the decision in its event."""
        assert self._decisions is not None  # noqa: S101 - only called when there are decisions
        decided = await self._decisions.decide(name)
        outcome = answer_query(query, self._policy, self._pool, blocked_rcode=self._blocked_rcode)
        self._report(replace(outcome, reason=decided), proto, family, origin)
        return outcome.reply

    def _hold(
        self, sock: socket.socket, peer: tuple[Any, ...], query: bytes, name: str, origin: Origin
    ) -> None:
        family = 4 if sock.family == socket.AF_INET else 6

        async def answer_later() -> None:
            reply = await self._answer_decided(query, name, "udp", family, origin)
            if reply is not None:
                with contextlib.suppress(OSError):
                    sock.sendto(reply, peer)

        task = asyncio.get_running_loop().create_task(answer_later())
        self._held.add(task)
        task.add_done_callback(self._held.discard)

    def _report(self, outcome: DnsOutcome, proto: str, family: int, origin: Origin) -> None:
        # Looked up before the answer goes out: the asking socket is surely still open.
        self._record(
            Event(
                job=self._job_id,
                time=rfc3339(time.time()),
                kind="dns",
                verdict=outcome.verdict,
                proto=proto,
                family=family,
                dst=None,
                port=53,
                uid=self._uid,
                count=1,
                via="dns",
                domain=outcome.domain,
                qtype=outcome.qtype,
                reason=outcome.reason,
                process=self._owner_of(origin),
            )
        )

    def _on_datagram(self, sock: socket.socket) -> None:
        family = 4 if sock.family == socket.AF_INET else 6
        for _ in range(_BURST):
            try:
                query, peer = sock.recvfrom(_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # e.g. ECONNREFUSED from an earlier reply's ICMP: nothing to do
            origin = peer_end("udp", peer, sock.getsockname())
            name = self._undecided(query)
            if name is not None:
                self._hold(sock, peer, query, name, origin)
                continue
            reply = self._answer(query, "udp", family, origin)
            if reply is not None:
                with contextlib.suppress(OSError):
                    sock.sendto(reply, peer)

    async def _on_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        family = 4 if sock is not None and sock.family == socket.AF_INET else 6
        origin = peer_end(
            "tcp", writer.get_extra_info("peername"), writer.get_extra_info("sockname")
        )
        try:
            for _ in range(_TCP_MAX_QUERIES):
                header = await asyncio.wait_for(reader.readexactly(2), _TCP_IDLE_S)
                length = int.from_bytes(header, "big")
                query = await asyncio.wait_for(reader.readexactly(length), _TCP_IDLE_S)
                name = self._undecided(query)
                if name is not None:
                    reply = await self._answer_decided(query, name, "tcp", family, origin)
                else:
                    reply = self._answer(query, "tcp", family, origin)
                if reply is None:
                    break
                writer.write(len(reply).to_bytes(2, "big") + reply)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, OSError):
            pass
        finally:
            writer.close()
