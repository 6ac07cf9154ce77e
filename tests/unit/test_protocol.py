"""Tests for netjail.protocol: strict request decoding, lenient replies, framing."""

from __future__ import annotations

import json

import msgspec
import pytest

from netjail import protocol as p
from netjail.errors import ProtocolError


def _frame(obj: object) -> bytes:
    return json.dumps(obj).encode()


def test_decode_hello() -> None:
    """A hello with version and client name decodes to Hello."""
    assert p.decode_request(b'{"op":"hello","version":1,"client":"t"}') == p.Hello(
        version=1, client="t"
    )


def test_decode_run_with_every_field() -> None:
    """A run request decodes with every field it carries, in its declared types."""
    request = p.decode_request(
        _frame(
            {
                "op": "run",
                "argv": ["/bin/echo", "hi"],
                "env": {"A": "1"},
                "cwd": "/tmp",
                "uid": 65534,
                "gid": 65534,
                "stdio": "capture",
                "capture_bytes": 4096,
                "events": False,
                "memory_bytes": 64 << 20,
                "cpus": 0.5,
                "pids": 100,
                "timeout_s": 30,
                "kill_grace_s": 2,
            }
        )
    )
    assert request == p.RunRequest(
        argv=["/bin/echo", "hi"],
        env={"A": "1"},
        cwd="/tmp",
        uid=65534,
        gid=65534,
        stdio="capture",
        capture_bytes=4096,
        events=False,
        memory_bytes=64 << 20,
        cpus=0.5,
        pids=100,
        timeout_s=30.0,
        kill_grace_s=2.0,
    )


def test_decode_run_defaults() -> None:
    """A run request with only argv gets the documented defaults."""
    request = p.decode_request(b'{"op":"run","argv":["true"]}')
    assert isinstance(request, p.RunRequest)
    assert (request.env, request.cwd, request.uid, request.gid) == ({}, None, None, None)
    assert request.stdio == "null"
    assert request.capture_bytes == p.DEFAULT_CAPTURE_BYTES
    assert request.events is True
    assert request.memory_bytes is None
    assert request.timeout_s is None


def test_decode_kill_defaults_to_sigterm() -> None:
    """A kill request without a signal means SIGTERM (15)."""
    assert p.decode_request(b'{"op":"kill","job":"j-1"}') == p.KillRequest(job="j-1", signal=15)


def test_decode_kill_with_signal() -> None:
    """A kill request carries the signal number it was given."""
    assert p.decode_request(b'{"op":"kill","job":"j-1","signal":9}') == p.KillRequest(
        job="j-1", signal=9
    )


def test_decode_ps_and_status() -> None:
    """ps and status requests carry no fields."""
    assert p.decode_request(b'{"op":"ps"}') == p.PsRequest()
    assert p.decode_request(b'{"op":"status"}') == p.StatusRequest()


def test_decode_events() -> None:
    """An events request decodes its job filter and follow flag."""
    assert p.decode_request(b'{"op":"events"}') == p.EventsRequest(job=None, follow=False)
    assert p.decode_request(b'{"op":"events","job":"j-1","follow":true}') == p.EventsRequest(
        job="j-1", follow=True
    )


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        pytest.param(
            b'{"op":"hello","version":1,"extra":1}',
            "bad request: Object contains unknown field `extra`",
            id="unknown-field",
        ),
        pytest.param(
            b'{"op":"run","argv":["a"],"nope":true}',
            "bad request: Object contains unknown field `nope`",
            id="unknown-field-run",
        ),
        pytest.param(
            b'{"op":"hello","version":"1"}',
            "bad request: Expected `int`, got `str` - at `$.version`",
            id="wrong-type",
        ),
        pytest.param(
            b'{"op":"run","argv":"echo hi"}',
            "bad request: Expected `array`, got `str` - at `$.argv`",
            id="argv-not-a-list",
        ),
        pytest.param(b'{"op":"shutdown"}', "bad request: unknown or missing op", id="unknown-op"),
        pytest.param(b'{"op":5}', "bad request: unknown or missing op", id="op-not-a-string"),
        pytest.param(b'{"version":1}', "bad request: unknown or missing op", id="missing-op"),
        pytest.param(
            b'{"op":"run","argv":[]}',
            "bad request: Expected `array` of length >= 1 - at `$.argv`",
            id="empty-argv",
        ),
        pytest.param(
            b'{"op":"run","argv":["a"],"uid":-1}',
            "bad request: Expected `int` >= 0 - at `$.uid`",
            id="negative-uid",
        ),
        pytest.param(
            b'{"op":"kill","job":"j-1","signal":0}',
            "bad request: Expected `int` >= 1 - at `$.signal`",
            id="signal-0",
        ),
        pytest.param(
            b'{"op":"kill","job":"j-1","signal":65}',
            "bad request: Expected `int` <= 64 - at `$.signal`",
            id="signal-65",
        ),
        pytest.param(
            b'{"op":"run","argv":["a"],"stdio":"pty"}',
            "bad request: Invalid enum value 'pty' - at `$.stdio`",
            id="unknown-stdio",
        ),
    ],
)
def test_decode_request_rejects_with_a_precise_message(frame: bytes, message: str) -> None:
    """Strict decoding raises ProtocolError naming the field and what was expected."""
    with pytest.raises(ProtocolError) as info:
        p.decode_request(frame)
    assert str(info.value) == message


