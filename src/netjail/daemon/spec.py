"""Request → job spec: decode what a client asked for into what the pipeline builds (pure).

Everything a job's build depends on is decided here, once, from the request, who asked
(SO_PEERCRED) and the configuration in force when it was asked: the uid and gid, the
environment, the limits after defaults and maxima, the policy, the hosts tables, the stdio
mode. The pipeline then reads only the spec, so a reload half-way through a build changes
nothing of that job.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from netjail import protocol as p
from netjail.daemon.config import BlockedDnsAnswer, Config, Jail, Limits
from netjail.daemon.decisions import Ask
from netjail.errors import PermissionDeniedError, RequestError
from netjail.httppolicy import HttpPolicy, intercepted_allow_rules, parse_http_policy
from netjail.ipaddr import IPAddress
from netjail.kernel.fsplan import JOB_CA_BUNDLE, JOB_CA_FILE, JOB_HOME
from netjail.kernel.peer import PeerCred
from netjail.policy import Policy, canonical_name
from netjail.text import sanitize
from netjail.units import format_size

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: The uid of a root job that chose only its gid.
NOBODY = 65534
#: Where the usual tools look for a CA bundle, set for a job that intercepts anything (Node
#: adds NODE_EXTRA_CA_CERTS to its own store, so it gets the job's CA alone).
TRUST_ENV = {
    "SSL_CERT_FILE": JOB_CA_BUNDLE,
    "REQUESTS_CA_BUNDLE": JOB_CA_BUNDLE,
    "CURL_CA_BUNDLE": JOB_CA_BUNDLE,
    "PIP_CERT": JOB_CA_BUNDLE,
    "GIT_SSL_CAINFO": JOB_CA_BUNDLE,
    "NODE_EXTRA_CA_CERTS": JOB_CA_FILE,
}


@dataclass(frozen=True)
class FixedUser:
    """The job runs as this uid and gid: the client's own, or what root asked for."""

    uid: int
    gid: int


@dataclass(frozen=True)
class LeasedUser:
    """The job runs as a uid (and equal gid) of its own, leased from ``jail.job_uids`` for as
    long as any of its processes can exist: root's jobs that ask for no --uid."""


JobUser = FixedUser | LeasedUser


@dataclass(frozen=True)
class PassedStdio:
    """The job's fds 0-2 are the client's own, passed with the request (SCM_RIGHTS)."""


@dataclass(frozen=True)
class CapturedStdio:
    """The job's stdout and stderr are captured, up to ``limit`` bytes each, into the report;
    its stdin is a pipe that gives ``stdin`` and then EOF, or /dev/null when that is None."""

    limit: int
    stdin: bytes | None = None


@dataclass(frozen=True)
class TerminalStdio:
    """The job's fds 0-2 are a pty of its own, allocated in the jail's devpts, of ``rows`` x
    ``cols`` (0: unknown); its master goes to the client with ``started``."""

    rows: int
    cols: int


#: How the job's stdio is wired ("null" requests arrive as passed /dev/null fds).
StdioMode = PassedStdio | CapturedStdio | TerminalStdio


@dataclass(frozen=True)
class JobSpec:
    """A validated request to run one job."""

    argv: list[str]
    env: dict[str, str]
    #: Where the job starts; with ``cwd_fallback`` "home", its HOME when this is not in view.
    cwd: str
    user: JobUser
    owner: PeerCred
    limits: p.AppliedLimits
    stdio: StdioMode
    policy: Policy = field(default_factory=lambda: Policy([]))
    #: The job's --add-host entries: resolved without DNS, reachable even if not global.
    job_hosts: Mapping[str, IPAddress] = field(default_factory=dict)
    #: The daemon's hosts table, as configured when the job was asked for.
    daemon_hosts: Mapping[str, IPAddress] = field(default_factory=dict)
    blocked_dns_answer: BlockedDnsAnswer = "NXDOMAIN"
    cwd_fallback: Literal["error", "home"] = "error"
    #: Host paths the job sees: the daemon's (opened as root), then the client's (opened
    #: with the client's credentials).
    daemon_binds: tuple[p.BindMount, ...] = ()
    client_binds: tuple[p.BindMount, ...] = ()
    hostname: str | None = None
    jail: Jail = field(default_factory=Jail)
    #: Interception and per-request rules; the upstreams' CA file (None: the host's store).
    http: HttpPolicy = field(default_factory=HttpPolicy)
    upstream_ca: str | None = None
    #: Live decisions on names and requests no rule covers: the requesting connection's
    #: question (set by the connection for a request with ``decide``), else None; how long
    #: an answer is waited for.
    ask: Ask | None = None
    decision_timeout_s: float = p.DECISION_TIMEOUT_S


