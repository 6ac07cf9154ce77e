"""Where the daemon keeps its state: on a tmpfs of its own, where that keeps recovery whole."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from netjail.daemon import statefs

ROOT = "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
RUN_TMPFS = "25 22 0:22 / /run rw,nosuid shared:5 - tmpfs tmpfs rw,mode=755\n"
OURS = "46 22 0:40 / /var/lib/netjail rw,nosuid,nodev,noexec - tmpfs netjail-state rw,mode=700\n"
OTHER_TMPFS = "47 22 0:41 / /var/lib/netjail rw - tmpfs tmpfs rw\n"
HOME = "50 46 0:41 / /var/lib/netjail/homes/j-1 rw - tmpfs netjail-home rw,size=1048576k\n"


@pytest.mark.parametrize(
    ("mountinfo", "state_dir", "holds", "expected"),
    [
        # On the root disk, nothing recorded: it gets a tmpfs.
        (ROOT, "/var/lib/netjail", False, "mount"),
        # On the root disk with records: recovery reads them there, so no mount hides them.
        (ROOT, "/var/lib/netjail", True, "disk"),
        # Ours, left mounted by a daemon that crashed: used as it is (records or none).
        (ROOT + OURS, "/var/lib/netjail", True, "ours"),
        (ROOT + OURS + HOME, "/var/lib/netjail", False, "ours"),
        # A tmpfs of the admin's, on the directory or above it: used, never unmounted.
        (ROOT + OTHER_TMPFS, "/var/lib/netjail", False, "tmpfs"),
        (ROOT + RUN_TMPFS, "/run/netjail/state", False, "tmpfs"),
        # Below our mount point, not on it: not ours to unmount.
        (ROOT + OURS, "/var/lib/netjail/sub", False, "tmpfs"),
        # A sibling whose name starts the same is not below the mount point.
        (ROOT + OURS, "/var/lib/netjail2", False, "mount"),
        # Stacked on ours, another tmpfs hides it: the last one listed counts.
        (ROOT + OURS + OTHER_TMPFS, "/var/lib/netjail", False, "tmpfs"),
        (ROOT + OTHER_TMPFS + OURS, "/var/lib/netjail", False, "ours"),
    ],
)
def test_placement(mountinfo: str, state_dir: str, holds: bool, expected: str) -> None:
    assert statefs.placement(mountinfo, state_dir, holds_state=holds) == expected


def test_holds_state_is_a_record_or_a_lease_not_the_other_files(tmp_path: Path) -> None:
    state = str(tmp_path)
    assert not statefs.holds_state(state)  # no subdirectory at all
    for part in ("jobs", "uids", "homes", "etc", "trust"):
        os.mkdir(os.path.join(state, part))
    open(os.path.join(state, "resolv.conf"), "w").close()
    open(os.path.join(state, "etc", "j-1.hosts"), "w").close()
    assert not statefs.holds_state(state)
    open(os.path.join(state, "uids", "61184.j-1"), "w").close()
    assert statefs.holds_state(state)
    os.unlink(os.path.join(state, "uids", "61184.j-1"))
    open(os.path.join(state, "jobs", "j-1.json"), "w").close()
    assert statefs.holds_state(state)
