"""Reading mounts, and cgroup mounts, out of /proc/<pid>/mountinfo (pure).

Shared by the daemon's cgroup manager and by ``netjail doctor``, which, being client side,
may not import anything under ``netjail.kernel``.
"""

from __future__ import annotations

import re
from typing import NamedTuple

#: Controllers a v1 mount option may name; anything else in the options (rw, xattr, name=…)
#: is not a controller.
V1_CONTROLLERS = frozenset(
    {
        "blkio",
        "cpu",
        "cpuacct",
        "cpuset",
        "devices",
        "freezer",
        "hugetlb",
        "memory",
        "misc",
        "net_cls",
        "net_prio",
        "perf_event",
        "pids",
        "rdma",
    }
)

_ESCAPE = re.compile(r"\\([0-7]{3})")


class CgroupMount(NamedTuple):
    """One cgroup filesystem mount."""

    fstype: str  # "cgroup" (v1) or "cgroup2"
    #: The cgroup that is the mount's root (not "/" inside a cgroup namespace or bind mount).
    root: str
    mount_point: str
    #: The v1 controllers bound to the hierarchy (none for cgroup2).
    controllers: frozenset[str]


def unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


class Mount(NamedTuple):
    """One line of a mountinfo text: the fields netjail reads."""

    #: The path inside the mounted file system that is the mount's root.
    root: str
    mount_point: str
    fstype: str
    source: str
    super_options: str


def parse_mounts(mountinfo_text: str) -> list[Mount]:
    """The mounts listed in a mountinfo text, in order; lines that are not mounts are skipped."""
    mounts = []
    for line in mountinfo_text.splitlines():
        fields = line.split(" ")
        # Optional fields (shared:, master:) vary in number; a lone "-" ends them.
        try:
            sep = fields.index("-", 6)
            fstype, source, super_options = fields[sep + 1 : sep + 4]
        except ValueError:
            continue
        root, mount_point = unescape(fields[3]), unescape(fields[4])
        mounts.append(Mount(root, mount_point, fstype, source, super_options))
    return mounts


def parse_cgroup_mounts(mountinfo_text: str) -> list[CgroupMount]:
    """The cgroup and cgroup2 mounts listed in a mountinfo text, in order."""
    return [
        CgroupMount(
            m.fstype,
            m.root,
            m.mount_point,
            frozenset(o for o in m.super_options.split(",") if o in V1_CONTROLLERS),
        )
        for m in parse_mounts(mountinfo_text)
        if m.fstype in ("cgroup", "cgroup2")
    ]
