"""The jail's egress ruleset as data (pure): one model, one renderer per firewall backend.

``build_jail_ruleset`` makes every policy decision once: what a jail accepts, what it logs and
with which prefix, what it redirects where, and how it rejects the rest. The result, a
``JailRuleset``, is two chains of rules; netjail.kernel.nftables and netjail.kernel.iptables
only spell each rule in their tool's syntax, together with the ``LogStrategy`` the daemon chose
at start-up (``Nflog`` or ``KernelLog``). So the backends cannot drift apart: there is nothing
in a renderer to drift.

The policy: in the redirect chain (nat, before filtering) DNS to a resolver other than the
stub is logged with the ``dns`` mark, all DNS goes to the stub, and TCP to every proxied range
goes to the proxy. In the output chain (filter, policy drop) local traffic and the kernel's own
ICMPv6 are accepted, the rest is logged, then TCP is reset and everything else rejected
admin-prohibited.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

from netjail.errors import FirewallError
from netjail.ipaddr import IPNetwork
from netjail.jobid import is_job_id

#: NFLOG group used inside every jail. Groups are per network namespace, so the same number in
#: every jail never mixes jobs; the log prefix names the job as well.
NFLOG_GROUP = 1
#: Bytes of each logged packet copied to the daemon: enough for IPv6 + TCP/UDP/ICMP headers.
NFLOG_SNAPLEN = 128
#: The daemon's in-jail transparent proxy port. Below 1024, so no unprivileged job can bind it
#: first, and the daemon binds it before the job exists anyway.
PROXY_PORT = 999
#: The DNS stub's port (on ``DNS_STUB``'s addresses inside the jail).
DNS_PORT = 53

#: A word after the job id in a log prefix that says why a packet was logged.
LogMark = Literal["dns"]
#: The mark of a DNS packet to a foreign resolver, redirected to the stub (it never left).
DNS_REDIRECT_MARK: LogMark = "dns"

Transport = Literal["tcp", "udp"]
#: DNS is carried over both.
DNS_TRANSPORTS: tuple[Transport, ...] = ("tcp", "udp")

ChainPolicy = Literal["accept", "drop"]


@dataclass(frozen=True)
class StubAddresses:
    """Where the jail's DNS stub listens: the jail's loopback address of each family."""

    v4: ipaddress.IPv4Address
    v6: ipaddress.IPv6Address


DNS_STUB = StubAddresses(ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1"))


@dataclass(frozen=True)
class Icmpv6Type:
    """An ICMPv6 message type, by the name nft uses and the number ip6tables prints."""

    name: str
    number: int


# IPv6 neighbour discovery and multicast listener reports are the kernel's own traffic on the
# jail's link (netjail.kernel.netns): an ifb that drops all it is sent, or a veth pair with both
# ends inside the jail, so nothing leaves.
KERNEL_ICMPV6 = (
    Icmpv6Type("nd-router-solicit", 133),
    Icmpv6Type("nd-neighbor-solicit", 135),
    Icmpv6Type("nd-neighbor-advert", 136),
    Icmpv6Type("mld-listener-report", 131),
    Icmpv6Type("mld2-listener-report", 143),
)


@dataclass(frozen=True)
class LogPrefix:
    """The prefix of a logged packet: ``netjail <job> `` and, if marked, ``<mark> ``.

    The kmsg reader routes events by the job id in it; NFLOG needs only its mark (an NFLOG
    socket is per jail already). Renderers put it between double quotes, so the job id is
    checked against the job-id grammar here, where every prefix is made.
    """

    job_id: str
    mark: LogMark | None = None

    def __post_init__(self) -> None:
        if not is_job_id(self.job_id):
            raise FirewallError(f"invalid job id for a log prefix: {self.job_id!r}")

    @property
    def text(self) -> str:
        mark = f"{self.mark} " if self.mark is not None else ""
        return f"netjail {self.job_id} {mark}"


def log_prefix(job_id: str) -> str:
    """The unmarked log prefix naming a job (FirewallError for an invalid job id)."""
    return LogPrefix(job_id).text


# --------------------------------------------------------------------------- log strategies


@dataclass(frozen=True)
class Nflog:
    """Log to an NFLOG group, read from a netlink socket in each jail (netjail.kernel.nflog)."""

    group: int = NFLOG_GROUP
    snaplen: int = NFLOG_SNAPLEN

    def __post_init__(self) -> None:
        if not 0 <= self.group <= 0xFFFF:
            raise FirewallError(f"invalid NFLOG group: {self.group}")
        if not 0 < self.snaplen <= 0xFFFFFFFF:
            raise FirewallError(f"invalid NFLOG snaplen: {self.snaplen}")


@dataclass(frozen=True)
class KernelLog:
    """Log to the kernel log with the sending socket's UID and GID (read by netjail.kernel.kmsg)."""


LogStrategy = Nflog | KernelLog


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class AcceptLoopback:
    """Accept what leaves on lo: it was sent to a local address."""


