"""``netjail doctor``: check this machine for what netjail needs, and say how to fix the rest.

Two halves, as elsewhere in netjail. Pure ``check_*`` functions turn what was observed (file
contents, flags, the daemon's answer) into :class:`Check` results; unit tests feed them made-up
observations. Thin ``probe_*`` functions make the observations with plain reads of /proc, /sys
and /boot, a few system tools, and one status exchange with the daemon. Doctor never imports
``netjail.kernel`` or ``netjail.daemon``: the CLI stays light and runs unprivileged, and doctor
has to work precisely when the kernel side is what is broken.

Each check is ``ok``, ``warn`` or ``FAIL``. Only blockers FAIL, i.e. what stops every job:
the kernel lacks network namespaces, nf_tables, nfnetlink_log or veth, libnftables is missing,
or the daemon cannot be reached. Everything else warns, because it either limits what jobs get
(cgroup controllers, the kmsg log backend) or only matters where netjaild itself runs, which
need not be where the client runs (a socket shared into an unprivileged container).
``netjail doctor`` exits 1 when anything FAILs.
"""

from __future__ import annotations

import ctypes.util
import dataclasses
import glob
import grp
import gzip
import json
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import click

from netjail import protocol as p
from netjail.client import Client, default_socket
from netjail.errors import DaemonConnectionError, NetjailError, PermissionDeniedError
from netjail.hostns import in_initial_netns
from netjail.mountinfo import CgroupMount, parse_cgroup_mounts
from netjail.text import sanitize

Status = Literal["ok", "warn", "FAIL"]

#: Exit status of ``netjail doctor`` when a blocker FAILs.
EXIT_BLOCKER = 1

START_DAEMON_FIX = "start netjaild: sudo netjaild & (with systemd: sudo systemctl start netjaild)"
NFTABLES_FIX = "apt-get install libnftables1"
ALL_NETNS_FIX = (
    "sysctl -w net.netfilter.nf_log_all_netns=1"
    ' (only needed for log_backend = "kmsg"; impossible inside a container)'
)
PRIVILEGED_FIX = (
    "run netjaild where root has every capability: on the host, or in a privileged container"
    ' (docker run --privileged; devcontainer.json "privileged": true)'
)


@dataclass(frozen=True)
class Check:
    """The result of one check: one line of ``netjail doctor``, plus a fix unless it is ok."""

    check: str
    status: Status
    detail: str
    fix: str | None = None


def _ok(check: str, detail: str) -> Check:
    return Check(check, "ok", detail)


def _warn(check: str, detail: str, fix: str) -> Check:
    return Check(check, "warn", detail, fix)


def _fail(check: str, detail: str, fix: str) -> Check:
    return Check(check, "FAIL", detail, fix)


# --------------------------------------------------------------------------------------------
# Pure: output


def format_checks(checks: Iterable[Check]) -> list[str]:
    """The lines ``netjail doctor`` prints: ``<status>  <check>: <detail>``, then the fix.

    Details can carry text from outside (a socket path, the daemon's error message), so every
    line is sanitized before it reaches a terminal.
    """
    lines = []
    for check in checks:
        lines.append(sanitize(f"{check.status:<4}  {check.check}: {check.detail}", 1000))
        if check.fix is not None:
            lines.append(sanitize(f"  fix: {check.fix}", 1000))
    return lines


def checks_to_json(checks: Iterable[Check]) -> str:
    """The checks as a JSON list of ``{check, status, detail, fix}`` (fix is null when ok)."""
    return json.dumps([dataclasses.asdict(check) for check in checks], indent=2)


def has_blocker(checks: Iterable[Check]) -> bool:
    """Whether any check FAILed: only blockers do, so netjail cannot run jobs here."""
    return any(check.status == "FAIL" for check in checks)


# --------------------------------------------------------------------------------------------
# Pure: kernel features


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
VETH = KernelFeature("veth", "CONFIG_VETH", "veth")
KERNEL_FEATURES = (NETNS, NF_TABLES, NFNETLINK_LOG, VETH)


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
            return _fail(
                name,
                f"{option}={value}, but {', '.join(missing)} {_is_are(missing)} not set",
                f"boot a kernel built with {', '.join(missing)} (=y or =m)",
            )
    if value == "y":
        return _ok(name, f"built in ({option}=y)")
    if evidence is not None:
        return _ok(name, f"present ({evidence})")
    if value == "m":
        return _check_module(feature, kernel)
    if kernel.config is not None:
        return _fail(
            name,
            f"not in this kernel ({option} is not set)",
            f"boot a kernel built with {option}=y or =m (Debian's and Ubuntu's kernels are)",
        )
    return _check_without_config(feature, kernel)


