"""A job's egress policy: allow/deny rules, matched.

Pure: no I/O. The rules themselves (grammar, parsing, validation, canonical names, and the
decisions behind each) are ``netjail.rulegrammar``'s; this module re-exports them, and matches
lists of them:

- **Matching** (:meth:`Policy.allows`): deny wins over allow; no matching allow rule means the
  connection is refused. :meth:`Policy.name_verdict` answers "may this name be resolved at all":
  true when some port is allowed for it and not denied, i.e. exactly when ``allows(name, p)``
  holds for some port ``p``.
- Names and addresses handed to the matchers come from the job and are hostile: the matchers
  never raise, they return ``False`` for anything malformed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from typing import Final, Literal

from netjail.errors import RequestError
from netjail.rulegrammar import (
    DEFAULT_PORTS,
    MAX_LABEL_LENGTH,
    MAX_NAME_LENGTH,
    MAX_PORTS_PER_RULE,
    MAX_RULE_LENGTH,
    MIN_IPV4_PREFIX,
    MIN_IPV6_PREFIX,
    CidrRule,
    NameRule,
    PortSet,
    Rule,
    TcpRule,
    canonical_name,
    parse_listed_rule,
    parse_rule,
    valid_port,
)

__all__ = [
    "DEFAULT_PORTS",
    "MAX_LABEL_LENGTH",
    "MAX_NAME_LENGTH",
    "MAX_PORTS_PER_RULE",
    "MAX_RULES",
    "MAX_RULE_LENGTH",
    "MIN_IPV4_PREFIX",
    "MIN_IPV6_PREFIX",
    "Access",
    "CidrRule",
    "NameRule",
    "Policy",
    "PortSet",
    "Rule",
    "TcpRule",
    "canonical_name",
    "parse_rule",
]

#: Most rules in each of the allow and deny lists.
MAX_RULES: Final = 1024

_ALL_PORTS_COUNT: Final = 65535


#: How a connection to a name on a port may go: refused, relayed once its first bytes name the
#: name (TLS SNI / HTTP Host), or relayed as raw TCP without a check (a ``tcp://`` rule).
Access = Literal["denied", "checked", "unverified"]


class Policy:
    """A job's allow and deny rules, indexed for matching."""

    __slots__ = ("_allow", "_deny", "_raw", "allow", "deny")

    def __init__(self, allow: Sequence[Rule], deny: Sequence[Rule] = ()) -> None:
        self.allow: tuple[Rule, ...] = tuple(allow)
        self.deny: tuple[Rule, ...] = tuple(deny)
        self._allow = _Index(rule for rule in self.allow if not isinstance(rule, TcpRule))
        self._raw = _Index(rule for rule in self.allow if isinstance(rule, TcpRule))
        # A deny rule refuses every protocol, tcp:// or not.
        self._deny = _Index(self.deny)

    @classmethod
    def parse(cls, allow: Sequence[str], deny: Sequence[str] = ()) -> Policy:
        """Parse rule texts; raises RequestError naming the first bad rule and its list."""
        for kind, texts in (("allow", allow), ("deny", deny)):
            if len(texts) > MAX_RULES:
                raise RequestError(
                    f"too many {kind} rules ({len(texts)}; at most {MAX_RULES}): use wildcards"
                )
        return cls(
            [parse_listed_rule("allow", text, DEFAULT_PORTS) for text in allow],
            # A bare "deny x" means x on every port; see the module docstring.
            [parse_listed_rule("deny", text, None) for text in deny],
        )

    def name_verdict(self, name: str) -> bool:
        """Whether ``name`` may be resolved: some port is allowed for it and not denied."""
        canonical = canonical_name(name)
        if canonical is None:
            return False
        allowed = _union(self._allow.ports_for(canonical), self._raw.ports_for(canonical))
        denied = self._deny.ports_for(canonical)
        if denied is None or allowed == frozenset():
            return False
        if allowed is None:
            return len(denied) < _ALL_PORTS_COUNT
        return bool(allowed - denied)

    def covers(self, name: str) -> bool:
        """Whether any allow, raw or deny rule names ``name`` (on any port): a name no rule
        covers is one a live decision may allow."""
        canonical = canonical_name(name)
        if canonical is None:
            return True
        return any(
            index.ports_for(canonical) != frozenset()
            for index in (self._allow, self._raw, self._deny)
        )

    def allow_name(self, name: str) -> None:
        """Allow the canonical ``name`` on the default ports from now on: a live decision, the
        one change a policy takes after it is made."""
        rule = NameRule(name, False, DEFAULT_PORTS)
        self.allow = (*self.allow, rule)
        self._allow.exact[name] = _union(self._allow.exact.get(name, frozenset()), DEFAULT_PORTS)

    def allows(self, name: str, port: int) -> bool:
        """Whether a connection to ``name`` on ``port`` may go out (deny wins over allow)."""
        return self.access(name, port) != "denied"

    def access(self, name: str, port: int) -> Access:
        """How a connection to ``name`` on ``port`` may go: deny wins, then a raw rule."""
        canonical = canonical_name(name)
        if canonical is None or not valid_port(port):
            return "denied"
        if _covers(self._deny.ports_for(canonical), port):
            return "denied"
        if _covers(self._raw.ports_for(canonical), port):
            return "unverified"
        return "checked" if _covers(self._allow.ports_for(canonical), port) else "denied"

    def allows_address(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> bool:
        """Whether a connection to ``ip`` on ``port`` may go out, by CIDR rules only."""
        address = _plain_address(ip)
        if address is None or not valid_port(port):
            return False
        if any(_covers(rule.ports, port) for rule in self._deny.cidrs_containing(address)):
            return False
        return any(_covers(rule.ports, port) for rule in self._allow.cidrs_containing(address))

    def denies_address(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> bool:
        """Whether a deny CIDR rule covers ``ip`` on ``port`` (true for anything malformed).

        The proxy asks this of every upstream address, however the name got it: deny wins.
        """
        address = _plain_address(ip)
        if address is None or not valid_port(port):
            return True
        return any(_covers(rule.ports, port) for rule in self._deny.cidrs_containing(address))


class _Index:
    """Rules of one list, keyed for matching by name suffix instead of a scan."""

    __slots__ = ("cidrs", "exact", "wildcard")

    def __init__(self, rules: Iterable[Rule]) -> None:
        self.exact: dict[str, PortSet] = {}
        self.wildcard: dict[str, PortSet] = {}
        self.cidrs: list[CidrRule] = []
        for rule in rules:
            if isinstance(rule, CidrRule):
                self.cidrs.append(rule)
                continue
            table = self.wildcard if rule.wildcard else self.exact
            table[rule.name] = _union(table.get(rule.name, frozenset()), rule.ports)

    def ports_for(self, name: str) -> PortSet:
        """The union of the ports of every rule matching the canonical ``name``."""
        ports = self.exact.get(name, frozenset())
        # A wildcard on "s" matches "x.s", "y.x.s"...: look up each proper suffix.
        rest = name
        while ports is not None:
            _, dot, rest = rest.partition(".")
            if not dot:
                break
            if rest in self.wildcard:
                ports = _union(ports, self.wildcard[rest])
        return ports

    def cidrs_containing(
        self, address: ipaddress.IPv4Address | ipaddress.IPv6Address
    ) -> list[CidrRule]:
        # Comparing across versions is False, never an error, in ipaddress.
        return [rule for rule in self.cidrs if address in rule.network]


def _plain_address(
    ip: object,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``ip`` as a plain address (IPv4-mapped IPv6 unwrapped), or None if not an address."""
    if isinstance(ip, ipaddress.IPv6Address):
        return ip.ipv4_mapped or ip
    if isinstance(ip, ipaddress.IPv4Address):
        return ip
    return None


def _covers(ports: PortSet, port: int) -> bool:
    return ports is None or port in ports


def _union(a: PortSet, b: PortSet) -> PortSet:
    if a is None or b is None:
        return None
    return a | b
