"""The client → daemon messages of the wire protocol, and the bounds a request must keep.

Pure: no I/O. Decoded strictly by ``netjail.protocol`` (unknown fields, wrong types and unknown
ops are errors), and sent with the fields left at their defaults omitted, so that a newer client
still talks to an older daemon. Field names are a public contract: later versions add fields,
never rename them. Users import these from ``netjail.protocol``.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from netjail.errors import ProtocolError
from netjail.units import MAX_CPUS as _UNITS_MAX_CPUS

#: Most file descriptors a run request may carry (stdin, stdout, stderr).
MAX_FDS = 3
#: Most captured bytes per stream a library client may ask for.
MAX_CAPTURE_BYTES = 16 << 20
DEFAULT_CAPTURE_BYTES = 1 << 20
#: Most bytes a run request's ``stdin`` payload may hold. Base64 makes it 4/3 as large in the
#: frame (699,052 bytes), which leaves a third of ``protocol.MAX_FRAME_BYTES`` for the rest of
#: the request.
MAX_STDIN_BYTES = 512 << 10
#: Bounds of a run request's limits (the CLI checks the same ones before sending).
MIN_MEMORY_BYTES = 1 << 20
MAX_CPUS = _UNITS_MAX_CPUS
MAX_PIDS = 1 << 22
MAX_TIMEOUT_S = 30 * 86400
MAX_KILL_GRACE_S = 3600
#: How long the daemon holds a query or a request for a live decision (``decide``) before
#: denying it, unless its config says otherwise (``policy.decision_timeout``).
DECISION_TIMEOUT_S = 30.0

#: The most argv and env may hold together, counted as execve counts them (``exec_size``).
#: execve takes at least 128 KiB whatever the stack limit (ARG_MAX's floor: 32 pages, pointers
#: included); 8 KiB of that is left for the variables the daemon adds (PATH, HOME, LANG). It
#: also fits the fork server's channel, one datagram of 212,960 bytes (net.core.wmem_default
#: less 32), with room for the rest of the job's plan.
MAX_EXEC_BYTES = 120 << 10
_POINTER_BYTES = 8

_Arg = Annotated[str, msgspec.Meta(max_length=65536)]
_Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
_Id = Annotated[int, msgspec.Meta(ge=0, le=0xFFFFFFFE)]
_Signal = Annotated[int, msgspec.Meta(ge=1, le=64)]
_Rule = Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
_Path = Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
#: A --mock: its rule and status, and a body of at most 256 KiB.
_Mock = Annotated[str, msgspec.Meta(min_length=1, max_length=(256 << 10) + 1024)]
#: An --inject-header: a name, a header and a value of at most 8 KiB.
_Injection = Annotated[str, msgspec.Meta(min_length=1, max_length=(8 << 10) + 512)]
#: Most --bind/--ro-bind mounts one request may ask for.
MAX_BINDS = 64
#: RFC 1123 host name labels, as sethostname and the jail's /etc/hostname take them.
_Hostname = Annotated[
    str,
    msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$"),
]


class _Request(
    msgspec.Struct, tag_field="op", forbid_unknown_fields=True, kw_only=True, omit_defaults=True
):
    """Base of client → daemon messages.

    Fields left at their defaults are not sent, so a newer client that uses none of a newer
    field's features still talks to an older daemon (which refuses unknown fields).
    """


class Hello(_Request, tag="hello"):
    version: int
    client: Annotated[str, msgspec.Meta(max_length=128)] = ""


#: A bind mount's access inside the jail: read-only or read-write.
BindAccess = Literal["ro", "rw"]


class BindMount(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A host path the job sees: ``source`` at ``target`` (the same path when omitted).

    The daemon opens ``source`` with the client's own credentials, never root's.
    """

    source: _Path
    target: _Path | None = None
    access: BindAccess = "ro"


def parse_bind(text: str, access: BindAccess) -> BindMount:
    """``SRC[:DST]`` (both absolute paths) as a BindMount; ProtocolError when malformed.

    The first ``:`` separates the two, so a source path holding a colon must be bound through
    the library (``BindMount``), not this form.
    """
    source, sep, target = text.partition(":")
    if not source.startswith("/") or (sep and not target.startswith("/")):
        raise ProtocolError(
            f"invalid bind {text[:200]!a}: use SRC[:DST] with absolute paths, e.g. /srv/data:/data"
        )
    return BindMount(source=source, target=target or None, access=access)


_Dimension = Annotated[int, msgspec.Meta(ge=0, le=0xFFFF)]


