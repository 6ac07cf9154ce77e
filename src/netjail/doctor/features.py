"""Kernel features every jail needs: read from the kernel config, module lists and direct signs.

Pure: :func:`check_kernel_feature` weighs a :class:`KernelInfo` (the config and module lists
``probe_kernel`` reads) and, where there is one, a direct sign of the feature at work, which
outweighs any config file. Network namespaces, nf_tables, nfnetlink_log and ifb (or veth, see
:func:`check_jail_link`) make the network jail; the PID, IPC and UTS namespaces and seccomp's
filter mode make the rest of the deep jail. A feature the kernel lacks is a blocker: no jail can
be built without it.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from netjail.doctor.result import Check


@dataclass(frozen=True)
class KernelFeature:
    """A kernel facility every jail needs, and the ways to recognise it."""

    check: str
    #: The Kconfig option that provides it.
    option: str
    #: Its module name when it can be built as one (network namespaces cannot).
    module: str | None
    #: Further options the feature is of no use without, e.g. the nftables expressions the
    #: jail's ruleset uses. Only an explicit "is not set" counts against them: an option absent
    #: from the config may simply have another name in that kernel version.
    companions: tuple[str, ...] = ()


NETNS = KernelFeature("netns", "CONFIG_NET_NS", None)
NF_TABLES = KernelFeature(
    "nf_tables",
    "CONFIG_NF_TABLES",
    "nf_tables",
    (
        "CONFIG_NF_TABLES_INET",  # the ruleset is one inet table for IPv4 and IPv6
        "CONFIG_NFT_LOG",  # log ... group N: the NFLOG events
        "CONFIG_NFT_REJECT",
        "CONFIG_NFT_REJECT_INET",  # reject with icmpx in an inet table
        "CONFIG_NFT_NAT",  # the nat chain that diverts DNS and proxied TCP
        "CONFIG_NFT_REDIR",
    ),
)
NFNETLINK_LOG = KernelFeature("nfnetlink_log", "CONFIG_NETFILTER_NETLINK_LOG", "nfnetlink_log")
#: The jail's link (netjail.kernel.netns): an ifb device, or, where the kernel has none, a veth
#: pair with both ends in the jail.
IFB = KernelFeature("ifb", "CONFIG_IFB", "ifb")
VETH = KernelFeature("veth", "CONFIG_VETH", "veth")
# The deep jail's other namespaces; none can be a module.
PIDNS = KernelFeature("pidns", "CONFIG_PID_NS", None)
IPCNS = KernelFeature("ipcns", "CONFIG_IPC_NS", None)
UTSNS = KernelFeature("utsns", "CONFIG_UTS_NS", None)
#: The features whose check needs nothing more than check_kernel_feature, in display order.
KERNEL_FEATURES = (NETNS, NF_TABLES, NFNETLINK_LOG, PIDNS, IPCNS, UTSNS)
#: The namespaces a kernel built without them leaves out of /proc/<pid>/ns, by check name.
NAMESPACE_LINKS = {NETNS.check: "net", PIDNS.check: "pid", IPCNS.check: "ipc", UTSNS.check: "uts"}


@dataclass(frozen=True)
class KernelInfo:
    """What the running kernel says about itself; ``None`` where it could not be read."""

    release: str
    #: CONFIG_* option -> value ("y", "m", ...; "n" for "is not set").
    config: Mapping[str, str] | None
    #: Module names present in /sys/module (loaded modules, and built-ins with parameters).
    present_modules: frozenset[str] = frozenset()
    #: Names from /lib/modules/<release>/modules.builtin and modules.dep.
    builtin_modules: frozenset[str] | None = None
    loadable_modules: frozenset[str] | None = None


_CONFIG_LINE = re.compile(r"(CONFIG_[A-Za-z0-9_]+)=(.*)")
_CONFIG_UNSET = re.compile(r"# (CONFIG_[A-Za-z0-9_]+) is not set")


def parse_kernel_config(text: str) -> dict[str, str]:
    """A kernel .config as option -> value; ``# CONFIG_X is not set`` becomes ``"n"``."""
    config = {}
    for line in text.splitlines():
        if match := _CONFIG_LINE.fullmatch(line.strip()):
            config[match.group(1)] = match.group(2)
        elif match := _CONFIG_UNSET.fullmatch(line.strip()):
            config[match.group(1)] = "n"
    return config


def parse_module_names(text: str) -> frozenset[str]:
    """Module names from modules.dep or modules.builtin (``kernel/.../nf_tables.ko.xz: ...``)."""
    names = set()
    for line in text.splitlines():
        path = line.partition(":")[0].strip()
        if not path:
            continue
        name = os.path.basename(path).partition(".ko")[0]
        # The kernel treats '-' and '_' in module names alike and shows '_' in /sys/module.
        names.add(name.replace("-", "_"))
    return frozenset(names)


def check_kernel_feature(
    feature: KernelFeature, kernel: KernelInfo, evidence: str | None = None
) -> Check:
    """Whether the kernel has *feature*, from its config, its module lists, or direct *evidence*.

    *evidence* says how the feature was seen working (e.g. "/proc/self/ns/net exists"); it
    outweighs a config that says otherwise, since a /boot config file may not be this kernel's.
    """
    name, option = feature.check, feature.option
    value = kernel.config.get(option) if kernel.config is not None else None
    if value in ("y", "m") and kernel.config is not None:
        missing = [o for o in feature.companions if kernel.config.get(o) == "n"]
        if missing:
            return Check.fail(
                name,
                f"{option}={value}, but {', '.join(missing)} {_is_are(missing)} not set",
                f"boot a kernel built with {', '.join(missing)} (=y or =m)",
            )
    if value == "y":
        return Check.ok(name, f"built in ({option}=y)")
    if evidence is not None:
        return Check.ok(name, f"present ({evidence})")
    if value == "m":
        return _check_module(feature, kernel)
    if kernel.config is not None:
        return Check.fail(
            name,
            f"not in this kernel ({option} is not set)",
            f"boot a kernel built with {_wanted_value(feature)} (Debian's and Ubuntu's kernels"
            " are)",
        )
    return _check_without_config(feature, kernel)


