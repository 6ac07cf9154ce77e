"""The daemon's configuration file, ``/etc/netjail/netjaild.toml``.

The file is TOML, read with the standard library's ``tomllib`` into a frozen :class:`Config`.
Every key has a default, so an absent file means "all defaults". Reading is strict because the
file steers a root daemon: an unknown key (a typo such as ``limits.max_memry`` would otherwise
silently leave a limit unset) or a bad value stops start-up with a :class:`ConfigError` that names
the key. ``docs/CONFIG.md`` documents every key; a unit test keeps it in step with this module.

:func:`parse_config` is pure (a decoded TOML document in, a ``Config`` or the list of problems
out); :func:`load_config` and :func:`check_config` add the file system around it.
"""

from __future__ import annotations

import ipaddress
import os
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Literal, TypeVar, cast, get_args

from netjail import policy as rules
from netjail.daemon.configvalues import (
    BadValueError,
    ListenAddress,
    Table,
    read_absolute_path,
    read_array,
    read_bind,
    read_bool,
    read_choice,
    read_count,
    read_cpus,
    read_duration,
    read_group_name,
    read_host_name,
    read_http_rules,
    read_listen_address,
    read_pids,
    read_rules,
    read_size,
    read_socket_path,
    read_string,
    read_uid,
    read_uid_range,
)
from netjail.daemon.uids import DEFAULT_JOB_UIDS, UidRange, parse_uid_range
from netjail.errors import ConfigError
from netjail.ipaddr import IPAddress
from netjail.kernel.backends import FirewallBackend as Firewall
from netjail.kernel.backends import LogBackend
from netjail.protocol import DECISION_TIMEOUT_S, BindMount

DEFAULT_CONFIG_PATH = "/etc/netjail/netjaild.toml"
DEFAULT_SOCKET = "/run/netjail/netjail.sock"
#: Connections one non-root uid may hold open at once.
DEFAULT_MAX_CONNECTIONS_PER_UID = 64
#: Bounds a configured count must keep (a typo of a few zeros is refused, not obeyed).
_MAX_JOBS_BOUND = 1_000_000
_MAX_CONNECTIONS_BOUND = 65536
#: Longest wait for a live decision the file may set.
MAX_DECISION_TIMEOUT_S = 3600.0

LogFormat = Literal["text", "json"]
BlockedDnsAnswer = Literal["NXDOMAIN", "REFUSED"]


@dataclass(frozen=True)
class Limits:
    """Resource limits for jobs: what a job gets when it asks for none, and the most it may ask.

    ``None`` means "no limit". When a ``default_*`` is absent from the file and the matching
    ``max_*`` is set, the default is the maximum, so a job that asks for nothing is still capped.
    """

    default_memory: int | None = None  # bytes
    max_memory: int | None = None  # bytes
    default_cpus: float | None = None
    max_cpus: float | None = None
    #: A pids limit even for jobs that ask for none: a fork bomb ends far below pid_max.
    default_pids: int | None = 4096
    max_pids: int | None = None
    default_timeout: float | None = None  # seconds
    max_timeout: float | None = None  # seconds
    kill_grace: float = 2.0  # seconds between SIGTERM and SIGKILL when a job is ended


#: The most warm jails a pool may keep (each holds a netns, a cgroup and a standby process).
MAX_POOL_SIZE = 64


@dataclass(frozen=True)
class Jail:
    """The deep jail: who jobs run as, what of the host they see, how big their tmpfs are."""

    #: uids (and gids) leased one per job to root's jobs that ask for no --uid.
    job_uids: UidRange = field(default_factory=lambda: parse_uid_range(DEFAULT_JOB_UIDS))
    #: Host paths every job sees, read-write and read-only (a job's own binds come after).
    binds: tuple[BindMount, ...] = ()
    ro_binds: tuple[BindMount, ...] = ()
    #: The job's HOME, a tmpfs of its own (its pages count against the job's memory limit).
    home_size: int = 1 << 30
    tmp_size: int = 256 << 20
    var_tmp_size: int = 256 << 20
    run_size: int = 16 << 20
    dev_shm_size: int = 256 << 20
    #: Jails kept built ahead of any job, each used by one job and then destroyed; 0: none.
    pool_size: int = 4


