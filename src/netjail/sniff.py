"""Read the host name a job's connection names in its first bytes: TLS SNI or HTTP Host.

Pure: the proxy feeds the bytes read so far and gets one result; on :class:`NeedMore` it reads
more and calls again with everything read. The proxy then checks that the name found is the
one its synthetic destination address stands for, so that a connection to an allowed name
cannot be steered to another host behind the same server (domain fronting).

Every byte is hostile: the parsers check every length against the bytes present, never raise,
and return :class:`Malformed` with a fixed reason (never job text) for anything inconsistent.

TLS: the TLS record layer may split a ClientHello over several handshake records; they are
reassembled, up to :data:`MAX_TLS_RECORDS` records and a ClientHello of at most
:data:`MAX_CLIENT_HELLO` bytes. Limits of any first-bytes check, which the proxy must own:
with Encrypted Client Hello the SNI read here is the outer, public name; and inside TLS (or in
later requests on a kept-alive HTTP connection) the job may name another host to the same
server. The proxy refuses what it cannot attribute.

HTTP/1.x: the request head must end (CRLF CRLF) within :data:`MAX_HTTP_HEAD` bytes. Parsing
is strict where a lenient reading could differ from the upstream server's: bare LF or CR,
obsolete line folding, whitespace before a colon and duplicate Host headers are malformed; an
absolute-form request target is the host that counts (RFC 9112 §3.2.2), and must agree with
a Host header if there is one; CONNECT is refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from netjail.policy import canonical_name

#: Largest TLS plaintext record (RFC 8446 §5.1).
MAX_TLS_RECORD: Final = 16384
#: Largest ClientHello accepted, and most records it may be split over.
MAX_CLIENT_HELLO: Final = 16384
MAX_TLS_RECORDS: Final = 4
#: Largest HTTP request head (request line and headers) accepted.
MAX_HTTP_HEAD: Final = 16384

_TLS_HEADER_SIZE: Final = 5
_CONTENT_HANDSHAKE: Final = 22
_HANDSHAKE_CLIENT_HELLO: Final = 1
_EXT_SERVER_NAME: Final = 0
_NAME_TYPE_HOST: Final = 0

_HTTP_VERSIONS: Final = frozenset({b"HTTP/1.0", b"HTTP/1.1"})
# RFC 9110 token characters: what a method and a field name are made of.
_TOKEN: Final = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# A method is a token; real ones are short, so a longer "method" is not HTTP.
_METHOD_PREFIX: Final = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}(?: |\Z)")
_BARE_LINE_END: Final = re.compile(rb"(?<!\r)\n|\r(?!\n)")
# Control characters other than HT, forbidden in field values and request lines.
_CONTROL: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_ABSOLUTE_TARGET: Final = re.compile(rb"[A-Za-z][A-Za-z0-9+.-]*://([^/?#]*)")
_PORT: Final = re.compile(r"[0-9]{1,5}", re.ASCII)


@dataclass(frozen=True, slots=True)
class NeedMore:
    """Too few bytes to decide; call again with more."""

    #: Total bytes (from the start) needed at least, when known.
    needed: int | None


@dataclass(frozen=True, slots=True)
class NotTls:
    """The bytes do not start a TLS handshake."""


@dataclass(frozen=True, slots=True)
class NoSni:
    """A well-formed ClientHello without a server_name host name."""


@dataclass(frozen=True, slots=True)
class ServerName:
    """The ClientHello's SNI host name, canonical (lowercase ASCII, no trailing dot)."""

    host: str


@dataclass(frozen=True, slots=True)
class NotHttp:
    """The bytes do not start an HTTP/1.0 or HTTP/1.1 request."""


@dataclass(frozen=True, slots=True)
class NoHost:
    """A well-formed HTTP/1.x request that names no host."""


@dataclass(frozen=True, slots=True)
class HttpHost:
    """The host the request is for, canonical, and the port it gave, if any."""

    host: str
    port: int | None


@dataclass(frozen=True, slots=True)
class TooLarge:
    """The ClientHello or request head exceeds ``limit`` bytes."""

    limit: int


@dataclass(frozen=True, slots=True)
class Malformed:
    """The protocol was recognised but broken; ``reason`` is a fixed phrase, not job text."""

    reason: str


SniResult = NeedMore | NotTls | NoSni | ServerName | TooLarge | Malformed
HostResult = NeedMore | NotHttp | NoHost | HttpHost | TooLarge | Malformed


