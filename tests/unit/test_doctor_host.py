"""netjail doctor's host checks (cgroups, capabilities, netns, root mount) on exact evidence."""

from __future__ import annotations

import errno

from netjail.doctor.host import (
    check_capabilities,
    check_cgroups,
    check_initial_netns,
    check_mount_api,
    check_nf_log_all_netns,
    check_pivot_root,
    parse_capability_sets,
    root_fstype,
)
from netjail.doctor.result import Check, format_checks
from netjail.mountinfo import CgroupMount, Mount, parse_cgroup_mounts, parse_mounts


def lines(check: Check) -> list[str]:
    return format_checks([check])


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
    mounts = parse_cgroup_mounts(text)
    assert mounts[0] == CgroupMount("cgroup", "/", "/sys/fs/cgroup/cpu", frozenset({"cpu"}))
    assert CgroupMount("cgroup", "/", "/sys/fs/cgroup/systemd", frozenset()) in mounts
    assert mounts[-2:] == [
        CgroupMount("cgroup2", "/", "/sys/fs/cgroup/unified", frozenset()),
        CgroupMount("cgroup2", "/", "/mnt/my cg", frozenset()),
    ]
    assert len(mounts) == 8  # tmpfs left out


def test_cgroups_v2_with_every_controller() -> None:
    """cgroup2 alone, with memory, cpu and pids: ok."""
    check = check_cgroups(
        parse_cgroup_mounts(V2_MOUNTINFO), "cpuset cpu io memory hugetlb pids rdma misc\n"
    )
    assert lines(check) == ["ok    cgroups: v2 (/sys/fs/cgroup): memory, cpu, pids controllers"]


def test_cgroups_v2_with_unreadable_controllers_warns() -> None:
    """cgroup2 whose cgroup.controllers cannot be read: a warning that says so, no guess."""
    check = check_cgroups(parse_cgroup_mounts(V2_MOUNTINFO), None)
    assert lines(check) == [
        "warn  cgroups: v2 at /sys/fs/cgroup, but its cgroup.controllers cannot be read",
        "  fix: nothing, if jobs with limits start; otherwise run netjail doctor as root",
    ]


def test_cgroups_v2_missing_controllers_warns_with_the_limits_lost() -> None:
    """A cgroup2 without memory and pids: the limits that are refused, and delegation as fix."""
    check = check_cgroups(parse_cgroup_mounts(V2_MOUNTINFO), "cpu io\n")
    assert lines(check) == [
        "warn  cgroups: v2 (/sys/fs/cgroup) without the memory, pids controllers: jobs cannot"
        " get --memory, --pids limits",
        "  fix: give netjaild's cgroup the controllers: under systemd, Delegate=yes"
        " (netjaild.service has it); in a container, a writable cgroup2 of its own (a"
        " privileged one has it)",
    ]


def test_cgroups_hybrid() -> None:
    """v1 controllers plus a cgroup2 mount (for killing): hybrid, ok."""
    check = check_cgroups(parse_cgroup_mounts(HYBRID_MOUNTINFO), "")
    assert lines(check) == [
        "ok    cgroups: hybrid (v1 + cgroup2 at /sys/fs/cgroup/unified): memory, cpu, pids"
        " controllers"
    ]


def test_cgroups_v1_without_freezer_warns_that_the_daemon_will_not_start() -> None:
    """Pure v1 needs the freezer to kill jobs; without it netjaild refuses to start."""
    mounts = [
        m
        for m in parse_cgroup_mounts(HYBRID_MOUNTINFO)
        if m.fstype == "cgroup" and "freezer" not in m.controllers
    ]
    check = check_cgroups(mounts, None)
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
        for m in parse_cgroup_mounts(HYBRID_MOUNTINFO)
        if m.fstype == "cgroup" and "memory" not in m.controllers
    ]
    check = check_cgroups(mounts, None)
    assert lines(check) == [
        "warn  cgroups: v1 (no cgroup2) without the memory controller: jobs cannot get"
        " --memory limits",
        "  fix: mount the missing v1 hierarchies (e.g. mount -t cgroup -o memory memory"
        " /sys/fs/cgroup/memory), or boot with cgroup2 (systemd.unified_cgroup_hierarchy=1)",
    ]


def test_no_cgroups_at_all() -> None:
    """No cgroup filesystem: a warning that netjaild will not start (it may run elsewhere)."""
    check = check_cgroups([], None)
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
    assert parse_capability_sets(STATUS_ROOT) == {
        "CapInh": 0,
        "CapPrm": 0x1FFFFFFFFFF,
        "CapEff": 0x1FFFFFFFFFF,
        "CapBnd": 0x1FFFFFFFFFF,
        "CapAmb": 0,
    }


