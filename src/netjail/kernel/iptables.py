"""The jail's ruleset for hosts without nftables userspace: iptables-restore, one per family.

``render_iptables`` is pure: it spells the one ruleset of netjail.kernel.rules as the input of
``iptables-restore`` (IPv4) and ``ip6tables-restore`` (IPv6), table by table (filter: accept
local and the kernel's own ICMPv6, log, reset TCP, reject the rest, chain policy drop as a
backstop; nat: the DNS-stub and proxy redirects), in the canonical form ``iptables-save`` prints
back, so what is in a jail can be compared line by line.

``apply_iptables_rules`` runs ``iptables-restore`` and ``ip6tables-restore`` from the calling
thread, which must be inside the jail's netns: a child process starts in the namespaces of the
thread that forked it, so the tools' netlink (nft backend) or setsockopt (legacy backend)
calls land in the jail. Whichever backend the host's ``iptables-restore`` points at (Debian's
alternatives) is used; both were checked.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from typing import Literal, assert_never

from netjail.errors import FirewallError, map_os_errors
from netjail.kernel.rules import (
    AcceptIcmpv6,
    AcceptLocalDestination,
    AcceptLoopback,
    JailRuleset,
    KernelLog,
    LogForeignDns,
    LogPacket,
    LogPrefix,
    LogStrategy,
    Nflog,
    OutputRule,
    RedirectDns,
    RedirectRule,
    RedirectTcp,
    RejectAdminProhibited,
    RejectTcpWithReset,
)

Family = Literal[4, 6]

#: xt_LOG keeps 29 bytes of --log-prefix and iptables truncates longer ones *silently*, which
#: would cut the job id (and could make it read as another job's), so longer prefixes are
#: refused instead: "netjail <id> " fits ids of up to 20 characters, "netjail <id> dns " 16.
LOG_PREFIX_MAX = 29
#: xt_NFLOG keeps 63 bytes of --nflog-prefix: every valid job id (32 at most) fits.
NFLOG_PREFIX_MAX = 63
#: xt_multiport takes at most 15 ports per rule; longer port lists are split over rules.
_MULTIPORT_MAX = 15
_REJECT_WITH: dict[Family, str] = {4: "icmp-admin-prohibited", 6: "icmp6-adm-prohibited"}

_RESTORE_TIMEOUT_S = 30
#: Seconds a restore waits for the legacy backend's xtables lock (/run/xtables.lock is one
#: file for every netns, so jails built at the same moment take turns); the nft backend
#: ignores it.
_XTABLES_WAIT_S = "5"
_TOOL_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


@dataclass(frozen=True)
class RestoreInput:
    """One jail's restore texts: ``v4`` for iptables-restore, ``v6`` for ip6tables-restore."""

    v4: str
    v6: str


def render_iptables(ruleset: JailRuleset, log: LogStrategy) -> RestoreInput:
    """The restore texts that load ``ruleset``, logging by ``log`` (NFLOG or LOG --log-uid).

    Raises FirewallError for a log prefix the target would truncate.
    """
    _check_prefix_lengths(ruleset, log)
    return RestoreInput(_render(ruleset, log, 4), _render(ruleset, log, 6))


def _check_prefix_lengths(ruleset: JailRuleset, log: LogStrategy) -> None:
    match log:
        case Nflog():
            limit, target = NFLOG_PREFIX_MAX, "an NFLOG"
        case KernelLog():
            limit, target = LOG_PREFIX_MAX, "an iptables LOG"
        case _:
            assert_never(log)
    for prefix in ruleset.log_prefixes:
        if len(prefix.text) > limit:
            room = limit - len(prefix.text) + len(prefix.job_id)
            raise FirewallError(
                f"job id {prefix.job_id!r} is too long for {target} prefix "
                f"(at most {room} characters)"
            )


def _render(ruleset: JailRuleset, log: LogStrategy, family: Family) -> str:
    """One family's restore text, in the canonical form iptables-save prints."""
    # Only OUTPUT is declared: the jail's chains are on the output hook only. filter is
    # committed before nat, so with the legacy backend (one commit per table) the deny is in
    # place first.
    output = ruleset.output
    lines = [
        "*filter",
        f":OUTPUT {output.policy.upper()} [0:0]",
        *(f"-A OUTPUT {rule}" for item in output.rules for rule in _output(item, log, family)),
        "COMMIT",
    ]
    redirect = ruleset.redirect
    nat = [rule for item in redirect.rules for rule in _redirect(item, log, family)]
    if nat:
        lines += [
            "*nat",
            f":OUTPUT {redirect.policy.upper()} [0:0]",
            *(f"-A OUTPUT {rule}" for rule in nat),
            "COMMIT",
        ]
    return "\n".join(lines) + "\n"


