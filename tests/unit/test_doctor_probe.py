"""netjail doctor's probes on this machine: what they read, unprivileged, with no side effects."""

from __future__ import annotations

import errno
import os
import re

from netjail.doctor import probe
from netjail.doctor.features import parse_seccomp_mode
from netjail.doctor.host import root_fstype


def test_seccomp_filter_probe_answers_efault_and_loads_nothing() -> None:
    """The NULL-filter prctl gets EFAULT from a kernel with filter mode, and leaves no filter."""
    before = parse_seccomp_mode(probe.probe_status() or "")
    assert probe.probe_seccomp_filter() == errno.EFAULT
    assert parse_seccomp_mode(probe.probe_status() or "") == before


def test_open_tree_probe_answers_efault_and_leaks_nothing() -> None:
    """open_tree with no path gets EFAULT from this kernel (5.2+) and leaves no fd open."""
    before = sorted(os.listdir("/proc/self/fd"))
    assert probe.probe_open_tree() == errno.EFAULT
    assert sorted(os.listdir("/proc/self/fd")) == before


def test_libseccomp_probe_loads_the_library_pyseccomp_uses() -> None:
    """find_library names libseccomp.so.2, it loads, says its version, and pyseccomp is there."""
    info = probe.probe_libseccomp()
    assert info.found == "libseccomp.so.2"
    assert info.load_error is None
    assert re.fullmatch(r"2\.\d+\.\d+", info.version), info.version
    assert info.binding is True


def test_kernel_evidence_names_each_namespace_link_that_exists() -> None:
    """Every /proc/self/ns link for a jail namespace that exists is reported as evidence."""
    evidence = probe.probe_kernel_evidence()
    for check, link in (("netns", "net"), ("pidns", "pid"), ("ipcns", "ipc"), ("utsns", "uts")):
        if os.path.lexists(f"/proc/self/ns/{link}"):
            assert evidence[check] == f"/proc/self/ns/{link} exists"
        else:
            assert check not in evidence


def test_mountinfo_probe_shows_a_root_mount() -> None:
    """This process's mountinfo is readable and has a mount at /."""
    mountinfo = probe.probe_mountinfo()
    assert mountinfo is not None
    assert root_fstype(mountinfo) not in (None, "rootfs")