def _check_module(feature: KernelFeature, kernel: KernelInfo) -> Check:
    """A feature the kernel config builds as a module: is the module there to load?"""
    module = feature.module or feature.check
    if module in kernel.present_modules:
        return _ok(feature.check, f"module {module}, loaded")
    installed = (kernel.builtin_modules or frozenset()) | (kernel.loadable_modules or frozenset())
    if kernel.loadable_modules is not None and module not in installed:
        return _fail(
            feature.check,
            f"{feature.option}=m, but the {module} module is not installed for {kernel.release}",
            f"install the kernel's modules (Debian: the linux-image package of {kernel.release};"
            f" Ubuntu: apt-get install linux-modules-extra-{kernel.release})",
        )
    # No module list to look in (a container seldom has /lib/modules): the kernel loads the
    # module on first use, from the host's /lib/modules.
    return _ok(feature.check, f"module {module} ({feature.option}=m), loaded on first use")


def _check_without_config(feature: KernelFeature, kernel: KernelInfo) -> Check:
    """No kernel config to go by: only the module lists are left."""
    module = feature.module
    if module is not None:
        if module in kernel.present_modules:
            return _ok(feature.check, f"present (/sys/module/{module})")
        if kernel.builtin_modules is not None and module in kernel.builtin_modules:
            return _ok(feature.check, "built in (modules.builtin)")
        if kernel.loadable_modules is not None and module in kernel.loadable_modules:
            return _ok(feature.check, f"module {module}, loaded on first use")
    return _warn(
        feature.check,
        f"cannot tell: no kernel config (/proc/config.gz, /boot/config-{kernel.release})"
        " and no other sign of it",
        f"nothing, if jobs start; otherwise check that the kernel has {feature.option}",
    )


def _is_are(items: Sequence[object]) -> str:
    return "is" if len(items) == 1 else "are"


# --------------------------------------------------------------------------------------------
# Pure: cgroups


_LIMIT_CONTROLLERS = {"memory": "--memory", "cpu": "--cpus", "pids": "--pids"}


def check_cgroups(mounts: Sequence[CgroupMount], unified_controllers: str | None) -> Check:
    """The cgroup mode (v2, hybrid, v1) and whether the controllers jobs' limits need are there.

    *unified_controllers* is the content of ``cgroup.controllers`` at the cgroup2 mount, if any.
    """
    name = "cgroups"
    unified = next((m for m in mounts if m.fstype == "cgroup2"), None)
    v1 = frozenset().union(*(m.controllers for m in mounts if m.fstype == "cgroup"))
    if unified is None and not v1:
        return _warn(
            name,
            "no cgroup filesystem is mounted: netjaild will not start here",
            "mount cgroup2: mount -t cgroup2 none /sys/fs/cgroup (a privileged container has it)",
        )
    if unified is not None and not v1:
        if unified_controllers is None:
            return _warn(
                name,
                f"v2 at {unified.mount_point}, but its cgroup.controllers cannot be read",
                "nothing, if jobs with limits start; otherwise run netjail doctor as root",
            )
        mode, where, available = "v2", unified.mount_point, frozenset(unified_controllers.split())
    elif unified is not None:
        mode, where, available = "hybrid", f"v1 + cgroup2 at {unified.mount_point}", v1
    else:
        mode, where, available = "v1", "no cgroup2", v1
    wanted = [*_LIMIT_CONTROLLERS, *(["freezer"] if mode == "v1" else [])]
    missing = [c for c in wanted if c not in available]
    if not missing:
        return _ok(name, f"{mode} ({where}): {', '.join(wanted)} controllers")
    if "freezer" in missing:
        return _warn(
            name,
            "v1 without the freezer controller: netjaild will not start (it could not kill"
            " jobs reliably)",
            "mount it (mount -t cgroup -o freezer freezer /sys/fs/cgroup/freezer), or boot with"
            " cgroup2 (systemd.unified_cgroup_hierarchy=1)",
        )
    options = ", ".join(_LIMIT_CONTROLLERS[c] for c in missing)
    if mode == "v2":
        fix = (
            "give netjaild's cgroup the controllers: under systemd, Delegate=yes (netjaild.service"
            " has it); in a container, a writable cgroup2 of its own (a privileged one has it)"
        )
    else:
        fix = (
            f"mount the missing v1 hierarchies (e.g. mount -t cgroup -o {missing[0]}"
            f" {missing[0]} /sys/fs/cgroup/{missing[0]}), or boot with cgroup2"
            " (systemd.unified_cgroup_hierarchy=1)"
        )
    return _warn(
        name,
        f"{mode} ({where}) without the {', '.join(missing)} controller{_plural(missing)}:"
        f" jobs cannot get {options} limits",
        fix,
    )


