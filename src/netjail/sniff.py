"""Read the host name a job's connection names in its first bytes: TLS SNI or HTTP Host.

Pure: the proxy feeds the bytes read so far and gets one result; on :class:`NeedMore` it reads
more and calls again with everything read. The proxy then checks that the name found is the
one its synthetic destination address stands for, so that a connection to an allowed name
cannot be steered to another host behind the same server (domain fronting), and blocks the
connection when nothing here finds that name.

Every byte is hostile: the parsers check every length against the bytes present, never raise,
and return :class:`Malformed` with a fixed reason (never job text) for anything inconsistent.
More bytes never change a decision: any result other than :class:`NeedMore` depends only on the
bytes already read, and from :data:`MAX_FIRST_BYTES` bytes on there always is one.

TLS: the ClientHello is reassembled from the handshake records at the start of the stream, up
to :data:`MAX_TLS_RECORDS` records and a ClientHello of at most :data:`MAX_CLIENT_HELLO` bytes;
any other record first (application data, an alert, change_cipher_spec) is not TLS here. With
Encrypted Client Hello the SNI read here is the outer, public name. What no first-bytes check
sees: a second ClientHello after a HelloRetryRequest or a renegotiation, and later requests on a
kept-alive HTTP connection, may name another host to the same server.

HTTP/1.x: the request head must end (CRLF CRLF) within :data:`MAX_HTTP_HEAD` bytes and be
accepted by h11. What h11 tolerates but a lenient server could read differently is refused
first: anything but ``METHOD SP target SP HTTP/1.0|HTTP/1.1 CRLF`` as the request line (so no
leading empty line, double space, tab, ``HTTP/1.2`` or lowercase ``http/1.1``), bare LF or CR,
obsolete line folding, CONNECT, Transfer-Encoding together with Content-Length. An
absolute-form request target is the host that counts (RFC 9112 §3.2.2), and must agree with the
Host header if there is one. HTTP/2 in cleartext (the ``PRI *`` preface, ``Upgrade: h2c``) is
:class:`H2c`, which the proxy refuses: it would carry requests for other hosts unseen.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

import h11

from netjail.policy import canonical_name

#: Largest TLS plaintext record (RFC 8446 §5.1).
MAX_TLS_RECORD: Final = 16384
#: Largest ClientHello accepted (post-quantum key shares make them grow), and most records it
#: may be split over.
MAX_CLIENT_HELLO: Final = 32768
MAX_TLS_RECORDS: Final = 16
#: Largest HTTP request head (request line and headers) accepted.
MAX_HTTP_HEAD: Final = 16384

_TLS_HEADER_SIZE: Final = 5
_HANDSHAKE_HEADER_SIZE: Final = 4
#: Bytes after which every parser here has decided: the proxy never reads more than this.
MAX_FIRST_BYTES: Final = max(
    MAX_HTTP_HEAD,
    _HANDSHAKE_HEADER_SIZE + MAX_CLIENT_HELLO + _TLS_HEADER_SIZE * MAX_TLS_RECORDS,
)
_CONTENT_HANDSHAKE: Final = 22
_HANDSHAKE_CLIENT_HELLO: Final = 1
_EXT_SERVER_NAME: Final = 0
_NAME_TYPE_HOST: Final = 0

# RFC 9112 §3: exactly one SP between the parts, an HTTP version that is one of ours, in
# uppercase. h11 allows any digit.digit version, which is how "HTTP/1.2" and the h2c preface
# "PRI * HTTP/2.0" would get through.
_REQUEST_LINE: Final = re.compile(
    rb"(?P<method>[!#$%&'*+.^_`|~0-9A-Za-z-]+) (?P<target>[\x21-\x7e]+) HTTP/1\.[01]"
)
# A method is a token; real ones are short, so a longer "method" is not HTTP.
_METHOD_PREFIX: Final = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}(?:[ \t]|\Z)")
_H2C_PREFACE: Final = b"PRI * HTTP/2.0\r\n"
_BARE_LINE_END: Final = re.compile(rb"(?<!\r)\n|\r(?!\n)")
_FOLDED_LINE: Final = re.compile(rb"\r\n[ \t]")
_ABSOLUTE_TARGET: Final = re.compile(rb"(?i:https?)://([^/?#]*)")
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
class H2c:
    """The request asks for HTTP/2 in cleartext: the ``PRI *`` preface, or ``Upgrade: h2c``."""


@dataclass(frozen=True, slots=True)
class TooLarge:
    """The ClientHello or request head exceeds ``limit`` bytes."""

    limit: int


@dataclass(frozen=True, slots=True)
class Malformed:
    """The protocol was recognised but broken; ``reason`` is a fixed phrase, not job text."""

    reason: str


SniResult = NeedMore | NotTls | NoSni | ServerName | TooLarge | Malformed
HostResult = NeedMore | NotHttp | NoHost | HttpHost | H2c | TooLarge | Malformed


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
        record_end = pos + _TLS_HEADER_SIZE + length
        body = data[pos + _TLS_HEADER_SIZE : record_end]
        # Fail fast on the handshake type rather than wait for a whole record of garbage.
        if not handshake and body and body[0] != _HANDSHAKE_CLIENT_HELLO:
            raise _MalformedError("the first handshake message is not a ClientHello")
        handshake += body
        missing = _HANDSHAKE_HEADER_SIZE - len(handshake)
        if missing <= 0:
            message_length = int.from_bytes(handshake[1:4], "big")
            if message_length > MAX_CLIENT_HELLO:
                return TooLarge(MAX_CLIENT_HELLO)
            missing = _HANDSHAKE_HEADER_SIZE + message_length - len(handshake)
            if missing <= 0:
                # Done, even if the record goes on: the server reads this same message.
                return bytes(handshake[_HANDSHAKE_HEADER_SIZE:][:message_length])
        if len(body) < length:
            return NeedMore(min(record_end, len(data) + missing))
        pos = record_end
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
    if data.startswith(_H2C_PREFACE[: len(data)]):
        return H2c() if len(data) >= len(_H2C_PREFACE) else NeedMore(None)
    end = data.find(b"\r\n\r\n", 0, MAX_HTTP_HEAD)
    if end < 0:
        if _check_head_so_far(data[:MAX_HTTP_HEAD]) is not None:
            return NotHttp()
        return TooLarge(MAX_HTTP_HEAD) if len(data) >= MAX_HTTP_HEAD else NeedMore(None)
    # The same checks on the whole head as on any prefix of it, so that a decision made on a
    # prefix is the one the whole head would have given.
    head = data[: end + 4]
    if _check_head_so_far(head) is not None:
        return NotHttp()
    if _FOLDED_LINE.search(head):
        raise _MalformedError("obsolete line folding")
    return _request_host(_parse_with_h11(head))


def _check_head_so_far(head: bytes) -> NotHttp | None:
    """NotHttp, or None if ``head`` may start an HTTP/1.x request; raises _MalformedError."""
    if head.startswith((b"\r", b"\n")):
        raise _MalformedError("an empty line before the request line")
    line, newline, _ = head.partition(b"\r\n")
    if not _METHOD_PREFIX.match(line):
        return NotHttp()
    if b"  " in line or b"\t" in line:
        raise _MalformedError("the request line is not METHOD SP target SP HTTP/1.x")
    if newline and _check_request_line(line) is not None:
        return NotHttp()
    # A trailing CR may be the first half of a CRLF still to come.
    if _BARE_LINE_END.search(head[:-1] if head.endswith(b"\r") else head):
        raise _MalformedError("bare CR or LF in the request head")
    return None


def _check_request_line(line: bytes) -> NotHttp | None:
    if b"HTTP/" not in line.upper():
        return NotHttp()  # not even a claim to be HTTP/1.x: HTTP/0.9, SSH, SMTP…
    parts = line.split(b" ")
    if len(parts) != 3 or not all(parts):
        raise _MalformedError("the request line is not METHOD SP target SP HTTP/1.x")
    if parts[2] not in (b"HTTP/1.0", b"HTTP/1.1"):
        raise _MalformedError("an HTTP version other than HTTP/1.0 or HTTP/1.1")
    if not _REQUEST_LINE.fullmatch(line):
        raise _MalformedError("bad request method or target")
    if parts[0] == b"CONNECT":
        raise _MalformedError("CONNECT is not forwarded")
    return None


def _parse_with_h11(head: bytes) -> h11.Request:
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HTTP_HEAD)
    try:
        connection.receive_data(head)
        event = connection.next_event()
    except h11.RemoteProtocolError:
        # h11's message quotes the job's bytes: keep to a fixed phrase.
        raise _MalformedError("the request head is not valid HTTP/1.1") from None
    if not isinstance(event, h11.Request):
        raise _MalformedError("the request head is not valid HTTP/1.1")
    return event


def _request_host(request: h11.Request) -> HostResult:
    """The host ``request`` names: its absolute-form target, else its Host header."""
    hosts: list[bytes] = []
    has_length = has_encoding = False
    for name, value in request.headers:
        if name == b"host":
            hosts.append(value)
        elif name == b"upgrade" and b"h2c" in (v.strip().lower() for v in value.split(b",")):
            return H2c()
        has_length = has_length or name == b"content-length"
        has_encoding = has_encoding or name == b"transfer-encoding"
    if has_length and has_encoding:
        raise _MalformedError("both Transfer-Encoding and Content-Length")
    header: HttpHost | None = None
    if hosts:  # h11 refuses two Host headers
        header = _parse_authority(hosts[0])
        if header is None:
            raise _MalformedError("Host header is not a valid host name")
    target = _absolute_target_host(request.target)
    if target is not None:
        if header is not None and header.host != target.host:
            raise _MalformedError("Host header disagrees with the request target")
        return target
    return NoHost() if header is None else header


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
