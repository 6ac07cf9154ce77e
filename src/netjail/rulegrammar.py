"""One egress rule: its grammar, parsing and validation, and canonical host names.

Pure: no I/O. ``netjail.policy`` matches lists of these rules, and re-exports what users import
from it. Grammar of one rule::

    rule       = name-rule / tcp-rule / cidr-rule
    name-rule  = ["*."] name [":" ports]      ; "*." = any subdomain, never the name itself
    tcp-rule   = "tcp://" ["*."] name ":" port-list   ; raw TCP: the name is not verified
    cidr-rule  = ipv4 ["/" prefix] ":" ports
               / "[" ipv6 ["/" prefix] "]" ":" ports
    ports      = "*" / port-list               ; "*" = every port
    port-list  = port *("," port)              ; port = 1-65535

Decisions, each for a reason:

- **Default ports.** An allow name rule without ports means 80 and 443 (web traffic, the
  common case). A *deny* rule without ports means every port, because "deny x" that still let
  x:8443 through would be a trap. CIDR rules must name their ports: an address rule is an
  exception to name-based policy and should say exactly what it opens.
- **Checked or raw.** A name rule lets through only connections whose first bytes prove the
  name: a TLS ClientHello whose SNI is it, or an HTTP/1.x request whose Host is it (the proxy
  blocks everything else). Other protocols (SSH, PostgreSQL, Redis…) prove nothing, so they
  need a ``tcp://`` rule, which must list its ports and says in its text that the name cannot
  be verified there: on those ports any bytes go to the name's address.
  :meth:`Policy.access` tells the two apart; a raw rule wins on its ports. In a deny list,
  ``tcp://`` changes nothing: a deny rule refuses every protocol.
- **Names are canonical** before they are stored or compared: lowercase, one trailing dot
  removed, Unicode labels converted to punycode with the stdlib IDNA 2003 codec (``xn--`` input
  is kept as is). IDNA 2003 and 2008 disagree on four "deviation" characters (``ß``, ``ς``,
  ZWJ, ZWNJ): 2003 maps ``straße`` to ``strasse``, a different domain from 2008's
  ``xn--strae-oqa``, so a Unicode name holding one is refused and the rule must be written in
  the ``xn--`` form meant. Other differences only make a name unreachable (fail closed).
  Labels are letters, digits, ``-`` (not first or last) and ``_`` (real host names carry it,
  and it cannot widen a match). A name whose last label is all digits is refused: it is an IP
  address, which CIDR rules handle. A single-label name (``intranet``) is accepted as an exact
  rule: it matches that one name only.
- **Over-broad rules are refused**: ``*``, a wildcard directly over a single label (``*.com``)
  or over a common two-level registry suffix (``*.co.uk``), and CIDR prefixes shorter than /8
  (IPv4) or /16 (IPv6). The suffix list is deliberately small (no network, no dependency); it is
  a guard against mistakes, not the Public Suffix List. IPv6 rules over IPv4-mapped space are
  refused: addresses are matched with ``::ffff:a.b.c.d`` unwrapped to ``a.b.c.d``, so such a
  rule could never match; write the IPv4 rule.
- Names handed to ``canonical_name`` come from the job and are hostile: it never raises, it
  returns ``None`` for anything malformed.
"""

from __future__ import annotations

import encodings.idna
import ipaddress
import re
from dataclasses import dataclass
from typing import Final

from netjail.errors import RequestError

#: Ports an allow name rule covers when it names none.
DEFAULT_PORTS: Final = frozenset({80, 443})
MAX_NAME_LENGTH: Final = 253
MAX_LABEL_LENGTH: Final = 63
#: Longest rule text accepted, and the most ports one rule may list.
MAX_RULE_LENGTH: Final = 512
MAX_PORTS_PER_RULE: Final = 64
#: Shortest CIDR prefixes accepted: anything wider is "the whole Internet" in disguise.
MIN_IPV4_PREFIX: Final = 8
MIN_IPV6_PREFIX: Final = 16

#: A set of ports; ``None`` means every port.
PortSet = frozenset[int] | None