class WindowSize(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A terminal's size in characters, as TIOCSWINSZ takes it (0: unknown)."""

    rows: _Dimension
    cols: _Dimension


#: How a job's stdio is wired: the fds passed with the request, captured into the report,
#: /dev/null, or a pty of the job's own whose master comes with ``started``.
StdioKind = Literal["fds", "capture", "null", "tty"]


class RunRequest(_Request, tag="run"):
    argv: Annotated[list[_Arg], msgspec.Meta(min_length=1, max_length=4096)]
    env: Annotated[dict[_Name, _Arg], msgspec.Meta(max_length=1024)] = {}
    cwd: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)] | None = None
    uid: _Id | None = None
    gid: _Id | None = None
    #: "fds": stdio passed with this frame; "capture": returned in the report; "null": /dev/null;
    #: "tty": a pty allocated in the jail (its master comes with ``started``).
    stdio: StdioKind = "null"
    #: The pty's first size, with stdio "tty" (its holder sets later sizes on the master).
    window: WindowSize | None = None
    capture_bytes: Annotated[int, msgspec.Meta(ge=0, le=MAX_CAPTURE_BYTES)] = DEFAULT_CAPTURE_BYTES
    #: Stream events to this connection while the job runs.
    events: bool = True
    #: Resource limits; None = the daemon's default.
    memory_bytes: Annotated[int, msgspec.Meta(ge=MIN_MEMORY_BYTES)] | None = None
    cpus: Annotated[float, msgspec.Meta(gt=0, le=MAX_CPUS)] | None = None
    pids: Annotated[int, msgspec.Meta(ge=1, le=MAX_PIDS)] | None = None
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=MAX_TIMEOUT_S)] | None = None
    kill_grace_s: Annotated[float, msgspec.Meta(ge=0, le=MAX_KILL_GRACE_S)] | None = None
    #: Domain policy: rules such as "pypi.org", "*.github.com:443", "10.0.0.0/8:5432".
    allow: Annotated[list[_Rule], msgspec.Meta(max_length=1024)] = []
    deny: Annotated[list[_Rule], msgspec.Meta(max_length=1024)] = []
    #: "NAME:IP" pairs the proxy uses instead of DNS for this job (and may reach even if private).
    add_hosts: Annotated[list[_Rule], msgspec.Meta(max_length=256)] = []
    #: Host paths the job sees, checked with the client's credentials.
    binds: Annotated[list[BindMount], msgspec.Meta(max_length=MAX_BINDS)] = []
    #: The jail's host name; default ``netjail-<job>``.
    hostname: _Hostname | None = None
    #: What to do when ``cwd`` is not in the jail's view: fail ("error"), or start in the job's
    #: HOME ("home", what the CLI asks for its own working directory).
    cwd_fallback: Literal["error", "home"] = "error"
    #: Bytes the job reads on its stdin (a pipe, closed after them), with stdio "capture"; at
    #: most MAX_STDIN_BYTES. None: its stdin is /dev/null.
    stdin: bytes | None = None
    #: HTTP inside TLS (README, "Seeing inside TLS"): names whose TLS the proxy terminates,
    #: and per-request rules, each of which intercepts its name too. Texts as on the CLI, with
    #: mock bodies and header values already expanded.
    intercept: Annotated[list[_Rule], msgspec.Meta(max_length=256)] = []
    mocks: Annotated[list[_Mock], msgspec.Meta(max_length=256)] = []
    deny_requests: Annotated[list[_Rule], msgspec.Meta(max_length=256)] = []
    allow_requests: Annotated[list[_Rule], msgspec.Meta(max_length=256)] = []
    redact: Annotated[list[_Rule], msgspec.Meta(max_length=256)] = []
    inject_headers: Annotated[list[_Injection], msgspec.Meta(max_length=256)] = []
    #: Live decisions: the daemon asks this connection (``decide`` messages) about names no
    #: rule covers, and about requests to intercepted names whose ``--allow-request`` rules
    #: all miss, and holds the DNS query or the request until a ``decision`` answers (30 s by
    #: default: deny).
    decide: bool = False

    def __post_init__(self) -> None:
        # Raised as is by both decoding and construction, so the client fails before sending.
        size = exec_size(self.argv, self.env)
        if size > MAX_EXEC_BYTES:
            raise ProtocolError(
                f"argv and env together must be under {MAX_EXEC_BYTES} bytes (as execve counts "
                f"them: each string, its NUL and its pointer); these are {size}"
            )
        if self.stdin is not None:
            check_stdin(self.stdin, self.stdio)


def check_stdin(data: bytes, stdio: str) -> None:
    """A run request's stdin payload as the protocol bounds it; ProtocolError otherwise."""
    if stdio != "capture":
        raise ProtocolError(
            f'a stdin payload needs stdio "capture" (this request has "{stdio}"); with "fds" '
            "the job reads the passed stdin instead"
        )
    if len(data) > MAX_STDIN_BYTES:
        raise ProtocolError(
            f"stdin payload of {len(data)} bytes is over the {MAX_STDIN_BYTES}-byte bound "
            '(512 KiB): pass larger input through a file (binds) or stdio "fds"'
        )


def exec_size(argv: list[str], env: dict[str, str]) -> int:
    """What ``argv`` and ``env`` take of execve's ARG_MAX: each string (``NAME=value`` for env)
    encoded, its NUL, and its pointer."""
    strings = [*argv, *(f"{name}={value}" for name, value in env.items())]
    return sum(len(text.encode(errors="surrogatepass")) + 1 + _POINTER_BYTES for text in strings)


class KillRequest(_Request, tag="kill"):
    job: _Name
    signal: _Signal = 15


class PsRequest(_Request, tag="ps"):
    pass


class StatusRequest(_Request, tag="status"):
    pass


class EventsRequest(_Request, tag="events"):
    job: _Name | None = None
    follow: bool = False


class DecisionRequest(_Request, tag="decision"):
    """The answer to a ``decide`` message: ``allow`` the name (as ``--allow NAME``), or the
    request (its method and path, for the rest of the job), or not."""

    id: Annotated[int, msgspec.Meta(ge=0)]
    allow: bool


Request = (
    Hello | RunRequest | KillRequest | PsRequest | StatusRequest | EventsRequest | DecisionRequest
)
