"""The HTTP relay of intercepted connections, over in-memory streams (no sockets)."""

from __future__ import annotations

import asyncio
import gzip
import socket

import h11

from netjail.daemon import intercept
from netjail.daemon.certauthority import JobCA
from netjail.daemon.decisions import Question, RequestDecisions
from netjail.daemon.intercept import HttpRelay, RequestRecord, Transport, UpstreamRefused
from netjail.daemon.interception import Interception, serve_intercepted, warm_leaves
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
    requests: bytes | list[bytes],
    policy: HttpPolicy,
    responses: list[bytes] | None = None,
    decisions: RequestDecisions | None = None,
    transport: Transport = "tls",
) -> tuple[list[h11.Event], list[RequestRecord], FakeUpstream]:
    """Run the relay over ``requests`` (in these pieces, if a list; to port 443 over TLS, 80
    plain); the job's parsed responses, the records, the upstream."""
    job = FakeStream(requests if isinstance(requests, list) else [requests])
    upstream = FakeUpstream(responses)
    records: list[RequestRecord] = []
    relay = HttpRelay(
        job=job,
        domain=API,
        port=443 if transport == "tls" else 80,
        policy=policy,
        connect=upstream,
        record=records.append,
        transport=transport,
        decisions=decisions,
    )
    asyncio.run(relay.serve())
    return parse_responses(bytes(job.sent)), records, upstream


def parse_responses(data: bytes) -> list[h11.Event]:
    """The job's side as a client reads it, one response per (pretend) request."""
    events: list[h11.Event] = []
    if not data:  # nothing sent (h11 would read b"" as the end of the connection)
        return events
    client = h11.Connection(h11.CLIENT)
    client.receive_data(data)
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


SECRET = b"tok_0123456789abcdef"


def upstream_got(upstream: FakeUpstream) -> bytes:
    """Every byte the relay sent to the upstream, over all its connections."""
    return b"".join(bytes(s.sent) for s in upstream.streams)


def test_h2c_upgrade_is_refused_so_no_request_skips_the_rules() -> None:
    """An h2c upgrade (or any HTTP2-Settings header) gets 403 h2c_refused, never the upstream."""
    policy = parse_http_policy(deny_requests=[f"DELETE {API}/*"])
    upgrade = get("/", extra="Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n")
    settings = get("/", extra="HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n")
    switched = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
    for request in (upgrade, settings):
        events, records, upstream = serve(request + get("/v1/x"), policy, [switched])
        [(status, headers, _)] = responses(events)
        assert status == 403
        assert headers[b"x-netjail-reason"].startswith(b"h2c_refused")
        assert upstream_got(upstream) == b""
        assert records[0].reason == "h2c_refused"