@dataclass(frozen=True)
class AcceptLocalDestination:
    """Accept what is addressed to the jail itself: what the redirect chain sent to the stub
    or proxy. The output device a hook reports is fixed when the hook starts, so after the
    redirect's re-route the packet still shows its original device although it goes to lo."""


@dataclass(frozen=True)
class AcceptIcmpv6:
    """Accept these ICMPv6 types (the kernel's own, on the jail's link)."""

    types: tuple[Icmpv6Type, ...]


@dataclass(frozen=True)
class LogPacket:
    """Log every packet that reaches this rule."""

    prefix: LogPrefix


@dataclass(frozen=True)
class RejectTcpWithReset:
    """Reject TCP with a reset: the job's client fails in milliseconds, where a dropped SYN
    would hang it until its own timeout."""


@dataclass(frozen=True)
class RejectAdminProhibited:
    """Reject anything with ICMP administratively prohibited (ICMPv6 for IPv6)."""


OutputRule = (
    AcceptLoopback
    | AcceptLocalDestination
    | AcceptIcmpv6
    | LogPacket
    | RejectTcpWithReset
    | RejectAdminProhibited
)


@dataclass(frozen=True)
class LogForeignDns:
    """Log DNS (``transports`` to ``port``) to any address but the stub's, so the report can
    say which resolver the job tried; the redirect that follows keeps it in the jail."""

    prefix: LogPrefix
    port: int
    transports: tuple[Transport, ...]
    stub: StubAddresses


@dataclass(frozen=True)
class RedirectDns:
    """Redirect DNS (``transports`` to ``port``, any destination) to the stub, on ``port``."""

    port: int
    transports: tuple[Transport, ...]


@dataclass(frozen=True)
class RedirectTcp:
    """Redirect TCP to ``network`` (on ``ports``, sorted; None: every port) to ``to_port``."""

    network: IPNetwork
    ports: tuple[int, ...] | None
    to_port: int


RedirectRule = LogForeignDns | RedirectDns | RedirectTcp

R = TypeVar("R")


@dataclass(frozen=True)
class Chain(Generic[R]):
    """A chain on the output hook: its rules in order, and what happens to a packet none
    decided on."""

    policy: ChainPolicy
    rules: tuple[R, ...]


@dataclass(frozen=True)
class JailRuleset:
    """A jail's whole ruleset as data, for a renderer.

    ``redirect`` (nat) is evaluated before ``output`` (filter). A redirected packet goes to lo,
    so the output chain's local accepts let it through: nothing redirected can leave the jail.
    """

    redirect: Chain[RedirectRule]
    output: Chain[OutputRule]

    @property
    def log_prefixes(self) -> tuple[LogPrefix, ...]:
        """Every prefix a rule logs with, in rule order (for a renderer's length limits)."""
        prefixes: list[LogPrefix] = []
        for rule in (*self.redirect.rules, *self.output.rules):
            if isinstance(rule, LogForeignDns | LogPacket):
                prefixes.append(rule.prefix)
        return tuple(prefixes)


# --------------------------------------------------------------------------- builder


@dataclass(frozen=True)
class ProxiedRange:
    """A CIDR rule's traffic: TCP to ``network`` (on ``ports``; None = all) goes to the proxy."""

    network: IPNetwork
    ports: frozenset[int] | None


@dataclass(frozen=True)
class JailRules:
    """What a jail's ruleset is made of."""

    job_id: str
    #: Redirect every DNS packet (any destination, UDP and TCP) to the in-jail stub.
    dns_stub: bool = False
    #: TCP to these networks is redirected to the in-jail proxy (the synthetic pool, CIDR rules).
    proxied: tuple[ProxiedRange, ...] = field(default_factory=tuple)


def build_jail_ruleset(rules: JailRules) -> JailRuleset:
    """The jail's ruleset: deny everything but local traffic, log it, then reject it.

    REJECT, never DROP (see ``RejectTcpWithReset``); the output chain's policy is drop only as
    a backstop. Raises FirewallError for a job id that cannot be a log prefix, or a proxied
    range with an empty port set (it would redirect nothing: nft refused such a rule while
    iptables left it out, so it is refused here, for both).
    """
    redirect: list[RedirectRule] = []
    if rules.dns_stub:
        redirect += [
            LogForeignDns(
                LogPrefix(rules.job_id, DNS_REDIRECT_MARK), DNS_PORT, DNS_TRANSPORTS, DNS_STUB
            ),
            RedirectDns(DNS_PORT, DNS_TRANSPORTS),
        ]
    for item in rules.proxied:
        if item.ports is not None and not item.ports:
            raise FirewallError(f"proxied range {item.network} has no ports to redirect")
        ports = None if item.ports is None else tuple(sorted(item.ports))
        redirect.append(RedirectTcp(item.network, ports, PROXY_PORT))
    output: tuple[OutputRule, ...] = (
        AcceptLoopback(),
        AcceptLocalDestination(),
        AcceptIcmpv6(KERNEL_ICMPV6),
        LogPacket(LogPrefix(rules.job_id)),
        RejectTcpWithReset(),
        RejectAdminProhibited(),
    )
    return JailRuleset(redirect=Chain("accept", tuple(redirect)), output=Chain("drop", output))
