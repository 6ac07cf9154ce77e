"""The HTTP relay of intercepted connections, over in-memory streams (no sockets)."""

from __future__ import annotations

import asyncio
import gzip

import h11

from netjail.daemon import intercept
from netjail.daemon.intercept import HttpRelay, RequestRecord, UpstreamRefused
from netjail.daemon.tlsstream import Stream
from netjail.httppolicy import HttpPolicy, parse_http_policy

API = "api.example.com"


class FakeStream:
    """Gives ``incoming`` chunk by chunk (then EOF) and keeps what is sent."""

    def __init__(self, incoming: list[bytes]) -> None:
        self.incoming = list(incoming)
        self.sent = bytearray()
        self.closed = False

    async def recv(self) -> bytes:
        return self.incoming.pop(0) if self.incoming else b""

    async def send(self, data: bytes) -> None:
        self.sent += data

    async def close(self) -> None:
        self.closed = True


class FakeUpstream:
    """Answers each connect with a stream holding ``responses``, and records requests."""

    def __init__(self, responses: list[bytes] | None) -> None:
        self.responses = responses
        self.streams: list[FakeStream] = []

    async def __call__(self) -> Stream | UpstreamRefused:
        if self.responses is None:
            return UpstreamRefused("upstream_unreachable", "nothing answers")
        stream = FakeStream(self.responses)
        self.streams.append(stream)
        return stream


def serve(
    requests: bytes, policy: HttpPolicy, responses: list[bytes] | None = None
) -> tuple[list[h11.Event], list[RequestRecord], FakeUpstream]:
    """Run the relay over ``requests``; the job's parsed responses, the records, the upstream."""
    job = FakeStream([requests])
    upstream = FakeUpstream(responses)
    records: list[RequestRecord] = []
    relay = HttpRelay(
        job=job, domain=API, port=443, policy=policy, connect=upstream, record=records.append
    )
    asyncio.run(relay.serve())
    return parse_responses(bytes(job.sent)), records, upstream


def parse_responses(data: bytes) -> list[h11.Event]:
    """The job's side as a client reads it, one response per (pretend) request."""
    client = h11.Connection(h11.CLIENT)
    client.receive_data(data)
    events: list[h11.Event] = []
    while client.our_state is h11.IDLE:
        client.send(h11.Request(method="GET", target="/", headers=[("Host", API)]))
        client.send(h11.EndOfMessage())
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                return events
            events.append(event)
            if isinstance(event, h11.EndOfMessage):
                break
        if client.their_state is not h11.DONE:
            return events
        client.start_next_cycle()
    return events