def test_decode_request_rejects_argv_element_over_64k() -> None:
    """An argv element longer than 65536 characters is refused; exactly 65536 is accepted."""
    assert p.decode_request(_frame({"op": "run", "argv": ["a" * 65536]})) == p.RunRequest(
        argv=["a" * 65536]
    )
    with pytest.raises(ProtocolError) as info:
        p.decode_request(_frame({"op": "run", "argv": ["true", "a" * 65537]}))
    assert str(info.value) == "bad request: Expected `str` of length <= 65536 - at `$.argv[1]`"


def test_decode_request_rejects_capture_bytes_above_the_maximum() -> None:
    """capture_bytes may be MAX_CAPTURE_BYTES but not one more."""
    ok = p.decode_request(
        _frame({"op": "run", "argv": ["a"], "capture_bytes": p.MAX_CAPTURE_BYTES})
    )
    assert isinstance(ok, p.RunRequest)
    assert ok.capture_bytes == p.MAX_CAPTURE_BYTES
    with pytest.raises(ProtocolError) as info:
        p.decode_request(
            _frame({"op": "run", "argv": ["a"], "capture_bytes": p.MAX_CAPTURE_BYTES + 1})
        )
    assert str(info.value) == (
        f"bad request: Expected `int` <= {p.MAX_CAPTURE_BYTES} - at `$.capture_bytes`"
    )


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (b'{"op":"ps"', "bad request: Input data was truncated"),
        (b"xyz", "bad request: JSON is malformed: invalid character (byte 0)"),
        (b'{"op":"ps",}', "bad request: JSON is malformed: trailing comma in object (byte 11)"),
        (b"", "bad request: Input data was truncated"),
    ],
)
def test_decode_request_rejects_invalid_json(frame: bytes, message: str) -> None:
    """Bytes that are not JSON raise ProtocolError, not a msgspec error."""
    with pytest.raises(ProtocolError) as info:
        p.decode_request(frame)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("frame", "got"), [(b'["ps"]', "array"), (b'"ps"', "str"), (b"42", "int"), (b"null", "null")]
)
def test_decode_request_rejects_non_object_json(frame: bytes, got: str) -> None:
    """A JSON value that is not an object is refused with what it was instead."""
    with pytest.raises(ProtocolError) as info:
        p.decode_request(frame)
    assert str(info.value) == f"bad request: Expected `object`, got `{got}`"


def _report_dict() -> dict[str, object]:
    return {
        "job": "j-0123abcd",
        "argv": ["curl", "https://203.0.113.9/"],
        "uid": 65534,
        "gid": 65534,
        "exit_code": 7,
        "signal": None,
        "wall_s": 0.25,
        "events": [
            {
                "job": "j-0123abcd",
                "time": "2026-01-01T00:00:00.000Z",
                "kind": "egress",
                "verdict": "blocked",
                "proto": "tcp",
                "family": 4,
                "dst": "203.0.113.9",
                "port": 443,
                "uid": 65534,
                "count": 1,
                "via": "nflog",
                "future_event_field": [1, 2],
            }
        ],
        "lost_events": 0,
        "future_report_field": {"x": 1},
    }


def test_decode_reply_ignores_unknown_fields() -> None:
    """A newer daemon's extra fields, at any depth, are ignored by the client."""
    frame = _frame({"op": "exit", "report": _report_dict(), "future_exit_field": "x"})
    reply = p.decode_reply(frame)
    assert isinstance(reply, p.Exit)
    assert reply.report.exit_code == 7
    assert reply.report.events[0].dst == "203.0.113.9"
    assert reply.dropped_events == 0


def test_decode_reply_still_rejects_unknown_op() -> None:
    """Leniency covers fields, not message kinds: an unknown op is a ProtocolError."""
    with pytest.raises(ProtocolError) as info:
        p.decode_reply(b'{"op":"reboot"}')
    assert str(info.value) == "bad message from daemon: unknown or missing op"


def test_decode_reply_error_message() -> None:
    """An error reply decodes with its code, message and optional exit code."""
    assert p.decode_reply(
        b'{"op":"error","code":"exec","message":"not found","exit_code":127}'
    ) == p.ErrorMessage(code="exec", message="not found", exit_code=127)


