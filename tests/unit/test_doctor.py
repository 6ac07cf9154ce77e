"""Tests for ``netjail doctor``: the pure checks on made-up observations, exact lines out."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
from click.testing import CliRunner

from netjail import doctor as d
from netjail import protocol as p
from netjail.errors import DaemonConnectionError, PermissionDeniedError, ProtocolError

RELEASE = "6.1.0-18-amd64"
SOCK = "/run/netjail/netjail.sock"
NETJAIL_GID = 990
USER_GID = 1000


def kernel(
    config: dict[str, str] | None,
    *,
    present: frozenset[str] = frozenset(),
    builtin: frozenset[str] | None = None,
    loadable: frozenset[str] | None = None,
) -> d.KernelInfo:
    return d.KernelInfo(RELEASE, config, present, builtin, loadable)


def lines(check: d.Check) -> list[str]:
    return d.format_checks([check])


# --------------------------------------------------------------------------------------------
# Output


def test_format_checks_prints_status_check_detail_and_fix() -> None:
    """Each check is one line, statuses padded to one width, and a fix line after warn/FAIL."""
    checks = [
        d.Check("netns", "ok", "built in (CONFIG_NET_NS=y)"),
        d.Check("iptables", "warn", "iptables-restore not found", "apt-get install iptables"),
        d.Check("daemon", "FAIL", "cannot connect", "start netjaild"),
    ]
    assert d.format_checks(checks) == [
        "ok    netns: built in (CONFIG_NET_NS=y)",
        "warn  iptables: iptables-restore not found",
        "  fix: apt-get install iptables",
        "FAIL  daemon: cannot connect",
        "  fix: start netjaild",
    ]


def test_format_checks_sanitizes_outside_text() -> None:
    """A socket path or daemon message with control characters cannot forge lines."""
    check = d.Check("socket", "warn", "/tmp/a\nok    daemon: fine\x1b[2J", "fix\rit")
    assert d.format_checks([check]) == [
        "warn  socket: /tmp/a?ok    daemon: fine?[2J",
        "  fix: fix?it",
    ]


def test_checks_to_json_lists_check_status_detail_fix() -> None:
    """--json output is a list of {check, status, detail, fix}, fix null when ok."""
    checks = [d.Check("netns", "ok", "yes"), d.Check("daemon", "FAIL", "down", "start it")]
    assert json.loads(d.checks_to_json(checks)) == [
        {"check": "netns", "status": "ok", "detail": "yes", "fix": None},
        {"check": "daemon", "status": "FAIL", "detail": "down", "fix": "start it"},
    ]


def test_only_fail_is_a_blocker() -> None:
    """Warnings do not make doctor fail; a FAIL does."""
    assert not d.has_blocker([d.Check("a", "ok", "x"), d.Check("b", "warn", "y", "z")])
    assert d.has_blocker([d.Check("a", "ok", "x"), d.Check("b", "FAIL", "y", "z")])


# --------------------------------------------------------------------------------------------
# Kernel features


def test_parse_kernel_config_reads_values_and_unset_options() -> None:
    """CONFIG_X=v keeps its value, '# CONFIG_X is not set' becomes 'n', comments are skipped."""
    text = (
        "#\n# Automatically generated file; DO NOT EDIT.\n#\n"
        "CONFIG_NET_NS=y\nCONFIG_VETH=m\n# CONFIG_NFT_REJECT is not set\n"
        'CONFIG_LOCALVERSION=""\n\n# Networking options\n'
    )
    assert d.parse_kernel_config(text) == {
        "CONFIG_NET_NS": "y",
        "CONFIG_VETH": "m",
        "CONFIG_NFT_REJECT": "n",
        "CONFIG_LOCALVERSION": '""',
    }


def test_parse_module_names_from_dep_and_builtin_lists() -> None:
    """Module names are the file names without .ko*, with '-' read as '_'."""
    dep = (
        "kernel/drivers/net/veth.ko.xz:\n"
        "kernel/net/netfilter/nf_tables.ko.zst: kernel/net/netfilter/nfnetlink.ko.zst\n"
        "kernel/net/netfilter/nf-log-syslog.ko:\n"
    )
    builtin = "kernel/net/ipv4/tcp_cubic.ko\n\n"
    assert d.parse_module_names(dep) == {"veth", "nf_tables", "nf_log_syslog"}
    assert d.parse_module_names(builtin) == {"tcp_cubic"}


def test_feature_built_in() -> None:
    """=y in the config: ok, built in."""
    check = d.check_kernel_feature(d.VETH, kernel({"CONFIG_VETH": "y"}))
    assert lines(check) == ["ok    veth: built in (CONFIG_VETH=y)"]


def test_feature_module_loaded_or_loadable() -> None:
    """=m: ok when loaded, and ok when installed (or unknowable, as in a container)."""
    config = {"CONFIG_VETH": "m"}
    loaded = d.check_kernel_feature(d.VETH, kernel(config, present=frozenset({"veth"})))
    assert lines(loaded) == ["ok    veth: module veth, loaded"]
    installed = d.check_kernel_feature(d.VETH, kernel(config, loadable=frozenset({"veth"})))
    assert lines(installed) == ["ok    veth: module veth (CONFIG_VETH=m), loaded on first use"]
    no_list = d.check_kernel_feature(d.VETH, kernel(config))
    assert lines(no_list) == ["ok    veth: module veth (CONFIG_VETH=m), loaded on first use"]


def test_feature_module_not_installed_is_a_blocker() -> None:
    """=m but absent from modules.dep: FAIL, with the package that ships the module."""
    check = d.check_kernel_feature(
        d.VETH, kernel({"CONFIG_VETH": "m"}, loadable=frozenset({"nf_tables"}))
    )
    assert check.status == "FAIL"
    assert lines(check) == [
        f"FAIL  veth: CONFIG_VETH=m, but the veth module is not installed for {RELEASE}",
        f"  fix: install the kernel's modules (Debian: the linux-image package of {RELEASE};"
        f" Ubuntu: apt-get install linux-modules-extra-{RELEASE})",
    ]


def test_feature_not_set_is_a_blocker() -> None:
    """Not set (or absent) in a readable config: FAIL."""
    check = d.check_kernel_feature(d.NFNETLINK_LOG, kernel({"CONFIG_NETFILTER_NETLINK_LOG": "n"}))
    assert lines(check) == [
        "FAIL  nfnetlink_log: not in this kernel (CONFIG_NETFILTER_NETLINK_LOG is not set)",
        "  fix: boot a kernel built with CONFIG_NETFILTER_NETLINK_LOG=y or =m (Debian's and"
        " Ubuntu's kernels are)",
    ]
    absent = d.check_kernel_feature(d.NETNS, kernel({}))
    assert absent.status == "FAIL"


def test_nf_tables_needs_the_expressions_the_ruleset_uses() -> None:
    """nf_tables without reject or the inet family is a blocker; unknown options are not."""
    config = {"CONFIG_NF_TABLES": "m", "CONFIG_NFT_REJECT": "n", "CONFIG_NF_TABLES_INET": "n"}
    check = d.check_kernel_feature(d.NF_TABLES, kernel(config))
    assert lines(check) == [
        "FAIL  nf_tables: CONFIG_NF_TABLES=m, but CONFIG_NF_TABLES_INET, CONFIG_NFT_REJECT are"
        " not set",
        "  fix: boot a kernel built with CONFIG_NF_TABLES_INET, CONFIG_NFT_REJECT (=y or =m)",
    ]
    # An option missing altogether may be named differently in this kernel version.
    ok = d.check_kernel_feature(d.NF_TABLES, kernel({"CONFIG_NF_TABLES": "y"}))
    assert lines(ok) == ["ok    nf_tables: built in (CONFIG_NF_TABLES=y)"]


def test_evidence_outweighs_a_config_that_disagrees() -> None:
    """Seen working (e.g. registered in nf_log): ok even if a /boot config says otherwise."""
    check = d.check_kernel_feature(
        d.NFNETLINK_LOG,
        kernel({"CONFIG_NETFILTER_NETLINK_LOG": "n"}),
        "registered in /proc/net/netfilter/nf_log",
    )
    assert lines(check) == [
        "ok    nfnetlink_log: present (registered in /proc/net/netfilter/nf_log)"
    ]


def test_feature_without_config_uses_module_lists() -> None:
    """No config: /sys/module, modules.builtin and modules.dep decide."""
    assert lines(d.check_kernel_feature(d.VETH, kernel(None, present=frozenset({"veth"})))) == [
        "ok    veth: present (/sys/module/veth)"
    ]
    assert lines(d.check_kernel_feature(d.VETH, kernel(None, builtin=frozenset({"veth"})))) == [
        "ok    veth: built in (modules.builtin)"
    ]
    assert lines(d.check_kernel_feature(d.VETH, kernel(None, loadable=frozenset({"veth"})))) == [
        "ok    veth: module veth, loaded on first use"
    ]


def test_feature_unknown_is_a_warning_not_a_blocker() -> None:
    """No config and no sign either way: warn, since the feature may well be there."""
    check = d.check_kernel_feature(d.VETH, kernel(None))
    assert lines(check) == [
        f"warn  veth: cannot tell: no kernel config (/proc/config.gz, /boot/config-{RELEASE})"
        " and no other sign of it",
        "  fix: nothing, if jobs start; otherwise check that the kernel has CONFIG_VETH",
    ]


# --------------------------------------------------------------------------------------------
# cgroups

HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V2_MOUNTINFO = (
    "30 24 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2"
    " rw,nsdelegate,memory_recursiveprot\n"
)


def test_parse_cgroup_mounts_keeps_cgroup_mounts_and_their_controllers() -> None:
    """Only cgroup filesystems; controllers from the super options; escaped paths decoded."""
    text = HYBRID_MOUNTINFO + "50 31 0:40 / /mnt/my\\040cg rw shared:9 master:2 - cgroup2 none rw\n"
    mounts = d.parse_cgroup_mounts(text)
    assert mounts[0] == d.CgroupMount("cgroup", "/", "/sys/fs/cgroup/cpu", frozenset({"cpu"}))
    assert d.CgroupMount("cgroup", "/", "/sys/fs/cgroup/systemd", frozenset()) in mounts
    assert mounts[-2:] == [
        d.CgroupMount("cgroup2", "/", "/sys/fs/cgroup/unified", frozenset()),
        d.CgroupMount("cgroup2", "/", "/mnt/my cg", frozenset()),
    ]
    assert len(mounts) == 8  # tmpfs left out


def test_cgroups_v2_with_every_controller() -> None:
    """cgroup2 alone, with memory, cpu and pids: ok."""
    check = d.check_cgroups(
        d.parse_cgroup_mounts(V2_MOUNTINFO), "cpuset cpu io memory hugetlb pids rdma misc\n"
    )
    assert lines(check) == ["ok    cgroups: v2 (/sys/fs/cgroup): memory, cpu, pids controllers"]


def test_cgroups_v2_missing_controllers_warns_with_the_limits_lost() -> None:
    """A cgroup2 without memory and pids: the limits that are refused, and delegation as fix."""
    check = d.check_cgroups(d.parse_cgroup_mounts(V2_MOUNTINFO), "cpu io\n")
    assert lines(check) == [
        "warn  cgroups: v2 (/sys/fs/cgroup) without the memory, pids controllers: jobs cannot"
        " get --memory, --pids limits",
        "  fix: give netjaild's cgroup the controllers: under systemd, Delegate=yes"
        " (netjaild.service has it); in a container, a writable cgroup2 of its own (a"
        " privileged one has it)",
    ]


def test_cgroups_hybrid() -> None:
    """v1 controllers plus a cgroup2 mount (for killing): hybrid, ok."""
    check = d.check_cgroups(d.parse_cgroup_mounts(HYBRID_MOUNTINFO), "")
    assert lines(check) == [
        "ok    cgroups: hybrid (v1 + cgroup2 at /sys/fs/cgroup/unified): memory, cpu, pids"
        " controllers"
    ]


def test_cgroups_v1_without_freezer_warns_that_the_daemon_will_not_start() -> None:
    """Pure v1 needs the freezer to kill jobs; without it netjaild refuses to start."""
    mounts = [
        m
        for m in d.parse_cgroup_mounts(HYBRID_MOUNTINFO)
        if m.fstype == "cgroup" and "freezer" not in m.controllers
    ]
    check = d.check_cgroups(mounts, None)
    assert lines(check) == [
        "warn  cgroups: v1 without the freezer controller: netjaild will not start (it could"
        " not kill jobs reliably)",
        "  fix: mount it (mount -t cgroup -o freezer freezer /sys/fs/cgroup/freezer), or boot"
        " with cgroup2 (systemd.unified_cgroup_hierarchy=1)",
    ]


def test_cgroups_v1_missing_memory() -> None:
    """Pure v1 with a freezer but no memory hierarchy: no --memory limits."""
    mounts = [
        m
        for m in d.parse_cgroup_mounts(HYBRID_MOUNTINFO)
        if m.fstype == "cgroup" and "memory" not in m.controllers
    ]
    check = d.check_cgroups(mounts, None)
    assert lines(check) == [
        "warn  cgroups: v1 (no cgroup2) without the memory controller: jobs cannot get"
        " --memory limits",
        "  fix: mount the missing v1 hierarchies (e.g. mount -t cgroup -o memory memory"
        " /sys/fs/cgroup/memory), or boot with cgroup2 (systemd.unified_cgroup_hierarchy=1)",
    ]


def test_no_cgroups_at_all() -> None:
    """No cgroup filesystem: a warning that netjaild will not start (it may run elsewhere)."""
    check = d.check_cgroups([], None)
    assert lines(check) == [
        "warn  cgroups: no cgroup filesystem is mounted: netjaild will not start here",
        "  fix: mount cgroup2: mount -t cgroup2 none /sys/fs/cgroup (a privileged container"
        " has it)",
    ]


# --------------------------------------------------------------------------------------------
# Capabilities

STATUS_ROOT = "Name:\tpython3\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\n"
STATUS_ROOT += "CapEff:\t000001ffffffffff\nCapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\n"
# Docker's default set: no CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_SYS_PTRACE.
DOCKER_DEFAULT = 0x00000000A80425FB


def test_parse_capability_sets() -> None:
    """The Cap* lines of /proc/self/status become bit masks."""
    assert d.parse_capability_sets(STATUS_ROOT) == {
        "CapInh": 0,
        "CapPrm": 0x1FFFFFFFFFF,
        "CapEff": 0x1FFFFFFFFFF,
        "CapBnd": 0x1FFFFFFFFFF,
        "CapAmb": 0,
    }


def test_root_with_every_capability() -> None:
    """Root with a full effective set: ok."""
    check = d.check_capabilities(d.parse_capability_sets(STATUS_ROOT), 0)
    assert lines(check) == ["ok    capabilities: root, with every capability netjaild needs"]


def test_root_in_an_unprivileged_container() -> None:
    """Root in Docker's default set lacks what jails need: a warning naming them."""
    check = d.check_capabilities({"CapEff": DOCKER_DEFAULT, "CapBnd": DOCKER_DEFAULT}, 0)
    assert lines(check) == [
        "warn  capabilities: root, but without CAP_NET_ADMIN, CAP_SYS_PTRACE, CAP_SYS_ADMIN:"
        " netjaild cannot build jails here",
        "  fix: run netjaild where root has every capability: on the host, or in a privileged"
        ' container (docker run --privileged; devcontainer.json "privileged": true)',
    ]