def test_parse_capability_sets_skips_lines_that_are_not_hex() -> None:
    """A Cap line with a value that is not hexadecimal is left out, not guessed."""
    assert parse_capability_sets("CapEff:\tzz\nCapBnd:\t000001ffffffffff\n") == {
        "CapBnd": 0x1FFFFFFFFFF
    }


def test_root_with_every_capability() -> None:
    """Root with a full effective set: ok."""
    check = check_capabilities(parse_capability_sets(STATUS_ROOT), 0)
    assert lines(check) == ["ok    capabilities: root, with every capability netjaild needs"]


def test_root_in_an_unprivileged_container() -> None:
    """Root in Docker's default set lacks what jails need: a warning naming them."""
    check = check_capabilities({"CapEff": DOCKER_DEFAULT, "CapBnd": DOCKER_DEFAULT}, 0)
    assert lines(check) == [
        "warn  capabilities: root, but without CAP_NET_ADMIN, CAP_SYS_PTRACE, CAP_SYS_ADMIN:"
        " netjaild cannot build jails here",
        "  fix: run netjaild where root has every capability: on the host, or in a privileged"
        ' container (docker run --privileged; devcontainer.json "privileged": true)',
    ]


def test_unprivileged_user_is_judged_by_the_bounding_set() -> None:
    """A user has no effective capabilities, which is fine; the bounding set is what counts."""
    full = check_capabilities({"CapEff": 0, "CapBnd": 0x1FFFFFFFFFF}, 1000)
    assert lines(full) == [
        "ok    capabilities: not root (the client needs none); root here may have all netjaild"
        " needs"
    ]
    bounded = check_capabilities({"CapEff": 0, "CapBnd": DOCKER_DEFAULT}, 1000)
    assert lines(bounded)[0] == (
        "warn  capabilities: the bounding set lacks CAP_NET_ADMIN, CAP_SYS_PTRACE, CAP_SYS_ADMIN:"
        " netjaild cannot run here (the client can, with a socket shared from the host)"
    )


def test_capabilities_unreadable() -> None:
    """No Cap lines (an odd /proc): a warning, not a guess."""
    check = check_capabilities({}, 0)
    assert lines(check) == [
        "warn  capabilities: cannot read CapEff from /proc/self/status",
        "  fix: nothing, if the daemon check is ok",
    ]


# --------------------------------------------------------------------------------------------
# Initial network namespace and nf_log_all_netns


def test_check_initial_netns_lines() -> None:
    """yes is ok; no (a container) warns that only the kmsg backend is affected; unknown warns."""
    assert lines(check_initial_netns(True)) == [
        "ok    initial netns: yes (the host's network namespace, not a container's)"
    ]
    assert lines(check_initial_netns(False)) == [
        "warn  initial netns: no: a container or another network namespace; jails and NFLOG"
        ' events work here, log_backend = "kmsg" only if the host allows it',
        '  fix: nothing for log_backend = "nflog" (the default); for "kmsg", see nf_log_all_netns',
    ]
    assert lines(check_initial_netns(None)) == [
        "warn  initial netns: unknown",
        "  fix: run netjail doctor as root to find out",
    ]


def test_nf_log_all_netns_lines() -> None:
    """1 is ok; 0 warns with the sysctl; absent (a container) says only the host can set it."""
    assert lines(check_nf_log_all_netns("1", True)) == [
        'ok    nf_log_all_netns: 1 (log_backend = "kmsg" can see jails\' packets)'
    ]
    assert lines(check_nf_log_all_netns("0", True)) == [
        "warn  nf_log_all_netns: 0: LOG records from jails do not reach the kernel log, so"
        ' log_backend = "kmsg" would see no events',
        "  fix: sysctl -w net.netfilter.nf_log_all_netns=1 (only needed for"
        ' log_backend = "kmsg"; impossible inside a container)',
    ]
    assert lines(check_nf_log_all_netns(None, False)) == [
        "warn  nf_log_all_netns: absent: only the initial network namespace has it; it cannot"
        " be read or set here",
        '  fix: use log_backend = "nflog" (the default); "kmsg" needs it set to 1 on the host:'
        " sysctl -w net.netfilter.nf_log_all_netns=1",
    ]
    assert lines(check_nf_log_all_netns(None, None))[0] == (
        "warn  nf_log_all_netns: cannot read /proc/sys/net/netfilter/nf_log_all_netns"
    )


# --------------------------------------------------------------------------------------------
# The jail's mount namespace: the new mount API and the root mount