# Longest input the name normaliser looks at before giving up: IDNA mapping can lengthen or
# shorten text, so allow some slack over 253, but never run nameprep over megabytes.
_MAX_RAW_NAME: Final = 4 * MAX_NAME_LENGTH
# The separators IDNA 2003 treats as dots (ASCII, ideographic, fullwidth, halfwidth), so that
# a rule splits into the labels a client's IDNA encoder would produce.
_DOTS: Final = re.compile("[.\u3002\uff0e\uff61]")
# Characters IDNA 2003 maps away but IDNA 2008 keeps: ß, final sigma, ZWNJ, ZWJ.
_DEVIATIONS: Final = frozenset("\u00df\u03c2\u200c\u200d")
_LABEL: Final = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?", re.ASCII)
_IPV4_MAPPED: Final = ipaddress.IPv6Network("::ffff:0:0/96")
_DIGITS: Final = re.compile(r"[0-9]{1,5}", re.ASCII)
_IPV4ISH: Final = re.compile(r"[0-9.]+(?:/[0-9]*)?", re.ASCII)
# Registry-level suffixes under which anyone can register a name: a wildcard directly over one
# of these allows unrelated parties' sites.
_PUBLIC_SUFFIXES: Final = frozenset(
    f"{second}.{tld}"
    for tld, seconds in {
        "uk": ("co", "org", "me", "ltd", "plc", "net", "ac", "gov", "nhs", "police", "sch"),
        "au": ("com", "net", "org", "edu", "gov", "asn", "id"),
        "nz": ("co", "net", "org", "ac", "govt", "school", "geek", "gen", "kiwi", "maori"),
        "jp": ("co", "ne", "or", "ac", "ad", "ed", "go", "gr", "lg"),
        "kr": ("co", "ne", "or", "re", "pe", "go", "ac"),
        "br": ("com", "net", "org", "gov", "edu", "art", "blog", "app"),
        "cn": ("com", "net", "org", "gov", "edu", "ac"),
        "in": ("co", "net", "org", "firm", "gen", "ind", "ac", "edu", "gov", "res"),
        "za": ("co", "net", "org", "web", "gov", "ac", "edu"),
        "mx": ("com", "net", "org", "gob", "edu"),
        "tr": ("com", "net", "org", "gen", "biz", "info", "web", "gov", "edu"),
        "ar": ("com", "net", "org", "gob", "edu"),
        "il": ("co", "net", "org", "ac", "gov", "muni"),
        "hk": ("com", "net", "org", "gov", "edu", "idv"),
        "tw": ("com", "net", "org", "gov", "edu", "idv"),
        "sg": ("com", "net", "org", "gov", "edu"),
        "my": ("com", "net", "org", "gov", "edu"),
        "id": ("co", "net", "or", "web", "my", "ac", "go"),
        "th": ("co", "in", "or", "net", "ac", "go"),
        "ua": ("com", "net", "org", "gov", "edu", "in"),
        "ru": ("com", "net", "org", "pp"),
        "pl": ("com", "net", "org", "info", "biz", "waw"),
        "eu": ("com",),
        "us": ("com",),
    }.items()
    for second in seconds
)


_RAW_SCHEME: Final = "tcp://"


class _BadRuleError(ValueError):
    """Why a rule or name is refused; turned into a RequestError naming the rule."""


@dataclass(frozen=True, slots=True)
class NameRule:
    """A rule on a host name: ``name`` exactly, or (``wildcard``) any name strictly under it."""

    #: Canonical: lowercase ASCII (punycode), no trailing dot.
    name: str
    wildcard: bool
    #: ``None``: every port.
    ports: PortSet

    def __str__(self) -> str:
        prefix = "*." if self.wildcard else ""
        return f"{prefix}{self.name}:{_format_ports(self.ports)}"

    def matches(self, name: str) -> bool:
        """Whether the canonical ``name`` is this rule's, whatever the port."""
        return name.endswith("." + self.name) if self.wildcard else name == self.name


@dataclass(frozen=True, slots=True)
class CidrRule:
    """A rule on an address range, for connections made to an address rather than a name."""

    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    #: ``None``: every port.
    ports: PortSet

    def __str__(self) -> str:
        if self.network.version == 6:
            return f"[{self.network}]:{_format_ports(self.ports)}"
        return f"{self.network}:{_format_ports(self.ports)}"


