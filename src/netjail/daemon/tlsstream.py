"""Byte streams over a non-blocking socket on the running loop: plain, or TLS through MemoryBIO.

The proxy has already read a connection's first bytes (the ClientHello or request head it
checked), so the job side's TLS cannot start on a fresh socket: an ``ssl.SSLObject`` over two
``MemoryBIO`` buffers is fed those bytes first, then whatever the socket brings.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable
from typing import Protocol

#: Most bytes read from a socket at once.
READ_SIZE = 1 << 20


class Stream(Protocol):
    """What the HTTP relay reads and writes."""

    async def recv(self) -> bytes:
        """Some bytes, or b"" at the end of the stream."""

    async def send(self, data: bytes) -> None: ...

    async def close(self) -> None:
        """Say goodbye where the protocol has a way (TLS close_notify), then close."""


class PlainStream:
    """A socket as it is, after ``first`` (bytes already read from it)."""

    def __init__(self, sock: socket.socket, first: bytes = b"") -> None:
        self._sock = sock
        self._pending = first

    async def recv(self) -> bytes:
        if self._pending:
            data, self._pending = self._pending, b""
            return data
        try:
            return await asyncio.get_running_loop().sock_recv(self._sock, READ_SIZE)
        except OSError:
            return b""

    async def send(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self._sock, data)

    async def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)
        self._sock.close()


class TlsStream:
    """TLS over a socket, driven by hand: the handshake, then records both ways."""

    def __init__(
        self,
        sock: socket.socket,
        context: ssl.SSLContext,
        *,
        server_hostname: str | None,
        session: ssl.SSLSession | None = None,
        on_session: Callable[[ssl.SSLSession], None] | None = None,
    ) -> None:
        self._sock = sock
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._tls = context.wrap_bio(
            self._in,
            self._out,
            server_side=server_hostname is None,
            server_hostname=server_hostname,
            session=session,
        )
        self._on_session = on_session

    @classmethod
    def server(cls, sock: socket.socket, context: ssl.SSLContext, first: bytes) -> TlsStream:
        """The job's side: ``first`` is the ClientHello the proxy already read."""
        stream = cls(sock, context, server_hostname=None)
        stream._in.write(first)
        return stream

    @classmethod
    def client(
        cls,
        sock: socket.socket,
        context: ssl.SSLContext,
        name: str,
        *,
        session: ssl.SSLSession | None = None,
        on_session: Callable[[ssl.SSLSession], None] | None = None,
    ) -> TlsStream:
        """The upstream's side, verifying its certificate for ``name``, or resuming
        ``session`` (one that verified it, from ``context``); ``on_session`` is given the
        connection's session once the server has sent a ticket to resume it by."""
        return cls(sock, context, server_hostname=name, session=session, on_session=on_session)

    @property
    def alpn(self) -> str | None:
        return self._tls.selected_alpn_protocol()

    async def handshake(self) -> None:
        """Raises ssl.SSLError (a certificate that does not verify among them) or OSError."""
        while True:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    raise ssl.SSLEOFError("the peer closed during the handshake") from None
                continue
            await self._flush()
            return

    async def recv(self) -> bytes:
        while True:
            try:
                first = self._tls.read(READ_SIZE)
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    return b""
                continue
            except ssl.SSLError:  # close_notify, a ragged EOF, or a broken record: the end
                return b""
            if self._on_session is not None:
                self._offer_session()
            # One join (of one item: no copy when nothing more is buffered).
            return b"".join(self._read_buffered([first], READ_SIZE - len(first)))

    def _offer_session(self) -> None:
        """Hand the session on once: in TLS 1.3 its ticket comes after the handshake, with
        (or before) the first data the server sends."""
        session = self._tls.session
        if session is not None and session.has_ticket and self._on_session is not None:
            self._on_session(session)
            self._on_session = None

    def _read_buffered(self, chunks: list[bytes], limit: int) -> list[bytes]:
        """``chunks`` and more plaintext from records already received (one read gives one
        record, at most 16 KiB), so the relay handles a socket read's worth at once (joined
        once, by the caller)."""
        while limit > 0 and self._in.pending:
            try:
                chunk = self._tls.read(limit)
            except ssl.SSLError:  # want-read included: what is left is not a whole record
                break
            chunks.append(chunk)
            limit -= len(chunk)
        return chunks

    async def send(self, data: bytes) -> None:
        self._tls.write(data)
        await self._flush()

    async def close(self) -> None:
        with contextlib.suppress(ssl.SSLError, OSError):
            self._tls.unwrap()
        with contextlib.suppress(OSError):
            await self._flush()
        self._sock.close()

    async def _flush(self) -> None:
        data = self._out.read()
        if data:
            await asyncio.get_running_loop().sock_sendall(self._sock, data)

    async def _fill(self) -> bool:
        try:
            chunk = await asyncio.get_running_loop().sock_recv(self._sock, READ_SIZE)
        except OSError:
            chunk = b""
        if not chunk:
            self._in.write_eof()
            return False
        self._in.write(chunk)
        return True
