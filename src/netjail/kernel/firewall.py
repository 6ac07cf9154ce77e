"""The jail's firewall, as the daemon uses it: one backend, chosen once at start-up.

``JailFirewall.for_backends(firewall, log_backend)`` is built from the daemon's configuration;
its ``apply(rules)`` builds the jail's ruleset (netjail.kernel.rules, pure), renders it for the
chosen firewall (netjail.kernel.nftables or netjail.kernel.iptables) with the chosen log
strategy, and loads it. ``apply`` must be called from a thread that is inside the jail's netns:
libnftables' netlink socket belongs to the calling thread's netns (the library is serialised
by a lock in netjail.kernel.nftables, as it is not thread-safe), and iptables-restore is exec'd
from that thread, so it starts in the jail's netns too.

The names re-exported from netjail.kernel.rules (``JailRules``, ``ProxiedRange``, the ports and
the NFLOG constants) are this module's public API as well, so the daemon needs no other kernel
module to describe a jail's rules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from netjail.errors import FirewallError
from netjail.kernel import iptables, nftables
from netjail.kernel.backends import FirewallBackend, LogBackend
from netjail.kernel.rules import (
    DNS_PORT,
    DNS_REDIRECT_MARK,
    NFLOG_GROUP,
    NFLOG_SNAPLEN,
    PROXY_PORT,
    JailRules,
    JailRuleset,
    KernelLog,
    LogStrategy,
    Nflog,
    ProxiedRange,
    build_jail_ruleset,
)

__all__ = [
    "DNS_PORT",
    "DNS_REDIRECT_MARK",
    "NFLOG_GROUP",
    "NFLOG_SNAPLEN",
    "PROXY_PORT",
    "JailFirewall",
    "JailRules",
    "ProxiedRange",
    "RulesetLoader",
]

#: Renders a ruleset for one firewall and loads it into the calling thread's netns.
RulesetLoader = Callable[[JailRuleset, LogStrategy], None]

_LOADERS: dict[FirewallBackend, RulesetLoader] = {
    "nftables": nftables.load_nftables,
    "iptables": iptables.load_iptables,
}
#: The same, replacing a ruleset already loaded (each iptables-restore flushes its tables).
_REPLACERS: dict[FirewallBackend, RulesetLoader] = {
    "nftables": nftables.replace_nftables,
    "iptables": iptables.load_iptables,
}


@dataclass(frozen=True)
class JailFirewall:
    """How every jail's ruleset is rendered and loaded, and how it logs."""

    backend: FirewallBackend
    log: LogStrategy
    #: The backend's render-and-load step (a fake in tests of the code above it).
    load: RulesetLoader = field(repr=False, compare=False)
    replace_loader: RulesetLoader = field(repr=False, compare=False)

    @classmethod
    def for_backends(cls, firewall: FirewallBackend, log_backend: LogBackend) -> JailFirewall:
        """The firewall for the daemon's ``firewall`` and ``log_backend`` settings.

        NFLOG logs to group ``NFLOG_GROUP`` with ``NFLOG_SNAPLEN`` bytes of each packet;
        kmsg logs with LOG and the socket's UID. FirewallError for an unknown name.
        """
        load = _LOADERS.get(firewall)
        if load is None:
            raise FirewallError(f"unknown firewall backend: {firewall!r}")
        log: LogStrategy
        if log_backend == "nflog":
            log = Nflog()
        elif log_backend == "kmsg":
            log = KernelLog()
        else:
            raise FirewallError(f"unknown log backend: {log_backend!r}")
        return cls(firewall, log, load, _REPLACERS[firewall])

    @property
    def nflog(self) -> Nflog | None:
        """The NFLOG group and snaplen a jail's socket must bind, or None (kernel log)."""
        return self.log if isinstance(self.log, Nflog) else None

    def apply(self, rules: JailRules) -> None:
        """Build, render and load ``rules`` into the calling thread's netns, which must be the
        jail's: in one transaction with nftables, one per family with iptables. FirewallError
        on any failure, and then the jail must not be started."""
        self.load(build_jail_ruleset(rules), self.log)

    def replace(self, rules: JailRules) -> None:
        """As ``apply``, in a netns that has a jail ruleset already: the old one is replaced in
        the same transaction (nftables) or table by table (iptables-restore flushes each table
        it loads), so the jail is never without rules."""
        self.replace_loader(build_jail_ruleset(rules), self.log)
