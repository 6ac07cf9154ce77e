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

import difflib
import ipaddress
import os
import re
import stat
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Literal, TypeVar, cast, get_args

from netjail import policy as rules
from netjail import units
from netjail.errors import ConfigError, RequestError
from netjail.ipaddr import IPAddress
from netjail.kernel.backends import FirewallBackend as Firewall
from netjail.kernel.backends import LogBackend

DEFAULT_CONFIG_PATH = "/etc/netjail/netjaild.toml"
DEFAULT_SOCKET = "/run/netjail/netjail.sock"

LogFormat = Literal["text", "json"]
BlockedDnsAnswer = Literal["NXDOMAIN", "REFUSED"]

# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107
# The kernel's PID_MAX_LIMIT on 64-bit: no pids limit can usefully exceed it.
_MAX_PIDS = 4_194_304
# (uid_t)-1 means "no change" to setresuid() and friends, so it is never a real uid.
_MAX_UID = 2**32 - 2
# useradd/groupadd's portable name syntax (plus the trailing '$' of machine accounts).
_GROUP_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9._-]{0,31}\$?")


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
    default_pids: int | None = None
    max_pids: int | None = None
    default_timeout: float | None = None  # seconds
    max_timeout: float | None = None  # seconds
    kill_grace: float = 2.0  # seconds between SIGTERM and SIGKILL when a job is ended


@dataclass(frozen=True)
class Policy:
    """The egress policy a job gets when its request names none."""

    default_allow: tuple[str, ...] = ()
    default_deny: tuple[str, ...] = ()
    blocked_dns_answer: BlockedDnsAnswer = "NXDOMAIN"


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
    limits: Limits = field(default_factory=Limits)
    policy: Policy = field(default_factory=Policy)
    # Host name (lower case, no trailing dot) -> address; the proxy uses it instead of DNS.
    hosts: Mapping[str, IPAddress] = field(default_factory=_no_hosts)


def config_keys() -> list[str]:
    """Every key the file may contain, dotted (``limits.max_memory``), in declaration order.

    ``hosts`` is listed as one key: its entries are host names chosen by the operator.
    """
    tables: dict[str, type[Limits | Policy]] = {"limits": Limits, "policy": Policy}
    keys: list[str] = []
    for top in fields(Config):
        if top.name in tables:
            keys.extend(f"{top.name}.{inner.name}" for inner in fields(tables[top.name]))
        else:
            keys.append(top.name)
    return keys


# --------------------------------------------------------------------------------------------
# Reading a decoded TOML document


class _BadValueError(ValueError):
    """A value of the right key but the wrong shape; the message says what was expected."""


_T = TypeVar("_T")
_D = TypeVar("_D")


class _Table:
    """One TOML table being read: hands out its keys and records problems and unknown keys."""

    def __init__(self, data: Mapping[str, object], prefix: str, problems: list[str]) -> None:
        self._data = data
        self._prefix = prefix
        self._problems = problems
        self._known: list[str] = []

    def take(self, key: str, convert: Callable[[object], _T], default: _D) -> _T | _D:
        """The converted value of ``key``, or ``default`` when it is absent or invalid."""
        self._known.append(key)
        if key not in self._data:
            return default
        try:
            return convert(self._data[key])
        except _BadValueError as exc:
            self.problem(key, str(exc))
            return default

    def subtable(self, key: str) -> _Table:
        """The nested table ``key`` (empty when absent)."""
        self._known.append(key)
        value = self._data.get(key, {})
        if not isinstance(value, dict):
            self.problem(key, f"expected a table ([{self._prefix}{key}]), got {_describe(value)}")
            value = {}
        return _Table(cast("dict[str, object]", value), f"{self._prefix}{key}.", self._problems)

    def entries(self) -> Iterator[tuple[str, object]]:
        """Every key and value, all taken as known: for tables whose keys the operator names."""
        for key, value in self._data.items():
            self._known.append(key)
            yield key, value

    def problem(self, key: str, message: str) -> None:
        self._problems.append(f"{self._prefix}{key}: {message}")

    def reject_unknown(self) -> None:
        """Record every key of the table that no ``take``/``subtable`` asked for."""
        for key in self._data:
            if key in self._known:
                continue
            hint = ""
            # A near spelling, else a known key that contains it ("allow" -> "default_allow").
            close = (
                difflib.get_close_matches(key, self._known, n=1)
                or [known for known in self._known if key in known][:1]
            )
            if close:
                hint = f" (did you mean '{self._prefix}{close[0]}'?)"
            self._problems.append(f"unknown key '{self._prefix}{key}'{hint}")

    @property
    def data(self) -> Mapping[str, object]:
        return self._data

    @property
    def prefix(self) -> str:
        return self._prefix


