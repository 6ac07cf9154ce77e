"""Unit tests for netjail.sniff: the HTTP/1.x Host in a connection's first bytes."""

from __future__ import annotations

import pytest

from netjail.sniff import (
    MAX_HTTP_HEAD,
    H2c,
    HttpHost,
    Malformed,
    NeedMore,
    NoHost,
    NotHttp,
    TooLarge,
    parse_http_host,
)

_NOT_SP_SEPARATED = "the request line is not METHOD SP target SP HTTP/1.x"
_NOT_HTTP_1 = "an HTTP version other than HTTP/1.0 or HTTP/1.1"
_H11 = "the request head is not valid HTTP/1.1"


# --- HTTP ------------------------------------------------------------------------------------


def test_http_host() -> None:
    """A plain request's Host is returned canonical."""
    request = b"GET /x HTTP/1.1\r\nUser-Agent: t\r\nHost: API.Example.Test.\r\nAccept: */*\r\n\r\n"
    assert parse_http_host(request) == HttpHost("api.example.test", None)


def test_http_host_with_port() -> None:
    """The port is stripped from the host and returned apart."""
    request = b"POST / HTTP/1.1\r\nHost: api.example.test:8080\r\n\r\nbody"
    assert parse_http_host(request) == HttpHost("api.example.test", 8080)


def test_http_host_whitespace_trimmed() -> None:
    """Optional whitespace around the Host value is ignored."""
    request = b"GET / HTTP/1.1\r\nhost:\t api.example.test \r\n\r\n"
    assert parse_http_host(request) == HttpHost("api.example.test", None)


def test_http_without_host() -> None:
    """An HTTP/1.0 request without Host names no host."""
    assert parse_http_host(b"GET / HTTP/1.0\r\nAccept: */*\r\n\r\n") == NoHost()


def test_http_absolute_form_target() -> None:
    """An absolute-form target is the host that counts, with or without Host."""
    with_host = b"GET http://api.example.test/x HTTP/1.1\r\nHost: api.example.test\r\n\r\n"
    assert parse_http_host(with_host) == HttpHost("api.example.test", None)
    without = b"GET http://api.example.test:81/x HTTP/1.0\r\n\r\n"
    assert parse_http_host(without) == HttpHost("api.example.test", 81)
    https = b"GET HTTPS://api.example.test/x HTTP/1.0\r\n\r\n"
    assert parse_http_host(https) == HttpHost("api.example.test", None)


def test_every_http_prefix_needs_more() -> None:
    """Each prefix of a request head before its blank line asks for more."""
    request = b"GET / HTTP/1.1\r\nHost: api.example.test\r\n\r\n"
    for size in range(len(request)):
        assert parse_http_host(request[:size]) == NeedMore(None), size


