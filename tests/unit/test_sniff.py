"""Unit tests for netjail.sniff: TLS SNI in a connection's first bytes (HTTP: test_sniff_http)."""

from __future__ import annotations

import itertools
import ssl

import pytest

from netjail.sniff import (
    MAX_CLIENT_HELLO,
    MAX_TLS_RECORDS,
    Malformed,
    NeedMore,
    NoSni,
    NotTls,
    ServerName,
    TooLarge,
    parse_tls_sni,
)


def real_client_hello(server_hostname: str | None) -> bytes:
    """The bytes CPython's ssl module sends first, as a client to server_hostname."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def u16(value: int) -> bytes:
    return value.to_bytes(2, "big")


def extension(kind: int, data: bytes) -> bytes:
    return u16(kind) + u16(len(data)) + data


def sni_extension(*names: bytes, name_type: int = 0) -> bytes:
    entries = b"".join(bytes([name_type]) + u16(len(name)) + name for name in names)
    return extension(0, u16(len(entries)) + entries)


def hello_body(extensions: bytes | None) -> bytes:
    """A minimal ClientHello body; ``None`` omits the extensions block entirely."""
    body = b"\x03\x03" + bytes(32) + b"\x00" + u16(2) + b"\x13\x01" + b"\x01\x00"
    if extensions is not None:
        body += u16(len(extensions)) + extensions
    return body


def handshake(body: bytes, kind: int = 1) -> bytes:
    return bytes([kind]) + len(body).to_bytes(3, "big") + body


def record(payload: bytes, content_type: int = 22) -> bytes:
    return bytes([content_type, 3, 1]) + u16(len(payload)) + payload


def records(message: bytes, *cuts: int) -> bytes:
    """``message`` framed as handshake records split at the offsets ``cuts``."""
    bounds = [0, *cuts, len(message)]
    return b"".join(record(message[a:b]) for a, b in itertools.pairwise(bounds))


# --- TLS: real ClientHellos ------------------------------------------------------------------


def test_real_client_hello_sni() -> None:
    """The SNI of a ClientHello from CPython's ssl module is found and lowercased."""
    assert parse_tls_sni(real_client_hello("API.example.test")) == ServerName("api.example.test")


def test_real_client_hello_unicode_name_is_punycode() -> None:
    """ssl sends a Unicode server name as punycode; that is what we return."""
    assert parse_tls_sni(real_client_hello("bücher.example")) == ServerName("xn--bcher-kva.example")


def test_real_client_hello_without_sni() -> None:
    """server_hostname=None sends no SNI."""
    assert parse_tls_sni(real_client_hello(None)) == NoSni()


def test_real_client_hello_to_an_address_has_no_sni() -> None:
    """Clients do not put IP addresses in SNI."""
    assert parse_tls_sni(real_client_hello("192.0.2.1")) == NoSni()


def test_every_prefix_needs_more() -> None:
    """Each truncated prefix asks for more: the record header, the handshake header, the rest."""
    hello = real_client_hello("api.example.test")
    for size in range(len(hello)):
        expected = NeedMore(5) if size < 5 else NeedMore(9) if size < 9 else NeedMore(len(hello))
        assert parse_tls_sni(hello[:size]) == expected, size


def test_trailing_bytes_after_client_hello_ignored() -> None:
    """Bytes after the ClientHello record (early data, say) do not matter."""
    hello = real_client_hello("api.example.test")
    assert parse_tls_sni(hello + b"\x17\x03\x03\x00\x05hello") == ServerName("api.example.test")


def test_client_hello_split_across_records() -> None:
    """A ClientHello split over two or three records is reassembled."""
    message = real_client_hello("api.example.test")[5:]
    assert parse_tls_sni(records(message, 3)) == ServerName("api.example.test")
    assert parse_tls_sni(records(message, 100)) == ServerName("api.example.test")
    assert parse_tls_sni(records(message, 1, 200)) == ServerName("api.example.test")


def test_split_client_hello_prefixes_need_more() -> None:
    """Prefixes of a split ClientHello ask for the next header, then the next record."""
    message = real_client_hello("api.example.test")[5:]
    split = records(message, 100)
    assert parse_tls_sni(split[:50]) == NeedMore(105)
    assert parse_tls_sni(split[:105]) == NeedMore(110)
    assert parse_tls_sni(split[:108]) == NeedMore(110)
    assert parse_tls_sni(split[:110]) == NeedMore(len(split))
    assert parse_tls_sni(split[:-1]) == NeedMore(len(split))


def test_client_hello_split_into_sixteen_records() -> None:
    """A ClientHello cut into as many records as allowed is still reassembled."""
    message = real_client_hello("api.example.test")[5:]
    assert parse_tls_sni(records(message, *range(1, MAX_TLS_RECORDS))) == ServerName(
        "api.example.test"
    )


def test_too_many_records_refused() -> None:
    """A ClientHello cut into more than sixteen records is malformed."""
    message = real_client_hello("api.example.test")[5:]
    assert parse_tls_sni(records(message, *range(1, MAX_TLS_RECORDS + 1))) == Malformed(
        "ClientHello spread over more than 16 records"
    )


def test_client_hello_done_before_its_record_ends() -> None:
    """A record that goes on after the ClientHello (another handshake message) is not awaited."""
    message = handshake(hello_body(sni_extension(b"a.example")))
    data = record(message + handshake(b"", kind=2) + bytes(100))
    assert parse_tls_sni(data[: 5 + len(message)]) == ServerName("a.example")