def test_unprivileged_user_is_judged_by_the_bounding_set() -> None:
    """A user has no effective capabilities, which is fine; the bounding set is what counts."""
    full = d.check_capabilities({"CapEff": 0, "CapBnd": 0x1FFFFFFFFFF}, 1000)
    assert lines(full) == [
        "ok    capabilities: not root (the client needs none); root here may have all netjaild"
        " needs"
    ]
    bounded = d.check_capabilities({"CapEff": 0, "CapBnd": DOCKER_DEFAULT}, 1000)
    assert lines(bounded)[0] == (
        "warn  capabilities: the bounding set lacks CAP_NET_ADMIN, CAP_SYS_PTRACE, CAP_SYS_ADMIN:"
        " netjaild cannot run here (the client can, with a socket shared from the host)"
    )


def test_capabilities_unreadable() -> None:
    """No Cap lines (an odd /proc): a warning, not a guess."""
    check = d.check_capabilities({}, 0)
    assert lines(check) == [
        "warn  capabilities: cannot read CapEff from /proc/self/status",
        "  fix: nothing, if the daemon check is ok",
    ]


# --------------------------------------------------------------------------------------------
# Initial network namespace and nf_log_all_netns


def test_check_initial_netns_lines() -> None:
    """yes is ok; no (a container) warns that only the kmsg backend is affected; unknown warns."""
    assert lines(d.check_initial_netns(True)) == [
        "ok    initial netns: yes (the host's network namespace, not a container's)"
    ]
    assert lines(d.check_initial_netns(False)) == [
        "warn  initial netns: no: a container or another network namespace; jails and NFLOG"
        ' events work here, log_backend = "kmsg" only if the host allows it',
        '  fix: nothing for log_backend = "nflog" (the default); for "kmsg", see nf_log_all_netns',
    ]
    assert lines(d.check_initial_netns(None)) == [
        "warn  initial netns: unknown",
        "  fix: run netjail doctor as root to find out",
    ]