def test_mount_api_there_whatever_error_but_enosys() -> None:
    """open_tree without a path fails; any error but ENOSYS shows the call exists."""
    for code in (errno.EFAULT, errno.EBADF, errno.EINVAL, 0):
        assert lines(check_mount_api(code)) == [
            "ok    mount API: open_tree and move_mount are there (Linux 5.2+)"
        ]


def test_mount_api_missing_is_a_blocker() -> None:
    """ENOSYS: a kernel before 5.2, FAIL with the version to boot."""
    assert lines(check_mount_api(errno.ENOSYS)) == [
        "FAIL  mount API: no open_tree in this kernel (ENOSYS): jails bind their directories with"
        " open_tree and move_mount, Linux 5.2 and later",
        "  fix: boot Linux 5.2 or later (Debian 11 and Ubuntu 20.04 have it)",
    ]


def test_mount_api_filtered_or_unknown_warns() -> None:
    """EPERM (a container's seccomp profile) or no call at all: a warning, not a verdict."""
    assert lines(check_mount_api(errno.EPERM)) == [
        "warn  mount API: open_tree is refused here (a seccomp filter over this process?)",
        "  fix: nothing, if netjaild runs elsewhere; where it runs, open_tree and move_mount must"
        " not be filtered (docker run --security-opt seccomp=unconfined)",
    ]
    assert lines(check_mount_api(None)) == [
        "warn  mount API: cannot tell: open_tree could not be called",
        "  fix: nothing, if jobs start; otherwise check that the kernel is Linux 5.2 or later",
    ]


INITRAMFS_MOUNTINFO = "1 1 0:2 / / rw - rootfs rootfs rw,size=4017692k,nr_inodes=1004423\n"
HOST_MOUNTINFO = (
    "22 27 0:21 / /proc rw,relatime - proc proc rw\n"
    "27 1 254:0 / / rw,relatime shared:1 master:3 - ext4 /dev/vda rw,discard\n"
)


def test_root_fstype_is_the_last_mount_at_the_root() -> None:
    """Optional fields are skipped; a mount stacked over / later wins; other mounts are not /."""
    assert root_fstype(HOST_MOUNTINFO) == "ext4"
    assert root_fstype(INITRAMFS_MOUNTINFO + HOST_MOUNTINFO) == "ext4"
    assert root_fstype(INITRAMFS_MOUNTINFO) == "rootfs"
    assert root_fstype("22 27 0:21 / /proc rw - proc proc rw\nnot a mountinfo line\n") is None
    # A mount point that only looks like / once unescaped is still /: "\057" is "/".
    assert root_fstype("30 1 0:9 / \\057 rw - tmpfs tmpfs rw\n") == "tmpfs"


def test_pivot_root_from_a_real_root() -> None:
    """A root on any file system but rootfs: ok, naming it."""
    assert lines(check_pivot_root(HOST_MOUNTINFO)) == [
        "ok    pivot_root: / is on ext4, not the initial ramfs: jails can pivot_root from it"
    ]


def test_pivot_root_from_the_initramfs_is_a_blocker() -> None:
    """The initial ramfs cannot be pivot_root'ed away from: FAIL, with how to switch root."""
    assert lines(check_pivot_root(INITRAMFS_MOUNTINFO)) == [
        "FAIL  pivot_root: / is the initial ramfs (rootfs), which pivot_root cannot leave: jails"
        " cannot get a root of their own",
        "  fix: boot with a root file system (root=...), or have the initramfs switch_root into"
        " one (a tmpfs with a copy of it will do)",
    ]


def test_pivot_root_in_a_chroot_or_without_mountinfo_warns() -> None:
    """No mount at / (a chroot) or no mountinfo at all: a warning, not a guess."""
    assert lines(check_pivot_root("22 27 0:21 / /proc rw - proc proc rw\n")) == [
        "warn  pivot_root: no mount at / (a chroot?): pivot_root needs the root to be a mount",
        "  fix: run netjaild outside the chroot, or where / is a mount of its own",
    ]
    assert lines(check_pivot_root(None)) == [
        "warn  pivot_root: cannot read /proc/self/mountinfo",
        "  fix: nothing, if jobs start; otherwise see that / is a mount other than rootfs",
    ]


def test_parse_mounts_reads_each_field_unescaped_and_skips_other_lines() -> None:
    """Each mount line gives root, mount point, type, source and options; junk lines are skipped."""
    text = (
        "36 35 98:0 /a\\040b /mnt/x\\040y rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n"
        "not a mountinfo line\n"
        "40 35 0:9 / /short rw - tmpfs\n"
    )
    assert parse_mounts(text) == [
        Mount("/a b", "/mnt/x y", "ext3", "/dev/root", "rw,errors=continue")
    ]