def check_jail_link(kernel: KernelInfo) -> Check:
    """The "ifb" line: the device every jail's link is made of. A kernel without ifb but with
    veth can still build jails (each with a veth pair, ~4.7 ms more CPU a jail): a warning.
    Without either, a blocker."""
    ifb = check_kernel_feature(IFB, kernel)
    if ifb.status != "FAIL":
        return ifb
    veth = check_kernel_feature(VETH, kernel)
    if veth.status == "FAIL":
        return Check.fail(
            IFB.check,
            f"{ifb.detail}, and veth, the other device a jail's link can be: {veth.detail}",
            ifb.fix or "",
        )
    return Check.warn(
        IFB.check,
        f"{ifb.detail}; jails get a veth pair instead ({veth.detail}), at ~4.7 ms more CPU each",
        ifb.fix or "",
    )


def _check_module(feature: KernelFeature, kernel: KernelInfo) -> Check:
    """A feature the kernel config builds as a module: is the module there to load?"""
    module = feature.module or feature.check
    if module in kernel.present_modules:
        return Check.ok(feature.check, f"module {module}, loaded")
    installed = (kernel.builtin_modules or frozenset()) | (kernel.loadable_modules or frozenset())
    if kernel.loadable_modules is not None and module not in installed:
        return Check.fail(
            feature.check,
            f"{feature.option}=m, but the {module} module is not installed for {kernel.release}",
            f"install the kernel's modules (Debian: the linux-image package of {kernel.release};"
            f" Ubuntu: apt-get install linux-modules-extra-{kernel.release})",
        )
    # No module list to look in (a container seldom has /lib/modules): the kernel loads the
    # module on first use, from the host's /lib/modules.
    return Check.ok(feature.check, f"module {module} ({feature.option}=m), loaded on first use")


def _check_without_config(feature: KernelFeature, kernel: KernelInfo) -> Check:
    """No kernel config to go by: only the module lists are left."""
    module = feature.module
    if module is not None:
        if module in kernel.present_modules:
            return Check.ok(feature.check, f"present (/sys/module/{module})")
        if kernel.builtin_modules is not None and module in kernel.builtin_modules:
            return Check.ok(feature.check, "built in (modules.builtin)")
        if kernel.loadable_modules is not None and module in kernel.loadable_modules:
            return Check.ok(feature.check, f"module {module}, loaded on first use")
    return Check.warn(
        feature.check,
        f"cannot tell: no kernel config (/proc/config.gz, /boot/config-{kernel.release})"
        " and no other sign of it",
        f"nothing, if jobs start; otherwise check that the kernel has {feature.option}",
    )


def _wanted_value(feature: KernelFeature) -> str:
    # An option that cannot be a module is a bool in Kconfig: =m does not exist for it.
    return f"{feature.option}=y or =m" if feature.module is not None else f"{feature.option}=y"


def _is_are(items: Sequence[object]) -> str:
    return "is" if len(items) == 1 else "are"


# --------------------------------------------------------------------------------------------
# seccomp

#: The seccomp filter mode (seccomp-bpf) the jail's filter is loaded with.
SECCOMP_FILTER = KernelFeature("seccomp", "CONFIG_SECCOMP_FILTER", None)

#: The ``Seccomp:`` line of /proc/<pid>/status: 0, 1 or 2.
SeccompMode = Literal["disabled", "strict", "filter"]
_SECCOMP_MODES: dict[str, SeccompMode] = {"0": "disabled", "1": "strict", "2": "filter"}


@dataclass(frozen=True)
class SeccompInfo:
    """What this process sees of seccomp."""

    #: This process's own mode, from /proc/self/status; None when the line is missing.
    mode: SeccompMode | None
    #: The errno of ``prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, NULL)``, a request that cannot
    #: succeed: EFAULT (the kernel went as far as reading the missing filter) means filter mode
    #: exists, EINVAL that it does not. None when the call could not be made.
    filter_errno: int | None


def parse_seccomp_mode(status_text: str) -> SeccompMode | None:
    """The ``Seccomp:`` line of /proc/<pid>/status (a kernel without CONFIG_SECCOMP has none)."""
    for line in status_text.splitlines():
        key, _, value = line.partition(":")
        if key == "Seccomp":
            return _SECCOMP_MODES.get(value.strip())
    return None


def check_seccomp(kernel: KernelInfo, seccomp: SeccompInfo) -> Check:
    """Whether the kernel can load the jail's seccomp filter: direct signs first, then config."""
    if seccomp.mode == "filter":
        # Filters stack: one over doctor (a container's, say) does not stop netjaild's own.
        evidence = "this process runs under a filter: Seccomp: 2 in /proc/self/status"
    elif seccomp.filter_errno == errno.EFAULT:
        evidence = "the kernel knows prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER)"
    elif seccomp.filter_errno == errno.EINVAL:
        return Check.fail(
            SECCOMP_FILTER.check,
            "no filter mode in this kernel (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER) fails"
            " with EINVAL)",
            f"boot a kernel built with {_wanted_value(SECCOMP_FILTER)} (Debian's and Ubuntu's"
            " kernels are)",
        )
    else:
        evidence = None
    return check_kernel_feature(SECCOMP_FILTER, kernel, evidence)