# --- TLS: not TLS ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n",
        b"SSH-2.0-OpenSSH_9.2\r\n",
        b"\x16\x02\x01\x00\x10",
        b"\x16\x01",
        b"\x80\x2e\x01\x00\x02",  # SSLv2-compatible hello
        b"\x15\x03\x01\x00\x02\x02\x28",  # an alert
        b"\x00",
    ],
)
def test_not_tls(data: bytes) -> None:
    """Bytes that do not start a TLS handshake record are not TLS."""
    assert parse_tls_sni(data) == NotTls()


def test_empty_needs_a_record_header() -> None:
    """No bytes yet: a record header's five bytes are needed."""
    assert parse_tls_sni(b"") == NeedMore(5)
    assert parse_tls_sni(b"\x16\x03") == NeedMore(5)


# --- TLS: hand-built ClientHellos ------------------------------------------------------------


def test_built_hello_with_sni() -> None:
    """The minimal hand-built ClientHello parses, SNI among other extensions."""
    extensions = (
        extension(0x0A0A, b"")
        + sni_extension(b"Api.Example.Test.")
        + extension(43, b"\x02\x03\x04")
    )
    assert parse_tls_sni(record(handshake(hello_body(extensions)))) == ServerName(
        "api.example.test"
    )


def test_hello_without_extensions_block() -> None:
    """A TLS 1.2 hello with no extensions block has no SNI."""
    assert parse_tls_sni(record(handshake(hello_body(None)))) == NoSni()


def test_hello_with_other_extensions_only() -> None:
    """Extensions but no server_name: no SNI."""
    assert parse_tls_sni(record(handshake(hello_body(extension(43, b"\x02\x03\x04"))))) == NoSni()


def test_unknown_name_type_only() -> None:
    """A server_name entry of an unknown type is skipped."""
    data = record(handshake(hello_body(sni_extension(b"opaque", name_type=7))))
    assert parse_tls_sni(data) == NoSni()


@pytest.mark.parametrize(
    ("extensions", "reason"),
    [
        (
            sni_extension(b"a.example") + sni_extension(b"b.example"),
            "duplicate extension",
        ),
        (sni_extension(b"a.example", b"b.example"), "more than one SNI host name"),
        (sni_extension(b"exa mple.example"), "SNI is not a valid host name"),
        (sni_extension(b"192.0.2.1"), "SNI is not a valid host name"),
        (sni_extension(b"b\xc3\xbccher.example"), "SNI is not a valid host name"),
        (sni_extension(b"a.example\x00.evil"), "SNI is not a valid host name"),
        (sni_extension(b""), "SNI is not a valid host name"),
        (sni_extension(b"a" * 300), "SNI is not a valid host name"),
        (extension(0, b""), "length field runs past the end of the ClientHello"),
        (
            extension(0, u16(100) + b"\x00" + u16(9) + b"a.example"),
            "server_name list length does not match its extension",
        ),
        (
            extension(0, u16(12) + b"\x00" + u16(50) + b"a.example"),
            "length field runs past the end of the ClientHello",
        ),
        (u16(0) + u16(10) + b"abc", "length field runs past the end of the ClientHello"),
    ],
)
def test_malformed_server_name(extensions: bytes, reason: str) -> None:
    """Inconsistent or ambiguous server_name data is malformed, with a fixed reason."""
    assert parse_tls_sni(record(handshake(hello_body(extensions)))) == Malformed(reason)


def test_extensions_length_mismatch() -> None:
    """An extensions block whose length disagrees with the message is malformed."""
    body = hello_body(sni_extension(b"a.example")) + b"\x00"
    assert parse_tls_sni(record(handshake(body))) == Malformed(
        "extensions length does not match the ClientHello"
    )


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\x03\x03" + bytes(10), "length field runs past the end of the ClientHello"),
        (b"\x03\x03" + bytes(32) + b"\x21" + bytes(33), "session id longer than 32 bytes"),
        (b"\x03\x03" + bytes(32) + b"\x00" + u16(3) + b"\x13\x01\x00", "bad cipher suites length"),
        (b"\x03\x03" + bytes(32) + b"\x00" + u16(2) + b"\x13\x01\x00", "no compression methods"),
    ],
)
def test_malformed_client_hello_body(body: bytes, reason: str) -> None:
    """Every length in the ClientHello is checked."""
    assert parse_tls_sni(record(handshake(body))) == Malformed(reason)


def test_not_a_client_hello_fails_fast() -> None:
    """A handshake that is not a ClientHello is malformed without waiting for the record."""
    assert parse_tls_sni(b"\x16\x03\x01\x40\x00\x02") == Malformed(
        "the first handshake message is not a ClientHello"
    )


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x16\x03\x01\x00\x00", "TLS record length out of range"),
        (b"\x16\x03\x01\x40\x01", "TLS record length out of range"),
    ],
)
def test_bad_record_lengths(data: bytes, reason: str) -> None:
    """Empty records and records over 16 KiB are malformed."""
    assert parse_tls_sni(data) == Malformed(reason)


def test_non_handshake_record_inside_hello() -> None:
    """A change_cipher_spec record between ClientHello fragments is malformed."""
    message = handshake(hello_body(sni_extension(b"a.example")))
    data = record(message[:10]) + record(b"\x01", content_type=20) + record(message[10:])
    assert parse_tls_sni(data) == Malformed("a non-handshake record interrupts the ClientHello")


def test_client_hello_too_large() -> None:
    """A ClientHello declaring more than 32 KiB is refused as too large."""
    data = record(b"\x01" + (MAX_CLIENT_HELLO + 1).to_bytes(3, "big") + bytes(100))
    assert parse_tls_sni(data) == TooLarge(MAX_CLIENT_HELLO)