@dataclass(frozen=True, slots=True)
class TcpRule:
    """A ``tcp://`` rule: the name on these ports as raw TCP, its first bytes unchecked."""

    name: str
    wildcard: bool
    ports: frozenset[int]

    def __str__(self) -> str:
        prefix = "*." if self.wildcard else ""
        return f"{_RAW_SCHEME}{prefix}{self.name}:{_format_ports(self.ports)}"


Rule = NameRule | TcpRule | CidrRule


def parse_rule(text: str, *, default_ports: PortSet = DEFAULT_PORTS) -> Rule:
    """Parse one rule; name rules without ports get ``default_ports`` (``None``: every port).

    Raises RequestError, with a one-line message naming the rule, when it is malformed or
    over-broad.
    """
    try:
        return _parse_rule(text, default_ports)
    except _BadRuleError as exc:
        raise RequestError(f"invalid rule {_quote(text)}: {exc}") from None


def canonical_name(text: str) -> str | None:
    """The canonical form of a host name, or ``None`` if it is not a valid host name.

    Never raises: this is what hostile names (DNS questions, SNI, Host headers) go through.
    """
    try:
        return _canonicalize(text)
    except ValueError:  # includes UnicodeError from the IDNA codec
        return None


def parse_listed_rule(kind: str, text: str, default_ports: PortSet) -> Rule:
    """``parse_rule``, with the error naming the list (``kind``) the rule is in."""
    try:
        return _parse_rule(text, default_ports)
    except _BadRuleError as exc:
        raise RequestError(f"invalid {kind} rule {_quote(text)}: {exc}") from None


def _parse_rule(text: str, default_ports: PortSet) -> Rule:
    if not isinstance(text, str):
        raise _BadRuleError("a rule must be a string")
    if len(text) > MAX_RULE_LENGTH:
        raise _BadRuleError(f"longer than {MAX_RULE_LENGTH} characters")
    text = text.strip()
    if not text:
        raise _BadRuleError("empty rule")
    if text[: len(_RAW_SCHEME)].lower() == _RAW_SCHEME:
        return _parse_tcp_rule(text[len(_RAW_SCHEME) :])
    if text.startswith("["):
        return _parse_ipv6_rule(text)
    if text.count(":") > 1:
        raise _BadRuleError(
            "write an IPv6 rule in brackets with its ports, e.g. [2001:db8::/32]:443"
        )
    host, colon, port_text = text.partition(":")
    ports = _parse_ports(port_text) if colon else default_ports
    if _IPV4ISH.fullmatch(host):
        if not colon:
            raise _BadRuleError("an address rule needs its ports, e.g. 10.0.0.0/8:443")
        return CidrRule(_parse_network(host, 4), ports)
    return _parse_name_rule(host, ports)


def _parse_tcp_rule(text: str) -> TcpRule:
    host, colon, port_text = text.partition(":")
    if host.startswith("[") or _IPV4ISH.fullmatch(host):
        raise _BadRuleError(
            "an address rule is raw TCP already: write it without tcp://, e.g. 10.0.0.7/32:5432"
        )
    ports = _parse_ports(port_text) if colon else None
    if ports is None:
        raise _BadRuleError("a tcp:// rule must list its ports, e.g. tcp://db.example:5432")
    rule = _parse_name_rule(host, ports)
    return TcpRule(rule.name, rule.wildcard, ports)


def _parse_ipv6_rule(text: str) -> CidrRule:
    inside, bracket, rest = text[1:].partition("]")
    if not bracket:
        raise _BadRuleError("missing ']' after the IPv6 network")
    if not rest.startswith(":") or rest == ":":
        raise _BadRuleError("expected ':' and ports after ']', e.g. [2001:db8::/32]:443")
    return CidrRule(_parse_network(inside, 6), _parse_ports(rest[1:]))


def _parse_network(text: str, version: int) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        if "host bits set" in str(exc):
            raise _BadRuleError(f"{text} has host bits set; write the network address") from None
        raise _BadRuleError(f"{text!r} is not a valid IPv{version} network") from None
    if network.version != version:
        raise _BadRuleError(f"{text!r} is not a valid IPv{version} network")
    shortest = MIN_IPV4_PREFIX if version == 4 else MIN_IPV6_PREFIX
    if network.prefixlen < shortest:
        raise _BadRuleError(
            f"/{network.prefixlen} is too broad; the shortest prefix allowed is /{shortest}"
        )
    if isinstance(network, ipaddress.IPv6Network) and network.overlaps(_IPV4_MAPPED):
        # Matching unwraps IPv4-mapped addresses to IPv4, so such a rule would never match.
        raise _BadRuleError("write IPv4-mapped addresses as an IPv4 rule, e.g. 192.0.2.0/24:443")
    return network