@dataclass(frozen=True)
class Policy:
    """The egress policy a job gets when its request names none."""

    default_allow: tuple[str, ...] = ()
    default_deny: tuple[str, ...] = ()
    blocked_dns_answer: BlockedDnsAnswer = "NXDOMAIN"
    #: How long a live decision (``decide``) is waited for before the name or request is denied.
    decision_timeout: float = DECISION_TIMEOUT_S
    #: Interception (docs/POLICY.md): added to every job's, except default_allow_requests,
    #: which, like default_allow, applies only to a job that names none of its own.
    default_intercept: tuple[str, ...] = ()
    default_mocks: tuple[str, ...] = ()
    default_deny_requests: tuple[str, ...] = ()
    default_allow_requests: tuple[str, ...] = ()
    default_redact: tuple[str, ...] = ()
    default_inject_headers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Proxy:
    """How the proxy reaches upstreams for intercepted names."""

    #: A PEM file of the CAs upstream certificates are verified against; None: the host's
    #: trust store.
    upstream_ca: str | None = None


def _no_hosts() -> Mapping[str, IPAddress]:
    return MappingProxyType({})


@dataclass(frozen=True)
class Config:
    """The whole daemon configuration; ``Config()`` is the configuration of an absent file."""

    socket: str = DEFAULT_SOCKET
    group: str = "netjail"
    state_dir: str = "/var/lib/netjail"
    log_format: LogFormat = "text"
    allowed_uids: tuple[int, ...] = ()
    allowed_groups: tuple[str, ...] = ()
    log_backend: LogBackend = "nflog"
    firewall: Firewall = "nftables"
    #: The most jobs built or running at once; None: sized to the fd limit at start
    #: (``jobs.max_jobs_for``).
    max_jobs: int | None = None
    max_connections_per_uid: int = DEFAULT_MAX_CONNECTIONS_PER_UID
    #: Where Prometheus scrapes netjaild's metrics; None: not served. Loopback only, unless
    #: ``metrics_allow_remote``: the endpoint has no authentication. Read at start only.
    metrics_listen: ListenAddress | None = None
    metrics_allow_remote: bool = False
    limits: Limits = field(default_factory=Limits)
    policy: Policy = field(default_factory=Policy)
    jail: Jail = field(default_factory=Jail)
    proxy: Proxy = field(default_factory=Proxy)
    # Host name (lower case, no trailing dot) -> address; the proxy uses it instead of DNS.
    hosts: Mapping[str, IPAddress] = field(default_factory=_no_hosts)


def config_keys() -> list[str]:
    """Every key the file may contain, dotted (``limits.max_memory``), in declaration order.

    ``hosts`` is listed as one key: its entries are host names chosen by the operator.
    """
    tables: dict[str, type[Limits | Policy | Jail | Proxy]] = {
        "limits": Limits,
        "policy": Policy,
        "jail": Jail,
        "proxy": Proxy,
    }
    keys: list[str] = []
    for top in fields(Config):
        if top.name in tables:
            keys.extend(f"{top.name}.{inner.name}" for inner in fields(tables[top.name]))
        else:
            keys.append(top.name)
    return keys


# --------------------------------------------------------------------------------------------
# Reading a decoded TOML document


def _read_hosts(table: Table) -> Mapping[str, IPAddress]:
    hosts: dict[str, IPAddress] = {}
    for name, value in table.entries():
        if isinstance(value, dict):
            # TOML reads an unquoted dotted key (pypi.example.com = "…") as nested tables.
            table.problem(
                name,
                "expected an IP address string; quote host names that contain dots: "
                '"pypi.example.com" = "10.0.0.5"',
            )
            continue
        try:
            host = read_host_name(name)
            text = read_string(value)
            try:
                address = ipaddress.ip_address(text)
            except ValueError:
                raise BadValueError(f"invalid IP address {text!r}") from None
        except BadValueError as exc:
            table.problem(name, str(exc))
            continue
        if host in hosts:
            table.problem(name, f"{host!r} is listed twice")
            continue
        hosts[host] = address
    return MappingProxyType(hosts)


_N = TypeVar("_N", int, float)