def test_nf_log_all_netns_lines() -> None:
    """1 is ok; 0 warns with the sysctl; absent (a container) says only the host can set it."""
    assert lines(d.check_nf_log_all_netns("1", True)) == [
        'ok    nf_log_all_netns: 1 (log_backend = "kmsg" can see jails\' packets)'
    ]
    assert lines(d.check_nf_log_all_netns("0", True)) == [
        "warn  nf_log_all_netns: 0: LOG records from jails do not reach the kernel log, so"
        ' log_backend = "kmsg" would see no events',
        "  fix: sysctl -w net.netfilter.nf_log_all_netns=1 (only needed for"
        ' log_backend = "kmsg"; impossible inside a container)',
    ]
    assert lines(d.check_nf_log_all_netns(None, False)) == [
        "warn  nf_log_all_netns: absent: only the initial network namespace has it; it cannot"
        " be read or set here",
        '  fix: use log_backend = "nflog" (the default); "kmsg" needs it set to 1 on the host:'
        " sysctl -w net.netfilter.nf_log_all_netns=1",
    ]
    assert lines(d.check_nf_log_all_netns(None, None))[0] == (
        "warn  nf_log_all_netns: cannot read /proc/sys/net/netfilter/nf_log_all_netns"
    )


# --------------------------------------------------------------------------------------------
# libnftables and iptables