def test_a_request_with_both_framings_is_refused_before_the_upstream() -> None:
    """Content-Length with Transfer-Encoding (CL.TE smuggling) is a 400 ambiguous_framing."""
    policy = parse_http_policy(deny_requests=[f"DELETE {API}/*"])
    smuggled = get("/v1/everything").replace(b"GET", b"DELETE")
    chunked = f"{len(smuggled):x}\r\n".encode() + smuggled + b"\r\n0\r\n\r\n"
    request = (
        f"POST /v1/ok HTTP/1.1\r\nHost: {API}\r\nContent-Length: 4\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode() + chunked
    events, _, upstream = serve(request, policy, [b"HTTP/1.1 204 No Content\r\n\r\n"])
    [(status, headers, _)] = responses(events)
    assert status == 400
    assert headers[b"x-netjail-reason"].startswith(b"ambiguous_framing")
    assert upstream_got(upstream) == b""


def test_range_requests_to_a_redacted_host_get_whole_bodies_or_a_502() -> None:
    """A redacted host's Range headers are dropped upstream and a 206 answer is 502
    redact_partial, so pieces that each dodge the regex never reach the job."""
    policy = parse_http_policy(redact=[f"{API}:tok_[0-9a-f]{{16}}"])
    partial = (
        b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-9/20\r\n"
        b"Content-Length: 10\r\n\r\n" + SECRET[:10]
    )
    request = get("/me", extra='Range: bytes=0-9\r\nIf-Range: "x"\r\n')
    events, _, upstream = serve(request, policy, [partial])
    [(status, headers, body)] = responses(events)
    assert status == 502
    assert headers[b"x-netjail-reason"].startswith(b"redact_partial")
    assert SECRET[:10] not in body
    sent = upstream_got(upstream).lower()
    assert b"get /me" in sent
    assert b"range:" not in sent


def test_two_content_encodings_are_refused_not_read_as_identity() -> None:
    """Content-Encoding gzip then identity (or a list of codings) is 502 redact_undecodable."""
    policy = parse_http_policy(redact=[f"{API}:tok_[0-9a-f]{{16}}"])
    body = gzip.compress(b"key=" + SECRET)
    for codings in (
        "Content-Encoding: gzip\r\nContent-Encoding: identity\r\n",
        "Content-Encoding: gzip, identity\r\n",
    ):
        events, _, _ = serve(get("/"), policy, [ok(body, codings)])
        [(status, headers, got)] = responses(events)
        assert status == 502
        assert headers[b"x-netjail-reason"].startswith(b"redact_undecodable")
        assert body not in got


def test_a_large_body_is_redacted_too() -> None:
    """A body over the on-loop bound (redacted in a thread) has its secrets redacted."""
    policy = parse_http_policy(redact=[f"{API}:tok_[0-9a-f]{{16}}"])
    body = b"x" * (intercept.REDACT_ON_LOOP_BYTES + 1) + SECRET
    events, _, _ = serve(get("/"), policy, [ok(body)])
    [(status, _, got)] = responses(events)
    assert status == 200
    assert SECRET not in got
    assert got.endswith(b"[REDACTED]")


def test_plain_http_to_a_host_with_injections_is_refused_before_any_upstream() -> None:
    """Over plain HTTP (transport "plain") a host with --inject-header gets 403
    inject_needs_tls, and the upstream never sees the credential."""
    policy = parse_http_policy(inject_headers=[f"{API}:Authorization=Bearer s3cret"])
    events, _, upstream = serve(
        get("/"), policy, [b"HTTP/1.1 204 No Content\r\n\r\n"], transport="plain"
    )
    [(status, headers, _)] = responses(events)
    assert status == 403
    assert headers[b"x-netjail-reason"].startswith(b"inject_needs_tls")
    assert b"s3cret" not in upstream_got(upstream)


def test_an_injected_header_never_goes_upstream_in_plain_http_through_the_interception() -> None:
    """Through serve_intercepted, plain HTTP (no ClientHello) to a host with --inject-header is
    answered 403 inject_needs_tls and no upstream connection is even made."""
    policy = parse_http_policy(inject_headers=[f"{API}:Authorization=Bearer s3cret"])
    interception = Interception(http=policy, ca=JobCA("j-test"), upstream_ca=None)
    connects: list[str] = []

    async def scenario() -> bytes:
        loop = asyncio.get_running_loop()
        with socket.create_server(("127.0.0.1", 0)) as server:
            server.setblocking(False)
            job = socket.create_connection(server.getsockname())
            conn, _ = await loop.sock_accept(server)
            conn.setblocking(False)
            first = f"GET / HTTP/1.1\r\nHost: {API}\r\nConnection: close\r\n\r\n".encode()
            job.sendall(first)
            await loop.sock_recv(conn, len(first))  # the proxy has read and checked these

            async def connect() -> socket.socket | UpstreamRefused:
                connects.append("upstream")
                return UpstreamRefused("upstream_unreachable")

            await asyncio.wait_for(
                serve_intercepted(
                    interception, conn, first, API, 80, connect=connect, record=lambda _r: None
                ),
                5,
            )
            conn.close()
            got = b""
            while chunk := job.recv(65536):
                got += chunk
            job.close()
            return got

    got = asyncio.run(scenario())
    assert got.startswith(b"HTTP/1.1 403")
    assert b"inject_needs_tls" in got
    assert connects == []


def _asking(allow: set[str], asked: list[Question], timeout_s: float = 5.0) -> RequestDecisions:
    async def ask(question: Question) -> bool:
        asked.append(question)
        return question.request is not None and question.request.path in allow

    return RequestDecisions("j-1", ask, timeout_s)


def test_a_request_no_allow_request_matches_waits_for_the_client_s_decision() -> None:
    """With live decisions, an unmatched request is asked about: allowed, it goes upstream
    (its record says decided_allow); denied, it gets 403 decided_deny; a request a rule
    allows is never asked; and the same path later is not asked again."""
    policy = parse_http_policy(allow_requests=[f"GET {API}/ok"])
    asked: list[Question] = []
    requests = get("/ok") + get("/yes") + get("/no") + get("/yes?q=1")
    events, records, upstream = serve(
        requests, policy, [ok(b"a"), ok(b"b"), ok(b"c")], _asking({"/yes"}, asked)
    )
    assert [r[0] for r in responses(events)] == [200, 200, 403, 200]
    assert [(q.domain, q.request and q.request.path) for q in asked] == [
        (API, "/yes"),
        (API, "/no"),
    ]
    assert [(r.verdict, r.path, r.reason) for r in records] == [
        ("allowed", "/ok", None),
        ("allowed", "/yes", "decided_allow"),
        ("blocked", "/no", "decided_deny"),
        ("allowed", "/yes?…", "decided_allow"),
    ]
    denied = responses(events)[2][1][b"x-netjail-reason"]
    assert denied == b"decided_deny: no --allow-request matches, and the client denied it"
    assert sum(stream.sent.count(b"GET /yes") for stream in upstream.streams) == 2


def test_a_request_without_an_answer_in_time_is_denied_with_the_reason() -> None:
    """The timeout denies the request: 403 decision_timeout naming the wait, no upstream."""

    async def silent(question: Question) -> bool:
        await asyncio.sleep(10)
        return True

    policy = parse_http_policy(allow_requests=[f"GET {API}/ok"])
    decisions = RequestDecisions("j-1", silent, timeout_s=0.01)
    events, records, upstream = serve(get("/other"), policy, [ok(b"a")], decisions)
    [(status, headers, _)] = responses(events)
    assert status == 403
    assert headers[b"x-netjail-reason"] == (
        b"decision_timeout: no --allow-request matches, and no decision came in 0.01s"
    )
    assert [(r.verdict, r.reason) for r in records] == [("blocked", "decision_timeout")]
    assert upstream.streams == []


def test_a_deny_request_rule_is_never_put_to_the_client() -> None:
    """Only requests no rule covers are asked about: a --deny-request stays a 403."""
    policy = parse_http_policy(deny_requests=[f"GET {API}/admin"], allow_requests=[f"GET {API}/ok"])
    asked: list[Question] = []
    events, records, _ = serve(get("/admin"), policy, [ok(b"a")], _asking({"/admin"}, asked))
    assert [r[0] for r in responses(events)] == [403]
    assert asked == []
    assert [r.reason for r in records] == ["deny_request"]


def test_the_leaves_of_exactly_intercepted_names_are_made_ahead() -> None:
    """warm_leaves makes a leaf for each name intercepted by name (not for *.NAME, which names
    no host yet), and the first connection then finds it cached."""
    ca = JobCA("j-1")
    policy = parse_http_policy(intercept=[API, "*.example.org"])
    asyncio.run(warm_leaves(Interception(policy, ca, None)))
    assert list(ca._leaves) == [API]
    assert ca.server_context(API) is ca._leaves[API]


def test_sized_bodies_in_pieces_keep_one_upstream_connection_for_the_next_request() -> None:
    """Content-Length bodies go past the upstream's h11 in whatever pieces they come; the
    upstream connection is kept for the next request, as h11's next cycle would keep it."""
    policy = parse_http_policy()
    first, second = ok(b"hello " * 1000), ok(b"world")
    pieces = [first[:40], first[40:41], first[41:5000], first[5000:], second]
    events, records, upstream = serve(get("/a") + get("/b"), policy, pieces)
    assert [(status, body) for status, _, body in responses(events)] == [
        (200, b"hello " * 1000),
        (200, b"world"),
    ]
    assert [(r.path, r.status, r.bytes_in) for r in records] == [
        ("/a", 200, 6000),
        ("/b", 200, 5),
    ]
    assert len(upstream.streams) == 1


def test_an_upstream_that_says_close_or_sends_past_the_body_is_not_used_again() -> None:
    """After ``Connection: close``, or bytes past the Content-Length, the next request goes on
    a new upstream connection (each fake connection answers from the start again)."""
    policy = parse_http_policy()
    for answer in (ok(b"hello", "Connection: close\r\n"), ok(b"hello") + b"HTTP/1.1 200"):
        events, _, upstream = serve(get("/a") + get("/b"), policy, [answer])
        assert [(status, body) for status, _, body in responses(events)] == [
            (200, b"hello"),
            (200, b"hello"),
        ]
        assert len(upstream.streams) == 2


def test_an_upstream_that_closes_inside_a_sized_body_ends_the_connection() -> None:
    """The job gets what came, then the end of the connection: never a complete response."""
    events, records, _ = serve(get("/a") + get("/b"), parse_http_policy(), [ok(b"x" * 100)[:-10]])
    assert not any(isinstance(event, h11.EndOfMessage) for event in events)
    assert records == []


def post(path: str, body: bytes, extra: str = "") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: {API}\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


def upstream_requests(data: bytes) -> list[tuple[bytes, bytes]]:
    """(target, body) of each whole request the upstream got, as its h11 reads them."""
    server = h11.Connection(h11.SERVER)
    server.receive_data(data)
    found: list[tuple[bytes, bytes]] = []
    target, body = b"", b""
    while True:
        event = server.next_event()
        if isinstance(event, h11.Request):
            target, body = event.target, b""
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            found.append((target, body))
            server.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
            server.send(h11.EndOfMessage())
            server.start_next_cycle()
        else:
            return found


def test_a_sized_request_body_in_pieces_reaches_the_upstream_then_the_next_request() -> None:
    """A Content-Length body goes past the job's h11 in whatever pieces it comes; a request
    sent in the same piece as the body's end is served next, on the same connections."""
    body = b"0123456789" * 1000
    sent = post("/up", body) + get("/after")
    pieces = [sent[:30], sent[30:31], sent[31:4000], sent[4000:]]
    events, records, upstream = serve(pieces, parse_http_policy(), [ok(b"one"), ok(b"two")])
    assert [(status, got) for status, _, got in responses(events)] == [(200, b"one"), (200, b"two")]
    assert [(r.method, r.path, r.bytes_out) for r in records] == [
        ("POST", "/up", len(body)),
        ("GET", "/after", 0),
    ]
    [stream] = upstream.streams
    assert upstream_requests(bytes(stream.sent)) == [(b"/up", body), (b"/after", b"")]


def test_a_job_that_closes_inside_a_sized_request_body_ends_the_connection() -> None:
    """The upstream never gets a whole request, and nothing is recorded as relayed."""
    events, records, upstream = serve(post("/up", b"x" * 100)[:-10], parse_http_policy(), [ok(b"")])
    assert events == []
    assert records == []
    assert upstream_requests(bytes(upstream.streams[0].sent)) == []


def test_a_sized_request_body_then_the_jobs_end_is_answered_then_the_connection_ends() -> None:
    """The job's side closed right after the body: the response still comes, then the end."""
    events, records, _ = serve([post("/up", b"data"), b""], parse_http_policy(), [ok(b"done")])
    assert [(status, got) for status, _, got in responses(events)] == [(200, b"done")]
    assert [(r.path, r.bytes_out) for r in records] == [("/up", 4)]


def test_a_job_waiting_for_100_continue_gets_it_before_its_sized_body_is_relayed() -> None:
    """Expect: 100-continue: the proxy answers 100 itself, and the Expect header stays here."""
    head, body = post("/up", b"payload", "Expect: 100-continue\r\n").split(b"\r\n\r\n")
    events, records, upstream = serve([head + b"\r\n\r\n", body], parse_http_policy(), [ok(b"ok")])
    assert isinstance(events[0], h11.InformationalResponse)
    assert events[0].status_code == 100
    assert [(status, got) for status, _, got in responses(events)] == [(200, b"ok")]
    sent = bytes(upstream.streams[0].sent)
    assert b"expect" not in sent.lower()
    assert upstream_requests(sent) == [(b"/up", b"payload")]
    assert [(r.status, r.bytes_out) for r in records] == [(200, 7)]
