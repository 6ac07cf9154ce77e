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
"""

from __future__ import annotations

import functools
from typing import Annotated, Literal

import msgspec

from netjail.errors import ProtocolError
from netjail.units import MAX_CPUS as _UNITS_MAX_CPUS

PROTOCOL_VERSION = 1
#: Largest frame (one line, newline included) either side accepts.
MAX_FRAME_BYTES = 1 << 20
#: Most file descriptors a run request may carry (stdin, stdout, stderr).
MAX_FDS = 3
#: Most captured bytes per stream a library client may ask for.
MAX_CAPTURE_BYTES = 16 << 20
DEFAULT_CAPTURE_BYTES = 1 << 20
#: Most bytes a run request's ``stdin`` payload may hold. Base64 makes it 4/3 as large in the
#: frame (699,052 bytes), which leaves a third of ``MAX_FRAME_BYTES`` for the rest of the request.
MAX_STDIN_BYTES = 512 << 10
#: Bounds of a run request's limits (the CLI checks the same ones before sending).
MIN_MEMORY_BYTES = 1 << 20
MAX_CPUS = _UNITS_MAX_CPUS
MAX_PIDS = 1 << 22
MAX_TIMEOUT_S = 30 * 86400
MAX_KILL_GRACE_S = 3600

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
    #: rule covers, and holds their DNS queries until a ``decision`` answers (30 s: deny).
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
    """The answer to a ``decide`` message: ``allow`` the name (as ``--allow NAME``) or not."""

    id: Annotated[int, msgspec.Meta(ge=0)]
    allow: bool


Request = (
    Hello | RunRequest | KillRequest | PsRequest | StatusRequest | EventsRequest | DecisionRequest
)


#: What an event is about: a packet or connection leaving the jail, a DNS query, or one HTTP
#: request on an intercepted connection.
EventKind = Literal["egress", "dns", "http"]
#: What became of it. "redirected": a DNS packet to a foreign resolver, answered by the stub;
#: "mocked": an HTTP request answered by a --mock, without the upstream.
Verdict = Literal["allowed", "blocked", "redirected", "mocked"]
#: Who saw it: the kernel (NFLOG or the kernel log), the DNS stub, or the proxy.
Via = Literal["nflog", "kmsg", "dns", "proxy"]


class EventProcess(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The process that owned an event's socket, as the daemon found it when the event came.

    ``pid`` is as seen inside the job's own PID namespace (its init is 1), not the host's.
    ``comm`` is the kernel's short name (at most 15 characters), ``exe`` the executable's
    path (absent when unreadable), ``argv`` the command line (at most 16 arguments of at most
    128 characters). All of it comes from the job: sanitised, and only as true as the job
    let it be (a process may rename itself or rewrite its argv).
    """

    pid: int
    comm: str
    exe: str | None = None
    argv: list[str] = []