def test_libnftables() -> None:
    """libnftables.so.1 is ok; another soname or none is a blocker with the package to install."""
    assert lines(d.check_libnftables("libnftables.so.1")) == [
        "ok    libnftables: libnftables.so.1 found"
    ]
    assert lines(d.check_libnftables("/usr/lib/x86_64-linux-gnu/libnftables.so.1"))[0] == (
        "ok    libnftables: /usr/lib/x86_64-linux-gnu/libnftables.so.1 found"
    )
    assert lines(d.check_libnftables("libnftables.so.0")) == [
        "FAIL  libnftables: only libnftables.so.0 found; netjaild needs libnftables.so.1",
        "  fix: apt-get install libnftables1",
    ]
    assert lines(d.check_libnftables(None)) == [
        "FAIL  libnftables: libnftables.so.1 not found",
        "  fix: apt-get install libnftables1",
    ]


def test_iptables() -> None:
    """Both restore tools: ok with the version; one missing: a warning, never a blocker."""
    restore, restore6 = "/usr/sbin/iptables-restore", "/usr/sbin/ip6tables-restore"
    assert lines(d.check_iptables(restore, restore6, "v1.8.9 (nf_tables)")) == [
        "ok    iptables: /usr/sbin/iptables-restore v1.8.9 (nf_tables)"
    ]
    assert lines(d.check_iptables(restore, restore6, None)) == [
        "ok    iptables: /usr/sbin/iptables-restore"
    ]
    assert lines(d.check_iptables(None, None, None)) == [
        "warn  iptables: iptables-restore and ip6tables-restore not found (only firewall ="
        ' "iptables" needs them)',
        "  fix: apt-get install iptables",
    ]
    assert lines(d.check_iptables(restore, None, None))[0] == (
        'warn  iptables: ip6tables-restore not found (only firewall = "iptables" needs them)'
    )


