"""HTTP/1.1 inside an intercepted connection: every request checked, then relayed or answered.

The proxy hands over the job's side (TLS terminated with the job's CA, or plain HTTP) once it
has checked the connection's name. Here, with h11 on both sides, each request of a kept-alive
connection is parsed and must name that host in its ``Host`` header, with an origin-form
target (:func:`netjail.httppolicy.parse_target`); then the job's :class:`HttpPolicy` decides:

- **deny** (a ``--deny-request`` rule, or a host whose ``--allow-request`` rules all miss):
  ``403`` with a short body and ``X-Netjail-Reason`` naming the rule; but when the job's
  client decides live, a request its ``--allow-request`` rules miss waits for the client's
  decision (:class:`netjail.daemon.decisions.RequestDecisions`), and is relayed or denied;
- **mock**: the mock's answer, without contacting the upstream;
- **relay**: the request goes upstream, over a connection made on first need (so a mock answers
  with the upstream down), with the ``--inject-header`` headers set; the response comes back,
  redacted if ``--redact`` names the host.

Redaction buffers the whole body, at most :data:`MAX_REDACT_BYTES` (a larger one is refused
with a ``502``, never passed unredacted), decodes ``gzip`` and ``deflate`` (asking the upstream
for ``identity`` first), refuses other content codings, and sends the result with a new
``Content-Length``. A WebSocket upgrade is checked like any request; after the upstream's
``101`` both sides are relayed as they are. Each request becomes one :class:`RequestRecord`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, cast

import h11

from netjail.daemon.contentcoding import DECODERS, MAX_REDACT_BYTES, content_coding, decode_body
from netjail.daemon.decisions import HeldRequest, RequestDecisions
from netjail.daemon.httpanswers import mock_head, refusal
from netjail.daemon.tlsstream import Stream
from netjail.httppolicy import (
    Answer,
    Decision,
    Deny,
    HttpPolicy,
    Mock,
    Relay,
    RequestPath,
    parse_host_header,
    parse_target,
)
from netjail.redaction import redact
from netjail.text import sanitize

#: Largest request head (request line and headers) or response head.
MAX_HEAD_BYTES = 64 << 10
#: Largest request body read and dropped to keep a connection open after a 403 or a mock.
MAX_DRAIN_BYTES = 1 << 20
#: How long a kept-alive connection may wait for its next request.
IDLE_S = 120.0
#: The longest path shown in an event.
MAX_EVENT_PATH = 200
#: Largest decoded body redacted on the event loop; a larger one is redacted in a thread.
REDACT_ON_LOOP_BYTES = 256 << 10

#: What became of one request.
RequestVerdict = Literal["allowed", "blocked", "mocked"]
#: How the job's side came: TLS terminated by netjail (the upstream verified for the name), or
#: plain HTTP (the upstream is whatever the job's address points to).
Transport = Literal["tls", "plain"]
_HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer"})
_RANGE = frozenset({b"range", b"if-range"})
_FRAMING = frozenset({b"content-length", b"transfer-encoding", b"content-encoding"})


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request, for its event."""

    verdict: RequestVerdict
    method: str
    path: str
    status: int | None
    bytes_out: int
    bytes_in: int
    duration_s: float
    reason: str | None = None
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class UpstreamRefused:
    """The upstream could not be used: ``reason`` for the 502 and the event."""

    reason: str
    detail: str | None = None


Connect = Callable[[], Awaitable[Stream | UpstreamRefused]]


@dataclass(slots=True)
class _Upstream:
    stream: Stream
    conn: h11.Connection


class _Closed(Exception):  # noqa: N818 - the end of a side's stream, carried up; not an error
    """A side closed, or broke the protocol: the connection ends."""


