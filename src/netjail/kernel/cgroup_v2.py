"""The cgroup v2 strategy: one cgroup2 tree holds every controller.

Jobs live in ``<daemon's cgroup>/netjail/<job>``; limits are ``memory.max`` +
``memory.swap.max``, ``cpu.max``, ``pids.max`` and ``memory.oom.group``; killing is one write
to ``cgroup.kill`` (or freezing, before 5.14). Because of cgroup2's "no internal processes"
rule, ``setup`` first moves the daemon into a leaf (``<daemon's cgroup>/daemon``) before it
enables controllers for its children.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping

from netjail.errors import CgroupError
from netjail.kernel.cgroup_layout import CgroupLayout, CgroupMode, host_path
from netjail.kernel.cgroup_plan import (
    CGROUP2_FREEZER,
    DELEGATION_HINT,
    ControlWrite,
    KillByCgroupKill,
    KillByFreezing,
    KillMethod,
    Limits,
    ResourceUsage,
    Role,
    check_v2_controllers,
    parse_pids,
    plan_v2_writes,
    usage_from_v2,
)
from netjail.kernel.cgroupfs import (
    CgroupFs,
    cgroup_errors,
    make_dirs_exist_ok,
    read_optional,
    read_words,
)

#: Name of the leaf the daemon moves itself into (see ``V2Strategy.setup``).
DAEMON_LEAF = "daemon"

# The cgroup2 controllers a job's limits need, in the order they are enabled.
_V2_CONTROLLERS = ("memory", "cpu", "pids")
# Passes over the daemon's cgroup when moving its processes into the leaf; each pass moves
# everything listed, so more than a few only happen if something forks without pause.
_MOVE_PASSES = 20


def cgroup2_kill_method(fs: CgroupFs, cgroup: str) -> KillMethod:
    """How to kill the processes of *cgroup*, in a cgroup2 tree of this kernel."""
    if fs.exists(os.path.join(cgroup, "cgroup.kill")):
        # cgroup.kill (5.14+) kills the whole subtree in the kernel, with forks blocked
        # meanwhile: no race with a job that forks while we look at its process list.
        return KillByCgroupKill(cgroup)
    return KillByFreezing(cgroup, CGROUP2_FREEZER)  # cgroup2 before 5.14: as on v1


class V2Strategy:
    """Job cgroups on a pure cgroup2 host."""

    mode: CgroupMode = "v2"

    def __init__(self, layout: CgroupLayout, root: str, parent_name: str, fs: CgroupFs) -> None:
        if layout.unified_mount is None or layout.unified_own_cgroup is None:
            # detect_cgroup_layout says v2 only when it found a cgroup2 tree.
            raise CgroupError("cgroup2 mode without a cgroup2 mount; this is a netjail bug")
        self._fs = fs
        self._own = host_path(root, layout.unified_mount, layout.unified_own_cgroup)
        #: The parent cgroup of all jobs.
        self.parents: dict[Role, str] = {"unified": os.path.join(self._own, parent_name)}

    def setup(self) -> None:
        """Make the daemon's cgroup able to hold job cgroups, and create their parent."""
        own, parent = self._own, self.parents["unified"]
        available = read_words(self._fs, os.path.join(own, "cgroup.controllers"))
        # Enable what the daemon's cgroup was given; create_job refuses a limit whose
        # controller is missing, so nothing is silently left unlimited.
        wanted = [c for c in _V2_CONTROLLERS if c in available]
        enabled = read_words(self._fs, os.path.join(own, "cgroup.subtree_control"))
        if any(c not in enabled for c in wanted):
            # cgroup2's "no internal processes" rule: a cgroup that hands controllers to its
            # children may not hold processes itself. The kernel's root cgroup is exempt, and
            # is the only one without cgroup.type.
            if self._fs.exists(os.path.join(own, "cgroup.type")):
                self._move_processes_to_leaf(own)
            self._enable_controllers(own, [c for c in wanted if c not in enabled])
        make_dirs_exist_ok(self._fs, (parent,))
        parent_enabled = read_words(self._fs, os.path.join(parent, "cgroup.subtree_control"))
        self._enable_controllers(parent, [c for c in wanted if c not in parent_enabled])

    def _move_processes_to_leaf(self, own: str) -> None:
        leaf = os.path.join(own, DAEMON_LEAF)
        make_dirs_exist_ok(self._fs, (leaf,))
        leaf_procs = os.path.join(leaf, "cgroup.procs")
        own_procs = os.path.join(own, "cgroup.procs")
        for _ in range(_MOVE_PASSES):
            with cgroup_errors("read", own_procs):
                pids = parse_pids(self._fs.read(own_procs))
            if not pids:
                return
            for pid in pids:
                # A process that exited meanwhile (ESRCH) needs no moving.
                with (
                    cgroup_errors(f"move process {pid} into", leaf, DELEGATION_HINT),
                    contextlib.suppress(ProcessLookupError),
                ):
                    self._fs.write(leaf_procs, str(pid))
        raise CgroupError(f"cannot empty {own}: processes keep appearing in it; {DELEGATION_HINT}")

    def _enable_controllers(self, cgroup: str, controllers: Iterable[str]) -> None:
        path = os.path.join(cgroup, "cgroup.subtree_control")
        for controller in controllers:
            with cgroup_errors(f"enable the {controller} controller in", cgroup, DELEGATION_HINT):
                self._fs.write(path, f"+{controller}")

    def job_roles(self, limits: Limits) -> tuple[Role, ...]:
        """The job's one cgroup; CgroupError if a limit's controller is not enabled for it."""
        parent = self.parents["unified"]
        enabled = read_words(self._fs, os.path.join(parent, "cgroup.subtree_control"))
        check_v2_controllers(limits, enabled, parent)
        return ("unified",)

    def plan_limits(self, dirs: Mapping[Role, str], limits: Limits) -> tuple[ControlWrite, ...]:
        """The writes that apply *limits* to the job's fresh cgroup *dirs*."""
        oom_group = self._fs.exists(os.path.join(dirs["unified"], "memory.oom.group"))
        return plan_v2_writes(limits, oom_group=oom_group)

    def kill_method(self, dirs: Mapping[Role, str]) -> KillMethod | None:
        """How to kill the job; None if its cgroup is gone."""
        unified = dirs.get("unified")
        return None if unified is None else cgroup2_kill_method(self._fs, unified)

    def usage(self, dirs: Mapping[Role, str]) -> ResourceUsage:
        """What the job used, from its cgroup2 accounting files."""
        cgroup = dirs.get("unified")
        return usage_from_v2(
            read_optional(self._fs, cgroup, "cpu.stat"),
            read_optional(self._fs, cgroup, "memory.peak"),
            read_optional(self._fs, cgroup, "pids.peak"),
            read_optional(self._fs, cgroup, "memory.events"),
        )