def _describe(value: object) -> str:
    """How a TOML value is named in messages: its TOML type and, when short, the value."""
    kinds: dict[type, str] = {
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        str: "a string",
        list: "an array",
        dict: "a table",
    }
    kind = kinds.get(type(value), "a date or time")
    shown = repr(value) if isinstance(value, str | int | float) else ""
    if shown and len(shown) <= 40:
        return f"{kind} {shown}"
    return kind


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise _BadValueError(f"expected a string, got {_describe(value)}")
    return value


def _absolute_path(value: object) -> str:
    path = _string(value)
    if not path.startswith("/") or "\0" in path:
        raise _BadValueError(f"expected an absolute path, got {path!r}")
    return os.path.normpath(path)


def _socket_path(value: object) -> str:
    path = _absolute_path(value)
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
        raise _BadValueError(
            f"path is longer than the {_MAX_SOCKET_PATH} bytes a Unix socket address can hold"
        )
    return path


def _group_name(value: object) -> str:
    name = _string(value)
    if not _GROUP_NAME.fullmatch(name):
        raise _BadValueError(f"invalid group name {name!r}")
    return name


def _choice(options: tuple[str, ...]) -> Callable[[object], str]:
    def convert(value: object) -> str:
        text = _string(value)
        if text not in options:
            listed = ", ".join(repr(option) for option in options)
            raise _BadValueError(f"expected one of {listed}, got {text!r}")
        return text

    return convert


def _array(item: Callable[[object], _T]) -> Callable[[object], tuple[_T, ...]]:
    def convert(value: object) -> tuple[_T, ...]:
        if not isinstance(value, list):
            raise _BadValueError(f"expected an array, got {_describe(value)}")
        items: list[_T] = []
        for index, element in enumerate(value):
            try:
                items.append(item(element))
            except _BadValueError as exc:
                raise _BadValueError(f"item {index}: {exc}") from None
        return tuple(items)

    return convert


