"""The host around the jails: cgroups, capabilities, the network namespace, mounts (pure).

Each ``check_*`` turns what the probes found (mountinfo, /proc/self/status, sysctls, one
harmless syscall) into a :class:`Check`. Most only warn: they limit what jobs get (limits, the
kmsg log backend), or matter only where netjaild itself runs, which need not be where the
client runs (a socket shared into an unprivileged container). The jail's mount namespace is
the exception: without open_tree, or with the initial ramfs as /, no jail can be built, so
those FAIL.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping, Sequence

from netjail.doctor.result import Check
from netjail.mountinfo import CgroupMount, parse_mounts

ALL_NETNS_FIX = (
    "sysctl -w net.netfilter.nf_log_all_netns=1"
    ' (only needed for log_backend = "kmsg"; impossible inside a container)'
)
PRIVILEGED_FIX = (
    "run netjaild where root has every capability: on the host, or in a privileged container"
    ' (docker run --privileged; devcontainer.json "privileged": true)'
)

# --------------------------------------------------------------------------------------------
# cgroups


_LIMIT_CONTROLLERS = {"memory": "--memory", "cpu": "--cpus", "pids": "--pids"}


def check_cgroups(mounts: Sequence[CgroupMount], unified_controllers: str | None) -> Check:
    """The cgroup mode (v2, hybrid, v1) and whether the controllers jobs' limits need are there.

    *unified_controllers* is the content of ``cgroup.controllers`` at the cgroup2 mount, if any.
    """
    name = "cgroups"
    unified = next((m for m in mounts if m.fstype == "cgroup2"), None)
    v1 = frozenset().union(*(m.controllers for m in mounts if m.fstype == "cgroup"))
    if unified is None and not v1:
        return Check.warn(
            name,
            "no cgroup filesystem is mounted: netjaild will not start here",
            "mount cgroup2: mount -t cgroup2 none /sys/fs/cgroup (a privileged container has it)",
        )
    if unified is not None and not v1:
        if unified_controllers is None:
            return Check.warn(
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
        return Check.ok(name, f"{mode} ({where}): {', '.join(wanted)} controllers")
    if "freezer" in missing:
        return Check.warn(
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
    return Check.warn(
        name,
        f"{mode} ({where}) without the {', '.join(missing)} controller{_plural(missing)}:"
        f" jobs cannot get {options} limits",
        fix,
    )


def _plural(items: Sequence[object]) -> str:
    return "" if len(items) == 1 else "s"


# --------------------------------------------------------------------------------------------
# Capabilities


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
        return Check.warn(
            name,
            f"cannot read {key} from /proc/self/status",
            "nothing, if the daemon check is ok",
        )
    missing = [cap for bit, cap in DAEMON_CAPABILITIES.items() if not mask >> bit & 1]
    if euid == 0:
        if not missing:
            return Check.ok(name, "root, with every capability netjaild needs")
        return Check.warn(
            name,
            f"root, but without {', '.join(missing)}: netjaild cannot build jails here",
            PRIVILEGED_FIX,
        )
    if not missing:
        return Check.ok(
            name, "not root (the client needs none); root here may have all netjaild needs"
        )
    return Check.warn(
        name,
        f"the bounding set lacks {', '.join(missing)}: netjaild cannot run here (the client"
        " can, with a socket shared from the host)",
        PRIVILEGED_FIX,
    )


# --------------------------------------------------------------------------------------------
# Network namespace and the kernel log


def check_initial_netns(initial: bool | None) -> Check:
    """Say whether this is the host's network namespace, and what that means for logging."""
    name = "initial netns"
    if initial is True:
        return Check.ok(name, "yes (the host's network namespace, not a container's)")
    if initial is False:
        return Check.warn(
            name,
            "no: a container or another network namespace; jails and NFLOG events work here,"
            ' log_backend = "kmsg" only if the host allows it',
            'nothing for log_backend = "nflog" (the default); for "kmsg", see nf_log_all_netns',
        )
    return Check.warn(name, "unknown", "run netjail doctor as root to find out")