def get(path: str, host: str = API, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


def ok(body: bytes, headers: str = "") -> bytes:
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{headers}\r\n".encode() + body


def responses(events: list[h11.Event]) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """(status, headers, body) of each response."""
    found: list[tuple[int, dict[bytes, bytes], bytes]] = []
    for event in events:
        if isinstance(event, h11.Response):
            found.append((event.status_code, dict(event.headers), b""))
        elif isinstance(event, h11.Data):
            status, headers, body = found[-1]
            found[-1] = (status, headers, body + event.data)
    return found


def test_a_request_for_another_host_gets_403_and_never_goes_upstream() -> None:
    """Host-in-TLS fronting: 403 host_mismatch, the connection ends, no upstream connect."""
    events, records, upstream = serve(
        get("/", "other.example.com"), parse_http_policy(intercept=[API])
    )
    [(status, headers, body)] = responses(events)
    assert status == 403
    assert headers[b"x-netjail-reason"].startswith(b"host_mismatch")
    assert b"other.example.com" in body
    assert upstream.streams == []
    assert [(r.verdict, r.reason) for r in records] == [("blocked", "host_mismatch")]


def test_each_kept_alive_request_is_decided_on_its_own() -> None:
    """Two requests on one connection: the first relayed, the second denied by its rule."""
    policy = parse_http_policy(deny_requests=[f"GET {API}/admin"])
    events, records, upstream = serve(get("/a") + get("/admin"), policy, [ok(b"hello")])
    [first, second] = responses(events)
    assert (first[0], first[2]) == (200, b"hello")
    assert second[0] == 403
    assert [(r.verdict, r.path, r.status) for r in records] == [
        ("allowed", "/a", 200),
        ("blocked", "/admin", 403),
    ]
    assert len(upstream.streams) == 1


def test_a_mock_answers_without_any_upstream() -> None:
    """The mock's status, body and content type; the upstream is never connected."""
    policy = parse_http_policy(mocks=[f'POST {API}/v1/x=201:{{"id":1}}'])
    request = f"POST /v1/x HTTP/1.1\r\nHost: {API}\r\nContent-Length: 2\r\n\r\n{{}}".encode()
    events, records, _ = serve(request, policy, None)
    [(status, headers, body)] = responses(events)
    assert (status, headers[b"content-type"], body) == (201, b"application/json", b'{"id":1}')
    assert records[0].verdict == "mocked"


def test_an_unreachable_upstream_gets_502_with_the_reason() -> None:
    """No upstream: 502, X-Netjail-Reason upstream_unreachable, a blocked record."""
    events, records, _ = serve(get("/"), parse_http_policy(intercept=[API]), None)
    [(status, headers, _)] = responses(events)
    assert status == 502
    assert headers[b"x-netjail-reason"].startswith(b"upstream_unreachable")
    assert records[0].verdict == "blocked"


def test_injected_headers_replace_the_jobs_and_reach_the_upstream() -> None:
    """The job's placeholder is dropped; the injected value is sent upstream."""
    policy = parse_http_policy(inject_headers=[f"{API}:Authorization=Bearer real"])
    _, _, upstream = serve(get("/", extra="Authorization: Bearer fake\r\n"), policy, [ok(b"")])
    sent = bytes(upstream.streams[0].sent)
    assert b"authorization: Bearer real\r\n" in sent
    assert b"fake" not in sent


def test_redaction_decodes_gzip_and_fixes_the_length() -> None:
    """A gzip body is decoded, redacted, sent with a new Content-Length and no coding."""
    body = gzip.compress(b"key sk_live_abcdefghijklmnop end")
    policy = parse_http_policy(redact=[f"{API}:@secrets"])
    events, _, upstream = serve(
        get("/", extra="Accept-Encoding: gzip\r\n"),
        policy,
        [ok(body, "Content-Encoding: gzip\r\nX-Key: sk_live_abcdefghijklmnop\r\n")],
    )
    [(status, headers, data)] = responses(events)
    assert (status, data) == (200, b"key [REDACTED] end")
    assert headers[b"content-length"] == str(len(data)).encode()
    assert b"content-encoding" not in headers
    assert headers[b"x-key"] == b"[REDACTED]"
    assert b"accept-encoding: identity" in bytes(upstream.streams[0].sent)


def test_a_body_that_cannot_be_redacted_is_never_passed_on() -> None:
    """An unknown content coding, or a body over the bound: 502, nothing of the body."""
    policy = parse_http_policy(redact=[f"{API}:@secrets"])
    events, _, _ = serve(
        get("/"), policy, [ok(b"sk_live_abcdefghijklmnop", "Content-Encoding: br\r\n")]
    )
    [(status, headers, body)] = responses(events)
    assert status == 502
    assert headers[b"x-netjail-reason"].startswith(b"redact_undecodable")
    assert b"sk_live" not in body


def test_a_large_body_over_the_redaction_bound_is_refused(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Bounded buffering: a body larger than MAX_REDACT_BYTES gets a 502."""
    monkeypatch.setattr(intercept, "MAX_REDACT_BYTES", 10)
    policy = parse_http_policy(redact=[f"{API}:@secrets"])
    events, _, _ = serve(get("/"), policy, [ok(b"x" * 11)])
    assert responses(events)[0][0] == 502


def test_a_refused_target_form_is_403() -> None:
    """An absolute-form target (a proxy request for any host) is refused."""
    events, records, _ = serve(get("http://other.example.com/"), parse_http_policy(intercept=[API]))
    assert responses(events)[0][0] == 403
    assert records[0].reason == "not_origin_form"


def test_a_websocket_upgrade_is_checked_then_passed_through() -> None:
    """After the upstream's 101, bytes go both ways as they are."""
    upgrade = get("/ws", extra="Connection: Upgrade\r\nUpgrade: websocket\r\n") + b"PING"
    switched = (
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nPONG"
    )
    job = FakeStream([upgrade])
    upstream = FakeUpstream([switched])
    records: list[RequestRecord] = []
    relay = HttpRelay(
        job=job,
        domain=API,
        port=443,
        policy=parse_http_policy(intercept=[API]),
        connect=upstream,
        record=records.append,
    )
    asyncio.run(relay.serve())
    assert job.sent.startswith(b"HTTP/1.1 101 ")
    assert job.sent.endswith(b"PONG")
    assert bytes(upstream.streams[0].sent).endswith(b"PING")
    assert records[0].status == 101


def test_a_later_injection_of_the_same_header_wins() -> None:
    """Two injections of one header (the job's, then the operator's): only the last is sent."""
    policy = parse_http_policy(inject_headers=[f"{API}:X-Key=job", f"{API}:X-Key=operator"])
    _, _, upstream = serve(get("/"), policy, [ok(b"")])
    sent = bytes(upstream.streams[0].sent)
    assert b"x-key: operator\r\n" in sent
    assert b"job" not in sent