def job_user(request: p.RunRequest, peer: PeerCred) -> JobUser:
    """Who the job runs as: root chooses (default: a leased uid of its own); anyone else runs
    as themselves.

    ``--uid N`` alone also sets the gid to N; ``--gid`` alone keeps a leased uid out (root
    asked for a fixed identity), so the uid is then N's default, nobody. A non-root client
    asking for any other uid or gid than its own gets PermissionDeniedError.
    """
    if peer.uid == 0:
        if request.uid is None and request.gid is None:
            return LeasedUser()
        uid = request.uid if request.uid is not None else NOBODY
        gid = request.gid if request.gid is not None else uid
        return FixedUser(uid, gid)
    if request.uid not in (None, peer.uid) or request.gid not in (None, peer.gid):
        raise PermissionDeniedError("only root may choose the job's uid or gid")
    return FixedUser(peer.uid, peer.gid)


def job_env(request: p.RunRequest, http: HttpPolicy) -> dict[str, str]:
    """The job's environment: safe defaults (the trust bundle's variables when it intercepts),
    overridden by what the client sent."""
    env = {"PATH": DEFAULT_PATH, "HOME": JOB_HOME, "LANG": "C.UTF-8"}
    if http.active:
        env.update(TRUST_ENV)
    env.update(request.env)
    return env


def check_strings(request: p.RunRequest) -> None:
    """argv, env and cwd as exec and chdir can take them; RequestError otherwise."""
    for text in [*request.argv, *request.env, *request.env.values(), request.cwd or ""]:
        if "\0" in text:
            raise RequestError("argv, env and cwd must not contain NUL bytes")
    for key in request.env:
        if "=" in key:
            raise RequestError(f"invalid environment variable name {sanitize(key)!r}")
    if request.cwd is not None and not request.cwd.startswith("/"):
        raise RequestError("cwd must be an absolute path")


def job_policy(request: p.RunRequest, config: Config, http: HttpPolicy) -> Policy:
    """The job's rules: its own allow rules and intercepted names (else the daemon's default
    allow rules), plus every deny.

    The operator's default_deny always applies, so a client cannot allow it back.
    """
    own = [*request.allow, *intercepted_allow_rules(http)]
    allow = own or list(config.policy.default_allow)
    deny = [*request.deny, *config.policy.default_deny]
    return Policy.parse(allow, deny)


def job_http_policy(request: p.RunRequest, config: Config) -> HttpPolicy:
    """The job's interception: its own options with the daemon's defaults (docs/CONFIG.md).

    The operator's injected headers come last, so they win over a job's of the same name.
    """
    defaults = config.policy
    return parse_http_policy(
        intercept=[*request.intercept, *defaults.default_intercept],
        mocks=[*request.mocks, *defaults.default_mocks],
        deny_requests=[*request.deny_requests, *defaults.default_deny_requests],
        allow_requests=request.allow_requests or list(defaults.default_allow_requests),
        redact=[*request.redact, *defaults.default_redact],
        inject_headers=[*request.inject_headers, *defaults.default_inject_headers],
    )


def check_injected_hosts(hosts: Mapping[str, IPAddress], config: Config) -> None:
    """RequestError for an ``--add-host`` of a name the operator injects a credential for: the
    client would choose the server that receives it."""
    operator = parse_http_policy(inject_headers=list(config.policy.default_inject_headers))
    for name in hosts:
        if operator.injections_for(name):
            raise RequestError(
                f"--add-host {sanitize(name, 100)}: the daemon injects headers for this name,"
                " so its address cannot be set by a client"
            )