# --------------------------------------------------------------------------------------------
# Socket and daemon


def sock(**overrides: object) -> d.SocketInfo:
    fields: dict[str, object] = {
        "path": SOCK,
        "kind": "socket",
        "mode": stat.S_IFSOCK | 0o660,
        "owner": "root",
        "group": "netjail",
        "gid": NETJAIL_GID,
        "usable": True,
        "euid": 1000,
        "user": "alice",
        "session_gids": frozenset({USER_GID, NETJAIL_GID}),
        "member_gids": frozenset({USER_GID, NETJAIL_GID}),
    }
    fields.update(overrides)
    return d.SocketInfo(**fields)  # type: ignore[arg-type]


def test_socket_usable_through_the_group_or_as_root() -> None:
    """ok, with the mode, owner and the reason we may connect."""
    assert lines(d.check_socket(sock())) == [
        f"ok    socket: {SOCK} (srw-rw---- root:netjail): you may connect (group netjail)"
    ]
    assert lines(d.check_socket(sock(euid=0, user="root", session_gids=frozenset({0}))))[0] == (
        f"ok    socket: {SOCK} (srw-rw---- root:netjail): you may connect (root)"
    )


def test_socket_missing_unreachable_or_not_a_socket() -> None:
    """Each says what is wrong with the path and what to do."""
    assert lines(d.check_socket(sock(kind="missing"))) == [
        f"warn  socket: {SOCK} does not exist (netjaild is not running, or listens elsewhere)",
        "  fix: if netjaild listens elsewhere: --socket PATH or NETJAIL_SOCKET=PATH; otherwise"
        " start it (see the daemon check)",
    ]
    assert lines(d.check_socket(sock(kind="unreachable"))) == [
        f"warn  socket: cannot reach {SOCK}: a directory on the way is closed to you",
        f"  fix: make the directories of {SOCK} searchable (netjaild makes its own 0755)",
    ]
    assert lines(d.check_socket(sock(kind="other")))[0] == f"warn  socket: {SOCK} is not a socket"