def test_encode_message_is_one_line_ending_in_newline() -> None:
    """encode_message gives exactly one newline, at the end, even for text with newlines."""
    frame = p.encode_message(p.RunRequest(argv=["sh", "-c", "echo a\necho b"], env={"X": "\n"}))
    assert frame.endswith(b"\n")
    assert frame.count(b"\n") == 1


def test_encode_message_round_trips_requests() -> None:
    """Every request kind decodes back to an equal message, tagged with its op."""
    messages: list[p.Request] = [
        p.Hello(version=p.PROTOCOL_VERSION, client="netjail-python"),
        p.RunRequest(argv=["echo", "hi"], env={"A": "1"}, cwd="/tmp", stdio="fds", cpus=1.5),
        p.KillRequest(job="j-1", signal=9),
        p.PsRequest(),
        p.StatusRequest(),
        p.EventsRequest(job="j-1", follow=True),
    ]
    for message in messages:
        frame = p.encode_message(message)
        assert p.decode_request(frame[:-1]) == message
        assert json.loads(frame)["op"] == type(message).__struct_config__.tag


def test_encode_message_round_trips_reply() -> None:
    """An exit reply with a full report decodes back to an equal message."""
    report = p.decode_reply(_frame({"op": "exit", "report": _report_dict()}))
    assert isinstance(report, p.Exit)
    assert p.decode_reply(p.encode_message(report)[:-1]) == report


def test_framebuffer_joins_a_frame_split_across_feeds() -> None:
    """Bytes of one frame arriving in pieces give one frame once the newline arrives."""
    buf = p.FrameBuffer()
    assert buf.feed(b'{"op":') == []
    assert buf.pending == 6
    assert buf.feed(b'"ps"') == []
    assert buf.feed(b"}\n") == [b'{"op":"ps"}']
    assert buf.pending == 0


def test_framebuffer_splits_several_frames_in_one_feed() -> None:
    """Several frames in one feed come out in order, and a trailing partial one is kept."""
    buf = p.FrameBuffer()
    assert buf.feed(b"a\nbb\n\nccc") == [b"a", b"bb", b""]
    assert buf.pending == 3
    assert buf.feed(b"\n") == [b"ccc"]
    assert buf.pending == 0


def test_framebuffer_accepts_a_frame_of_exactly_max_size() -> None:
    """A frame whose length, newline included, equals the maximum is accepted."""
    buf = p.FrameBuffer(max_frame=16)
    assert buf.feed(b"x" * 15 + b"\n") == [b"x" * 15]


def test_framebuffer_accepts_max_size_frame_split_across_feeds() -> None:
    """A maximum-size frame whose newline arrives in a later feed is accepted."""
    buf = p.FrameBuffer(max_frame=16)
    assert buf.feed(b"x" * 15) == []
    assert buf.feed(b"\ny") == [b"x" * 15]
    assert buf.pending == 1


def test_framebuffer_rejects_one_byte_over_with_newline() -> None:
    """A complete frame one byte over the maximum raises ProtocolError."""
    buf = p.FrameBuffer(max_frame=16)
    with pytest.raises(ProtocolError, match="frame larger than 16 bytes"):
        buf.feed(b"x" * 16 + b"\n")


def test_framebuffer_rejects_oversize_frame_after_smaller_ones() -> None:
    """An oversize frame after valid ones in the same feed still raises."""
    buf = p.FrameBuffer(max_frame=16)
    with pytest.raises(ProtocolError, match="frame larger than 16 bytes"):
        buf.feed(b"ok\n" + b"x" * 16 + b"\n")


def test_framebuffer_rejects_one_byte_over_without_newline() -> None:
    """Pending bytes beyond the maximum raise before any newline arrives."""
    buf = p.FrameBuffer(max_frame=16)
    with pytest.raises(ProtocolError, match="frame larger than 16 bytes"):
        buf.feed(b"x" * 17)


def test_framebuffer_rejects_max_pending_bytes_completed_by_newline() -> None:
    """A maximum-size partial frame that then gets its newline is one byte over: refused."""
    buf = p.FrameBuffer(max_frame=16)
    assert buf.feed(b"x" * 16) == []
    with pytest.raises(ProtocolError, match="frame larger than 16 bytes"):
        buf.feed(b"\n")


def test_framebuffer_default_limit_is_max_frame_bytes() -> None:
    """Without an argument the limit is MAX_FRAME_BYTES."""
    buf = p.FrameBuffer()
    assert buf.feed(b"x" * (p.MAX_FRAME_BYTES - 1) + b"\n") == [b"x" * (p.MAX_FRAME_BYTES - 1)]
    with pytest.raises(ProtocolError, match=f"frame larger than {p.MAX_FRAME_BYTES} bytes"):
        buf.feed(b"x" * (p.MAX_FRAME_BYTES + 1))