def _parse_ports(text: str) -> PortSet:
    if text == "*":
        return None
    if not text:
        raise _BadRuleError("empty port list after ':'")
    parts = text.split(",")
    if len(parts) > MAX_PORTS_PER_RULE:
        raise _BadRuleError(f"more than {MAX_PORTS_PER_RULE} ports; use '*' for every port")
    ports: set[int] = set()
    for part in parts:
        if not _DIGITS.fullmatch(part) or not valid_port(int(part)):
            raise _BadRuleError(f"bad port {part!r}: a port is a number from 1 to 65535")
        ports.add(int(part))
    return frozenset(ports)


def _parse_name_rule(host: str, ports: PortSet) -> NameRule:
    if host == "*":
        raise _BadRuleError("'*' alone would allow every name; name a domain, e.g. *.example.com")
    wildcard = host.startswith("*.")
    name_text = host[2:] if wildcard else host
    if "*" in name_text:
        raise _BadRuleError("'*' may only be the whole first label, as in *.example.com")
    try:
        name = _canonicalize(name_text)
    except _BadRuleError:
        raise
    except ValueError:  # UnicodeError from the IDNA codec
        raise _BadRuleError(f"{name_text!r} is not a valid internationalised name") from None
    if wildcard and ("." not in name or name in _PUBLIC_SUFFIXES):
        raise _BadRuleError(
            f"a wildcard directly over the public suffix {name!r} is too broad;"
            " name a domain, e.g. *.example.com"
        )
    return NameRule(name, wildcard, ports)


def _canonicalize(text: str) -> str:
    """Canonical host name; raises _BadRuleError (or UnicodeError) saying what is wrong."""
    if not isinstance(text, str):
        raise _BadRuleError("a name must be a string")
    if len(text) > _MAX_RAW_NAME:
        raise _BadRuleError(f"name longer than {MAX_NAME_LENGTH} characters")
    text = text.lower()
    if text.endswith("."):
        text = text[:-1]
    if not text:
        raise _BadRuleError("empty name")
    labels = []
    for raw in _DOTS.split(text):
        if not raw:
            raise _BadRuleError("empty label (two dots in a row, or a leading dot)")
        if _DEVIATIONS.intersection(raw):
            raise _BadRuleError(
                f"label {raw!r} means different names under IDNA 2003 and 2008;"
                " write the xn-- form you mean"
            )
        # ToASCII applies nameprep (case folding, NFKC) and punycode to a Unicode label, and
        # refuses prohibited code points with UnicodeError; ASCII labels pass unchanged.
        label = raw if raw.isascii() else encodings.idna.ToASCII(raw).decode("ascii").lower()
        if len(label) > MAX_LABEL_LENGTH:
            raise _BadRuleError(f"label longer than {MAX_LABEL_LENGTH} characters")
        if not _LABEL.fullmatch(label):
            raise _BadRuleError(f"label {label!r} may only hold letters, digits, '_' and inner '-'")
        labels.append(label)
    name = ".".join(labels)
    if len(name) > MAX_NAME_LENGTH:
        raise _BadRuleError(f"name longer than {MAX_NAME_LENGTH} characters")
    if labels[-1].isdigit():
        raise _BadRuleError(
            "the last label is all digits; for an address write a CIDR rule with its ports,"
            " e.g. 192.0.2.0/24:443"
        )
    return name


def valid_port(port: object) -> bool:
    """Whether ``port`` is a port number (1-65535), whatever its type."""
    # bool is an int subclass; True is not port 1.
    return isinstance(port, int) and not isinstance(port, bool) and 1 <= port <= 65535


def _format_ports(ports: PortSet) -> str:
    return "*" if ports is None else ",".join(str(port) for port in sorted(ports))


def _quote(text: object) -> str:
    """A bounded, escaped rendering of rule text for a one-line error message."""
    shown = repr(text)
    return shown if len(shown) <= 80 else shown[:77] + "..."
