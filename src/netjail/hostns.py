"""Is this process in the initial network namespace, the host's, and not a container's?

The one home of that detection, for doctor and for the kmsg log backend (whose sysctl exists
only in the initial netns). :func:`detect_initial_netns` is pure: it weighs the
:class:`NetnsEvidence` that :func:`probe_netns_evidence` gathers with plain reads of /proc, and
:func:`in_initial_netns` does both. Nothing here needs root or imports ``netjail.kernel``: the
client side (doctor) uses it too.

The evidence, strongest first:

1. The inode number of /proc/self/ns/net. Linux 6.18 gave the initial network namespace the
   fixed number ``NET_NS_INIT_INO``; namespaces created later get numbers from 0xF0000000 up.
   So that number means yes on any kernel, and on 6.18 or later any other number means no.
2. The netfilter sysctls. The kernel registers ``net.netfilter.nf_log_all_netns`` in the
   initial netns only (since Linux 4.11), and the ``net.netfilter.nf_log`` directory in every
   netns; /proc/sys/net always shows the reading process's own netns. The directory without
   the sysctl means no.
3. PID 1's network namespace, but only from the initial PID namespace, where PID 1 is the real
   init: a container's PID 1 shares the container's netns, so matching it proves nothing.
   Reading /proc/1/ns/net needs ptrace access to PID 1, which may be refused even to root.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Literal

#: Inode numbers of the initial namespaces (include/uapi/linux/nsfs.h). The initial PID
#: namespace has had its fixed number since Linux 3.8, the initial network namespace since 6.18.
NET_NS_INIT_INO = 0xEFFFFFF9
PID_NS_INIT_INO = 0xEFFFFFFC
#: The first kernel release whose initial network namespace has NET_NS_INIT_INO.
FIXED_NET_NS_INO_SINCE = (6, 18)

NF_LOG_ALL_NETNS = "/proc/sys/net/netfilter/nf_log_all_netns"
NF_LOG_DIR = "/proc/sys/net/netfilter/nf_log"

#: What /proc/sys/net/netfilter shows: "all_netns", the initial-netns-only sysctl is there;
#: "per_netns_only", only the nf_log directory every netns has; "absent", neither (no
#: netfilter, no sysctls, or /proc/sys hidden), so nothing to go by.
NfLogSysctls = Literal["all_netns", "per_netns_only", "absent"]


@dataclass(frozen=True)
class NetnsEvidence:
    """What /proc says about this process's namespaces; a link is None when unreadable."""

    #: readlink /proc/self/ns/net and /proc/self/ns/pid, e.g. "net:[4026531833]".
    own_net: str | None
    own_pid: str | None
    #: readlink /proc/1/ns/net.
    init_net: str | None
    nf_log_sysctls: NfLogSysctls
    #: os.uname().release, e.g. "6.18.44-fc-v669"; "" when unknown.
    kernel_release: str = ""


_NS_LINK = re.compile(r"[a-z_]+:\[(\d+)\]")
_RELEASE = re.compile(r"(\d+)\.(\d+)")


def _ns_inode(link: str | None) -> int | None:
    match = _NS_LINK.fullmatch(link) if link is not None else None
    return int(match.group(1)) if match else None


def _has_fixed_net_ns_inode(release: str) -> bool:
    match = _RELEASE.match(release)
    return match is not None and (int(match[1]), int(match[2])) >= FIXED_NET_NS_INO_SINCE


def detect_initial_netns(evidence: NetnsEvidence) -> bool | None:
    """True in the initial network namespace, False in another one, None when it cannot be told.

    The evidence is weighed in the order the module docstring gives; the first that decides,
    decides.
    """
    own = _ns_inode(evidence.own_net)
    if own == NET_NS_INIT_INO:
        return True
    if own is not None and _has_fixed_net_ns_inode(evidence.kernel_release):
        return False
    if evidence.nf_log_sysctls == "all_netns":
        return True
    if evidence.nf_log_sysctls == "per_netns_only":
        return False
    init = _ns_inode(evidence.init_net)
    if own is not None and init is not None and _ns_inode(evidence.own_pid) == PID_NS_INIT_INO:
        return own == init
    return None


def _read_link(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _probe_nf_log_sysctls() -> NfLogSysctls:
    if os.path.lexists(NF_LOG_ALL_NETNS):
        return "all_netns"
    if os.path.isdir(NF_LOG_DIR):
        return "per_netns_only"
    return "absent"


def probe_netns_evidence() -> NetnsEvidence:
    """Read the evidence from /proc; never raises (an unreadable link is evidence too)."""
    return NetnsEvidence(
        own_net=_read_link("/proc/self/ns/net"),
        own_pid=_read_link("/proc/self/ns/pid"),
        init_net=_read_link("/proc/1/ns/net"),
        nf_log_sysctls=_probe_nf_log_sysctls(),
        kernel_release=os.uname().release,
    )


def in_initial_netns() -> bool | None:
    """Whether this process is in the initial network namespace; None when it cannot be told."""
    return detect_initial_netns(probe_netns_evidence())