def job_hosts(entries: list[str]) -> dict[str, IPAddress]:
    """The job's ``--add-host NAME:IP`` table; RequestError naming a bad entry."""
    hosts: dict[str, IPAddress] = {}
    for entry in entries:
        # Names hold no colon, IPv6 addresses do: split at the first one ("NAME:[2001:db8::1]").
        name, sep, address = entry.partition(":")
        canonical = canonical_name(name) if sep else None
        try:
            ip: IPAddress | None = ipaddress.ip_address(address.strip("[]"))
        except ValueError:
            ip = None
        if canonical is None or ip is None:
            raise RequestError(
                f"invalid --add-host {sanitize(entry)!r}: use NAME:IP, "
                "e.g. api.example.test:192.0.2.10"
            )
        hosts[canonical] = ip
    return hosts


def applied_limits(
    settings: Limits,
    *,
    memory: int | None,
    cpus: float | None,
    pids: int | None,
    timeout: float | None,
    kill_grace: float | None,
) -> p.AppliedLimits:
    """Fill in defaults and enforce the daemon's maxima (RequestError above a maximum)."""

    def pick(
        name: str, asked: float | None, default: float | None, maximum: float | None
    ) -> float | None:
        value = asked if asked is not None else default
        if maximum is not None:
            if value is None:
                value = maximum
            elif value > maximum:
                shown = format_size(int(maximum)) if name == "memory" else f"{maximum:g}"
                raise RequestError(f"--{name} above the daemon's maximum of {shown}")
        return value

    mem = pick("memory", memory, settings.default_memory, settings.max_memory)
    cpu = pick("cpus", cpus, settings.default_cpus, settings.max_cpus)
    pid = pick("pids", pids, settings.default_pids, settings.max_pids)
    tmo = pick("timeout", timeout, settings.default_timeout, settings.max_timeout)
    return p.AppliedLimits(
        memory_bytes=int(mem) if mem is not None else None,
        cpus=cpu,
        pids=int(pid) if pid is not None else None,
        timeout_s=tmo,
        kill_grace_s=kill_grace if kill_grace is not None else settings.kill_grace,
    )


def job_stdio(request: p.RunRequest) -> StdioMode:
    """How the job's stdio is wired; RequestError for a window size without a terminal."""
    if request.stdio == "tty":
        window = request.window or p.WindowSize(rows=0, cols=0)
        return TerminalStdio(rows=window.rows, cols=window.cols)
    if request.window is not None:
        raise RequestError('window is the size of a terminal: it needs stdio "tty"')
    if request.stdio == "capture":
        return CapturedStdio(request.capture_bytes, request.stdin)
    return PassedStdio()


def job_spec(request: p.RunRequest, peer: PeerCred, config: Config) -> JobSpec:
    """Validate a run request against who is asking; RequestError says what is wrong.

    A ``stdio: "fds"`` or ``"null"`` request becomes ``PassedStdio`` (the connection passes
    the fds, /dev/null ones for "null"); ``"capture"`` becomes ``CapturedStdio``, ``"tty"``
    ``TerminalStdio``.
    """
    user = job_user(request, peer)
    check_strings(request)
    http = job_http_policy(request, config)
    policy = job_policy(request, config, http)
    hosts = job_hosts(request.add_hosts)
    check_injected_hosts(hosts, config)
    limits = applied_limits(
        config.limits,
        memory=request.memory_bytes,
        cpus=request.cpus,
        pids=request.pids,
        timeout=request.timeout_s,
        kill_grace=request.kill_grace_s,
    )
    stdio = job_stdio(request)
    return JobSpec(
        argv=list(request.argv),
        env=job_env(request, http),
        cwd=request.cwd or JOB_HOME,
        user=user,
        owner=peer,
        limits=limits,
        stdio=stdio,
        policy=policy,
        job_hosts=hosts,
        daemon_hosts=config.hosts,
        blocked_dns_answer=config.policy.blocked_dns_answer,
        cwd_fallback=request.cwd_fallback,
        daemon_binds=(*config.jail.binds, *config.jail.ro_binds),
        client_binds=tuple(request.binds),
        hostname=request.hostname,
        jail=config.jail,
        http=http,
        upstream_ca=config.proxy.upstream_ca,
        decision_timeout_s=config.policy.decision_timeout,
    )
