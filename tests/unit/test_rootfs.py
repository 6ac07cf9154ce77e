"""Tests for netjail.kernel.rootfs's pure part: the flags of a read-only bind remount."""

from __future__ import annotations

import os

from netjail.kernel import syscalls
from netjail.kernel.rootfs import mount_flags_of, remount_flags

RO, NOSUID, NODEV, NOEXEC = (
    syscalls.MS_RDONLY,
    syscalls.MS_NOSUID,
    syscalls.MS_NODEV,
    syscalls.MS_NOEXEC,
)


def test_statvfs_flags_map_to_mount_flags() -> None:
    """Every statvfs bit maps to its MS_* flag, relatime included (whose values differ)."""
    every = (
        os.ST_RDONLY
        | os.ST_NOSUID
        | os.ST_NODEV
        | os.ST_NOEXEC
        | os.ST_NOATIME
        | os.ST_NODIRATIME
        | os.ST_RELATIME
    )
    assert (
        mount_flags_of(every)
        == (RO | NOSUID | NODEV | NOEXEC | syscalls.MS_NOATIME | syscalls.MS_NODIRATIME)
        | syscalls.MS_RELATIME
    )
    assert mount_flags_of(os.ST_RELATIME) == syscalls.MS_RELATIME
    assert mount_flags_of(0) == 0


def test_a_read_only_remount_keeps_the_sources_flags() -> None:
    """noexec and relatime of the source survive; read-only, nosuid and nodev are added."""
    flags = remount_flags(os.ST_NOEXEC | os.ST_RELATIME, RO | NOSUID | NODEV)
    assert flags == NOEXEC | syscalls.MS_RELATIME | RO | NOSUID | NODEV


def test_no_remount_when_nothing_is_added() -> None:
    """A mount that already has every wanted flag is left alone (None)."""
    assert remount_flags(os.ST_RDONLY | os.ST_NOSUID | os.ST_NODEV, RO | NOSUID | NODEV) is None
    assert remount_flags(os.ST_NOSUID | os.ST_NOEXEC, NOSUID) is None


def test_a_read_write_bind_is_made_nosuid_and_nodev() -> None:
    """A rw bind gains nosuid and nodev but stays writable."""
    flags = remount_flags(os.ST_RELATIME, NOSUID | NODEV)
    assert flags == syscalls.MS_RELATIME | NOSUID | NODEV
