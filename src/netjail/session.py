"""The client side of one daemon connection, without I/O: what both clients share.

``netjail.client`` (blocking sockets) and ``netjail.asyncclient`` (asyncio) only move bytes.
What the bytes mean is decided here, once: the hello, the request frames, the framing and
decoding of the daemon's replies, the errors it reports rebuilt as netjail errors (in their
turn, after the messages before them), and which reply each request expects. Pure, in the
spirit of httpcore over h11: a fed buffer in, typed messages out.
"""

from __future__ import annotations

import os
from collections import deque
from typing import TypeVar

from netjail import protocol as p
from netjail.errors import DaemonConnectionError, ProtocolError, error_for_code

DEFAULT_SOCKET = "/run/netjail/netjail.sock"
SOCKET_ENV = "NETJAIL_SOCKET"
#: Daemon frames can be large (a report with captured output and many events).
MAX_REPLY_BYTES = 64 << 20
#: Bytes one read asks the socket for.
RECV_BYTES = 1 << 20

_ReplyT = TypeVar("_ReplyT", bound=p.Reply)


def default_socket() -> str:
    return os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


def reason_of(error: Exception) -> str:
    """The OS's words for ``error`` (some OSErrors, such as a socket path too long, have none)."""
    return (error.strerror if isinstance(error, OSError) else None) or str(error)


def connect_error(path: str, error: Exception) -> DaemonConnectionError:
    """The error for a failed connect to ``path``, with what to check."""
    hint = (
        "are you root or in the netjail group?"
        if isinstance(error, PermissionError)
        else "is netjaild running?"
    )
    return DaemonConnectionError(f"cannot connect to {path}: {reason_of(error)} ({hint})")


def lost_error(error: Exception) -> DaemonConnectionError:
    return DaemonConnectionError(f"lost the connection to netjaild: {reason_of(error)}")


def timeout_error() -> DaemonConnectionError:
    return DaemonConnectionError("timed out waiting for netjaild")


def hello_frame(client: str) -> bytes:
    """The first frame a client sends."""
    return p.encode_request(p.Hello(version=p.PROTOCOL_VERSION, client=client))


def expect(reply: p.Reply, kind: type[_ReplyT], what: str) -> _ReplyT:
    """``reply`` as the message ``kind`` a request expects; ProtocolError for any other."""
    if not isinstance(reply, kind):
        raise ProtocolError(f"expected {what} from the daemon, got {type(reply).__name__}")
    return reply


def check_reply(reply: p.Reply) -> p.Reply:
    """``reply``, unless it is a daemon error: then that error, as the class the daemon had."""
    if isinstance(reply, p.ErrorMessage):
        raise error_for_code(reply.code, reply.message, reply.exit_code)
    return reply


class ReplyReader:
    """The daemon's byte stream in, its messages out, in order."""

    def __init__(self) -> None:
        self._frames = p.FrameBuffer(MAX_REPLY_BYTES)
        self._pending: deque[bytes] = deque()

    def feed(self, data: bytes) -> None:
        """Add what one read returned; b"" (end of file) is DaemonConnectionError."""
        if not data:
            raise DaemonConnectionError("netjaild closed the connection")
        self._pending.extend(self._frames.feed(data))

    @property
    def buffered(self) -> bool:
        """Whether whole messages are waiting, so that the next call needs no read."""
        return bool(self._pending)

    def next_reply(self) -> p.Reply:
        """The next whole message (the caller feeds until ``buffered``); a daemon error is
        raised."""
        return check_reply(p.decode_reply(self._pending.popleft()))

    def take_replies(self) -> list[p.Reply]:
        """Every whole message waiting. A daemon error is raised in its turn: the messages
        before it are returned first, and the error is raised by the next call."""
        messages: list[p.Reply] = []
        while self._pending:
            reply = p.decode_reply(self._pending[0])
            if isinstance(reply, p.ErrorMessage) and messages:
                break
            self._pending.popleft()
            messages.append(check_reply(reply))
        return messages