def _plural(items: Sequence[object]) -> str:
    return "" if len(items) == 1 else "s"


# --------------------------------------------------------------------------------------------
# Pure: capabilities


#: What netjaild needs, by capability number; systemd/netjaild.service says who needs which.
DAEMON_CAPABILITIES = {
    0: "CAP_CHOWN",
    1: "CAP_DAC_OVERRIDE",
    5: "CAP_KILL",
    6: "CAP_SETGID",
    7: "CAP_SETUID",
    8: "CAP_SETPCAP",
    10: "CAP_NET_BIND_SERVICE",
    12: "CAP_NET_ADMIN",
    19: "CAP_SYS_PTRACE",
    21: "CAP_SYS_ADMIN",
}


def parse_capability_sets(status_text: str) -> dict[str, int]:
    """The ``Cap*`` lines of /proc/<pid>/status as name -> bit mask (``{"CapEff": ...}``)."""
    sets = {}
    for line in status_text.splitlines():
        key, _, value = line.partition(":")
        if key.startswith("Cap"):
            try:
                sets[key] = int(value.strip(), 16)
            except ValueError:
                continue
    return sets


def check_capabilities(sets: Mapping[str, int], euid: int) -> Check:
    """Whether netjaild could have its capabilities here.

    As root, that is the effective set. Otherwise the bounding set: the client needs no
    capability, and it bounds what a root started from here (sudo netjaild) can have.
    """
    name = "capabilities"
    key = "CapEff" if euid == 0 else "CapBnd"
    mask = sets.get(key)
    if mask is None:
        return _warn(
            name,
            f"cannot read {key} from /proc/self/status",
            "nothing, if the daemon check is ok",
        )
    missing = [cap for bit, cap in DAEMON_CAPABILITIES.items() if not mask >> bit & 1]
    if euid == 0:
        if not missing:
            return _ok(name, "root, with every capability netjaild needs")
        return _warn(
            name,
            f"root, but without {', '.join(missing)}: netjaild cannot build jails here",
            PRIVILEGED_FIX,
        )
    if not missing:
        return _ok(name, "not root (the client needs none); root here may have all netjaild needs")
    return _warn(
        name,
        f"the bounding set lacks {', '.join(missing)}: netjaild cannot run here (the client"
        " can, with a socket shared from the host)",
        PRIVILEGED_FIX,
    )


# --------------------------------------------------------------------------------------------
# Pure: network namespace and the kernel log


def check_initial_netns(initial: bool | None) -> Check:
    """Say whether this is the host's network namespace, and what that means for logging."""
    name = "initial netns"
    if initial is True:
        return _ok(name, "yes (the host's network namespace, not a container's)")
    if initial is False:
        return _warn(
            name,
            "no: a container or another network namespace; jails and NFLOG events work here,"
            ' log_backend = "kmsg" only if the host allows it',
            'nothing for log_backend = "nflog" (the default); for "kmsg", see nf_log_all_netns',
        )
    return _warn(name, "unknown", "run netjail doctor as root to find out")


def check_nf_log_all_netns(value: str | None, initial: bool | None) -> Check:
    """net.netfilter.nf_log_all_netns: whether LOG rules in jails reach the kernel log.

    Only log_backend = "kmsg" needs it; NFLOG (the default) works in every namespace.
    """
    name = "nf_log_all_netns"
    if value == "1":
        return _ok(name, '1 (log_backend = "kmsg" can see jails\' packets)')
    if value is not None:
        return _warn(
            name,
            f"{value}: LOG records from jails do not reach the kernel log, so"
            ' log_backend = "kmsg" would see no events',
            ALL_NETNS_FIX,
        )
    if initial is False:
        # The sysctl is global but lives in the initial namespace only: the host can still
        # switch it on for every namespace, containers included.
        return _warn(
            name,
            "absent: only the initial network namespace has it; it cannot be read or set here",
            'use log_backend = "nflog" (the default); "kmsg" needs it set to 1 on the host:'
            " sysctl -w net.netfilter.nf_log_all_netns=1",
        )
    return _warn(name, "cannot read /proc/sys/net/netfilter/nf_log_all_netns", ALL_NETNS_FIX)