def _read_limit(
    table: Table, name: str, convert: Callable[[object], _N]
) -> tuple[_N | None, _N | None]:
    """``default_<name>`` and ``max_<name>``, the default defaulting to the max (see Limits)."""
    default = table.take(f"default_{name}", convert, None)
    maximum = table.take(f"max_{name}", convert, None)
    given = f"default_{name}" in table.data
    shipped = getattr(Limits(), f"default_{name}")
    if maximum is None:
        return (default if given else shipped), maximum
    if default is None:
        # Absent means the shipped default, capped by the max (the max when there is no
        # shipped default); a default that was given but invalid is reported already.
        if given:
            return None, maximum
        return (maximum if shipped is None else min(shipped, maximum)), maximum
    if default > maximum:
        # Quote the values as written ("4G"), not as parsed (4294967296).
        table.problem(
            f"default_{name}",
            f"{table.data[f'default_{name}']!r} is more than"
            f" {table.prefix}max_{name} {table.data[f'max_{name}']!r};"
            f" raise {table.prefix}max_{name} or lower {table.prefix}default_{name}",
        )
    return default, maximum


def _read_limits(table: Table) -> Limits:
    default_memory, max_memory = _read_limit(table, "memory", read_size)
    default_cpus, max_cpus = _read_limit(table, "cpus", read_cpus)
    default_pids, max_pids = _read_limit(table, "pids", read_pids)
    default_timeout, max_timeout = _read_limit(table, "timeout", read_duration)
    return Limits(
        default_memory=default_memory,
        max_memory=max_memory,
        default_cpus=default_cpus,
        max_cpus=max_cpus,
        default_pids=default_pids,
        max_pids=max_pids,
        default_timeout=default_timeout,
        max_timeout=max_timeout,
        kill_grace=table.take("kill_grace", read_duration, Limits().kill_grace),
    )


def _read_policy(table: Table) -> Policy:
    base = Policy()
    answer = table.take("blocked_dns_answer", read_choice(get_args(BlockedDnsAnswer)), "NXDOMAIN")
    return Policy(
        default_allow=table.take(
            "default_allow", read_rules(rules.DEFAULT_PORTS), base.default_allow
        ),
        # As in a request, a deny rule without ports means every port.
        default_deny=table.take("default_deny", read_rules(None), base.default_deny),
        blocked_dns_answer=cast("BlockedDnsAnswer", answer),
        decision_timeout=table.take("decision_timeout", _read_decision_timeout, DECISION_TIMEOUT_S),
        **{
            name: table.take(name, read_http_rules(name), ())
            for name in (
                "default_intercept",
                "default_mocks",
                "default_deny_requests",
                "default_allow_requests",
                "default_redact",
                "default_inject_headers",
            )
        },
    )


def _read_decision_timeout(value: object) -> float:
    seconds = read_duration(value)
    if seconds > MAX_DECISION_TIMEOUT_S:
        # A held query or request keeps a socket and a task of the job's waiting.
        raise BadValueError(f"at most {MAX_DECISION_TIMEOUT_S:g} seconds, got {seconds:g}")
    return seconds


def _read_proxy(table: Table) -> Proxy:
    return Proxy(upstream_ca=table.take("upstream_ca", read_absolute_path, None))


def _read_jail(table: Table) -> Jail:
    base = Jail()
    return Jail(
        job_uids=table.take("job_uids", read_uid_range, base.job_uids),
        binds=table.take("binds", read_array(read_bind("rw")), base.binds),
        ro_binds=table.take("ro_binds", read_array(read_bind("ro")), base.ro_binds),
        home_size=table.take("home_size", read_size, base.home_size),
        tmp_size=table.take("tmp_size", read_size, base.tmp_size),
        var_tmp_size=table.take("var_tmp_size", read_size, base.var_tmp_size),
        run_size=table.take("run_size", read_size, base.run_size),
        dev_shm_size=table.take("dev_shm_size", read_size, base.dev_shm_size),
        pool_size=table.take("pool_size", read_count(MAX_POOL_SIZE, minimum=0), base.pool_size),
    )


