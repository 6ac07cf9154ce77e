"""Reading one TOML table of the daemon's configuration: typed values, every problem named.

``Table`` hands out a table's keys, converting each with one of the ``read_*`` functions,
and records a problem (naming the key) for each bad or unknown one instead of stopping at
the first; netjail.daemon.config assembles them into its dataclasses.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar, cast

from netjail import policy as rules
from netjail import units
from netjail.daemon.uids import UidRange, parse_uid_range
from netjail.errors import ConfigError, ProtocolError, RequestError
from netjail.ipaddr import IPAddress
from netjail.protocol import BindAccess, BindMount, parse_bind
from netjail.text import sanitize

# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107
# The kernel's PID_MAX_LIMIT on 64-bit: no pids limit can usefully exceed it.
_MAX_PIDS = 4_194_304
# (uid_t)-1 means "no change" to setresuid() and friends, so it is never a real uid.
_MAX_UID = 2**32 - 2
# useradd/groupadd's portable name syntax (plus the trailing '$' of machine accounts).
_GROUP_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9._-]{0,31}\$?")


class BadValueError(ValueError):
    """A value of the right key but the wrong shape; the message says what was expected."""


_T = TypeVar("_T")
_D = TypeVar("_D")


class Table:
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
        except BadValueError as exc:
            self.problem(key, str(exc))
            return default

    def subtable(self, key: str) -> Table:
        """The nested table ``key`` (empty when absent)."""
        self._known.append(key)
        value = self._data.get(key, {})
        if not isinstance(value, dict):
            self.problem(key, f"expected a table ([{self._prefix}{key}]), got {describe(value)}")
            value = {}
        return Table(cast("dict[str, object]", value), f"{self._prefix}{key}.", self._problems)

    def entries(self) -> Iterator[tuple[str, object]]:
        """Every key and value, all taken as known: for tables whose keys the operator names."""
        for key, value in self._data.items():
            self._known.append(key)
            yield key, value

    def problem(self, key: str, message: str) -> None:
        # Keys come from the file as written: one printable line, whatever they hold.
        self._problems.append(f"{sanitize(self._prefix + key)}: {message}")

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
            self._problems.append(f"unknown key '{sanitize(self._prefix + key)}'{hint}")

    @property
    def data(self) -> Mapping[str, object]:
        return self._data

    @property
    def prefix(self) -> str:
        return self._prefix


def describe(value: object) -> str:
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


def read_string(value: object) -> str:
    if not isinstance(value, str):
        raise BadValueError(f"expected a string, got {describe(value)}")
    return value


def read_absolute_path(value: object) -> str:
    path = read_string(value)
    if not path.startswith("/") or "\0" in path:
        raise BadValueError(f"expected an absolute path, got {path!r}")
    return os.path.normpath(path)


def read_socket_path(value: object) -> str:
    path = read_absolute_path(value)
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
        raise BadValueError(
            f"path is longer than the {_MAX_SOCKET_PATH} bytes a Unix socket address can hold"
        )
    return path


def read_group_name(value: object) -> str:
    name = read_string(value)
    if not _GROUP_NAME.fullmatch(name):
        raise BadValueError(f"invalid group name {name!r}")
    return name


def read_choice(options: tuple[str, ...]) -> Callable[[object], str]:
    def convert(value: object) -> str:
        text = read_string(value)
        if text not in options:
            listed = ", ".join(repr(option) for option in options)
            raise BadValueError(f"expected one of {listed}, got {text!r}")
        return text

    return convert


def read_array(item: Callable[[object], _T]) -> Callable[[object], tuple[_T, ...]]:
    def convert(value: object) -> tuple[_T, ...]:
        if not isinstance(value, list):
            raise BadValueError(f"expected an array, got {describe(value)}")
        items: list[_T] = []
        for index, element in enumerate(value):
            try:
                items.append(item(element))
            except BadValueError as exc:
                raise BadValueError(f"item {index}: {exc}") from None
        return tuple(items)

    return convert


def read_uid(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadValueError(f"expected an integer uid, got {describe(value)}")
    if not 0 <= value <= _MAX_UID:
        raise BadValueError(f"uid {value} is out of range 0-{_MAX_UID}")
    return value


def read_rules(default_ports: rules.PortSet) -> Callable[[object], tuple[str, ...]]:
    """Rule texts, each checked by the policy parser (the daemon parses them again per job)."""

    def check(value: object) -> str:
        text = read_string(value)
        try:
            rules.parse_rule(text, default_ports=default_ports)
        except RequestError as exc:
            raise BadValueError(str(exc)) from None
        return text

    parse_all = read_array(check)

    def convert(value: object) -> tuple[str, ...]:
        texts = parse_all(value)
        if len(texts) > rules.MAX_RULES:
            raise BadValueError(f"{len(texts)} rules; at most {rules.MAX_RULES}: use wildcards")
        return texts

    return convert


def read_http_rules(key: str) -> Callable[[object], tuple[str, ...]]:
    """Texts of one interception option (``default_mocks``…), each checked by its parser."""
    # Imported here: only a config that sets these keys needs the HTTP rule parsers.
    from netjail.httppolicy import parse_http_policy  # noqa: PLC0415

    option = key.removeprefix("default_")

    def check(value: object) -> str:
        text = read_string(value)
        try:
            parse_http_policy(**{option: [text]})
        except RequestError as exc:
            raise BadValueError(str(exc)) from None
        return text

    return read_array(check)


# Sizes, durations and CPU counts obey the same rules as in a client's request (netjail.units),
# so that every default the file sets is one a request could also ask for.


def read_size(value: object) -> int:
    if isinstance(value, str):
        try:
            return units.parse_size(value)
        except RequestError as exc:
            raise BadValueError(str(exc)) from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadValueError(f'expected a size such as "512M", got {describe(value)}')
    if not 1 <= value <= units.MAX_SIZE:
        raise BadValueError(f"a size in bytes must be from 1 to {units.MAX_SIZE}, got {value}")
    return value


def read_duration(value: object) -> float:
    if isinstance(value, str):
        try:
            return units.parse_duration(value)
        except RequestError as exc:
            raise BadValueError(str(exc)) from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadValueError(f'expected a duration such as "30s", got {describe(value)}')
    if not 0 < value <= units.MAX_DURATION_S:  # also false for nan
        raise BadValueError(
            f"a duration in seconds must be more than 0 and at most a year, got {value!r}"
        )
    return float(value)


def read_cpus(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadValueError(f"expected a number of CPUs such as 1.5, got {describe(value)}")
    if not units.MIN_CPUS <= value <= units.MAX_CPUS:  # also false for nan
        raise BadValueError(
            f"a number of CPUs must be from {units.MIN_CPUS:g} to {units.MAX_CPUS:g}, got {value!r}"
        )
    return float(value)


def read_pids(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadValueError(f"expected an integer, got {describe(value)}")
    if not 1 <= value <= _MAX_PIDS:
        raise BadValueError(f"must be between 1 and {_MAX_PIDS}, got {value}")
    return value


def read_count(maximum: int, minimum: int = 1) -> Callable[[object], int]:
    """A reader of a whole number from ``minimum`` to ``maximum`` (a count of jobs,
    connections, warm jails…)."""

    def convert(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadValueError(f"expected an integer, got {describe(value)}")
        if not minimum <= value <= maximum:
            raise BadValueError(f"must be between {minimum} and {maximum}, got {value}")
        return value

    return convert


def read_bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise BadValueError(f"expected true or false, got {describe(value)}")
    return value


@dataclass(frozen=True)
class ListenAddress:
    """An address and port to listen on, such as ``metrics_listen``'s."""

    host: IPAddress
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if self.host.version == 6 else str(self.host)
        return f"{host}:{self.port}"