def test_socket_user_not_in_the_group() -> None:
    """Not in the socket's group: the usermod fix."""
    info = sock(
        usable=False,
        session_gids=frozenset({USER_GID}),
        member_gids=frozenset({USER_GID}),
    )
    assert lines(d.check_socket(info)) == [
        f"warn  socket: {SOCK} (srw-rw---- root:netjail): you (alice) are not root and not in"
        " group netjail",
        "  fix: add yourself to the netjail group: sudo usermod -aG netjail $USER, then log in"
        " again",
    ]


def test_socket_user_added_to_the_group_but_not_logged_in_again() -> None:
    """In the group per /etc/group but not in this session: log in again."""
    info = sock(usable=False, session_gids=frozenset({USER_GID}))
    assert lines(d.check_socket(info)) == [
        f"warn  socket: {SOCK} (srw-rw---- root:netjail): you are in group netjail, but this"
        " login session is not yet",
        "  fix: log in again (or start a shell with: newgrp netjail)",
    ]


def test_socket_closed_to_the_group() -> None:
    """A 0600 socket is closed even to its group: look at the permissions."""
    info = sock(mode=stat.S_IFSOCK | 0o600, usable=False)
    assert lines(d.check_socket(info)) == [
        f"warn  socket: {SOCK} (srw------- root:netjail): you may not open it (its mode, or a"
        " directory on the way)",
        f"  fix: check the permissions of {SOCK} and its directories (netjaild makes the socket"
        " 0660 in a 0755 directory)",
    ]


