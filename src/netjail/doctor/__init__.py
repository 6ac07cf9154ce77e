"""``netjail doctor``: check this machine for what netjail needs, and say how to fix the rest.

Two halves, as elsewhere in netjail. Pure ``check_*`` functions turn what was observed (file
contents, flags, the daemon's answer) into :class:`~netjail.doctor.result.Check` results; unit
tests feed them made-up observations. Thin ``probe_*`` functions (:mod:`netjail.doctor.probe`)
make the observations with plain reads of /proc, /sys and /boot, a few system tools, and one
status exchange with the daemon. :func:`run_checks` wires the two, in display order, for the
``netjail doctor`` command in :mod:`netjail.cli`. Doctor never imports ``netjail.kernel`` or
``netjail.daemon``: the CLI stays light and runs unprivileged, and doctor has to work precisely
when the kernel side is what is broken.

The checks, by what they look at:

- :mod:`~netjail.doctor.features`: kernel features for the network jail (network namespaces,
  nf_tables, nfnetlink_log, ifb or veth) and for the rest of the deep jail (PID, IPC and UTS
  namespaces, seccomp filter mode);
- :mod:`~netjail.doctor.host`: cgroups, capabilities, the initial network namespace (decided
  by :mod:`netjail.hostns`), nf_log_all_netns, and the jail's mount namespace: the new mount
  API and the root it pivot_roots from;
- :mod:`~netjail.doctor.tools`: libnftables, libseccomp (with pyseccomp), iptables;
- :mod:`~netjail.doctor.access`: the daemon's socket and the daemon.

Each check is ``ok``, ``warn`` or ``FAIL``. Only blockers FAIL, i.e. what stops every job: a
kernel feature the jail is built from is missing (the mount API included), / is the initial
ramfs, libnftables or libseccomp is missing, or the daemon cannot be reached. Everything else
warns, because it either limits what jobs get (cgroup controllers, the kmsg log backend) or
only matters where netjaild itself runs, which need not be where the client runs (a socket
shared into an unprivileged container). ``netjail doctor`` exits 1 when anything FAILs.
"""

from __future__ import annotations

from netjail import hostns
from netjail.doctor import probe
from netjail.doctor.access import check_daemon, check_socket
from netjail.doctor.features import (
    KERNEL_FEATURES,
    SeccompInfo,
    check_jail_link,
    check_kernel_feature,
    check_seccomp,
    parse_seccomp_mode,
)
from netjail.doctor.host import (
    check_capabilities,
    check_cgroups,
    check_initial_netns,
    check_mount_api,
    check_nf_log_all_netns,
    check_pivot_root,
    parse_capability_sets,
)
from netjail.doctor.result import EXIT_BLOCKER, Check, checks_to_json, format_checks, has_blocker
from netjail.doctor.tools import check_iptables, check_libnftables, check_libseccomp
from netjail.mountinfo import parse_cgroup_mounts

__all__ = ["EXIT_BLOCKER", "Check", "checks_to_json", "format_checks", "has_blocker", "run_checks"]


def run_checks(socket_path: str) -> list[Check]:
    """Probe this machine and the daemon at *socket_path*; every check, in display order."""
    kernel = probe.probe_kernel()
    evidence = probe.probe_kernel_evidence()
    status = probe.probe_status() or ""
    checks = [
        check_kernel_feature(feature, kernel, evidence.get(feature.check))
        for feature in KERNEL_FEATURES
    ]
    checks.insert(3, check_jail_link(kernel))
    seccomp = SeccompInfo(parse_seccomp_mode(status), probe.probe_seccomp_filter())
    checks.append(check_seccomp(kernel, seccomp))
    mountinfo = probe.probe_mountinfo()
    mounts = parse_cgroup_mounts(mountinfo or "")
    checks.append(check_cgroups(mounts, probe.probe_unified_controllers(mounts)))
    checks.append(check_capabilities(parse_capability_sets(status), probe.probe_euid()))
    initial = hostns.detect_initial_netns(hostns.probe_netns_evidence())
    checks.append(check_initial_netns(initial))
    checks.append(check_nf_log_all_netns(probe.probe_nf_log_all_netns(), initial))
    checks.append(check_mount_api(probe.probe_open_tree()))
    checks.append(check_pivot_root(mountinfo))
    checks.append(check_libnftables(probe.probe_libnftables()))
    checks.append(check_libseccomp(probe.probe_libseccomp()))
    iptables = probe.probe_iptables()
    checks.append(check_iptables(iptables.restore, iptables.restore6, iptables.version))
    socket_info = probe.probe_socket(socket_path)
    checks.append(check_socket(socket_info))
    checks.append(check_daemon(probe.probe_daemon(socket_path), socket_info))
    return checks