class Event(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One egress attempt (a packet, a DNS query or a proxied connection) seen for a job.

    The fields without defaults are always present (``port`` is null where there is none);
    fields with defaults appear only when they apply. ``reason`` is a short snake_case word
    (``foreign_resolver``, ``not_allowed``, ``sni_mismatch``…): an open set, kept a string so
    that a newer daemon's reasons reach older clients intact.
    """

    job: str
    time: str
    kind: EventKind
    verdict: Verdict
    proto: str | int | None
    family: int | None
    dst: str | None
    port: int | None
    uid: int | None
    count: int
    via: Via
    domain: str | None = None
    qtype: str | None = None
    reason: str | None = None
    bytes_out: int | None = None
    bytes_in: int | None = None
    #: One line for people: why, and the fix (e.g. which address the proxy refused and the
    #: --add-host that would allow it). Not part of what makes two events the same.
    detail: str | None = None
    #: An "http" event's request: method, path (no query; bounded, sanitised), the status
    #: the job got, and how long it took. ``bytes_out``/``bytes_in`` are its bodies.
    method: str | None = None
    path: str | None = None
    status: int | None = None
    duration_ms: float | None = None
    #: Who sent it: absent when the process was gone (or its socket closed) before the daemon
    #: looked. Not part of what makes two events the same: a folded event names the first.
    process: EventProcess | None = None


class AppliedLimits(msgspec.Struct, kw_only=True):
    """The limits a job ran under (null = unlimited)."""

    memory_bytes: int | None
    cpus: float | None
    pids: int | None
    timeout_s: float | None
    kill_grace_s: float


class DomainSummary(msgspec.Struct, kw_only=True):
    """What a job did with one domain name."""

    allowed: int = 0
    blocked: int = 0
    #: HTTP requests answered by a --mock.
    mocked: int = 0
    bytes_out: int = 0
    bytes_in: int = 0


class Report(msgspec.Struct, kw_only=True):
    """The final report of a job."""

    job: str
    argv: list[str]
    uid: int
    gid: int
    exit_code: int | None
    signal: int | None
    wall_s: float
    events: list[Event]
    lost_events: int
    stdout: bytes | None = None
    stderr: bytes | None = None
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    timed_out: bool = False
    oom_killed: bool = False
    #: Resource usage; null where the host cannot tell, never a made-up number.
    cpu_user_s: float | None = None
    cpu_system_s: float | None = None
    memory_peak_bytes: int | None = None
    pids_peak: int | None = None
    limits: AppliedLimits | None = None
    #: Per domain name: connections allowed and blocked (DNS queries included), bytes relayed.
    #: Counted as events arrive, so nothing here is lost to the event cap.
    domains: dict[str, DomainSummary] = {}
    #: The seccomp profile the job ran under (e.g. "netjail-default-1").
    seccomp_profile: str | None = None
    #: Of ``lost_events``, those that arrived but were not kept (the per-job event cap), by
    #: event kind ("egress", "dns"). The rest were lost before reaching the daemon.
    events_not_kept: dict[str, int] = {}

    def to_dict(self) -> dict[str, object]:
        """The report as plain data (dicts, lists, str, int, float, bool, None), as in its JSON:
        bytes (captured output) become base64 strings."""
        data: dict[str, object] = msgspec.to_builtins(self)
        return data


class JobInfo(msgspec.Struct, kw_only=True):
    job: str
    argv: list[str]
    uid: int
    gid: int
    pid: int | None
    owner_uid: int
    started: str
    events: int


class _Reply(msgspec.Struct, tag_field="op", kw_only=True):
    """Base of daemon → client messages."""


class HelloReply(_Reply, tag="hello"):
    version: int
    daemon: str


class Started(_Reply, tag="started"):
    """The job runs. With stdio "tty", the pty's master comes with this frame (SCM_RIGHTS)."""

    job: str
    pid: int
    #: Where the job started, when that differs from the cwd asked for (cwd_fallback "home").
    cwd: str | None = None


class EventMessage(_Reply, tag="event"):
    event: Event


class Exit(_Reply, tag="exit"):
    report: Report
    #: Events not streamed to this client because it read too slowly (all are in the report).
    dropped_events: int = 0
    #: netjaild ended the job because it is stopping: its ``shutdown`` error follows at once.
    shutdown: bool = False


class ErrorMessage(_Reply, tag="error"):
    code: str
    message: str
    #: For a command that could not be executed: the shell's status (127, 126).
    exit_code: int | None = None


class PsReply(_Reply, tag="ps"):
    jobs: list[JobInfo]


class StatusReply(_Reply, tag="status"):
    version: str
    pid: int
    uptime_s: float
    jobs_running: int
    jobs_total: int
    events_seen: int
    events_lost: int
    cgroup_mode: str | None = None
    #: The seccomp profile every job gets (e.g. "netjail-default-1").
    seccomp_profile: str | None = None
    #: The fork server: "up"; "starting" (a new one, not yet serving); "down" (it ended, a new
    #: one starts after a back-off, and jobs are refused until then).
    fork_server: str | None = None
    #: How many times a new fork server was started because the last one ended.
    fork_server_restarts: int | None = None
    #: How the last fork server that ended did ("was killed by SIGKILL"), if one has.
    fork_server_last_exit: str | None = None
    #: Warm jails the daemon keeps (jail.pool_size), and how many are ready now; pool jails
    #: are not jobs, so they are in neither jobs_running nor ``ps``.
    pool_size: int | None = None
    pool_ready: int | None = None


class DecideQuestion(_Reply, tag="decide"):
    """A running job (asked with ``decide``) wants a name no rule covers: answer with a
    ``decision`` of the same ``id``."""

    job: str
    id: int
    domain: str


class Killed(_Reply, tag="killed"):
    job: str


class EventsEnd(_Reply, tag="end"):
    lost_events: int


Reply = (
    HelloReply
    | Started
    | EventMessage
    | Exit
    | ErrorMessage
    | PsReply
    | StatusReply
    | Killed
    | EventsEnd
    | DecideQuestion
)

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
