"""The hybrid strategy: controllers in v1 hierarchies, plus a controller-less cgroup2 tree.

This is systemd's "hybrid" layout (the cgroup2 tree at ``/sys/fs/cgroup/unified``). Limits and
memory and pids accounting use the v1 files, as on v1 (``cgroup_v1``). The job also gets a
cgroup in the cgroup2 tree, first of all its cgroups, for ``cgroup.kill``, a process list no
job can leave, and its CPU time (``cpu.stat``); so neither the v1 freezer nor cpuacct is used.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from netjail.errors import CgroupError
from netjail.kernel.cgroup_layout import CgroupLayout, CgroupMode, host_path
from netjail.kernel.cgroup_plan import (
    ControlWrite,
    KillMethod,
    Limits,
    ResourceUsage,
    Role,
    plan_v1_roles,
    unique_paths,
)
from netjail.kernel.cgroup_v1 import V1_ROLES, plan_v1_limits, read_v1_usage, v1_parents
from netjail.kernel.cgroup_v2 import cgroup2_kill_method
from netjail.kernel.cgroupfs import CgroupFs, make_dirs_exist_ok


class HybridStrategy:
    """Job cgroups on a host with v1 controllers and a cgroup2 tree without them."""

    mode: CgroupMode = "hybrid"

    def __init__(self, layout: CgroupLayout, root: str, parent_name: str, fs: CgroupFs) -> None:
        if layout.unified_mount is None or layout.unified_own_cgroup is None:
            # detect_cgroup_layout says hybrid only when it found a cgroup2 tree.
            raise CgroupError("hybrid mode without a cgroup2 mount; this is a netjail bug")
        self._fs = fs
        own = host_path(root, layout.unified_mount, layout.unified_own_cgroup)
        #: The parent cgroup of all jobs, per hierarchy; the cgroup2 tree's first.
        self.parents: dict[Role, str] = {
            "unified": os.path.join(own, parent_name),
            **v1_parents(layout, root, parent_name, V1_ROLES),
        }

    def setup(self) -> None:
        """Create the parent cgroups (the cgroup2 one holds no controllers, so no leaf)."""
        make_dirs_exist_ok(self._fs, unique_paths(self.parents.values()))

    def job_roles(self, limits: Limits) -> tuple[Role, ...]:
        """The hierarchies a job with *limits* joins, the cgroup2 tree first.

        Not cpuacct: the job's cgroup2 cgroup counts its CPU time already (cpu.stat's
        user_usec and system_usec, kept by the kernel in every cgroup2 cgroup, controllers or
        not), and one v1 cgroup fewer is ~0.3 ms less CPU a job (made, joined, removed). It
        stays among the parents, so that leftovers of jobs that had one are still swept.
        """
        joinable = [role for role in self.parents if role != "cpuacct"]
        return plan_v1_roles("unified", joinable, limits)

    def plan_limits(self, dirs: Mapping[Role, str], limits: Limits) -> tuple[ControlWrite, ...]:
        """The writes that apply *limits* to the job's fresh cgroups *dirs*."""
        return plan_v1_limits(self._fs, dirs, limits)

    def kill_method(self, dirs: Mapping[Role, str]) -> KillMethod | None:
        """How to kill the job, by its cgroup2 cgroup; None if it has none."""
        unified = dirs.get("unified")
        return None if unified is None else cgroup2_kill_method(self._fs, unified)

    def usage(self, dirs: Mapping[Role, str]) -> ResourceUsage:
        """What the job used, from its v1 accounting files (or cgroup2's cpu.stat)."""
        return read_v1_usage(self._fs, dirs)
