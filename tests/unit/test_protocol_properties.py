"""Properties of the wire protocol (netjail.protocol) on hostile and generated input: framing is
independent of how the stream is cut, decoding raises only ProtocolError, every request and
reply round-trips, and the argv/env bound holds exactly at MAX_EXEC_BYTES."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from netjail import protocol as p
from netjail.errors import ProtocolError

#: Text as a hostile client might send it: any code point but surrogates (JSON cannot carry them
#: unpaired through a UTF-8 encoder), NULs and control characters included.
TEXT = st.text(st.characters(blacklist_categories=["Cs"]), max_size=40)
NAME = st.text(st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=20)
IDS = st.integers(0, 0xFFFFFFFE)


@st.composite
def chunked(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` cut at arbitrary points (empty pieces included)."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    pieces = []
    start = 0
    for cut in [*cuts, len(data)]:
        pieces.append(data[start:cut])
        start = cut
    return pieces


# ---------------------------------------------------------------------- FrameBuffer


@given(st.data(), st.lists(st.binary(max_size=50).map(lambda b: b.replace(b"\n", b"")), max_size=8))
def test_frames_come_out_whole_and_in_order_however_the_stream_is_cut(
    data: st.DataObject, frames: list[bytes]
) -> None:
    """Any cut of a stream of frames gives the same frames; a trailing partial one is pending."""
    tail = data.draw(st.binary(max_size=20).map(lambda b: b.replace(b"\n", b"")))
    stream = b"".join(frame + b"\n" for frame in frames) + tail
    buffer = p.FrameBuffer(max_frame=64)
    out: list[bytes] = []
    for piece in data.draw(chunked(stream)):
        out.extend(buffer.feed(piece))
    assert out == frames
    assert buffer.pending == len(tail)


@given(st.data(), st.binary(max_size=400))
def test_a_hostile_stream_gives_bounded_frames_or_a_protocol_error(
    data: st.DataObject, stream: bytes
) -> None:
    """Any bytes give frames within the bound, or ProtocolError once a frame outgrows it."""
    buffer = p.FrameBuffer(max_frame=32)
    frames: list[bytes] = []
    error = None
    try:
        for piece in data.draw(chunked(stream)):
            frames.extend(buffer.feed(piece))
    except ProtocolError as e:
        error = str(e)
    assert error in (None, "frame larger than 32 bytes")
    assert all(b"\n" not in frame and len(frame) + 1 <= 32 for frame in frames)
    if error is None:
        assert buffer.pending <= 32
        assert b"".join(frame + b"\n" for frame in frames) == stream[: len(stream) - buffer.pending]


# ---------------------------------------------------------------------- requests


def floats(low: float, high: float, *, exclude_low: bool) -> st.SearchStrategy[float]:
    return st.floats(low, high, exclude_min=exclude_low, allow_nan=False, allow_infinity=False)


def optional(strategy: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    return st.none() | strategy


RULE = st.text(st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=30)
PATH = st.text(st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=30)

RUN_REQUESTS = st.builds(
    p.RunRequest,
    argv=st.lists(TEXT, min_size=1, max_size=6),
    env=st.dictionaries(NAME, TEXT, max_size=4),
    cwd=optional(PATH),
    uid=optional(IDS),
    gid=optional(IDS),
    stdio=st.sampled_from(["fds", "capture", "null"]),
    capture_bytes=st.integers(0, p.MAX_CAPTURE_BYTES),
    events=st.booleans(),
    memory_bytes=optional(st.integers(p.MIN_MEMORY_BYTES, 1 << 50)),
    cpus=optional(floats(0, p.MAX_CPUS, exclude_low=True)),
    pids=optional(st.integers(1, p.MAX_PIDS)),
    timeout_s=optional(floats(0, p.MAX_TIMEOUT_S, exclude_low=True)),
    kill_grace_s=optional(floats(0, p.MAX_KILL_GRACE_S, exclude_low=False)),
    allow=st.lists(RULE, max_size=3),
    deny=st.lists(RULE, max_size=3),
    add_hosts=st.lists(RULE, max_size=2),
    binds=st.lists(
        st.builds(
            p.BindMount,
            source=PATH,
            target=optional(PATH),
            access=st.sampled_from(["ro", "rw"]),
        ),
        max_size=2,
    ),
    hostname=optional(
        st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,10}[A-Za-z0-9])?", fullmatch=True)
    ),
    cwd_fallback=st.sampled_from(["error", "home"]),
)

REQUESTS = st.one_of(
    st.builds(p.Hello, version=st.integers(-(2**63), 2**63 - 1), client=st.text(max_size=20)),
    RUN_REQUESTS,
    st.builds(p.KillRequest, job=NAME, signal=st.integers(1, 64)),
    st.just(p.PsRequest()),
    st.just(p.StatusRequest()),
    st.builds(p.EventsRequest, job=optional(NAME), follow=st.booleans()),
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(REQUESTS)
def test_every_request_round_trips(request: p.Request) -> None:
    """encode_message then decode_request gives the request back, as one frame."""
    frame = p.encode_message(request)
    assert frame.endswith(b"\n")
    assert frame.count(b"\n") == 1
    assert p.decode_request(frame[:-1]) == request


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_any_bytes_decode_to_a_request_or_a_protocol_error(frame: bytes) -> None:
    """decode_request raises nothing but ProtocolError, whatever the bytes; what it accepts
    encodes back to a frame that decodes to the same request."""
    try:
        request = p.decode_request(frame)
    except ProtocolError:
        return
    assert p.decode_request(p.encode_message(request)[:-1]) == request


@st.composite
def mutated_request(draw: st.DrawFn) -> bytes:
    """A valid request's JSON with a few bytes changed, cut, or a field's value replaced."""
    frame = bytearray(p.encode_message(draw(REQUESTS))[:-1])
    for _ in range(draw(st.integers(0, 3))):
        if frame:
            frame[draw(st.integers(0, len(frame) - 1))] = draw(st.integers(0, 255))
    return bytes(frame[: draw(st.integers(0, len(frame)))])


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_request() | JSON_VALUES.map(msgspec.json.encode))
def test_mutated_or_foreign_json_decodes_or_is_a_protocol_error(frame: bytes) -> None:
    """Damaged requests and arbitrary JSON documents give a Request or ProtocolError only."""
    try:
        request = p.decode_request(frame)
    except ProtocolError:
        return
    assert p.decode_request(p.encode_message(request)[:-1]) == request


@given(RUN_REQUESTS, NAME, st.none() | st.booleans() | st.integers() | TEXT)
def test_an_unknown_field_is_refused(request: p.RunRequest, field: str, value: object) -> None:
    """A field the protocol does not define is a ProtocolError, never silently ignored."""
    assume(field not in p.RunRequest.__struct_fields__ and field != "op")
    document = msgspec.json.decode(p.encode_message(request))
    document[field] = value
    with pytest.raises(ProtocolError):
        p.decode_request(msgspec.json.encode(document))


# ---------------------------------------------------------------------- the exec bound


#: Strings of up to 65,536 copies of one character (one to four UTF-8 bytes), so that a handful
#: of them fall on either side of the bound.
LONG = st.builds(
    lambda char, n: char * n, st.characters(blacklist_categories=["Cs"]), st.integers(0, 65_536)
)


@settings(max_examples=300)
@given(
    st.lists(LONG | TEXT, min_size=1, max_size=8),
    st.dictionaries(NAME, LONG | TEXT, max_size=4),
)
def test_argv_and_env_are_refused_exactly_above_max_exec_bytes(
    argv: list[str], env: dict[str, str]
) -> None:
    """A run request is accepted, built or decoded, exactly when exec_size is within the bound;
    above it both give the same ProtocolError naming the bound."""
    size = p.exec_size(argv, env)
    frame = msgspec.json.encode({"op": "run", "argv": argv, "env": env})
    if size <= p.MAX_EXEC_BYTES:
        assert p.decode_request(frame) == p.RunRequest(argv=argv, env=env)
        return
    message = (
        f"argv and env together must be under {p.MAX_EXEC_BYTES} bytes (as execve counts "
        f"them: each string, its NUL and its pointer); these are {size}"
    )
    with pytest.raises(ProtocolError) as decoded:
        p.decode_request(frame)
    assert str(decoded.value) == message
    with pytest.raises(ProtocolError) as built:
        p.RunRequest(argv=argv, env=env)
    assert str(built.value) == message


def test_exec_size_counts_strings_nuls_and_pointers() -> None:
    """exec_size counts UTF-8 bytes, a NUL and 8 pointer bytes per string, env as NAME=value."""
    assert p.exec_size(["true"], {}) == 4 + 1 + 8
    assert p.exec_size(["é"], {"A": "b"}) == (2 + 1 + 8) + (3 + 1 + 8)


def test_the_bound_is_reached_exactly() -> None:
    """One byte under the bound is a request; one byte over is refused."""
    filler = p.MAX_EXEC_BYTES - p.exec_size(["x"], {})
    assert p.RunRequest(argv=["x" * (filler + 1)]).argv[0] == "x" * (filler + 1)
    with pytest.raises(ProtocolError):
        p.RunRequest(argv=["x" * (filler + 2)])


# ---------------------------------------------------------------------- replies

EVENTS = st.builds(
    p.Event,
    job=NAME,
    time=TEXT,
    kind=st.sampled_from(["egress", "dns"]),
    verdict=st.sampled_from(["allowed", "blocked", "redirected"]),
    proto=st.none() | TEXT | st.integers(0, 255),
    family=st.none() | st.sampled_from([4, 6]),
    dst=st.none() | TEXT,
    port=st.none() | st.integers(0, 65535),
    uid=st.none() | st.integers(0, 2**32 - 1),
    count=st.integers(1, 10**9),
    via=st.sampled_from(["nflog", "kmsg", "dns", "proxy"]),
    domain=st.none() | TEXT,
    reason=st.none() | TEXT,
)

REPORTS = st.builds(
    p.Report,
    job=NAME,
    argv=st.lists(TEXT, max_size=3),
    uid=st.integers(0, 2**32 - 1),
    gid=st.integers(0, 2**32 - 1),
    exit_code=st.none() | st.integers(0, 255),
    signal=st.none() | st.integers(1, 64),
    wall_s=floats(0, 1e6, exclude_low=False),
    events=st.lists(EVENTS, max_size=3),
    lost_events=st.integers(0, 10**9),
    stdout=st.none() | st.binary(max_size=40),
    stderr=st.none() | st.binary(max_size=40),
    domains=st.dictionaries(
        TEXT,
        st.builds(p.DomainSummary, allowed=st.integers(0, 10**6), blocked=st.integers(0, 10**6)),
        max_size=3,
    ),
)

REPLIES = st.one_of(
    st.builds(p.HelloReply, version=st.integers(0, 10), daemon=TEXT),
    st.builds(p.Started, job=NAME, pid=st.integers(1, 2**22), cwd=st.none() | TEXT),
    st.builds(p.EventMessage, event=EVENTS),
    st.builds(p.Exit, report=REPORTS, dropped_events=st.integers(0, 10**6)),
    st.builds(p.ErrorMessage, code=NAME, message=TEXT, exit_code=st.none() | st.integers(0, 255)),
    st.builds(p.Killed, job=NAME),
    st.builds(p.EventsEnd, lost_events=st.integers(0, 10**6)),
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(REPLIES)
def test_every_reply_round_trips(reply: p.Reply) -> None:
    """encode_message then decode_reply gives the daemon's message back, as one frame."""
    frame = p.encode_message(reply)
    assert frame.count(b"\n") == 1
    assert p.decode_reply(frame[:-1]) == reply


@settings(max_examples=300)
@given(st.binary(max_size=200) | JSON_VALUES.map(msgspec.json.encode))
def test_any_bytes_from_a_daemon_decode_to_a_reply_or_a_protocol_error(frame: bytes) -> None:
    """decode_reply raises nothing but ProtocolError, whatever a (hostile) daemon sends."""
    try:
        reply = p.decode_reply(frame)
    except ProtocolError:
        return
    assert p.decode_reply(p.encode_message(reply)[:-1]) == reply