def check_nf_log_all_netns(value: str | None, initial: bool | None) -> Check:
    """net.netfilter.nf_log_all_netns: whether LOG rules in jails reach the kernel log.

    Only log_backend = "kmsg" needs it; NFLOG (the default) works in every namespace.
    """
    name = "nf_log_all_netns"
    if value == "1":
        return Check.ok(name, '1 (log_backend = "kmsg" can see jails\' packets)')
    if value is not None:
        return Check.warn(
            name,
            f"{value}: LOG records from jails do not reach the kernel log, so"
            ' log_backend = "kmsg" would see no events',
            ALL_NETNS_FIX,
        )
    if initial is False:
        # The sysctl is global but lives in the initial namespace only: the host can still
        # switch it on for every namespace, containers included.
        return Check.warn(
            name,
            "absent: only the initial network namespace has it; it cannot be read or set here",
            'use log_backend = "nflog" (the default); "kmsg" needs it set to 1 on the host:'
            " sysctl -w net.netfilter.nf_log_all_netns=1",
        )
    return Check.warn(name, "cannot read /proc/sys/net/netfilter/nf_log_all_netns", ALL_NETNS_FIX)


# --------------------------------------------------------------------------------------------
# The jail's mount namespace: the new mount API, and the root it pivot_roots away from


def root_fstype(mountinfo_text: str) -> str | None:
    """The file system type of the mount this process sees at ``/`` (the last one listed)."""
    roots = [m.fstype for m in parse_mounts(mountinfo_text) if m.mount_point == "/"]
    return roots[-1] if roots else None


def check_pivot_root(mountinfo_text: str | None) -> Check:
    """Whether a jail's mount namespace can pivot_root from here to a root of its own.

    pivot_root(2) fails with EINVAL when the current root is the initial ramfs (rootfs), as on
    a machine that boots into an initramfs and never switches root, and when it is no mount at
    all, as after a chroot. *mountinfo_text* is /proc/self/mountinfo, None when unreadable.
    """
    name = "pivot_root"
    if mountinfo_text is None:
        return Check.warn(
            name,
            "cannot read /proc/self/mountinfo",
            "nothing, if jobs start; otherwise see that / is a mount other than rootfs",
        )
    fstype = root_fstype(mountinfo_text)
    if fstype is None:
        return Check.warn(
            name,
            "no mount at / (a chroot?): pivot_root needs the root to be a mount",
            "run netjaild outside the chroot, or where / is a mount of its own",
        )
    if fstype == "rootfs":
        return Check.fail(
            name,
            "/ is the initial ramfs (rootfs), which pivot_root cannot leave: jails cannot get a"
            " root of their own",
            "boot with a root file system (root=...), or have the initramfs switch_root into one"
            " (a tmpfs with a copy of it will do)",
        )
    return Check.ok(name, f"/ is on {fstype}, not the initial ramfs: jails can pivot_root from it")


def check_mount_api(open_tree_errno: int | None) -> Check:
    """Whether the kernel has open_tree and move_mount (Linux 5.2), which the jail's binds use.

    *open_tree_errno* is the errno of an open_tree call that cannot succeed (no path): ENOSYS
    means the kernel lacks the call; any other error, that it has it. None: not made.
    """
    name = "mount API"
    if open_tree_errno == errno.ENOSYS:
        return Check.fail(
            name,
            "no open_tree in this kernel (ENOSYS): jails bind their directories with open_tree"
            " and move_mount, Linux 5.2 and later",
            "boot Linux 5.2 or later (Debian 11 and Ubuntu 20.04 have it)",
        )
    if open_tree_errno in (errno.EPERM, errno.EACCES):
        return Check.warn(
            name,
            "open_tree is refused here (a seccomp filter over this process?)",
            "nothing, if netjaild runs elsewhere; where it runs, open_tree and move_mount must"
            " not be filtered (docker run --security-opt seccomp=unconfined)",
        )
    if open_tree_errno is None:
        return Check.warn(
            name,
            "cannot tell: open_tree could not be called",
            "nothing, if jobs start; otherwise check that the kernel is Linux 5.2 or later",
        )
    return Check.ok(name, "open_tree and move_mount are there (Linux 5.2+)")