def _uid(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _BadValueError(f"expected an integer uid, got {_describe(value)}")
    if not 0 <= value <= _MAX_UID:
        raise _BadValueError(f"uid {value} is out of range 0-{_MAX_UID}")
    return value


def _rules(default_ports: rules.PortSet) -> Callable[[object], tuple[str, ...]]:
    """Rule texts, each checked by the policy parser (the daemon parses them again per job)."""

    def check(value: object) -> str:
        text = _string(value)
        try:
            rules.parse_rule(text, default_ports=default_ports)
        except RequestError as exc:
            raise _BadValueError(str(exc)) from None
        return text

    parse_all = _array(check)

    def convert(value: object) -> tuple[str, ...]:
        texts = parse_all(value)
        if len(texts) > rules.MAX_RULES:
            raise _BadValueError(f"{len(texts)} rules; at most {rules.MAX_RULES}: use wildcards")
        return texts

    return convert


# Sizes, durations and CPU counts obey the same rules as in a client's request (netjail.units),
# so that every default the file sets is one a request could also ask for.


def _size(value: object) -> int:
    if isinstance(value, str):
        try:
            return units.parse_size(value)
        except RequestError as exc:
            raise _BadValueError(str(exc)) from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _BadValueError(f'expected a size such as "512M", got {_describe(value)}')
    if not 1 <= value <= units.MAX_SIZE:
        raise _BadValueError(f"a size in bytes must be from 1 to {units.MAX_SIZE}, got {value}")
    return value


def _duration(value: object) -> float:
    if isinstance(value, str):
        try:
            return units.parse_duration(value)
        except RequestError as exc:
            raise _BadValueError(str(exc)) from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _BadValueError(f'expected a duration such as "30s", got {_describe(value)}')
    if not 0 < value <= units.MAX_DURATION_S:  # also false for nan
        raise _BadValueError(
            f"a duration in seconds must be more than 0 and at most a year, got {value!r}"
        )
    return float(value)


def _cpus(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _BadValueError(f"expected a number of CPUs such as 1.5, got {_describe(value)}")
    if not units.MIN_CPUS <= value <= units.MAX_CPUS:  # also false for nan
        raise _BadValueError(
            f"a number of CPUs must be from {units.MIN_CPUS:g} to {units.MAX_CPUS:g}, got {value!r}"
        )
    return float(value)


def _pids(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _BadValueError(f"expected an integer, got {_describe(value)}")
    if not 1 <= value <= _MAX_PIDS:
        raise _BadValueError(f"must be between 1 and {_MAX_PIDS}, got {value}")
    return value


def _host_name(name: str) -> str:
    """The canonical form of a host name key (as the policy matcher writes names)."""
    canonical = rules.canonical_name(name)
    if canonical is None:
        raise _BadValueError(f"invalid host name {name!r}")
    return canonical


def _read_hosts(table: _Table) -> Mapping[str, IPAddress]:
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
            host = _host_name(name)
            text = _string(value)
            try:
                address = ipaddress.ip_address(text)
            except ValueError:
                raise _BadValueError(f"invalid IP address {text!r}") from None
        except _BadValueError as exc:
            table.problem(name, str(exc))
            continue
        if host in hosts:
            table.problem(name, f"{host!r} is listed twice")
            continue
        hosts[host] = address
    return MappingProxyType(hosts)


_N = TypeVar("_N", int, float)


def _read_limit(
    table: _Table, name: str, convert: Callable[[object], _N]
) -> tuple[_N | None, _N | None]:
    """``default_<name>`` and ``max_<name>``, the default defaulting to the max (see Limits)."""
    default = table.take(f"default_{name}", convert, None)
    maximum = table.take(f"max_{name}", convert, None)
    if maximum is None:
        return default, maximum
    if default is None:
        # Absent means "the max"; a default that was given but invalid is reported already.
        return (None if f"default_{name}" in table.data else maximum), maximum
    if default > maximum:
        # Quote the values as written ("4G"), not as parsed (4294967296).
        table.problem(
            f"default_{name}",
            f"{table.data[f'default_{name}']!r} is more than"
            f" {table.prefix}max_{name} {table.data[f'max_{name}']!r};"
            f" raise {table.prefix}max_{name} or lower {table.prefix}default_{name}",
        )
    return default, maximum


def _read_limits(table: _Table) -> Limits:
    default_memory, max_memory = _read_limit(table, "memory", _size)
    default_cpus, max_cpus = _read_limit(table, "cpus", _cpus)
    default_pids, max_pids = _read_limit(table, "pids", _pids)
    default_timeout, max_timeout = _read_limit(table, "timeout", _duration)
    return Limits(
        default_memory=default_memory,
        max_memory=max_memory,
        default_cpus=default_cpus,
        max_cpus=max_cpus,
        default_pids=default_pids,
        max_pids=max_pids,
        default_timeout=default_timeout,
        max_timeout=max_timeout,
        kill_grace=table.take("kill_grace", _duration, Limits().kill_grace),
    )


def _read_policy(table: _Table) -> Policy:
    base = Policy()
    answer = table.take("blocked_dns_answer", _choice(get_args(BlockedDnsAnswer)), "NXDOMAIN")
    return Policy(
        default_allow=table.take("default_allow", _rules(rules.DEFAULT_PORTS), base.default_allow),
        # As in a request, a deny rule without ports means every port.
        default_deny=table.take("default_deny", _rules(None), base.default_deny),
        blocked_dns_answer=cast("BlockedDnsAnswer", answer),
    )


def _read_config(data: Mapping[str, object], problems: list[str]) -> Config:
    top = _Table(data, "", problems)
    limits, policy, hosts = top.subtable("limits"), top.subtable("policy"), top.subtable("hosts")
    base = Config()
    config = Config(
        socket=top.take("socket", _socket_path, base.socket),
        group=top.take("group", _group_name, base.group),
        state_dir=top.take("state_dir", _absolute_path, base.state_dir),
        log_format=cast("LogFormat", top.take("log_format", _choice(get_args(LogFormat)), "text")),
        allowed_uids=top.take("allowed_uids", _array(_uid), base.allowed_uids),
        allowed_groups=top.take("allowed_groups", _array(_group_name), base.allowed_groups),
        log_backend=cast(
            "LogBackend", top.take("log_backend", _choice(get_args(LogBackend)), "nflog")
        ),
        firewall=cast("Firewall", top.take("firewall", _choice(get_args(Firewall)), "nftables")),
        limits=_read_limits(limits),
        policy=_read_policy(policy),
        hosts=_read_hosts(hosts),
    )
    for table in (top, limits, policy, hosts):
        table.reject_unknown()
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
