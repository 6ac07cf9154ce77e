"""The jail's policy for hosts without nftables userspace: iptables-restore, one per family.

``build_iptables_rules`` is pure and renders exactly the policy of ``firewall.build_ruleset``
(filter: accept local and the kernel's own ICMPv6, log, reset TCP, reject the rest, chain
policy drop as a backstop; nat: the DNS-stub and proxy redirects), in the canonical form
``iptables-save`` prints back, so what is in a jail can be compared line by line.
``apply_iptables_rules`` runs ``iptables-restore`` and ``ip6tables-restore`` from the calling
thread, which must be inside the jail's netns: a child process starts in the namespaces of the
thread that forked it, so the tools' netlink (nft backend) or setsockopt (legacy backend)
calls land in the jail. Whichever backend the host's ``iptables-restore`` points at (Debian's
alternatives) is used; both were checked.
"""

from __future__ import annotations

import re
import subprocess
from typing import Literal

from netjail.errors import FirewallError
from netjail.kernel import firewall

IptablesTarget = Literal["nflog", "log"]

#: xt_LOG keeps 29 bytes of --log-prefix and iptables truncates longer ones *silently*, which
#: would cut the job id (and could make it read as another job's), so longer prefixes are
#: refused instead: "netjail <id> " fits ids of up to 20 characters, "netjail <id> dns " 16.
LOG_PREFIX_MAX = 29
#: xt_NFLOG keeps 63 bytes of --nflog-prefix: every valid job id (32 at most) fits.
NFLOG_PREFIX_MAX = 63
#: xt_multiport takes at most 15 ports per rule; longer port lists are split over rules.
_MULTIPORT_MAX = 15

_JOB_ID = re.compile(r"[a-z0-9-]{1,32}")  # the same rule as firewall.build_ruleset

# The kernel's own ICMPv6 on the jail's veth link, as ip6tables-save prints them: router
# solicitation (133), neighbour solicitation (135) and advertisement (136), MLD and MLDv2
# listener reports (131, 143). Mirrors firewall._KERNEL_ICMPV6.
_KERNEL_ICMPV6_TYPES = (133, 135, 136, 131, 143)
_LOOPBACK = {4: "127.0.0.1/32", 6: "::1/128"}
_REJECT_WITH = {4: "icmp-admin-prohibited", 6: "icmp6-adm-prohibited"}

_RESTORE_TIMEOUT_S = 30
#: Seconds a restore waits for the legacy backend's xtables lock (/run/xtables.lock is one
#: file for every netns, so jails built at the same moment take turns); the nft backend
#: ignores it.
_XTABLES_WAIT_S = "5"
_TOOL_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


def build_iptables_rules(rules: firewall.JailRules, *, target: IptablesTarget) -> tuple[str, str]:
    """The iptables-restore input for IPv4 and the ip6tables-restore input for IPv6.

    The same policy as ``firewall.build_ruleset(rules)``, table by table: filter (accept local
    and the kernel's ICMPv6, log, reset TCP, reject the rest) and, when the jail has a DNS stub
    or proxied ranges, nat (log DNS to foreign resolvers, redirect DNS to the stub and proxied
    TCP to the proxy). ``target`` picks how packets are logged: "nflog" (NFLOG group
    ``rules.nflog_group``, read by netjail.kernel.nflog) or "log" (LOG with the owner's UID=,
    to the kernel log, read by netjail.kernel.kmsg). Raises FirewallError for a job id that
    cannot be a log prefix.
    """
    if not _JOB_ID.fullmatch(rules.job_id):
        raise FirewallError(f"invalid job id for a log prefix: {rules.job_id!r}")
    prefix = firewall.log_prefix(rules.job_id)
    dns_prefix = f"{prefix}{firewall.DNS_REDIRECT_MARK} "
    longest = dns_prefix if rules.dns_stub else prefix
    if target == "nflog":
        if not 0 <= rules.nflog_group <= 0xFFFF:
            raise FirewallError(f"invalid NFLOG group: {rules.nflog_group}")
        if len(longest) > NFLOG_PREFIX_MAX:
            raise FirewallError(f"job id {rules.job_id!r} is too long for an NFLOG prefix")
    elif target == "log":
        if len(longest) > LOG_PREFIX_MAX:
            raise FirewallError(
                f"job id {rules.job_id!r} is too long for an iptables LOG prefix "
                f"(at most {LOG_PREFIX_MAX - len(longest) + len(rules.job_id)} characters)"
            )
    else:
        raise FirewallError(f"unknown iptables log target: {target!r}")
    return _render(rules, 4, target), _render(rules, 6, target)