class _MalformedError(Exception):
    """Raised inside the parsers, caught at their top: the protocol is recognised but broken."""


class _Reader:
    """A bounds-checked cursor over a byte string."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def take(self, count: int) -> bytes:
        if count > self.remaining:
            raise _MalformedError("length field runs past the end of the ClientHello")
        chunk = self._data[self._pos : self._pos + count]
        self._pos += count
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")


def parse_tls_sni(data: bytes) -> SniResult:
    """Classify the first bytes of a connection as a TLS ClientHello and find its SNI."""
    data = bytes(data)
    if not data:
        return NeedMore(_TLS_HEADER_SIZE)
    # An SSLv2-compatible hello (first byte 0x80) cannot carry SNI: it is "not TLS" here.
    if data[0] != _CONTENT_HANDSHAKE or (len(data) > 1 and data[1] != 3):
        return NotTls()
    try:
        hello = _reassemble_client_hello(data)
        return _parse_client_hello(hello) if isinstance(hello, bytes) else hello
    except _MalformedError as exc:
        return Malformed(str(exc))


def _reassemble_client_hello(data: bytes) -> bytes | NeedMore | TooLarge:
    """The ClientHello body from the handshake records at the start of ``data``."""
    handshake = bytearray()
    pos = 0
    for _ in range(MAX_TLS_RECORDS):
        if len(data) < pos + _TLS_HEADER_SIZE:
            return NeedMore(pos + _TLS_HEADER_SIZE)
        content_type, major = data[pos], data[pos + 1]
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        if content_type != _CONTENT_HANDSHAKE or major != 3:
            raise _MalformedError("a non-handshake record interrupts the ClientHello")
        if length == 0 or length > MAX_TLS_RECORD:
            raise _MalformedError("TLS record length out of range")
        body = data[pos + _TLS_HEADER_SIZE : pos + _TLS_HEADER_SIZE + length]
        # Fail fast on the handshake type rather than wait for a whole record of garbage.
        if not handshake and body and body[0] != _HANDSHAKE_CLIENT_HELLO:
            raise _MalformedError("the first handshake message is not a ClientHello")
        if len(body) < length:
            return NeedMore(pos + _TLS_HEADER_SIZE + length)
        handshake += body
        pos += _TLS_HEADER_SIZE + length
        if len(handshake) >= 4:
            message_length = int.from_bytes(handshake[1:4], "big")
            if message_length > MAX_CLIENT_HELLO:
                return TooLarge(MAX_CLIENT_HELLO)
            if len(handshake) >= 4 + message_length:
                return bytes(handshake[4 : 4 + message_length])
    raise _MalformedError(f"ClientHello spread over more than {MAX_TLS_RECORDS} records")


def _parse_client_hello(body: bytes) -> SniResult:
    reader = _Reader(body)
    reader.take(2 + 32)  # legacy_version, random
    session_id_length = reader.u8()
    if session_id_length > 32:
        raise _MalformedError("session id longer than 32 bytes")
    reader.take(session_id_length)
    cipher_suites_length = reader.u16()
    if cipher_suites_length < 2 or cipher_suites_length % 2:
        raise _MalformedError("bad cipher suites length")
    reader.take(cipher_suites_length)
    compression_length = reader.u8()
    if compression_length < 1:
        raise _MalformedError("no compression methods")
    reader.take(compression_length)
    if not reader.remaining:
        return NoSni()  # a TLS 1.2 hello may omit the extensions block entirely
    if reader.u16() != reader.remaining:
        raise _MalformedError("extensions length does not match the ClientHello")
    seen: set[int] = set()
    result: SniResult = NoSni()
    while reader.remaining:
        extension_type = reader.u16()
        extension = reader.take(reader.u16())
        # RFC 8446 §4.2: at most one extension of each type; two SNIs could be read two ways.
        if extension_type in seen:
            raise _MalformedError("duplicate extension")
        seen.add(extension_type)
        if extension_type == _EXT_SERVER_NAME:
            result = _parse_server_name(extension)
    return result


def _parse_server_name(extension: bytes) -> SniResult:
    reader = _Reader(extension)
    if reader.u16() != reader.remaining or not reader.remaining:
        raise _MalformedError("server_name list length does not match its extension")
    host: bytes | None = None
    while reader.remaining:
        name_type = reader.u8()
        name = reader.take(reader.u16())
        if name_type != _NAME_TYPE_HOST:
            continue  # other name types are defined as opaque; none exist today
        if host is not None:
            raise _MalformedError("more than one SNI host name")  # RFC 6066 §3
        host = name
    if host is None:
        return NoSni()
    canonical = _host_from_bytes(host)
    if canonical is None:
        raise _MalformedError("SNI is not a valid host name")
    return ServerName(canonical)


def parse_http_host(data: bytes) -> HostResult:
    """Classify the first bytes of a connection as an HTTP/1.x request and find its host."""
    try:
        return _parse_http_head(bytes(data))
    except _MalformedError as exc:
        return Malformed(str(exc))


def _parse_http_head(data: bytes) -> HostResult:
    if not data:
        return NeedMore(None)
    end = data.find(b"\r\n\r\n", 0, MAX_HTTP_HEAD)
    if end < 0:
        return _classify_partial_head(data)
    lines = data[:end].split(b"\r\n")
    target = _parse_request_line(lines[0])
    if target is None:
        return NotHttp()
    if _BARE_LINE_END.search(data, 0, end):
        raise _MalformedError("bare CR or LF in the request head")
    target_host = _absolute_target_host(target)
    header = _host_header(lines[1:])
    if target_host is not None:
        if header is not None and header.host != target_host.host:
            raise _MalformedError("Host header disagrees with the request target")
        return target_host
    return NoHost() if header is None else header


def _classify_partial_head(data: bytes) -> HostResult:
    """What an incomplete head already shows: not HTTP, broken, too large, or need more."""
    # Decide early when possible rather than wait for 16 KiB that will never parse.
    head = data[:MAX_HTTP_HEAD]
    line, newline, _ = head.partition(b"\r\n")
    if not _METHOD_PREFIX.match(line) or (newline and _parse_request_line(line) is None):
        return NotHttp()
    # A trailing CR may be the first half of a CRLF still to come.
    checked = head[:-1] if head.endswith(b"\r") else head
    if _BARE_LINE_END.search(checked):
        raise _MalformedError("bare CR or LF in the request head")
    return TooLarge(MAX_HTTP_HEAD) if len(data) >= MAX_HTTP_HEAD else NeedMore(None)


def _parse_request_line(line: bytes) -> bytes | None:
    """The request target, or None if this is not an HTTP/1.x request line."""
    parts = line.split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or parts[2] not in _HTTP_VERSIONS:
        return None
    method, target, _ = parts
    if not target or _CONTROL.search(target):
        raise _MalformedError("bad request target")
    if method == b"CONNECT":
        raise _MalformedError("CONNECT is not forwarded")
    return target


def _absolute_target_host(target: bytes) -> HttpHost | None:
    """The host of an absolute-form target; None for origin-form or "*"."""
    if target.startswith(b"/") or target == b"*":
        return None
    match = _ABSOLUTE_TARGET.match(target)
    if match is None:
        raise _MalformedError("bad request target")
    authority = match.group(1)
    if b"@" in authority:
        raise _MalformedError("user information in the request target")
    host = _parse_authority(authority)
    if host is None:
        raise _MalformedError("request target names no valid host")
    return host


def _host_header(lines: list[bytes]) -> HttpHost | None:
    """The one Host header's value, None if there is none."""
    found: HttpHost | None = None
    seen = False
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            raise _MalformedError("obsolete line folding")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise _MalformedError("bad header field name")
        if _CONTROL.search(value):
            raise _MalformedError("control character in a header value")
        if name.lower() != b"host":
            continue
        if seen:
            raise _MalformedError("more than one Host header")
        seen = True
        found = _parse_authority(value.strip(b" \t"))
        if found is None:
            raise _MalformedError("Host header is not a valid host name")
    return found


def _parse_authority(authority: bytes) -> HttpHost | None:
    """``host[:port]`` as an HttpHost; None for IP literals, bad ports or invalid names."""
    if authority.startswith(b"["):
        return None  # an IPv6 literal: a name-based policy has nothing to match it with
    host, colon, port_text = authority.partition(b":")
    port: int | None = None
    if colon and port_text:
        text = port_text.decode("ascii", "replace")
        if not _PORT.fullmatch(text) or not 1 <= int(text) <= 65535:
            return None
        port = int(text)
    canonical = _host_from_bytes(host)
    return None if canonical is None else HttpHost(canonical, port)


def _host_from_bytes(raw: bytes) -> str | None:
    # Host names on the wire are ASCII (punycode); anything else is not a name we match.
    if not raw or len(raw) > 255 or not raw.isascii():
        return None
    return canonical_name(raw.decode("ascii"))