def read_listen_address(value: object) -> ListenAddress:
    """``127.0.0.1:9464`` or ``[::1]:9464``: an IP address (no name: nothing to resolve at
    start) and a port from 1 to 65535."""
    text = read_string(value)
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise BadValueError(f"write an IPv6 address in brackets, e.g. [::1]:9464; got {text!r}")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise BadValueError(f"expected ADDRESS:PORT with an IP address, got {text!r}") from None
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise BadValueError(f"expected ADDRESS:PORT with a port from 1 to 65535, got {text!r}")
    return ListenAddress(address, int(port))


def read_host_name(name: str) -> str:
    """The canonical form of a host name key (as the policy matcher writes names)."""
    canonical = rules.canonical_name(name)
    if canonical is None:
        raise BadValueError(f"invalid host name {name!r}")
    return canonical


def read_uid_range(value: object) -> UidRange:
    text = read_string(value)
    try:
        return parse_uid_range(text, key="")
    except ConfigError as exc:
        raise BadValueError(str(exc).removeprefix(": ")) from None


def read_bind(access: BindAccess) -> Callable[[object], BindMount]:
    def convert(value: object) -> BindMount:
        try:
            return parse_bind(read_string(value), access)
        except ProtocolError as exc:
            raise BadValueError(str(exc)) from None

    return convert