@pytest.mark.parametrize(
    ("text", "access", "expected"),
    [
        ("/srv/data", "ro", p.BindMount(source="/srv/data", target=None, access="ro")),
        ("/srv/data:/data", "rw", p.BindMount(source="/srv/data", target="/data", access="rw")),
    ],
)
def test_parse_bind_reads_src_and_dst(
    text: str, access: p.BindAccess, expected: p.BindMount
) -> None:
    """SRC[:DST]: the same path when DST is left out; the access is the option's."""
    assert p.parse_bind(text, access) == expected


@pytest.mark.parametrize("text", ["data", "/srv:data", "", ":/data"])
def test_parse_bind_refuses_relative_paths(text: str) -> None:
    """Both paths must be absolute; the error shows the form to use."""
    with pytest.raises(ProtocolError, match="use SRC\\[:DST\\] with absolute paths"):
        p.parse_bind(text, "ro")


def test_run_request_carries_binds_hostname_and_cwd_fallback() -> None:
    """A run request with binds, a hostname and a cwd fallback round-trips strictly."""
    request = p.RunRequest(
        argv=["true"],
        binds=[p.BindMount(source="/a", target="/b", access="rw")],
        hostname="box-1",
        cwd_fallback="home",
    )
    assert p.decode_request(p.encode_message(request)) == request


@pytest.mark.parametrize("hostname", ["-bad", "has space", "a" * 65, ""])
def test_run_request_refuses_bad_hostnames(hostname: str) -> None:
    """A host name sethostname would take badly is a protocol error."""
    frame = b'{"op":"run","argv":["true"],"hostname":' + msgspec.json.encode(hostname) + b"}\n"
    with pytest.raises(ProtocolError):
        p.decode_request(frame)


def test_requests_leave_default_fields_out() -> None:
    """A run request sends only what differs from the defaults (older daemons refuse unknown
    fields, so new ones left at their defaults must not be sent)."""
    frame = p.encode_message(p.RunRequest(argv=["true"]))
    assert json.loads(frame) == {"op": "run", "argv": ["true"]}


def test_run_request_carries_a_stdin_payload_as_base64() -> None:
    """A stdin payload (any bytes) goes out as base64 and decodes back to the same bytes."""
    request = p.RunRequest(argv=["cat"], stdio="capture", stdin=b"\x00\xffline\n")
    frame = p.encode_request(request)
    assert json.loads(frame)["stdin"] == "AP9saW5lCg=="
    assert p.decode_request(frame[:-1]) == request


def test_stdin_payload_of_exactly_the_bound_is_accepted() -> None:
    """MAX_STDIN_BYTES of stdin fit, and the frame stays under the frame bound."""
    request = p.RunRequest(argv=["cat"], stdio="capture", stdin=bytes(p.MAX_STDIN_BYTES))
    assert len(p.encode_request(request)) <= p.MAX_FRAME_BYTES


def test_stdin_payload_over_the_bound_is_refused_by_name() -> None:
    """One byte over MAX_STDIN_BYTES is a ProtocolError naming the bound, built or decoded."""
    too_big = bytes(p.MAX_STDIN_BYTES + 1)
    with pytest.raises(ProtocolError, match=r"stdin payload of 524289 bytes is over the 524288"):
        p.RunRequest(argv=["cat"], stdio="capture", stdin=too_big)
    request = {"op": "run", "argv": ["cat"], "stdio": "capture", "stdin": too_big}
    frame = msgspec.json.encode(request)
    with pytest.raises(ProtocolError, match=r"over the 524288-byte bound"):
        p.decode_request(frame)


@pytest.mark.parametrize("stdio", ["null", "fds"])
def test_stdin_payload_needs_capture_mode(stdio: str) -> None:
    """A stdin payload with stdio "null" or "fds" is refused, saying it needs "capture"."""
    frame = _frame({"op": "run", "argv": ["cat"], "stdio": stdio, "stdin": "aGk="})
    with pytest.raises(ProtocolError, match=r'a stdin payload needs stdio "capture"'):
        p.decode_request(frame)


def test_encode_request_refuses_a_frame_the_daemon_would_refuse() -> None:
    """A request whose frame is over MAX_FRAME_BYTES fails before it is sent."""
    request = p.RunRequest(
        argv=["cat", "\x01" * 60000], stdio="capture", stdin=bytes(p.MAX_STDIN_BYTES)
    )
    with pytest.raises(ProtocolError, match=r"over the protocol's 1048576-byte frame bound"):
        p.encode_request(request)