# --------------------------------------------------------------------------------------------
# Pure: user-space tools

#: The library netjail.kernel.firewall loads.
LIBNFTABLES_SONAME = "libnftables.so.1"


def check_libnftables(found: str | None) -> Check:
    """Whether libnftables.so.1 is there; *found* is what the library search found, if any."""
    name = "libnftables"
    if found is not None and os.path.basename(found) == LIBNFTABLES_SONAME:
        return _ok(name, f"{found} found")
    if found is not None:
        return _fail(name, f"only {found} found; netjaild needs {LIBNFTABLES_SONAME}", NFTABLES_FIX)
    return _fail(name, f"{LIBNFTABLES_SONAME} not found", NFTABLES_FIX)


def check_iptables(restore: str | None, restore6: str | None, version: str | None) -> Check:
    """Whether iptables-restore and ip6tables-restore are there, for firewall = "iptables"."""
    name = "iptables"
    missing = [
        tool
        for tool, path in (("iptables-restore", restore), ("ip6tables-restore", restore6))
        if path is None
    ]
    if missing:
        return _warn(
            name,
            f'{" and ".join(missing)} not found (only firewall = "iptables" needs them)',
            "apt-get install iptables",
        )
    return _ok(name, f"{restore} {version}" if version else f"{restore}")


# --------------------------------------------------------------------------------------------
# Pure: the daemon's socket and the daemon


@dataclass(frozen=True)
class SocketInfo:
    """The daemon socket as the current user sees it."""

    path: str
    #: "unreachable": a directory on the way may not be searched by us.
    kind: Literal["socket", "missing", "unreachable", "other"]
    #: st_mode, owner and group names; meaningful when kind is "socket".
    mode: int = 0
    owner: str = ""
    group: str = ""
    gid: int = -1
    #: os.access(path, R_OK | W_OK): whether we may connect.
    usable: bool = False
    euid: int = 0
    user: str = ""
    #: The groups of this process, and the groups the user database puts the user in.
    session_gids: frozenset[int] = frozenset()
    member_gids: frozenset[int] = frozenset()


def _group_fix(group: str) -> str:
    return f"add yourself to the {group} group: sudo usermod -aG {group} $USER, then log in again"


def _socket_access_problem(info: SocketInfo) -> tuple[str, str]:
    """Why the current user may not connect to an existing socket, and what to do."""
    group = info.group or "netjail"
    if info.gid in info.member_gids and info.gid not in info.session_gids:
        return (
            f"you are in group {group}, but this login session is not yet",
            f"log in again (or start a shell with: newgrp {group})",
        )
    if info.mode & 0o060 == 0o060 and info.gid not in info.session_gids:
        return f"you ({info.user}) are not root and not in group {group}", _group_fix(group)
    return (
        "you may not open it (its mode, or a directory on the way)",
        f"check the permissions of {info.path} and its directories (netjaild makes the socket"
        " 0660 in a 0755 directory)",
    )


def check_socket(info: SocketInfo) -> Check:
    """Whether the daemon's socket exists and the current user may connect to it."""
    name = "socket"
    if info.kind == "missing":
        return _warn(
            name,
            f"{info.path} does not exist (netjaild is not running, or listens elsewhere)",
            "if netjaild listens elsewhere: --socket PATH or NETJAIL_SOCKET=PATH; otherwise"
            " start it (see the daemon check)",
        )
    if info.kind == "unreachable":
        return _warn(
            name,
            f"cannot reach {info.path}: a directory on the way is closed to you",
            f"make the directories of {info.path} searchable (netjaild makes its own 0755)",
        )
    if info.kind == "other":
        return _warn(
            name,
            f"{info.path} is not a socket",
            "point netjail at netjaild's socket: --socket PATH or NETJAIL_SOCKET",
        )
    shown = f"{info.path} ({stat.filemode(info.mode)} {info.owner}:{info.group})"
    if not info.usable:
        problem, fix = _socket_access_problem(info)
        return _warn(name, f"{shown}: {problem}", fix)
    if info.euid == 0:
        why = "root"
    elif info.owner == info.user:
        why = "its owner"
    elif info.gid in info.session_gids:
        why = f"group {info.group}"
    else:
        why = "it is open to every user"
    return _ok(name, f"{shown}: you may connect ({why})")