STATUS = p.StatusReply(
    version="0.3.0",
    pid=4242,
    uptime_s=61.6,
    jobs_running=0,
    jobs_total=2,
    events_seen=5,
    events_lost=0,
    cgroup_mode="v2",
)


def test_daemon_answers() -> None:
    """A status reply: ok, with version, pid, socket and uptime."""
    assert lines(d.check_daemon(STATUS, sock())) == [
        f"ok    daemon: netjaild 0.3.0 (pid 4242) answers on {SOCK}, up 62s"
    ]


def test_daemon_not_running_is_a_blocker() -> None:
    """No socket: FAIL with the client's message and how to start netjaild."""
    error = DaemonConnectionError(
        f"cannot connect to {SOCK}: No such file or directory (is netjaild running?)"
    )
    check = d.check_daemon(error, sock(kind="missing"))
    assert check.status == "FAIL"
    assert lines(check) == [
        f"FAIL  daemon: cannot connect to {SOCK}: No such file or directory (is netjaild running?)",
        "  fix: start netjaild: sudo netjaild & (with systemd: sudo systemctl start netjaild)",
    ]


def test_daemon_socket_left_by_a_dead_daemon() -> None:
    """A socket nobody answers on: restart netjaild, and its log if that fails."""
    error = DaemonConnectionError(f"cannot connect to {SOCK}: Connection refused")
    assert lines(d.check_daemon(error, sock()))[1] == (
        "  fix: restart netjaild (sudo systemctl restart netjaild, or sudo netjaild &); if that"
        " fails, see its log (journalctl -u netjaild)"
    )


def test_daemon_denied_by_the_socket_permissions() -> None:
    """EACCES on connect: the fix is the group, as for the socket check."""
    error = DaemonConnectionError(
        f"cannot connect to {SOCK}: Permission denied (are you root or in the netjail group?)"
    )
    info = sock(usable=False, session_gids=frozenset({USER_GID}), member_gids=frozenset())
    assert lines(d.check_daemon(error, info)) == [
        f"FAIL  daemon: cannot connect to {SOCK}: Permission denied (are you root or in the"
        " netjail group?)",
        "  fix: add yourself to the netjail group: sudo usermod -aG netjail $USER, then log in"
        " again",
    ]


def test_daemon_refuses_the_user() -> None:
    """Refused by allowed_uids/allowed_groups: ask the administrator."""
    error = PermissionDeniedError("this user may not use netjail (allowed_uids/allowed_groups)")
    assert lines(d.check_daemon(error, sock())) == [
        "FAIL  daemon: netjaild refused you: this user may not use netjail"
        " (allowed_uids/allowed_groups)",
        "  fix: ask its administrator to add you to allowed_uids or allowed_groups in"
        " /etc/netjail/netjaild.toml",
    ]


