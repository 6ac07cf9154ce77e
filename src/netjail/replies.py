"""The daemon → client messages of the wire protocol: replies, events and the job report.

Pure: no I/O. Decoded leniently by clients (``netjail.protocol``), so that a newer daemon may add
fields without breaking older clients. Field names are a public contract: later versions add
fields, never rename them. Users import these from ``netjail.protocol``.
"""

from __future__ import annotations

from typing import Literal

import msgspec

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


#: The longest method and path a ``decide`` question shows (longer ones end in "…").
MAX_ASKED_METHOD = 32
MAX_ASKED_PATH = 1024


class AskedRequest(msgspec.Struct, kw_only=True):
    """The one HTTP request a ``decide`` question is about: its method and its decoded path
    (no query: it may hold secrets, and rules do not match it). Both come from the job: the
    daemon sanitises and bounds them (MAX_ASKED_METHOD, MAX_ASKED_PATH)."""

    method: str
    path: str


class DecideQuestion(_Reply, tag="decide"):
    """A running job (asked with ``decide``) wants what no rule covers: a name, or (with
    ``request``) one request to an intercepted name whose ``--allow-request`` rules all miss.
    Answer with a ``decision`` of the same ``id``."""

    job: str
    id: int
    domain: str
    #: Absent: the question is about the name. Set: about this request to ``domain`` only.
    request: AskedRequest | None = None
    #: How long the daemon waits for the answer before denying (absent from older daemons,
    #: which wait DECISION_TIMEOUT_S).
    timeout_s: float | None = None


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