def check_daemon(answer: p.StatusReply | NetjailError, socket: SocketInfo) -> Check:
    """Whether netjaild answered hello and status on its socket; the fix depends on why not."""
    name = "daemon"
    if isinstance(answer, p.StatusReply):
        return _ok(
            name,
            f"netjaild {answer.version} (pid {answer.pid}) answers on {socket.path},"
            f" up {answer.uptime_s:.0f}s",
        )
    detail = str(answer)
    if isinstance(answer, PermissionDeniedError):
        return _fail(
            name,
            f"netjaild refused you: {detail}",
            "ask its administrator to add you to allowed_uids or allowed_groups in"
            " /etc/netjail/netjaild.toml",
        )
    if isinstance(answer, DaemonConnectionError):
        if socket.kind == "socket" and not socket.usable:
            return _fail(name, detail, _socket_access_problem(socket)[1])
        if socket.kind == "socket":
            # The socket is there but nobody answers on it: a daemon that died, or one stuck.
            return _fail(
                name,
                detail,
                "restart netjaild (sudo systemctl restart netjaild, or sudo netjaild &); if that"
                " fails, see its log (journalctl -u netjaild)",
            )
        return _fail(name, detail, START_DAEMON_FIX)
    return _fail(
        name,
        detail,
        "see netjaild's log (journalctl -u netjaild); a netjail client and daemon of different"
        " versions may not understand each other: upgrade both",
    )


# --------------------------------------------------------------------------------------------
# Probes: thin reads of the running system. None of them raises for a missing or unreadable
# file: that is an observation like any other.


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _read_module_list(path: str) -> frozenset[str] | None:
    text = _read_text(path)
    return parse_module_names(text) if text is not None else None


def _read_kernel_config(release: str) -> dict[str, str] | None:
    # /proc/config.gz is the running kernel's own (CONFIG_IKCONFIG_PROC); /boot/config-* is
    # what the distribution ships next to the kernel image.
    try:
        with gzip.open("/proc/config.gz", "rt", encoding="utf-8", errors="replace") as f:
            return parse_kernel_config(f.read())
    except (OSError, EOFError, zlib.error):
        pass
    text = _read_text(f"/boot/config-{release}")
    return parse_kernel_config(text) if text is not None else None


def probe_kernel() -> KernelInfo:
    """The running kernel's config and module lists, as far as they are readable."""
    release = os.uname().release
    try:
        present = frozenset(os.listdir("/sys/module"))
    except OSError:
        present = frozenset()
    return KernelInfo(
        release=release,
        config=_read_kernel_config(release),
        present_modules=present,
        builtin_modules=_read_module_list(f"/lib/modules/{release}/modules.builtin"),
        loadable_modules=_read_module_list(f"/lib/modules/{release}/modules.dep"),
    )


def probe_kernel_evidence() -> dict[str, str]:
    """Direct signs of kernel features, by check name: stronger than any config file."""
    evidence = {}
    # The link exists only in kernels built with CONFIG_NET_NS.
    if os.path.lexists("/proc/self/ns/net"):
        evidence[NETNS.check] = "/proc/self/ns/net exists"
    nf_log = _read_text("/proc/net/netfilter/nf_log")
    if nf_log is not None and "nfnetlink_log" in nf_log:
        evidence[NFNETLINK_LOG.check] = "registered in /proc/net/netfilter/nf_log"
    return evidence


def probe_cgroups() -> Check:
    """Check the cgroup filesystems this process sees."""
    mounts = parse_cgroup_mounts(_read_text("/proc/self/mountinfo") or "")
    unified = next((m for m in mounts if m.fstype == "cgroup2"), None)
    controllers = None
    if unified is not None:
        controllers = _read_text(os.path.join(unified.mount_point, "cgroup.controllers"))
    return check_cgroups(mounts, controllers)


def probe_libnftables() -> str | None:
    """The libnftables the dynamic linker would find, e.g. "libnftables.so.1"."""
    # find_library asks ldconfig's cache and may name another soname first; a library
    # installed without ldconfig having run is still found by dlopen in the default
    # directories, so look there too before settling for what find_library said.
    found = ctypes.util.find_library("nftables")
    if found is not None and os.path.basename(found) == LIBNFTABLES_SONAME:
        return found
    multiarch = getattr(sys.implementation, "_multiarch", "")
    for directory in ("/usr/lib", "/lib", "/usr/lib64", "/lib64", "/usr/local/lib"):
        for candidate in (
            os.path.join(directory, multiarch, LIBNFTABLES_SONAME),
            os.path.join(directory, LIBNFTABLES_SONAME),
        ):
            if os.path.exists(candidate):
                return candidate
    if found is not None:
        return found  # another soname: reported as such
    others = sorted(
        glob.glob("/usr/lib/*/libnftables.so.*") + glob.glob("/usr/lib/libnftables.so.*")
    )
    return os.path.basename(others[0]) if others else None


