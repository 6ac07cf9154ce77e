"""The wire protocol between netjail clients and netjaild.

Pure: no I/O. One JSON object per line over a Unix stream socket, in both directions. The
client sends ``hello`` first; the daemon answers ``hello`` with its protocol version. A ``run``
request may carry the client's stdin/stdout/stderr as SCM_RIGHTS ancillary data on the same
``sendmsg`` as the frame (``stdio: "fds"``), or, with ``stdio: "capture"``, its stdin as bytes
in the frame (``stdin``, base64 in JSON), so that a client without fd passing can feed a job.
With ``stdio: "tty"`` the job gets a pty of its own instead, allocated inside its jail, and the
daemon's ``started`` reply carries the pty's master as SCM_RIGHTS: the client relays it, and
sets its window size on it.

Requests are decoded strictly (unknown fields, wrong types, unknown ops and oversize frames are
errors); daemon messages are decoded leniently by clients, so that a newer daemon may add
fields without breaking older clients. Field names here are a public contract: later versions
add fields, never rename them.

The messages live in ``netjail.requests`` (client → daemon, with their bounds) and
``netjail.replies`` (daemon → client: replies, events, the report); this module is their one
import point, and holds the version, the frame bound, the codecs and the framing.
"""

from __future__ import annotations

import functools

import msgspec

from netjail.errors import ProtocolError
from netjail.replies import (
    MAX_ASKED_METHOD,
    MAX_ASKED_PATH,
    AppliedLimits,
    AskedRequest,
    DecideQuestion,
    DomainSummary,
    ErrorMessage,
    Event,
    EventKind,
    EventMessage,
    EventProcess,
    EventsEnd,
    Exit,
    HelloReply,
    JobInfo,
    Killed,
    PsReply,
    Reply,
    Report,
    Started,
    StatusReply,
    Verdict,
    Via,
)
from netjail.requests import (
    DECISION_TIMEOUT_S,
    DEFAULT_CAPTURE_BYTES,
    MAX_BINDS,
    MAX_CAPTURE_BYTES,
    MAX_CPUS,
    MAX_EXEC_BYTES,
    MAX_FDS,
    MAX_KILL_GRACE_S,
    MAX_PIDS,
    MAX_STDIN_BYTES,
    MAX_TIMEOUT_S,
    MIN_MEMORY_BYTES,
    BindAccess,
    BindMount,
    DecisionRequest,
    EventsRequest,
    Hello,
    KillRequest,
    PsRequest,
    Request,
    RunRequest,
    StatusRequest,
    StdioKind,
    WindowSize,
    check_stdin,
    exec_size,
    parse_bind,
)

PROTOCOL_VERSION = 1
#: Largest frame (one line, newline included) either side accepts.
MAX_FRAME_BYTES = 1 << 20

__all__ = [
    "DECISION_TIMEOUT_S",
    "DEFAULT_CAPTURE_BYTES",
    "MAX_ASKED_METHOD",
    "MAX_ASKED_PATH",
    "MAX_BINDS",
    "MAX_CAPTURE_BYTES",
    "MAX_CPUS",
    "MAX_EXEC_BYTES",
    "MAX_FDS",
    "MAX_FRAME_BYTES",
    "MAX_KILL_GRACE_S",
    "MAX_PIDS",
    "MAX_STDIN_BYTES",
    "MAX_TIMEOUT_S",
    "MIN_MEMORY_BYTES",
    "PROTOCOL_VERSION",
    "AppliedLimits",
    "AskedRequest",
    "BindAccess",
    "BindMount",
    "DecideQuestion",
    "DecisionRequest",
    "DomainSummary",
    "ErrorMessage",
    "Event",
    "EventKind",
    "EventMessage",
    "EventProcess",
    "EventsEnd",
    "EventsRequest",
    "Exit",
    "FrameBuffer",
    "Hello",
    "HelloReply",
    "JobInfo",
    "KillRequest",
    "Killed",
    "PsReply",
    "PsRequest",
    "Reply",
    "Report",
    "Request",
    "RunRequest",
    "Started",
    "StatusReply",
    "StatusRequest",
    "StdioKind",
    "Verdict",
    "Via",
    "WindowSize",
    "check_stdin",
    "decode_reply",
    "decode_request",
    "encode_message",
    "encode_request",
    "exec_size",
    "parse_bind",
]

_encoder = msgspec.json.Encoder()


# Built on first use: a decoder inspects every type of its union, and each side of the socket
# needs only one of the two (every `netjail` command pays for what this module does at import).
@functools.cache
def _request_decoder() -> msgspec.json.Decoder[Request]:
    return msgspec.json.Decoder(Request)


@functools.cache
def _reply_decoder() -> msgspec.json.Decoder[Reply]:
    return msgspec.json.Decoder(Reply)


def encode_message(message: msgspec.Struct) -> bytes:
    """Encode one message as a frame: compact JSON and a newline."""
    return _encoder.encode(message) + b"\n"


def encode_request(request: Request) -> bytes:
    """Encode a client request as a frame; ProtocolError when it is over ``MAX_FRAME_BYTES``,
    which the daemon would refuse (and close the connection)."""
    frame = encode_message(request)
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError(
            f"request of {len(frame)} bytes is over the protocol's {MAX_FRAME_BYTES}-byte frame "
            "bound: send less argv, env or stdin"
        )
    return frame


def _describe(error: msgspec.MsgspecError) -> str:
    text = str(error)
    if "`$.op`" in text or "missing required field `op`" in text:
        return "unknown or missing op"
    return text


def decode_request(frame: bytes) -> Request:
    """Decode one client frame strictly; raise ProtocolError saying what is wrong."""
    try:
        request: Request = _request_decoder().decode(frame)
    except msgspec.MsgspecError as e:
        raise ProtocolError(f"bad request: {_describe(e)}") from None
    return request


def decode_reply(frame: bytes) -> Reply:
    """Decode one daemon frame; unknown fields are ignored for forward compatibility."""
    try:
        reply: Reply = _reply_decoder().decode(frame)
    except msgspec.MsgspecError as e:
        raise ProtocolError(f"bad message from daemon: {_describe(e)}") from None
    return reply


class FrameBuffer:
    """Splits a byte stream into newline-terminated frames of bounded size."""

    def __init__(self, max_frame: int = MAX_FRAME_BYTES) -> None:
        self._buf = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return the complete frames (without newline), in order.

        Raises ProtocolError when a frame grows beyond the maximum without a newline; the
        stream cannot be resynchronised after that, so the caller closes it.
        """
        self._buf += data
        frames: list[bytes] = []
        start = 0
        while True:
            end = self._buf.find(b"\n", start)
            if end < 0:
                break
            if end - start + 1 > self._max:
                raise ProtocolError(f"frame larger than {self._max} bytes")
            frames.append(bytes(self._buf[start:end]))
            start = end + 1
        del self._buf[:start]
        if len(self._buf) > self._max:
            raise ProtocolError(f"frame larger than {self._max} bytes")
        return frames

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a whole frame."""
        return len(self._buf)
