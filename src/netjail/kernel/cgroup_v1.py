"""The cgroup v1 strategy: controllers in v1 hierarchies, and no cgroup2 tree at all.

A job joins ``<daemon's cgroup>/netjail/<job>`` in the freezer hierarchy (to list and kill
its processes by), in memory, cpuacct and pids (accounting, and their limits), and in cpu only
with a CPU limit. Killing freezes the job's freezer cgroup, SIGKILLs what it holds and thaws
it, until nothing is left. The v1 half of the hybrid strategy (limits, accounting) is here too,
as functions ``cgroup_hybrid`` shares.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from netjail.errors import CgroupError
from netjail.kernel.cgroup_layout import CgroupLayout, CgroupMode, host_path
from netjail.kernel.cgroup_plan import (
    V1_FREEZER,
    ControlWrite,
    KillByFreezing,
    KillMethod,
    Limits,
    ResourceUsage,
    Role,
    V1UsageFiles,
    plan_v1_roles,
    plan_v1_writes,
    unique_paths,
    usage_from_v1,
)
from netjail.kernel.cgroupfs import CgroupFs, make_dirs_exist_ok, read_optional

# The v1 hierarchies whose parent cgroups a job may join, besides the tracker.
V1_ROLES: tuple[Role, ...] = ("memory", "cpu", "cpuacct", "pids")


def v1_parents(
    layout: CgroupLayout, root: str, parent_name: str, roles: Iterable[Role]
) -> dict[Role, str]:
    """The parent cgroup of all jobs in each of *roles*' v1 hierarchies that is mounted."""
    parents: dict[Role, str] = {}
    for role in roles:
        hierarchy = layout.v1_hierarchy(role)
        if hierarchy is not None:
            own = host_path(root, hierarchy.mount_point, hierarchy.own_cgroup)
            parents[role] = os.path.join(own, parent_name)
    return parents


def plan_v1_limits(
    fs: CgroupFs, dirs: Mapping[Role, str], limits: Limits
) -> tuple[ControlWrite, ...]:
    """The v1 writes that apply *limits* to the job's fresh cgroups *dirs*."""
    memory = dirs.get("memory")
    memsw = memory is not None and fs.exists(os.path.join(memory, "memory.memsw.limit_in_bytes"))
    return plan_v1_writes(limits, "memsw" if memsw else "swappiness")


def read_v1_usage(fs: CgroupFs, dirs: Mapping[Role, str]) -> ResourceUsage:
    """What the job used, from its v1 accounting files (and cgroup2 cpu.stat, if it has one)."""
    cpuacct, memory = dirs.get("cpuacct"), dirs.get("memory")
    # The CPU time's sources in the order usage_from_v1 prefers them, each read only when
    # those before it are missing: the job's end waits for these reads.
    user = read_optional(fs, cpuacct, "cpuacct.usage_user")
    system = read_optional(fs, cpuacct, "cpuacct.usage_sys") if user is not None else None
    stat = read_optional(fs, cpuacct, "cpuacct.stat") if system is None else None
    unified = (
        read_optional(fs, dirs.get("unified"), "cpu.stat")
        if system is None and stat is None
        else None
    )
    files = V1UsageFiles(
        cpuacct_usage_user=user,
        cpuacct_usage_sys=system,
        cpuacct_stat=stat,
        memory_max_usage_in_bytes=read_optional(fs, memory, "memory.max_usage_in_bytes"),
        memory_oom_control=read_optional(fs, memory, "memory.oom_control"),
        pids_peak=read_optional(fs, dirs.get("pids"), "pids.peak"),
        unified_cpu_stat=unified,
    )
    return usage_from_v1(files, os.sysconf("SC_CLK_TCK"))


class V1Strategy:
    """Job cgroups on a host with cgroup v1 hierarchies only."""

    mode: CgroupMode = "v1"

    def __init__(self, layout: CgroupLayout, root: str, parent_name: str, fs: CgroupFs) -> None:
        self._fs = fs
        #: The parent cgroup of all jobs, per hierarchy (cpu and cpuacct may share one).
        self.parents = v1_parents(layout, root, parent_name, ("freezer", *V1_ROLES))

    def setup(self) -> None:
        """Create the parent cgroups; CgroupError if there is no freezer to kill jobs by."""
        if "freezer" not in self.parents:
            raise CgroupError(
                "cgroup v1 without a freezer hierarchy: netjail could not kill a job reliably;"
                " mount the freezer controller or use cgroup2"
            )
        make_dirs_exist_ok(self._fs, unique_paths(self.parents.values()))

    def job_roles(self, limits: Limits) -> tuple[Role, ...]:
        """The hierarchies a job with *limits* joins, the freezer first."""
        return plan_v1_roles("freezer", self.parents.keys(), limits)

    def plan_limits(self, dirs: Mapping[Role, str], limits: Limits) -> tuple[ControlWrite, ...]:
        """The writes that apply *limits* to the job's fresh cgroups *dirs*."""
        return plan_v1_limits(self._fs, dirs, limits)

    def kill_method(self, dirs: Mapping[Role, str]) -> KillMethod | None:
        """Freezing the job's freezer cgroup; None if it has none."""
        freezer = dirs.get("freezer")
        return None if freezer is None else KillByFreezing(freezer, V1_FREEZER)

    def usage(self, dirs: Mapping[Role, str]) -> ResourceUsage:
        """What the job used, from its v1 accounting files."""
        return read_v1_usage(self._fs, dirs)