class HttpRelay:
    """Serves the requests of one intercepted connection."""

    def __init__(
        self,
        *,
        job: Stream,
        domain: str,
        port: int,
        policy: HttpPolicy,
        connect: Connect,
        record: Callable[[RequestRecord], None],
        transport: Transport = "tls",
        decisions: RequestDecisions | None = None,
    ) -> None:
        self._job = job
        self._decisions = decisions
        self._transport = transport
        self._domain = domain
        self._port = port
        self._policy = policy
        self._connect = connect
        self._record = record
        self._server = _job_connection()
        #: After a request body that went past h11: the bytes that came after it (the start
        #: of the next request).
        self._after_body: bytes | None = None
        self._upstream: _Upstream | None = None
        self._redactions = policy.redactions_for(domain)

    async def serve(self) -> None:
        """Every request until either side closes."""
        try:
            while await self._one_request():
                if self._server.our_state is not h11.DONE:
                    break
                self._next_job_cycle()
                await self._next_upstream_cycle()
        except (_Closed, h11.ProtocolError, OSError):
            pass
        finally:
            await self._close_upstream()
            with contextlib.suppress(OSError):
                await self._job.close()

    def _next_job_cycle(self) -> None:
        """Ready the job's side for its next request: h11's next cycle, or, after a request
        body that went past h11 (``_pump_sized_request_body``), a fresh connection fed the
        bytes that came after that body."""
        if self._after_body is None:
            self._server.start_next_cycle()
            return
        rest, self._after_body = self._after_body, None
        self._server = _job_connection()
        if rest:
            self._server.receive_data(rest)

    async def _next_upstream_cycle(self) -> None:
        """Keep the upstream connection for the next request, or close it (a new one is made
        when one is needed)."""
        upstream = self._upstream
        if upstream is None:
            return
        states = (upstream.conn.our_state, upstream.conn.their_state)
        if states == (h11.DONE, h11.DONE):
            upstream.conn.start_next_cycle()
        elif states != (h11.IDLE, h11.IDLE):  # IDLE: a fresh one, after a sized body
            await self._close_upstream()

    async def _close_upstream(self) -> None:
        if self._upstream is not None:
            with contextlib.suppress(OSError):
                await self._upstream.stream.close()
            self._upstream = None

    async def _one_request(self) -> bool:
        """Serve one request; False when the connection is to end."""
        try:
            async with asyncio.timeout(IDLE_S):  # no task per request, as wait_for makes
                event = await _next_event(self._job, self._server)
        except TimeoutError:
            return False
        if not isinstance(event, h11.Request):
            return False
        started = time.monotonic()
        method = event.method.decode("ascii", "replace")
        shown = _shown_path(event.target)
        checked = self._check(event)
        if isinstance(checked, tuple):
            status, reason, detail = checked
            await self._refuse(status, reason, detail, close=True)
            self._record(self._blocked(method, shown, started, status, why=(reason, detail)))
            return False
        decision = self._policy.decide(method, self._domain, checked.path)
        if isinstance(decision, Deny) and decision.reason == "not_allowed_request":
            decision = await self._decided(decision, method, checked.path)
        if isinstance(decision, Deny):
            keep = await self._drain()
            await self._refuse(403, decision.reason, decision.rule, close=not keep)
            self._record(
                self._blocked(method, shown, started, 403, why=(decision.reason, decision.rule))
            )
            return keep
        if isinstance(decision, Answer):
            keep = await self._drain()
            await self._answer(decision.mock, method, keep=keep)
            self._record(
                RequestRecord("mocked", method, shown, decision.mock.status, 0, 0, _since(started))
            )
            return keep
        return await self._relay(event, method, shown, started, decision.reason)

    async def _decided(self, denied: Deny, method: str, path: str) -> Decision:
        """A request no ``--allow-request`` allows: the client's live decision, if it decides
        (the request waits meanwhile), else, and past the question bound, ``denied``."""
        if self._decisions is None:
            return denied
        held = HeldRequest(method, self._domain, path)
        if not self._decisions.asks(held):
            return denied
        outcome = await self._decisions.decide(held)
        if outcome == "decided_allow":
            return Relay(outcome)
        if outcome == "decided_deny":
            return Deny(outcome, f"{denied.rule}, and the client denied it")
        return Deny(
            outcome, f"{denied.rule}, and no decision came in {self._decisions.timeout_s:g}s"
        )

    def _check(self, request: h11.Request) -> RequestPath | tuple[int, str, str]:
        """The request's path, or why it is refused before any rule: (status, reason, detail)."""
        names = {name for name, _ in request.headers}
        if b"content-length" in names and b"transfer-encoding" in names:
            # Relayed with both, an upstream that reads the other one sees another request.
            return 400, "ambiguous_framing", "the request has Content-Length and Transfer-Encoding"
        upgrades = [value.strip().lower() for name, value in request.headers if name == b"upgrade"]
        if b"http2-settings" in names or any(u != b"websocket" for u in upgrades):
            # After an h2c switch, requests would pass unread: only WebSocket is upgraded to.
            return 403, "h2c_refused", "only a WebSocket upgrade is relayed"
        hosts = [value for name, value in request.headers if name == b"host"]
        host = parse_host_header(hosts[0], self._port) if len(hosts) == 1 else None
        if host != self._domain:
            seen = sanitize(hosts[0].decode("ascii", "replace"), 100) if hosts else "no host"
            return 403, "host_mismatch", f"the request names {seen}, not {self._domain}"
        target = parse_target(request.target)
        if isinstance(target, str):
            return 403, target, f"the request target is {target.replace('_', ' ')}"
        return target

    async def _answer(self, mock: Mock, method: str, *, keep: bool) -> None:
        await self._send_job(mock_head(mock, keep=keep))
        if method != "HEAD":
            await self._send_job(h11.Data(data=mock.body))
        await self._send_job(h11.EndOfMessage())

    async def _relay(
        self, request: h11.Request, method: str, shown: str, started: float, reason: str | None
    ) -> bool:
        if self._transport == "plain" and self._policy.injections_for(self._domain):
            # Plain HTTP goes wherever the job's address points: never with a credential.
            why = ("inject_needs_tls", f"headers are injected for {self._domain} only over TLS")
            await self._refuse(403, *why, close=True)
            self._record(self._blocked(method, shown, started, 403, why=why))
            return False
        upstream = await self._open_upstream()
        if isinstance(upstream, UpstreamRefused):
            await self._refuse(502, upstream.reason, upstream.detail, close=True)
            self._record(
                self._blocked(method, shown, started, 502, why=(upstream.reason, upstream.detail))
            )
            return False
        upgrade = any(name == b"upgrade" for name, _ in request.headers)
        headers = self._upstream_headers(request, upgrade=upgrade)
        if self._server.they_are_waiting_for_100_continue:
            await self._send_job(h11.InformationalResponse(status_code=100, headers=[]))
        await self._send_upstream(
            upstream,
            h11.Request(method=request.method, target=request.target, headers=headers),
        )
        length = _content_length(request)
        if not length or upgrade:  # chunked, no body, or an upgrade: through h11
            sent = await self._pump_request_body(upstream)
        else:
            sent = await self._pump_sized_request_body(upstream, length)
        status, received, keep = await self._relay_response(upstream, method)
        if status == 101:
            received += await self._tunnel(upstream)
            keep = False
        self._record(
            RequestRecord("allowed", method, shown, status, sent, received, _since(started), reason)
        )
        return keep

    async def _open_upstream(self) -> _Upstream | UpstreamRefused:
        if self._upstream is None:
            stream = await self._connect()
            if isinstance(stream, UpstreamRefused):
                return stream
            self._upstream = _Upstream(stream, _upstream_connection())
        return self._upstream

    def _upstream_headers(
        self, request: h11.Request, *, upgrade: bool
    ) -> list[tuple[bytes, bytes]]:
        # One value per header: a later injection (the operator's) replaces an earlier one.
        injected = list({i.header: i for i in self._policy.injections_for(self._domain)}.values())
        replaced = {i.header.encode() for i in injected}
        if self._redactions:
            # Whole bodies only: the redaction of a piece could miss a secret split over two.
            replaced |= _RANGE
            replaced.add(b"accept-encoding")
        headers = [
            (name, value)
            for name, value in request.headers
            if name not in replaced and name != b"expect" and (upgrade or name not in _HOP_BY_HOP)
        ]
        headers += [(i.header.encode(), i.value.encode()) for i in injected]
        if self._redactions:
            headers.append((b"accept-encoding", b"identity"))
        return headers

    async def _pump_request_body(self, upstream: _Upstream) -> int:
        sent = 0
        while True:
            event = await _next_event(self._job, self._server)
            if isinstance(event, h11.Data):
                sent += len(event.data)
                await self._send_upstream(upstream, h11.Data(data=event.data))
            elif isinstance(event, h11.EndOfMessage):
                await self._send_upstream(upstream, h11.EndOfMessage())
                return sent
            else:
                raise _Closed

    async def _pump_sized_request_body(self, upstream: _Upstream, length: int) -> int:
        """A request body of ``length`` bytes (its Content-Length, which h11 checked), sent
        upstream as it comes, past the job's h11 as a sized response body goes past the
        upstream's (``_relay_sized_body``); the upstream's h11 still counts the bytes. What
        came after the body is the next request's, kept for ``_next_job_cycle``."""
        first, _ = self._server.trailing_data
        self._after_body = await _pass_sized(
            first, length, source=self._job, counter=upstream.conn, sink=upstream.stream
        )
        await self._send_upstream(upstream, h11.EndOfMessage())
        return length

    async def _relay_response(self, upstream: _Upstream, method: str) -> tuple[int, int, bool]:
        """The upstream's response, sent on to the job: (status, body bytes, keep-alive)."""
        while True:
            event = await _next_event(upstream.stream, upstream.conn)
            if isinstance(event, h11.InformationalResponse):
                if event.status_code == 101:
                    await self._send_job(
                        h11.InformationalResponse(status_code=101, headers=list(event.headers))
                    )
                    return 101, 0, False
                continue  # 100 was sent already, by the proxy itself; 103 is only a hint
            if isinstance(event, h11.Response):
                break
            raise _Closed
        bodyless = method == "HEAD" or event.status_code in (204, 304)
        if self._redactions:
            return await self._relay_redacted(upstream, event, bodyless=bodyless)
        headers = [(n, v) for n, v in event.headers if n not in _HOP_BY_HOP]
        await self._send_job(
            h11.Response(status_code=event.status_code, headers=headers, reason=event.reason)
        )
        length = None if bodyless else _content_length(event)
        if length is not None:
            return event.status_code, await self._relay_sized_body(upstream, length), True
        received = 0
        while True:
            body = await _next_event(upstream.stream, upstream.conn)
            if isinstance(body, h11.Data):
                received += len(body.data)
                await self._send_job(h11.Data(data=body.data))
            elif isinstance(body, h11.EndOfMessage):
                await self._send_job(h11.EndOfMessage())
                return event.status_code, received, True
            else:
                raise _Closed

    async def _relay_sized_body(self, upstream: _Upstream, length: int) -> int:
        """A response body of ``length`` bytes (its Content-Length), sent on as it comes.

        The bytes go past the upstream's h11, whose buffer would copy each one twice; the job's
        side still counts them (``send_with_data_passthrough`` copies nothing). The upstream's
        h11 connection is then replaced by a fresh one for the next request, which is what its
        own next cycle would be, unless the response ends the connection (``Connection:
        close``, HTTP/1.0) or bytes came past the body: then it is closed before the next.
        """
        keep_alive = upstream.conn.our_state is h11.DONE
        first, _ = upstream.conn.trailing_data
        rest = await _pass_sized(
            first, length, source=upstream.stream, counter=self._server, sink=self._job
        )
        await self._send_job(h11.EndOfMessage())
        if keep_alive and not rest:
            upstream.conn = _upstream_connection()
        return length

    async def _relay_redacted(
        self, upstream: _Upstream, response: h11.Response, *, bodyless: bool
    ) -> tuple[int, int, bool]:
        if response.status_code == 206:
            # A piece of a body: a secret split across pieces matches in none of them.
            return await self._redaction_failed("redact_partial")
        body = bytearray()
        while True:
            event = await _next_event(upstream.stream, upstream.conn)
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_REDACT_BYTES:
                    return await self._redaction_failed("redact_too_large")
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise _Closed
        coding = content_coding(response.headers)
        if coding is None:
            return await self._redaction_failed("redact_undecodable")
        decoded = decode_body(bytes(body), coding)
        if decoded is None:
            return await self._redaction_failed(
                "redact_too_large" if coding in DECODERS else "redact_undecodable"
            )
        if len(decoded) > REDACT_ON_LOOP_BYTES:
            # Linear in the body, but 16 MiB times a few regexes still takes a while: not on
            # the loop every other connection of every job is served from.
            data, _ = await asyncio.to_thread(redact, decoded, self._redactions)
        else:
            data, _ = redact(decoded, self._redactions)
        headers = [
            (name, redact(value, self._redactions)[0])
            for name, value in response.headers
            if name not in _HOP_BY_HOP and (bodyless or name not in _FRAMING)
        ]
        if not bodyless:
            headers.append((b"content-length", str(len(data)).encode()))
        await self._send_job(
            h11.Response(status_code=response.status_code, headers=headers, reason=response.reason)
        )
        if not bodyless and data:
            await self._send_job(h11.Data(data=data))
        await self._send_job(h11.EndOfMessage())
        return response.status_code, len(data), True

    async def _redaction_failed(self, reason: str) -> tuple[int, int, bool]:
        """A response that cannot be redacted is never passed on: a 502, and the end."""
        await self._close_upstream()
        detail = {
            "redact_too_large": f"a response over {MAX_REDACT_BYTES >> 20} MiB cannot be redacted",
            "redact_partial": "a partial (206) response cannot be redacted",
        }.get(
            reason,
            "a response in a content coding other than one of gzip or deflate cannot be redacted",
        )
        await self._refuse(502, reason, detail, close=True)
        return 502, 0, False

    async def _tunnel(self, upstream: _Upstream) -> int:
        """After a 101: the bytes of both sides as they are, until either ends."""
        job_rest, _ = self._server.trailing_data
        up_rest, _ = upstream.conn.trailing_data
        received = len(up_rest)
        if up_rest:
            await self._job.send(up_rest)
        if job_rest:
            await upstream.stream.send(job_rest)

        async def pump(src: Stream, dst: Stream) -> int:
            total = 0
            while data := await src.recv():
                total += len(data)
                await dst.send(data)
            return total

        down = asyncio.ensure_future(pump(upstream.stream, self._job))
        up = asyncio.ensure_future(pump(self._job, upstream.stream))
        try:
            await asyncio.wait({down, up}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (down, up):
                task.cancel()
        with contextlib.suppress(BaseException):
            received += down.result()
        return received

    async def _drain(self) -> bool:
        """Read the request's body and drop it; False when the connection cannot be reused
        (the job waits for a 100 Continue, or sends more than MAX_DRAIN_BYTES)."""
        if self._server.they_are_waiting_for_100_continue:
            return False
        drained = 0
        while True:
            event = await _next_event(self._job, self._server)
            if isinstance(event, h11.Data):
                drained += len(event.data)
                if drained > MAX_DRAIN_BYTES:
                    return False
            elif isinstance(event, h11.EndOfMessage):
                return True
            else:
                raise _Closed

    async def _refuse(self, status: int, reason: str, detail: str | None, *, close: bool) -> None:
        response, body = refusal(status, reason, detail, close=close)
        await self._send_job(response)
        await self._send_job(h11.Data(data=body))
        await self._send_job(h11.EndOfMessage())

    @staticmethod
    def _blocked(
        method: str, path: str, started: float, status: int, *, why: tuple[str, str | None]
    ) -> RequestRecord:
        reason, detail = why
        return RequestRecord("blocked", method, path, status, 0, 0, _since(started), reason, detail)

    async def _send_job(self, event: h11.Event) -> None:
        data = self._server.send(event)
        if data:
            await self._job.send(data)

    async def _send_upstream(self, upstream: _Upstream, event: h11.Event) -> None:
        data = upstream.conn.send(event)
        if data:
            await upstream.stream.send(data)


async def _pass_sized(
    first: bytes, length: int, *, source: Stream, counter: h11.Connection, sink: Stream
) -> bytes:
    """Pass a body of ``length`` bytes from ``source`` (``first``, then what it brings) to
    ``sink`` as it comes, through ``counter``, the sending side's h11, which counts the bytes
    without a copy (``send_with_data_passthrough``); the bytes read past the body, returned.
    Raises _Closed if the source ends first."""
    data, left = first, length
    while True:
        rest = b""
        if len(data) > left:
            data, rest = data[:left], data[left:]
        if data:
            left -= len(data)
            for piece in counter.send_with_data_passthrough(h11.Data(data=data)) or ():
                await sink.send(piece)
        if not left:
            return rest
        data = await source.recv()
        if not data:
            raise _Closed


def _job_connection() -> h11.Connection:
    return h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)


def _upstream_connection() -> h11.Connection:
    return h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)


def _content_length(message: h11.Request | h11.Response) -> int | None:
    """The body's length when the message is framed by Content-Length alone (h11 checked
    the value), else None: chunked, to the connection's end, or (a request) none."""
    lengths = [value for name, value in message.headers if name == b"content-length"]
    if len(lengths) != 1 or any(name == b"transfer-encoding" for name, _ in message.headers):
        return None
    return int(lengths[0])


async def _next_event(stream: Stream, conn: h11.Connection) -> h11.Event | type[h11.PAUSED]:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.recv())
            continue
        if isinstance(event, h11.ConnectionClosed):
            raise _Closed
        return cast("h11.Event | type[h11.PAUSED]", event)


def _shown_path(target: bytes) -> str:
    """The target as events show it: no query (it may hold secrets), bounded, printable."""
    path, question, _ = target.partition(b"?")
    text = path.decode("utf-8", "replace") + ("?…" if question else "")
    return sanitize(text, MAX_EVENT_PATH)


def _since(started: float) -> float:
    return time.monotonic() - started