@pytest.mark.parametrize(
    "data",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n",
        b"GET /\r\n\r\n",
        b"G@T / HTTP/1.1\r\nHost: a.example\r\n\r\n",
        b"\x17\x03\x03\x00\x05helloGET / HTTP/1.1\r\nHost: a.example\r\n\r\n",
        b"\x00\x00\x00\x08\x04\xd2\x16\x2f",  # PostgreSQL's SSLRequest
        b"A" * 40,
        b"GET\x00 / HTTP/1.1",
    ],
)
def test_not_http(data: bytes) -> None:
    """Other protocols, a TLS record that is not a handshake, and HTTP/0.9 are not HTTP/1.x."""
    assert parse_http_host(data) == NotHttp()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        # The forms that lenient servers (nginx among them) accept: each one refused.
        (b"\r\nGET / HTTP/1.1\r\nHost: a.example\r\n\r\n", "an empty line before the request line"),
        (b"\nGET / HTTP/1.1\r\nHost: a.example\r\n\r\n", "an empty line before the request line"),
        (
            b"\r\nCONNECT b.example:443 HTTP/1.1\r\nHost: b.example:443\r\n\r\n",
            "an empty line before the request line",
        ),
        (b"GET  / HTTP/1.1\r\nHost: a.example\r\n\r\n", _NOT_SP_SEPARATED),
        (b"GET /  HTTP/1.1\r\nHost: a.example\r\n\r\n", _NOT_SP_SEPARATED),
        (b"GET / HTTP/1.1 \r\nHost: a.example\r\n\r\n", _NOT_SP_SEPARATED),
        (b"GET\t/\tHTTP/1.1\r\nHost: a.example\r\n\r\n", _NOT_SP_SEPARATED),
        (b"GET /\tHTTP/1.1\r\nHost: a.example\r\n\r\n", _NOT_SP_SEPARATED),
        (b"GET / HTTP/1.2\r\nHost: a.example\r\n\r\n", _NOT_HTTP_1),
        (b"GET / HTTP/2\r\n\r\n", _NOT_HTTP_1),
        (b"GET / HTTP/1.10\r\nHost: a.example\r\n\r\n", _NOT_HTTP_1),
        (b"GET / http/1.1\r\nHost: a.example\r\n\r\n", _NOT_HTTP_1),
        (b"GET / Http/1.1\r\nHost: a.example\r\n\r\n", _NOT_HTTP_1),
        (b"GET /\x80 HTTP/1.1\r\nHost: a.example\r\n\r\n", "bad request method or target"),
        (b"GET /\x7f HTTP/1.1\r\nHost: a.example\r\n\r\n", "bad request method or target"),
        (
            b"GET / HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Length: 5\r\n\r\n",
            "both Transfer-Encoding and Content-Length",
        ),
        # What h11 itself refuses.
        (b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: a.example\r\n\r\n", _H11),
        (b"GET / HTTP/1.1\r\nHost: a.example\r\nHOST: b.example\r\n\r\n", _H11),
        (b"GET / HTTP/1.1\r\nHost : a.example\r\n\r\n", _H11),
        (b"GET / HTTP/1.1\r\n\r\n", _H11),  # HTTP/1.1 without Host
        (b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\nHost: a\r\n\r\n", _H11),
        (b"GET / HTTP/1.1\r\nX: y\r\n a.example\r\n\r\n", "obsolete line folding"),
        (b"GET / HTTP/1.1\r\nno colon\r\n\r\n", _H11),
        (b"GET / HTTP/1.1\r\nHost: a.example\x00.evil\r\n\r\n", _H11),
        (b"GET / HTTP/1.1\r\nHost: a.example\n\r\n\r\n", "bare CR or LF in the request head"),
        (b"GET / HTTP/1.1\nHost: a.example\n\n", "bare CR or LF in the request head"),
        (b"GET / HTTP/1.1\r\nHost:\r\n\r\n", "Host header is not a valid host name"),
        (b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n", "Host header is not a valid host name"),
        (b"GET / HTTP/1.1\r\nHost: 192.0.2.1\r\n\r\n", "Host header is not a valid host name"),
        (
            b"GET / HTTP/1.1\r\nHost: a.example:99999\r\n\r\n",
            "Host header is not a valid host name",
        ),
        (b"GET / HTTP/1.1\r\nHost: a.example:8o\r\n\r\n", "Host header is not a valid host name"),
        (
            b"GET / HTTP/1.1\r\nHost: a.example:80:80\r\n\r\n",
            "Host header is not a valid host name",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: b\xc3\xbccher.example\r\n\r\n",
            "Host header is not a valid host name",
        ),
        (b"GET / HTTP/1.1\r\nHost: a b.example\r\n\r\n", "Host header is not a valid host name"),
        (
            b"GET http://evil.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n",
            "Host header disagrees with the request target",
        ),
        (b"GET http://u@a.example/ HTTP/1.0\r\n\r\n", "user information in the request target"),
        (b"GET http:///x HTTP/1.0\r\n\r\n", "request target names no valid host"),
        (b"GET a.example HTTP/1.0\r\n\r\n", "bad request target"),
        (b"GET ftp://a.example/ HTTP/1.0\r\n\r\n", "bad request target"),
        (
            b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n",
            "CONNECT is not forwarded",
        ),
    ],
)
def test_malformed_http(data: bytes, reason: str) -> None:
    """Ambiguous or broken request heads are malformed, with a fixed reason."""
    assert parse_http_host(data) == Malformed(reason)


@pytest.mark.parametrize(
    "data",
    [
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"PRI * HTTP/2.0\r\n",
        b"GET / HTTP/1.1\r\nHost: a.example\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a.example\r\nUpgrade: websocket, H2C\r\n\r\n",
    ],
)
def test_h2c_is_recognised(data: bytes) -> None:
    """The HTTP/2 preface and an Upgrade to h2c are H2c, which the proxy refuses."""
    assert parse_http_host(data) == H2c()


def test_h2c_preface_prefix_needs_more() -> None:
    """A prefix of the h2c preface cannot be told from other requests yet."""
    assert parse_http_host(b"PRI * HTTP/2") == NeedMore(None)


def test_websocket_upgrade_is_an_ordinary_request() -> None:
    """An Upgrade to anything but h2c is the same host, and goes."""
    data = b"GET /ws HTTP/1.1\r\nHost: a.example\r\nUpgrade: websocket\r\n\r\n"
    assert parse_http_host(data) == HttpHost("a.example", None)


def test_lowercase_method_is_a_token_and_parses() -> None:
    """Methods are case-sensitive tokens; "get" is an unknown one, checked like any other."""
    data = b"get / HTTP/1.1\r\nHost: a.example\r\n\r\n"
    assert parse_http_host(data) == HttpHost("a.example", None)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\r\n", "an empty line before the request line"),
        (b"GET  /", _NOT_SP_SEPARATED),
        (b"GET\t/", _NOT_SP_SEPARATED),
        (b"GET / HTTP/1.2\r\nHost: a", _NOT_HTTP_1),
        (b"CONNECT a.example:443 HTTP/1.1\r\n", "CONNECT is not forwarded"),
    ],
)
def test_partial_heads_fail_fast(data: bytes, reason: str) -> None:
    """What is already wrong in an incomplete head is refused without waiting for the rest."""
    assert parse_http_host(data) == Malformed(reason)


def test_partial_head_with_bare_lf_fails_fast() -> None:
    """A bare LF is refused before the head is complete."""
    assert parse_http_host(b"GET / HTTP/1.1\nHost: a") == Malformed(
        "bare CR or LF in the request head"
    )


def test_http_head_too_large() -> None:
    """A head with no blank line within 16 KiB is too large."""
    data = b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * MAX_HTTP_HEAD
    assert parse_http_host(data) == TooLarge(MAX_HTTP_HEAD)
    assert parse_http_host(data[: MAX_HTTP_HEAD - 1]) == NeedMore(None)


def test_http_head_ending_exactly_at_the_bound() -> None:
    """A head whose blank line ends at 16 KiB exactly is parsed."""
    start = b"GET / HTTP/1.1\r\nHost: a.example\r\nX-Pad: "
    data = start + b"a" * (MAX_HTTP_HEAD - len(start) - 4) + b"\r\n\r\n"
    assert len(data) == MAX_HTTP_HEAD
    assert parse_http_host(data) == HttpHost("a.example", None)
