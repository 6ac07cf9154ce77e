"""Initial-network-namespace detection: the pure decision over exact evidence, and its probe."""

from __future__ import annotations

import os

from netjail import hostns as h
from netjail.hostns import NetnsEvidence

INIT_NET = f"net:[{h.NET_NS_INIT_INO}]"
INIT_PID = f"pid:[{h.PID_NS_INIT_INO}]"
CONTAINER_PID = "pid:[4026532301]"
#: Network namespaces with dynamic numbers, as kernels before 6.18 give even the initial one.
HOST_NET = "net:[4026531992]"
OTHER_NET = "net:[4026532500]"
OLD_KERNEL = "6.1.0-27-amd64"
NEW_KERNEL = "6.18.44-fc-v669"


def evidence(
    own_net: str | None = None,
    own_pid: str | None = None,
    init_net: str | None = None,
    sysctls: h.NfLogSysctls = "absent",
    release: str = OLD_KERNEL,
) -> NetnsEvidence:
    return NetnsEvidence(own_net, own_pid, init_net, sysctls, release)


def test_the_fixed_inode_number_means_initial_whatever_else_says() -> None:
    """Linux 6.18+: the initial netns's fixed inode number decides, before any sysctl."""
    assert h.detect_initial_netns(evidence(INIT_NET, sysctls="per_netns_only")) is True
    assert h.detect_initial_netns(evidence(INIT_NET, release="")) is True


def test_on_a_kernel_with_fixed_numbers_any_other_number_means_not_initial() -> None:
    """From 6.18 on, a dynamic netns number is another namespace, even if the sysctls disagree."""
    assert h.detect_initial_netns(evidence(OTHER_NET, release=NEW_KERNEL)) is False
    assert h.detect_initial_netns(evidence(OTHER_NET, sysctls="all_netns", release="7.0")) is False


def test_before_6_18_the_sysctls_decide() -> None:
    """nf_log_all_netns exists only in the initial netns; the nf_log directory in every one."""
    assert h.detect_initial_netns(evidence(HOST_NET, sysctls="all_netns")) is True
    assert h.detect_initial_netns(evidence(OTHER_NET, sysctls="per_netns_only")) is False
    # An unreadable own link leaves the fixed-number rule nothing to compare.
    assert h.detect_initial_netns(evidence(None, sysctls="all_netns", release=NEW_KERNEL)) is True


def test_without_sysctls_the_real_init_is_compared() -> None:
    """In the initial PID namespace, PID 1 is the real init: its netns is the initial one."""
    assert h.detect_initial_netns(evidence(HOST_NET, INIT_PID, HOST_NET)) is True
    assert h.detect_initial_netns(evidence(OTHER_NET, INIT_PID, HOST_NET)) is False


def test_a_containers_pid_1_proves_nothing() -> None:
    """Outside the initial PID namespace, PID 1 is a container's init: no answer from it."""
    assert h.detect_initial_netns(evidence(OTHER_NET, CONTAINER_PID, OTHER_NET)) is None
    assert h.detect_initial_netns(evidence(OTHER_NET, CONTAINER_PID, HOST_NET)) is None


def test_unreadable_links_and_no_sysctls_cannot_tell() -> None:
    """PID 1's link refused (no ptrace access) and no sysctls: None, not a guess."""
    assert h.detect_initial_netns(evidence(HOST_NET, INIT_PID, None)) is None
    assert h.detect_initial_netns(evidence()) is None
    assert h.detect_initial_netns(evidence("garbage", INIT_PID, "garbage")) is None


def test_probe_reads_this_process() -> None:
    """The probe reports this process's own links, the kernel release and the sysctls seen."""
    found = h.probe_netns_evidence()
    assert found.own_net == os.readlink("/proc/self/ns/net")
    assert found.own_pid == os.readlink("/proc/self/ns/pid")
    assert found.kernel_release == os.uname().release
    expected = (
        "all_netns"
        if os.path.lexists(h.NF_LOG_ALL_NETNS)
        else "per_netns_only"
        if os.path.isdir(h.NF_LOG_DIR)
        else "absent"
    )
    assert found.nf_log_sysctls == expected
    assert h.in_initial_netns() == h.detect_initial_netns(found)
