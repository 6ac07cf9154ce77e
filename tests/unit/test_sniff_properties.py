"""Property tests for netjail.sniff and the proxy's first-bytes check, on hostile bytes.

Any bytes give one of the parsers' own results (a Malformed value for broken input), never an
exception; a decision is never changed by more bytes; from MAX_FIRST_BYTES on there is one;
and what the parsers build from well-formed messages they read back exactly.
"""

from __future__ import annotations

import ssl
from typing import get_args

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from netjail import sniff
from netjail.daemon.proxy import Blocked, BlockReason, check_first_bytes

from .test_sniff import extension, handshake, hello_body, record, sni_extension, u16

PROPERTIES = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _real_client_hello() -> bytes:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="api.example.test")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


HELLO = _real_client_hello()
REQUEST = b"GET http://a.example/ HTTP/1.1\r\nHost: a.example:80\r\nX: y\r\n\r\nbody"


@st.composite
def mutated(draw: st.DrawFn, original: bytes) -> bytes:
    """``original`` with a few bytes changed, inserted or cut, then truncated somewhere."""
    data = bytearray(original)
    alphabet = b"\r\n :/[]@\t\x00\xff\x16\x03aZ9"
    for _ in range(draw(st.integers(0, 6))):
        position = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["set", "insert", "delete"]))
        byte = draw(st.sampled_from(alphabet) | st.integers(0, 255))
        if action == "insert":
            data.insert(position, byte)
        elif position < len(data):
            if action == "set":
                data[position] = byte
            else:
                del data[position]
    return bytes(data[: draw(st.integers(0, len(data)))])


