"""The jail's policy for hosts without nftables userspace: iptables-restore, one per family.

``build_iptables_rules`` is pure and renders exactly the policy of ``firewall.build_ruleset``
(accept local and the kernel's own ICMPv6, log, reset TCP, reject the rest; chain policy drop as
a backstop), in the canonical form ``iptables-save`` prints back, so what is in a jail can be
compared line by line. ``apply_iptables_rules`` runs ``iptables-restore`` and
``ip6tables-restore`` from the calling thread, which must be inside the jail's netns: a child
process starts in the namespaces of the thread that forked it, so the tools' netlink (nft
backend) or setsockopt (legacy backend) calls land in the jail. Whichever backend the host's
``iptables-restore`` points at (Debian's alternatives) is used; both were checked.
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
#: refused instead. "netjail " + id + " " fits for ids of up to 20 characters.
LOG_PREFIX_MAX = 29
#: xt_NFLOG keeps 63 bytes of --nflog-prefix: every valid job id (32 at most) fits.
NFLOG_PREFIX_MAX = 63

_JOB_ID = re.compile(r"[a-z0-9-]{1,32}")  # the same rule as firewall.build_ruleset

# The kernel's own ICMPv6 on the jail's veth link, as iptables-save prints them: router
# solicitation (133), neighbour solicitation (135) and advertisement (136), MLD and MLDv2
# listener reports (131, 143). Mirrors firewall._KERNEL_ICMPV6.
_KERNEL_ICMPV6_TYPES = (133, 135, 136, 131, 143)

_RESTORE_TIMEOUT_S = 30
#: Seconds a restore waits for the legacy backend's xtables lock (/run/xtables.lock is one
#: file for every netns, so jails built at the same moment take turns); the nft backend
#: ignores it.
_XTABLES_WAIT_S = "5"
_TOOL_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


def build_iptables_rules(
    job_id: str,
    *,
    target: IptablesTarget,
    nflog_group: int = firewall.NFLOG_GROUP,
) -> tuple[str, str]:
    """The iptables-restore input for IPv4 and the ip6tables-restore input for IPv6.

    ``target`` picks how rejected packets are logged: "nflog" (NFLOG group ``nflog_group``,
    read by netjail.kernel.nflog) or "log" (LOG with the owner's UID=, to the kernel log, read
    by netjail.kernel.kmsg). Raises FirewallError for a job id that cannot be a log prefix.
    """
    if not _JOB_ID.fullmatch(job_id):
        raise FirewallError(f"invalid job id for a log prefix: {job_id!r}")
    prefix = firewall.log_prefix(job_id)
    if target == "nflog":
        if not 0 <= nflog_group <= 0xFFFF:
            raise FirewallError(f"invalid NFLOG group: {nflog_group}")
        log_rule = (
            f'-A OUTPUT -j NFLOG --nflog-prefix "{prefix}" --nflog-group {nflog_group} '
            f"--nflog-size {firewall.NFLOG_SNAPLEN}"
        )
    elif target == "log":
        if len(prefix) > LOG_PREFIX_MAX:
            raise FirewallError(
                f"job id {job_id!r} is too long for an iptables LOG prefix "
                f"(at most {LOG_PREFIX_MAX - len(firewall.log_prefix(''))} characters)"
            )
        log_rule = f'-A OUTPUT -j LOG --log-prefix "{prefix}" --log-uid'
    else:
        raise FirewallError(f"unknown iptables log target: {target!r}")
    v4 = _render(log_rule, [], "icmp-admin-prohibited")
    v6 = _render(
        log_rule,
        [
            f"-A OUTPUT -p ipv6-icmp -m icmp6 --icmpv6-type {kind} -j ACCEPT"
            for kind in _KERNEL_ICMPV6_TYPES
        ],
        "icmp6-adm-prohibited",
    )
    return v4, v6


def _render(log_rule: str, kernel_rules: list[str], reject_with: str) -> str:
    # REJECT, never DROP (see firewall.build_ruleset); only OUTPUT is declared, as the nft
    # ruleset has only an output chain.
    lines = [
        "*filter",
        ":OUTPUT DROP [0:0]",
        "-A OUTPUT -o lo -j ACCEPT",
        *kernel_rules,
        log_rule,
        "-A OUTPUT -p tcp -j REJECT --reject-with tcp-reset",
        f"-A OUTPUT -j REJECT --reject-with {reject_with}",
        "COMMIT",
    ]
    return "\n".join(lines) + "\n"


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
