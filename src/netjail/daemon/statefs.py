"""The state directory on a tmpfs of the daemon's own: the per-job files without disk writes.

Everything netjaild keeps under its state directory belongs to jobs of this boot: a record per
job (written before anything of it is built, for crash recovery), a uid lease per job, each
job's /etc files, CA bundle and HOME mount point, the shared resolv.conf. A crash of the daemon
must leave them to the next start; a reboot need not keep them, since it ends every job and
jail too. A tmpfs the daemon mounts on its state directory keeps exactly that promise: it stays
mounted when the daemon dies, so the next one finds the records there, and it goes at reboot
with the jails. Created and deleted hundreds of times a second, those files cost this VM's root
ext4 0.3-0.9 ms of CPU a job, 3-7% of the throughput (same-run A/B in ARCHITECTURE.md); a
journalled file system costs more.

- At start, before anything else uses the directory (``prepare``):
  - already on a tmpfs (this mount, left by a daemon that crashed, or a tmpfs the admin chose):
    used as it is;
  - on disk, holding no record and no lease: a tmpfs is mounted over it (it hides only empty
    directories and the shared resolv.conf);
  - on disk, holding records or leases (a daemon that kept its state there stopped uncleanly):
    kept on disk for this run, so that recovery finds them; the next start mounts;
  - the mount fails: on disk, with a warning. Only speed depends on it, no isolation.
- At a clean stop (``release``): unmounted once no record and no lease is left in it; else kept,
  mounted, for the next start to recover from.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Literal

from netjail.kernel import syscalls
from netjail.mountinfo import Mount, parse_mounts

#: The source name of the daemon's own state tmpfs, as mountinfo shows it.
SOURCE = "netjail-state"
#: The subdirectories whose entries are state a crash leaves: job records and uid leases.
STATE_PARTS = ("jobs", "uids")

Placement = Literal["ours", "tmpfs", "disk", "mount"]
Log = Callable[..., None]


def placement(mountinfo_text: str, state_dir: str, *, holds_state: bool) -> Placement:
    """Where the state goes (pure): ``state_dir`` (a canonical path) is our tmpfs already
    ("ours"), on another tmpfs ("tmpfs"), on disk with state that must stay there for recovery
    ("disk"), or on disk and free to get a tmpfs of its own ("mount")."""
    holder = _holding_mount(parse_mounts(mountinfo_text), state_dir)
    if holder is not None and holder.fstype == "tmpfs":
        return "ours" if holder.mount_point == state_dir and holder.source == SOURCE else "tmpfs"
    return "disk" if holds_state else "mount"


def _holding_mount(mounts: list[Mount], path: str) -> Mount | None:
    """The mount ``path`` is on: the deepest mount point above it, the last one listed there
    (a mount stacked on another hides it)."""
    best: Mount | None = None
    for mount in mounts:
        point = mount.mount_point
        if (path == point or path.startswith(point.rstrip("/") + "/")) and (
            best is None or len(point) >= len(best.mount_point)
        ):
            best = mount
    return best


def holds_state(state_dir: str) -> bool:
    """Whether ``state_dir`` holds a job record or a uid lease."""
    for part in STATE_PARTS:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            if os.listdir(os.path.join(state_dir, part)):
                return True
    return False


def _mountinfo() -> str:
    with open("/proc/self/mountinfo") as f:
        return f.read()


def prepare(state_dir: str, log: Log) -> Placement:
    """Make ``state_dir`` (mode 0700) and put it on a tmpfs of its own where it may go (see
    the module's docstring); where it is."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    path = os.path.realpath(state_dir)
    where = placement(_mountinfo(), path, holds_state=holds_state(path))
    if where == "disk":
        log(
            "warning",
            "the state directory stays on disk for this run: a previous run left job records"
            " there to recover",
            state_dir=path,
        )
    if where != "mount":
        return where
    try:
        syscalls.mount(
            SOURCE,
            path,
            "tmpfs",
            syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC,
            "mode=0700",
        )
    except OSError as e:
        log(
            "warning", "cannot mount a tmpfs on the state directory; it stays on disk", error=str(e)
        )
        return "disk"
    return "ours"


def release(state_dir: str, log: Log) -> None:
    """At a clean stop: unmount our tmpfs from ``state_dir`` once it holds no state; otherwise
    (or when the unmount fails) it stays mounted for the next start."""
    path = os.path.realpath(state_dir)
    try:
        state = holds_state(path)
        if placement(_mountinfo(), path, holds_state=state) != "ours" or state:
            return
        syscalls.umount2(path, 0)
    except OSError as e:
        log("warning", "cannot unmount the state directory's tmpfs; kept", error=str(e))