def _log(prefix: str, target: IptablesTarget, group: int) -> str:
    if target == "nflog":
        return (
            f'-j NFLOG --nflog-prefix "{prefix}" --nflog-group {group} '
            f"--nflog-size {firewall.NFLOG_SNAPLEN}"
        )
    return f'-j LOG --log-prefix "{prefix}" --log-uid'


def _render(rules: firewall.JailRules, version: int, target: IptablesTarget) -> str:
    """One family's restore text, in the canonical form iptables-save prints."""
    prefix = firewall.log_prefix(rules.job_id)
    kernel_icmpv6 = [
        f"-A OUTPUT -p ipv6-icmp -m icmp6 --icmpv6-type {kind} -j ACCEPT"
        for kind in (_KERNEL_ICMPV6_TYPES if version == 6 else ())
    ]
    # REJECT, never DROP (see firewall.build_ruleset). Local traffic is matched twice, as in
    # the nft ruleset: "-o lo" for what was sent to a local address, addrtype LOCAL for what
    # the nat table redirected to the stub or proxy (its output device stays the original).
    # Only OUTPUT is declared: the nft ruleset has output hooks only. filter is committed
    # before nat, so with the legacy backend (one commit per table) the deny is in place first.
    lines = [
        "*filter",
        ":OUTPUT DROP [0:0]",
        "-A OUTPUT -o lo -j ACCEPT",
        "-A OUTPUT -m addrtype --dst-type LOCAL -j ACCEPT",
        *kernel_icmpv6,
        f"-A OUTPUT {_log(prefix, target, rules.nflog_group)}",
        "-A OUTPUT -p tcp -j REJECT --reject-with tcp-reset",
        f"-A OUTPUT -j REJECT --reject-with {_REJECT_WITH[version]}",
        "COMMIT",
    ]
    nat = _nat_rules(rules, version, target)
    if nat:
        lines += ["*nat", ":OUTPUT ACCEPT [0:0]", *nat, "COMMIT"]
    return "\n".join(lines) + "\n"


def _nat_rules(rules: firewall.JailRules, version: int, target: IptablesTarget) -> list[str]:
    """firewall._nat_chain for one family: DNS logged and redirected, proxied TCP redirected."""
    lines: list[str] = []
    if rules.dns_stub:
        dns_prefix = f"{firewall.log_prefix(rules.job_id)}{firewall.DNS_REDIRECT_MARK} "
        log = _log(dns_prefix, target, rules.nflog_group)
        port = firewall.DNS_PORT
        for proto in ("tcp", "udp"):
            lines.append(
                f"-A OUTPUT ! -d {_LOOPBACK[version]} -p {proto} -m {proto} --dport {port} {log}"
            )
        for proto in ("tcp", "udp"):
            lines.append(
                f"-A OUTPUT -p {proto} -m {proto} --dport {port} -j REDIRECT --to-ports {port}"
            )
    redirect = f"-j REDIRECT --to-ports {firewall.PROXY_PORT}"
    for item in rules.proxied:
        if item.network.version != version:
            continue
        if item.ports is None:
            lines.append(f"-A OUTPUT -d {item.network} -p tcp {redirect}")
            continue
        ports = sorted(item.ports)
        for start in range(0, len(ports), _MULTIPORT_MAX):
            chunk = ",".join(str(p) for p in ports[start : start + _MULTIPORT_MAX])
            lines.append(
                f"-A OUTPUT -d {item.network} -p tcp -m multiport --dports {chunk} {redirect}"
            )
    return lines


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
    except OSError as e:
        raise FirewallError(f"cannot run {tool}: {e.strerror}") from None
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        first = lines[0] if lines else f"exit status {result.returncode}"
        raise FirewallError(f"{tool} refused the jail rules: {first}")