def _read_config(data: Mapping[str, object], problems: list[str]) -> Config:
    top = Table(data, "", problems)
    limits, policy, hosts = top.subtable("limits"), top.subtable("policy"), top.subtable("hosts")
    jail, proxy = top.subtable("jail"), top.subtable("proxy")
    base = Config()
    config = Config(
        socket=top.take("socket", read_socket_path, base.socket),
        group=top.take("group", read_group_name, base.group),
        state_dir=top.take("state_dir", read_absolute_path, base.state_dir),
        log_format=cast(
            "LogFormat", top.take("log_format", read_choice(get_args(LogFormat)), "text")
        ),
        allowed_uids=top.take("allowed_uids", read_array(read_uid), base.allowed_uids),
        allowed_groups=top.take("allowed_groups", read_array(read_group_name), base.allowed_groups),
        log_backend=cast(
            "LogBackend", top.take("log_backend", read_choice(get_args(LogBackend)), "nflog")
        ),
        firewall=cast(
            "Firewall", top.take("firewall", read_choice(get_args(Firewall)), "nftables")
        ),
        max_jobs=top.take("max_jobs", read_count(_MAX_JOBS_BOUND), base.max_jobs),
        max_connections_per_uid=top.take(
            "max_connections_per_uid",
            read_count(_MAX_CONNECTIONS_BOUND),
            base.max_connections_per_uid,
        ),
        metrics_listen=top.take("metrics_listen", read_listen_address, base.metrics_listen),
        metrics_allow_remote=top.take("metrics_allow_remote", read_bool, base.metrics_allow_remote),
        limits=_read_limits(limits),
        policy=_read_policy(policy),
        hosts=_read_hosts(hosts),
        jail=_read_jail(jail),
        proxy=_read_proxy(proxy),
    )
    for table in (top, limits, policy, hosts, jail, proxy):
        table.reject_unknown()
    listen = config.metrics_listen
    if listen is not None and not listen.host.is_loopback and not config.metrics_allow_remote:
        top.problem(
            "metrics_listen",
            f"{listen} is not a loopback address, and the metrics endpoint has no "
            "authentication; set metrics_allow_remote = true to serve it beyond this host",
        )
    return config


def find_problems(data: Mapping[str, object]) -> list[str]:
    """Every problem in a decoded TOML document, one line each, naming the key; [] if valid."""
    problems: list[str] = []
    _read_config(data, problems)
    return problems


def parse_config(data: Mapping[str, object], source: str = DEFAULT_CONFIG_PATH) -> Config:
    """The configuration a decoded TOML document describes.

    Raises ConfigError naming ``source`` and the first bad key (and how many more there are).
    """
    problems: list[str] = []
    config = _read_config(data, problems)
    if problems:
        raise ConfigError(_summarise(source, problems))
    return config


def _summarise(source: str, problems: list[str]) -> str:
    message = f"{source}: {problems[0]}"
    if len(problems) > 1:
        message += (
            f" (and {len(problems) - 1} more problem(s);"
            f" 'netjaild --check-config {source}' lists them all)"
        )
    return message


# --------------------------------------------------------------------------------------------
# The file


def _read_document(path: str, *, required: bool) -> dict[str, object] | None:
    """The decoded file at ``path``; None when it is absent and not ``required``."""
    try:
        with open(path, "rb") as file:
            info = os.fstat(file.fileno())
            raw = file.read()
    except FileNotFoundError:
        if not required:
            return None
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{path}: not a regular file")
    # The file decides who may run jobs and what they may reach, so someone who can write it
    # can give themselves the daemon's power: refuse a file others could have changed.
    if info.st_uid not in (0, os.geteuid()):
        raise ConfigError(f"{path}: owned by uid {info.st_uid}; it must be owned by root")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(
            f"{path}: writable by group or others (mode {stat.S_IMODE(info.st_mode):04o});"
            f" run: chmod go-w {path}"
        )
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def load_config(path: str | None = None) -> Config:
    """The configuration in ``path``, or in the default file when ``path`` is None.

    A missing default file means all defaults; a missing file that was named is an error.
    Raises ConfigError (one line naming the file and the key) on any problem.
    """
    source = DEFAULT_CONFIG_PATH if path is None else path
    data = _read_document(source, required=path is not None)
    if data is None:
        return Config()
    return parse_config(data, source)


def check_config(path: str | None = None) -> list[str]:
    """Every problem of the configuration file, each a line ``FILE: problem``; [] when valid.

    For ``netjaild --check-config [PATH]``: unlike :func:`load_config`, lists all problems.
    """
    source = DEFAULT_CONFIG_PATH if path is None else path
    try:
        data = _read_document(source, required=path is not None)
    except ConfigError as exc:
        return [str(exc)]
    if data is None:
        return []
    return [f"{source}: {problem}" for problem in find_problems(data)]
