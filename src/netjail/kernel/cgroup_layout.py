"""The host's cgroup layout, detected from /proc/self/mountinfo and /proc/self/cgroup (pure).

Three layouts, one strategy each (``cgroup_v2``, ``cgroup_hybrid``, ``cgroup_v1``):

``v2``
    One cgroup2 tree holds every controller.
``hybrid``
    Controllers are bound to v1 hierarchies, and a controller-less cgroup2 tree is mounted too
    (systemd's "unified" tree).
``v1``
    Only v1 hierarchies.

Detection also finds the daemon's own cgroup in each hierarchy, including inside a cgroup
namespace or a bind-mounted subtree, where the mount's root is not the hierarchy's root.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from netjail.errors import CgroupError
from netjail.mountinfo import V1_CONTROLLERS, parse_cgroup_mounts

CgroupMode = Literal["v2", "hybrid", "v1"]


@dataclass(frozen=True)
class V1Hierarchy:
    """One mounted cgroup v1 hierarchy and the daemon's place in it."""

    controllers: frozenset[str]
    mount_point: str
    #: The daemon's cgroup, relative to the mount point ("/" = the mount's root).
    own_cgroup: str


@dataclass(frozen=True)
class CgroupLayout:
    """The cgroup filesystems of this host, as seen by the daemon's process."""

    mode: CgroupMode
    #: Where the cgroup2 tree is mounted, if it is.
    unified_mount: str | None
    #: The daemon's cgroup in the cgroup2 tree, relative to ``unified_mount``.
    unified_own_cgroup: str | None
    v1_hierarchies: tuple[V1Hierarchy, ...] = ()

    def v1_hierarchy(self, controller: str) -> V1Hierarchy | None:
        """The v1 hierarchy *controller* is mounted in, if any."""
        for hierarchy in self.v1_hierarchies:
            if controller in hierarchy.controllers:
                return hierarchy
        return None


def host_path(root: str, mount_point: str, cgroup: str) -> str:
    """The directory of *cgroup* (relative to its mount) under *root* (tests use a fake tree)."""
    return os.path.normpath(os.path.join(root, mount_point.lstrip("/"), cgroup.lstrip("/")))


def _parse_proc_cgroup(text: str) -> tuple[str | None, dict[frozenset[str], str]]:
    """The cgroup2 path and the v1 paths (keyed by controller set) of /proc/<pid>/cgroup."""
    unified: str | None = None
    v1: dict[frozenset[str], str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy_id, controllers, path = parts
        if hierarchy_id == "0" and not controllers:
            unified = path
            continue
        key = frozenset(c for c in controllers.split(",") if c in V1_CONTROLLERS)
        if key:  # named hierarchies without controllers (name=systemd) are of no use here
            v1[key] = path
    return unified, v1


def _relative_to_mount(cgroup: str, mount_root: str) -> str | None:
    """*cgroup* relative to a mount of its hierarchy rooted at *mount_root*, if visible there."""
    # A mount may expose only a subtree (containers bind-mount their own cgroup), and inside a
    # cgroup namespace both sides are already relative to the namespace root.
    if mount_root == "/":
        return cgroup
    if cgroup == mount_root:
        return "/"
    if cgroup.startswith(mount_root + "/"):
        return cgroup[len(mount_root) :]
    return None


def detect_cgroup_layout(mountinfo_text: str, proc_self_cgroup_text: str) -> CgroupLayout:
    """Work out the host's cgroup layout from /proc/self/mountinfo and /proc/self/cgroup.

    Raises CgroupError if no usable cgroup filesystem is mounted.
    """
    mounts = parse_cgroup_mounts(mountinfo_text)
    unified_cgroup, v1_cgroups = _parse_proc_cgroup(proc_self_cgroup_text)

    unified_mount: str | None = None
    unified_own: str | None = None
    if unified_cgroup is not None:
        for mount in mounts:
            if mount.fstype != "cgroup2":
                continue
            relative = _relative_to_mount(unified_cgroup, mount.root)
            if relative is not None:
                unified_mount, unified_own = mount.mount_point, relative
                break

    hierarchies: list[V1Hierarchy] = []
    for mount in mounts:
        if mount.fstype != "cgroup" or not mount.controllers:
            continue
        if any(h.controllers == mount.controllers for h in hierarchies):
            continue  # the same hierarchy mounted twice: the first visible mount will do
        cgroup = v1_cgroups.get(mount.controllers)
        relative = None if cgroup is None else _relative_to_mount(cgroup, mount.root)
        if relative is not None:
            hierarchies.append(V1Hierarchy(mount.controllers, mount.mount_point, relative))

    mode: CgroupMode
    if unified_mount is not None:
        mode = "hybrid" if hierarchies else "v2"
    elif hierarchies:
        mode = "v1"
    else:
        raise CgroupError(
            "no usable cgroup filesystem is mounted: mount cgroup2 at /sys/fs/cgroup"
            " (or the v1 memory, cpu, pids and freezer hierarchies)"
        )
    return CgroupLayout(mode, unified_mount, unified_own, tuple(hierarchies))
