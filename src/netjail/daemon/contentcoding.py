"""Content codings of a response body to redact: which one it is, and the body without it."""

from __future__ import annotations

import zlib
from collections.abc import Sequence

#: Largest response body buffered for redaction, decoded.
MAX_REDACT_BYTES = 16 << 20

DECODERS = {
    b"gzip": 16 + zlib.MAX_WBITS,
    b"x-gzip": 16 + zlib.MAX_WBITS,
    b"deflate": zlib.MAX_WBITS,
}


def decode_body(body: bytes, coding: bytes) -> bytes | None:
    """The body without its content coding, at most MAX_REDACT_BYTES; None if it cannot be."""
    if coding in (b"", b"identity"):
        return body
    wbits = DECODERS.get(coding)
    if wbits is None:
        return None
    for bits in (wbits, -zlib.MAX_WBITS) if coding == b"deflate" else (wbits,):
        decoder = zlib.decompressobj(bits)
        try:
            data = decoder.decompress(body, MAX_REDACT_BYTES + 1)
        except zlib.error:
            continue
        if len(data) > MAX_REDACT_BYTES or decoder.unconsumed_tail:
            return None
        return data
    return None


def content_coding(headers: Sequence[tuple[bytes, bytes]]) -> bytes | None:
    """The one content coding of a response (``identity`` if none), or None when it has more
    than one (every ``Content-Encoding`` value joined) or one netjail cannot decode: a second
    header or list item must never leave a coded body looking like plain text."""
    values = [value for name, value in headers if name == b"content-encoding"]
    tokens = [t.strip().lower() for t in b",".join(values).split(b",") if t.strip()]
    if not tokens:
        return b"identity"
    if len(tokens) != 1 or (tokens[0] != b"identity" and tokens[0] not in DECODERS):
        return None
    return tokens[0]