def test_daemon_speaking_another_protocol() -> None:
    """A protocol error: the log, and a version mismatch as the likely cause."""
    check = d.check_daemon(ProtocolError("expected hello from the daemon, got Exit"), sock())
    assert lines(check) == [
        "FAIL  daemon: expected hello from the daemon, got Exit",
        "  fix: see netjaild's log (journalctl -u netjaild); a netjail client and daemon of"
        " different versions may not understand each other: upgrade both",
    ]


# --------------------------------------------------------------------------------------------
# The command


@dataclass
class FakeProbes:
    checks: list[d.Check]
    sockets: list[str] = field(default_factory=list)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeProbes:
    """run_checks replaced by a scripted list; records the socket it was asked about."""
    probes = FakeProbes(
        [
            d.Check("netns", "ok", "built in (CONFIG_NET_NS=y)"),
            d.Check("iptables", "warn", "missing", "apt-get install iptables"),
        ]
    )

    def run_checks(socket_path: str) -> list[d.Check]:
        probes.sockets.append(socket_path)
        return list(probes.checks)

    monkeypatch.setattr(d, "run_checks", run_checks)
    return probes


def test_command_prints_lines_and_exits_0_on_warnings(fake: FakeProbes) -> None:
    """Warnings only: exit 0; the socket comes from the group's context object."""
    result = CliRunner().invoke(d.doctor, [], obj={"socket": "/tmp/x.sock"})
    assert result.exit_code == 0
    assert result.output.splitlines() == [
        "ok    netns: built in (CONFIG_NET_NS=y)",
        "warn  iptables: missing",
        "  fix: apt-get install iptables",
    ]
    assert fake.sockets == ["/tmp/x.sock"]


def test_command_exits_1_on_a_blocker_and_prints_json(fake: FakeProbes) -> None:
    """A FAIL: exit 1; --json prints the list."""
    fake.checks.append(d.Check("daemon", "FAIL", "down", "start it"))
    result = CliRunner().invoke(d.doctor, ["--json"], obj={"socket": SOCK})
    assert result.exit_code == 1
    assert [c["status"] for c in json.loads(result.output)] == ["ok", "warn", "FAIL"]


def test_command_without_a_context_uses_the_default_socket(
    fake: FakeProbes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run on its own (no netjail group around it), doctor asks about NETJAIL_SOCKET."""
    monkeypatch.setenv("NETJAIL_SOCKET", "/tmp/env.sock")
    assert CliRunner().invoke(d.doctor, []).exit_code == 0
    assert fake.sockets == ["/tmp/env.sock"]


def test_run_checks_on_this_machine_covers_every_check() -> None:
    """The real probes run unprivileged, never raise, and give every check in order."""
    checks = d.run_checks("/nonexistent/netjail.sock")
    assert [c.check for c in checks] == [
        "netns",
        "nf_tables",
        "nfnetlink_log",
        "veth",
        "cgroups",
        "capabilities",
        "initial netns",
        "nf_log_all_netns",
        "libnftables",
        "iptables",
        "socket",
        "daemon",
    ]
    assert all((c.fix is None) == (c.status == "ok") for c in checks)
    assert checks[-1].status == "FAIL"


def test_importing_doctor_loads_no_kernel_or_daemon_code() -> None:
    """Doctor is part of the light CLI: no pyroute2, netjail.kernel or netjail.daemon."""
    result = subprocess.run(
        [sys.executable, "-c", "import sys, netjail.doctor; print('\\n'.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    loaded = result.stdout.split()
    assert "netjail.doctor" in loaded
    assert [
        name
        for name in loaded
        if name.split(".")[0] == "pyroute2" or name.startswith(("netjail.kernel", "netjail.daemon"))
    ] == []