def _log(prefix: LogPrefix, log: LogStrategy) -> str:
    match log:
        case Nflog(group=group, snaplen=snaplen):
            return (
                f'-j NFLOG --nflog-prefix "{prefix.text}" --nflog-group {group} '
                f"--nflog-size {snaplen}"
            )
        case KernelLog():
            return f'-j LOG --log-prefix "{prefix.text}" --log-uid'
        case _:
            assert_never(log)


def _output(rule: OutputRule, log: LogStrategy, family: Family) -> list[str]:
    """The rule's matches and target, as "-A OUTPUT" lines of the filter table."""
    match rule:
        case AcceptLoopback():
            return ["-o lo -j ACCEPT"]
        case AcceptLocalDestination():
            return ["-m addrtype --dst-type LOCAL -j ACCEPT"]
        case AcceptIcmpv6(types=types):
            ipv6_only = types if family == 6 else ()
            return [f"-p ipv6-icmp -m icmp6 --icmpv6-type {t.number} -j ACCEPT" for t in ipv6_only]
        case LogPacket(prefix=prefix):
            return [_log(prefix, log)]
        case RejectTcpWithReset():
            return ["-p tcp -j REJECT --reject-with tcp-reset"]
        case RejectAdminProhibited():
            return [f"-j REJECT --reject-with {_REJECT_WITH[family]}"]
        case _:
            assert_never(rule)


def _redirect(rule: RedirectRule, log: LogStrategy, family: Family) -> list[str]:
    """The rule's matches and target, as "-A OUTPUT" lines of the nat table."""
    match rule:
        case LogForeignDns(prefix=prefix, port=port, transports=transports, stub=stub):
            address = stub.v4 if family == 4 else stub.v6
            stub_net = f"{address}/{address.max_prefixlen}"
            statement = _log(prefix, log)
            return [f"! -d {stub_net} -p {t} -m {t} --dport {port} {statement}" for t in transports]
        case RedirectDns(port=port, transports=transports):
            return [
                f"-p {t} -m {t} --dport {port} -j REDIRECT --to-ports {port}" for t in transports
            ]
        case RedirectTcp(network=network, ports=ports, to_port=to_port):
            if network.version != family:
                return []
            target = f"-j REDIRECT --to-ports {to_port}"
            if ports is None:
                return [f"-d {network} -p tcp {target}"]
            return [
                f"-d {network} -p tcp -m multiport --dports "
                + ",".join(str(p) for p in ports[start : start + _MULTIPORT_MAX])
                + f" {target}"
                for start in range(0, len(ports), _MULTIPORT_MAX)
            ]
        case _:
            assert_never(rule)


def load_iptables(ruleset: JailRuleset, log: LogStrategy) -> None:
    """Render ``ruleset`` for iptables and load it into the calling thread's netns."""
    restore = render_iptables(ruleset, log)
    apply_iptables_rules(restore.v4, restore.v6)


def apply_iptables_rules(v4: str, v6: str) -> None:
    """Load ``v4`` and ``v6`` into the calling thread's netns, one restore per family.

    Each restore replaces the filter table atomically. If the IPv6 one fails after the IPv4
    one succeeded, the jail holds half a policy: the caller must treat any FirewallError as
    fatal for the jail (it is never started, and deleting the netns removes the rules).
    """
    _restore("iptables-restore", v4)
    _restore("ip6tables-restore", v6)


def _restore(tool: str, rules: str) -> None:
    # No preexec_fn (the daemon is threaded) and nothing that needs one: the child inherits
    # the jail netns from this thread.
    with map_os_errors(FirewallError, f"cannot run {tool}"):
        try:
            result = subprocess.run(
                [tool, "-w", _XTABLES_WAIT_S],
                input=rules,
                capture_output=True,
                text=True,
                env=_TOOL_ENV,
                timeout=_RESTORE_TIMEOUT_S,
                check=False,
            )
        except FileNotFoundError:
            raise FirewallError(
                f"{tool} not found: install iptables (apt-get install iptables) "
                "or use the nftables firewall backend"
            ) from None
        except subprocess.TimeoutExpired:
            raise FirewallError(f"{tool} did not finish within {_RESTORE_TIMEOUT_S} s") from None
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        first = lines[0] if lines else f"exit status {result.returncode}"
        raise FirewallError(f"{tool} refused the jail rules: {first}")