def _which_admin_tool(name: str) -> str | None:
    # An unprivileged user's PATH often lacks the sbin directories these tools live in.
    path = os.environ.get("PATH", os.defpath) + ":/usr/sbin:/sbin"
    return shutil.which(name, path=path)


def probe_iptables() -> Check:
    """Check for iptables-restore and ip6tables-restore and say which iptables they are."""
    restore = _which_admin_tool("iptables-restore")
    restore6 = _which_admin_tool("ip6tables-restore")
    version = None
    if restore is not None:
        try:
            result = subprocess.run(
                [restore, "--version"], capture_output=True, text=True, timeout=5, check=False
            )
            lines = result.stdout.strip().splitlines()
        except (OSError, subprocess.SubprocessError):
            lines = []
        # "iptables-restore v1.8.9 (nf_tables)": the version, and which kernel API it drives.
        if lines:
            version = lines[0].removeprefix(os.path.basename(restore)).strip() or None
    return check_iptables(restore, restore6, version)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def probe_socket(path: str) -> SocketInfo:
    """The daemon socket at *path*, and who the current user is, for :func:`check_socket`."""
    euid = os.geteuid()
    user = _user_name(euid)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return SocketInfo(path, "missing", euid=euid, user=user)
    except OSError:
        return SocketInfo(path, "unreachable", euid=euid, user=user)
    if not stat.S_ISSOCK(st.st_mode):
        return SocketInfo(path, "other", euid=euid, user=user)
    try:
        member = frozenset(os.getgrouplist(user, pwd.getpwuid(euid).pw_gid))
    except (KeyError, OSError):
        member = frozenset()
    return SocketInfo(
        path,
        "socket",
        mode=st.st_mode,
        owner=_user_name(st.st_uid),
        group=_group_name(st.st_gid),
        gid=st.st_gid,
        usable=os.access(path, os.R_OK | os.W_OK),
        euid=euid,
        user=user,
        session_gids=frozenset([os.getegid(), *os.getgroups()]),
        member_gids=member,
    )


def probe_daemon(path: str) -> p.StatusReply | NetjailError:
    """The daemon's status through the client library (hello, then status), or why not."""
    try:
        return Client(path, timeout=5).status()
    except NetjailError as exc:
        return exc


def run_checks(socket_path: str) -> list[Check]:
    """Probe this machine and the daemon at *socket_path*; every check, in display order."""
    kernel = probe_kernel()
    evidence = probe_kernel_evidence()
    checks = [
        check_kernel_feature(feature, kernel, evidence.get(feature.check))
        for feature in KERNEL_FEATURES
    ]
    checks.append(probe_cgroups())
    checks.append(
        check_capabilities(
            parse_capability_sets(_read_text("/proc/self/status") or ""), os.geteuid()
        )
    )
    initial = in_initial_netns()
    checks.append(check_initial_netns(initial))
    all_netns = _read_text("/proc/sys/net/netfilter/nf_log_all_netns")
    checks.append(
        check_nf_log_all_netns(all_netns.strip() if all_netns is not None else None, initial)
    )
    checks.append(check_libnftables(probe_libnftables()))
    checks.append(probe_iptables())
    socket_info = probe_socket(socket_path)
    checks.append(check_socket(socket_info))
    checks.append(check_daemon(probe_daemon(socket_path), socket_info))
    return checks


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the checks as a JSON list.")
@click.pass_context
def doctor(ctx: click.Context, as_json: bool) -> None:
    """Check this machine for what netjail needs, and say how to fix what is missing.

    Exit status: 1 when a blocker FAILs (no job can run here), else 0; warnings do not count.
    """
    socket_path = ctx.obj["socket"] if isinstance(ctx.obj, dict) else default_socket()
    checks = run_checks(socket_path)
    if as_json:
        click.echo(checks_to_json(checks))
    else:
        for line in format_checks(checks):
            click.echo(line)
    if has_blocker(checks):
        ctx.exit(EXIT_BLOCKER)