HOSTILE = st.binary(max_size=300) | mutated(HELLO) | mutated(REQUEST)
# Host names as clients send them, and as sniff returns them (canonical: lowercase).
LABEL = st.from_regex(r"[a-z0-9](?:[a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
NAME = st.lists(LABEL, min_size=1, max_size=4).map(".".join).filter(
    lambda name: not name.rsplit(".", 1)[-1].isdigit()
) | st.just("api.example.test")


def _is_decided(result: object) -> bool:
    return not isinstance(result, sniff.NeedMore)


@PROPERTIES
@given(HOSTILE)
@example(b"\x16\x03\x01\x00\x00")
def test_tls_needs_more_only_past_the_end(data: bytes) -> None:
    """NeedMore always asks for more bytes than there are."""
    result = sniff.parse_tls_sni(data)
    if isinstance(result, sniff.NeedMore):
        assert result.needed is not None
        assert result.needed > len(data)


@PROPERTIES
@given(HOSTILE, st.binary(max_size=300))
def test_tls_decision_stands_whatever_follows(data: bytes, more: bytes) -> None:
    """A decision on some bytes is the decision on those bytes and any that follow."""
    first = sniff.parse_tls_sni(data)
    assume(_is_decided(first))
    assert sniff.parse_tls_sni(data + more) == first


@PROPERTIES
@given(HOSTILE, st.binary(max_size=300))
def test_http_decision_stands_whatever_follows(data: bytes, more: bytes) -> None:
    """A host found stays the host found; a refusal stays a refusal (its reason may sharpen)."""
    first = sniff.parse_http_host(data)
    assume(_is_decided(first))
    later = sniff.parse_http_host(data + more)
    if isinstance(first, sniff.HttpHost | sniff.NoHost):
        assert later == first
    else:
        assert _is_decided(later)
        assert not isinstance(later, sniff.HttpHost | sniff.NoHost)


@PROPERTIES
@given(HOSTILE)
def test_http_needs_more_has_no_length(data: bytes) -> None:
    """An incomplete HTTP head cannot say how much is missing, only that something is."""
    result = sniff.parse_http_host(data)
    if isinstance(result, sniff.NeedMore):
        assert result.needed is None
        assert len(data) < sniff.MAX_HTTP_HEAD


@settings(max_examples=40, deadline=None)
@given(
    st.binary(min_size=1, max_size=64), st.sampled_from([b"\x16\x03\x01\x7f\xff", b"GET / ", b""])
)
def test_every_parser_decides_by_max_first_bytes(pattern: bytes, start: bytes) -> None:
    """From MAX_FIRST_BYTES bytes on, neither parser asks for more: the proxy's read bound."""
    data = (start + pattern * (sniff.MAX_FIRST_BYTES // len(pattern) + 1))[: sniff.MAX_FIRST_BYTES]
    assert _is_decided(sniff.parse_tls_sni(data))
    assert _is_decided(sniff.parse_http_host(data))


@PROPERTIES
@given(HOSTILE)
def test_names_found_are_in_the_bytes(data: bytes) -> None:
    """A name either parser returns is spelled, in some case, in the bytes themselves."""
    for result in (sniff.parse_tls_sni(data), sniff.parse_http_host(data)):
        if isinstance(result, sniff.ServerName | sniff.HttpHost):
            assert result.host.encode() in data.lower()


@PROPERTIES
@given(
    NAME,
    st.lists(st.integers(1, 0xFFFF), unique=True, max_size=6),
    st.lists(st.integers(1, 400), max_size=sniff.MAX_TLS_RECORDS - 1),
    st.booleans(),
)
def test_built_client_hello_reads_back(
    name: str, others: list[int], cuts: list[int], upper: bool
) -> None:
    """A ClientHello with any extensions, cut into records anywhere, gives back its SNI."""
    sni = sni_extension((name.upper() if upper else name).encode())
    extensions = b"".join(extension(kind, u16(kind)) for kind in others) + sni
    message = handshake(hello_body(extensions))
    bounds = sorted({min(cut, len(message) - 1) for cut in cuts} - {0})
    data = b"".join(
        record(message[a:b]) for a, b in zip([0, *bounds], [*bounds, len(message)], strict=True)
    )
    assert sniff.parse_tls_sni(data) == sniff.ServerName(name)


TOKEN = st.from_regex(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,12}", fullmatch=True).filter(
    lambda token: token.lower() not in {"host", "upgrade", "content-length", "transfer-encoding"}
)
VALUE = st.from_regex(r"[!-~]([ !-~]{0,20}[!-~])?", fullmatch=True)


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, str, int | None]:
    """A strict request head with any other headers and Host anywhere among them."""
    method = draw(st.sampled_from(["GET", "POST", "HEAD", "PUT", "OPTIONS", "PATCH", "DELETE"]))
    path = draw(st.from_regex(r"/[A-Za-z0-9/._~%-]{0,30}", fullmatch=True))
    version = draw(st.sampled_from(["1.0", "1.1"]))
    name = draw(NAME)
    port = draw(st.none() | st.integers(1, 65535))
    lines = [
        f"{key}: {value}" for key, value in draw(st.lists(st.tuples(TOKEN, VALUE), max_size=6))
    ]
    host = name if port is None else f"{name}:{port}"
    lines.insert(draw(st.integers(0, len(lines))), f"Host: {host}")
    head = f"{method} {path} HTTP/{version}\r\n" + "".join(f"{line}\r\n" for line in lines)
    return head.encode() + b"\r\n", name, port


@PROPERTIES
@given(requests())
def test_built_request_reads_back(request: tuple[bytes, str, int | None]) -> None:
    """A strict request head gives back its host and port, wherever Host is among the headers."""
    head, name, port = request
    assert sniff.parse_http_host(head) == sniff.HttpHost(name, port)


@PROPERTIES
@given(HOSTILE, st.sampled_from(["api.example.test", "a.example"]))
def test_first_bytes_check_relays_only_the_name(data: bytes, domain: str) -> None:
    """check_first_bytes asks for more, passes bytes that name ``domain``, or raises Blocked
    with one of the proxy's reasons; nothing else."""
    blocked: Blocked | None = None
    try:
        verdict = check_first_bytes(data, domain, 443)
    except Blocked as exc:
        blocked = exc
    if blocked is not None:
        assert blocked.reason in get_args(BlockReason)
        assert blocked.detail is not None
        return
    if verdict is None:
        http = sniff.parse_http_host(data)
        assert sniff.parse_tls_sni(data) == sniff.ServerName(domain) or (
            isinstance(http, sniff.HttpHost) and http.host == domain
        )
    else:
        assert verdict in (sniff.parse_tls_sni(data), sniff.parse_http_host(data))
