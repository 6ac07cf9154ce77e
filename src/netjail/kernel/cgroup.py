"""Job cgroups: resource limits, a complete process list, kill-everything and accounting.

Plain file I/O on cgroupfs, in three host layouts (see ``cgroup_layout``), each with a strategy
of its own that decides which hierarchies a job joins, which files its limits are written to,
how it is killed and where its usage is read:

``v2`` (``cgroup_v2``)
    One cgroup2 tree: ``memory.max`` + ``memory.swap.max``, ``cpu.max``, ``pids.max``; killing
    is one write to ``cgroup.kill``. ``setup`` first moves the daemon into a leaf cgroup.
``hybrid`` (``cgroup_hybrid``)
    Limits and accounting in the v1 hierarchies; the job also gets a cgroup in the
    controller-less cgroup2 tree, for ``cgroup.kill`` and a process list no job can leave.
``v1`` (``cgroup_v1``)
    Limits and accounting as in hybrid; killing freezes the job's freezer cgroup, SIGKILLs
    what it holds and thaws it, until nothing is left.

The decisions are pure (``cgroup_plan``); ``CgroupManager`` and ``JobCgroup`` here do what is
the same in every layout (making, listing, killing and removing directories); and every kernel
access goes through ``CgroupFs`` (``cgroupfs``), so that unit tests emulate kernfs in a
temporary directory. OSError becomes CgroupError in these modules only, by ``cgroup_errors``.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Protocol

from netjail.errors import CgroupError, map_os_errors
from netjail.jobid import JOB_ID_PATTERN, JOB_ID_PREFIX, is_job_id
from netjail.kernel.cgroup_hybrid import HybridStrategy
from netjail.kernel.cgroup_layout import (
    CgroupLayout,
    CgroupMode,
    V1Hierarchy,
    detect_cgroup_layout,
)
from netjail.kernel.cgroup_plan import (
    ControlWrite,
    KillByCgroupKill,
    KillByFreezing,
    KillMethod,
    Limits,
    ResourceUsage,
    Role,
    parse_pids,
    unique_paths,
)
from netjail.kernel.cgroup_v1 import V1Strategy
from netjail.kernel.cgroup_v2 import DAEMON_LEAF, V2Strategy
from netjail.kernel.cgroupfs import CgroupFs, cgroup_errors, is_gone

__all__ = [
    "CgroupFs",
    "CgroupLayout",
    "CgroupManager",
    "CgroupMode",
    "JobCgroup",
    "Limits",
    "ResourceUsage",
    "V1Hierarchy",
    "detect_cgroup_layout",
    "load_cgroup_layout",
]

# The parent name is no job id, but it becomes a directory name beside the daemon's own
# cgroup, so it must be one safe path component.
_PARENT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# How long remove() keeps retrying rmdir while just-killed processes finish exiting.
_REMOVE_RETRY_S = 1.0


class CgroupStrategy(Protocol):
    """What differs between the v2, hybrid and v1 layouts; one class each implements it."""

    @property
    def mode(self) -> CgroupMode: ...

    @property
    def parents(self) -> Mapping[Role, str]:
        """The parent cgroup of all jobs, per role; the order in which jobs join them."""

    def setup(self) -> None:
        """Create the parent cgroups (idempotent); CgroupError if jobs cannot be run here."""

    def job_roles(self, limits: Limits) -> tuple[Role, ...]:
        """The roles a job with *limits* joins, the one to list and kill it by first."""

    def plan_limits(self, dirs: Mapping[Role, str], limits: Limits) -> tuple[ControlWrite, ...]:
        """The writes that apply *limits* to a job's fresh cgroups *dirs*."""

    def kill_method(self, dirs: Mapping[Role, str]) -> KillMethod | None:
        """How to kill the job in *dirs*; None if it has no cgroup to kill it by."""

    def usage(self, dirs: Mapping[Role, str]) -> ResourceUsage:
        """What the job in *dirs* used; None for what this host cannot tell."""


_STRATEGIES: dict[CgroupMode, Callable[[CgroupLayout, str, str, CgroupFs], CgroupStrategy]] = {
    "v2": V2Strategy,
    "hybrid": HybridStrategy,
    "v1": V1Strategy,
}


def load_cgroup_layout(fs: CgroupFs | None = None) -> CgroupLayout:
    """Detect the layout of the running host, for the calling process."""
    fs = fs if fs is not None else CgroupFs()
    with map_os_errors(CgroupError, "cannot read the process's cgroup information"):
        mountinfo = fs.read("/proc/self/mountinfo")
        own = fs.read("/proc/self/cgroup")
    return detect_cgroup_layout(mountinfo, own)


def _check_job_id(job_id: str) -> None:
    # The id becomes a directory name: only the one job-id grammar, never "/" or "..".
    if not is_job_id(job_id):
        raise CgroupError(f"invalid job id {job_id[:64]!r}: it must match {JOB_ID_PATTERN.pattern}")


class CgroupManager:
    """Creates and finds job cgroups under a parent cgroup the daemon owns.

    *layout*'s mode picks the strategy; *root* is prefixed to every cgroupfs path (tests point
    it at a fake tree); *fs* performs the I/O.
    """

    def __init__(
        self,
        layout: CgroupLayout,
        *,
        root: str = "/",
        parent_name: str = "netjail",
        fs: CgroupFs | None = None,
    ) -> None:
        if not _PARENT_NAME_RE.fullmatch(parent_name):
            raise CgroupError(
                f"invalid parent cgroup name {parent_name[:64]!r}: use 1-64 letters, digits,"
                " '_', '.' or '-'"
            )
        if parent_name == DAEMON_LEAF:
            raise CgroupError(f"invalid parent cgroup name {parent_name!r}: it is reserved")
        self.layout = layout
        self.parent_name = parent_name
        self._fs = fs if fs is not None else CgroupFs()
        self._strategy = _STRATEGIES[layout.mode](layout, root, parent_name, self._fs)
        self.mode: CgroupMode = self._strategy.mode

    @property
    def parent_dirs(self) -> tuple[str, ...]:
        """The daemon-owned parent cgroup directories, one per hierarchy used."""
        return unique_paths(self._strategy.parents.values())

    # -- setup and teardown ------------------------------------------------------------------

    def setup(self) -> None:
        """Create the parent cgroups; on cgroup2, make the daemon's cgroup able to hold them.

        Idempotent, so a restarted daemon reuses what it made before.
        """
        self._strategy.setup()

    def teardown(self) -> None:
        """Remove the parent cgroups; CgroupError if job cgroups remain in them."""
        for path in self.parent_dirs:
            with (
                cgroup_errors("remove", path, "remove the job cgroups in it first"),
                contextlib.suppress(FileNotFoundError),
            ):
                self._fs.remove_dir(path)

    def in_job_cgroup(self, proc_cgroup_text: str) -> bool:
        """Whether a /proc/<pid>/cgroup text puts its process in (or below) a job's cgroup."""
        for line in proc_cgroup_text.splitlines():
            parts = line.split(":", 2)[-1].split("/")
            if any(
                parent == self.parent_name and child.startswith(JOB_ID_PREFIX)
                for parent, child in itertools.pairwise(parts)
            ):
                return True
        return False

    # -- jobs --------------------------------------------------------------------------------

    def create_job(self, job_id: str, limits: Limits) -> JobCgroup:
        """Create job *job_id*'s cgroups with *limits* applied.

        On failure raises CgroupError and leaves nothing behind.
        """
        _check_job_id(job_id)
        parents = self._strategy.parents
        dirs = {
            role: os.path.join(parents[role], job_id) for role in self._strategy.job_roles(limits)
        }
        with contextlib.ExitStack() as cleanup_on_fail:
            for path in unique_paths(dirs.values()):
                with cgroup_errors("create cgroup", path):
                    self._fs.make_dir(path)
                cleanup_on_fail.callback(self._remove_fresh, path)
            for write in self._strategy.plan_limits(dirs, limits):
                self._write_control(dirs[write.role], write)
            cleanup_on_fail.pop_all()
        return JobCgroup(job_id, dirs, strategy=self._strategy, fs=self._fs)

    def _remove_fresh(self, path: str) -> None:
        # A fresh cgroup holds no process yet, so rmdir succeeds; if it still does not, the
        # error that made us undo is the one worth reporting.
        with contextlib.suppress(OSError):
            self._fs.remove_dir(path)

    def _write_control(self, cgroup: str, write: ControlWrite) -> None:
        write_control(self._fs, cgroup, write)

    def leftover_job_ids(self) -> list[str]:
        """Ids of the job cgroups under the parent cgroups, e.g. left by a crashed daemon."""
        ids: set[str] = set()
        for parent in self.parent_dirs:
            with cgroup_errors("list", parent):
                try:
                    names = self._fs.list_dirs(parent)
                except FileNotFoundError:
                    continue
            ids.update(name for name in names if is_job_id(name))
        return sorted(ids)

    def open_job(self, job_id: str) -> JobCgroup:
        """The existing cgroups of job *job_id* (e.g. a leftover), to kill and remove it."""
        _check_job_id(job_id)
        dirs = {
            role: os.path.join(parent, job_id)
            for role, parent in self._strategy.parents.items()
            if self._fs.exists(os.path.join(parent, job_id))
        }
        if not dirs:
            raise CgroupError(f"no cgroup exists for job {job_id}")
        return JobCgroup(job_id, dirs, strategy=self._strategy, fs=self._fs)


def write_control(fs: CgroupFs, cgroup: str, write: ControlWrite) -> None:
    """One limit's write; CgroupError naming the file and the cgroup."""
    with cgroup_errors(f"set {write.file} to {write.value} in", cgroup):
        try:
            fs.write(os.path.join(cgroup, write.file), write.value)
        except FileNotFoundError as exc:
            raise CgroupError(
                f"cannot set {write.file} to {write.value} in {cgroup}: the file does not"
                " exist (this kernel lacks the control, or its controller is not enabled)"
            ) from exc


class JobCgroup:
    """The cgroups of one job, in every hierarchy it joined."""

    def __init__(
        self,
        job_id: str,
        dirs: Mapping[Role, str],
        *,
        strategy: CgroupStrategy,
        fs: CgroupFs,
    ) -> None:
        self.job_id = job_id
        self.mode: CgroupMode = strategy.mode
        self._dirs: dict[Role, str] = dict(dirs)
        self._strategy = strategy
        self._fs = fs
        #: The job's cgroup directories; the one used to list and kill processes first.
        self.directories: tuple[str, ...] = unique_paths(self._dirs.values())
        #: The child writes "0" (itself) into each before exec, so the job's first
        #: instruction already runs inside, limited and killable; the first one first.
        self.procs_files: tuple[str, ...] = tuple(
            os.path.join(d, "cgroup.procs") for d in self.directories
        )

    def __repr__(self) -> str:
        return f"JobCgroup({self.job_id!r}, {self.mode!r}, {self.directories!r})"

    # -- processes ---------------------------------------------------------------------------

    def pids(self) -> list[int]:
        """Every process in the job's cgroups (and any cgroups it made below them), sorted."""
        found: set[int] = set()
        for top in self.directories:
            for listed in self._listed_in_tree(top):
                found.update(listed)
        return sorted(found)

    def holds_other_than(self, pid: int) -> bool:
        """Whether the job's cgroups hold a process other than ``pid``, read from the first
        hierarchy's tree alone: every process of the job is in all of them at once (its init
        joins each before it forks anything, and nothing in the job may move a process), so
        one lists them all, in a quarter of the reads on a hybrid host."""
        return any(
            any(other != pid for other in listed)
            for listed in self._listed_in_tree(self.directories[0])
        )

    def _listed_in_tree(self, top: str) -> Iterator[list[int]]:
        """The processes of each cgroup of ``top``'s tree, read as the walk reaches it."""
        for cgroup in self._fs.list_tree(top):
            with cgroup_errors("list the processes of", cgroup):
                try:
                    procs = self._fs.read(os.path.join(cgroup, "cgroup.procs"))
                except OSError as exc:
                    if not is_gone(exc):
                        raise
                    continue  # removed while we looked: it holds nobody
            yield parse_pids(procs)

    def contains(self, pid: int) -> bool:
        """Whether process *pid* is in the job's cgroups."""
        return pid in self.pids()

    def kill_all(self, timeout: float = 2.0) -> None:
        """SIGKILL every process of the job and wait until none is left.

        Raises CgroupError if processes remain after *timeout* seconds. A leftover whose kill
        handle is gone (its cgroup2 or freezer cgroup, removed by something else) holds no
        process once its kill handle's own processes were killed, and so needs no killing; if
        its other cgroups still list processes, it cannot be killed safely, and is refused.
        """
        deadline = time.monotonic() + timeout
        match self._strategy.kill_method(self._dirs):
            case KillByCgroupKill(cgroup=cgroup):
                self._kill_with_cgroup_kill(cgroup, deadline)
            case KillByFreezing() as method:
                self._kill_frozen(method, deadline)
            case None:
                left = self.pids()
                if left:
                    raise CgroupError(
                        f"cannot kill job {self.job_id}: it has {len(left)} process(es) but no"
                        " cgroup to kill them by"
                    )

    def _kill_with_cgroup_kill(self, cgroup: str, deadline: float) -> None:
        kill_file = os.path.join(cgroup, "cgroup.kill")
        delay = 0.002
        while True:
            with cgroup_errors("kill the processes of", cgroup):
                try:
                    self._fs.write(kill_file, "1")
                except OSError as exc:
                    if not is_gone(exc):  # removed meanwhile means already empty
                        raise
            if not self.pids():
                return
            # Killed processes leave the cgroup as they finish exiting; writing again also
            # catches one that got into a hierarchy while we waited.
            if time.monotonic() >= deadline:
                self._raise_not_empty()
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _kill_frozen(self, method: KillByFreezing, deadline: float) -> None:
        # Without cgroup.kill, killing by pid is only safe while the job is frozen: a frozen
        # process can neither fork a child we have not seen nor exit and have its pid reused.
        freezer, cgroup = method.freezer, method.cgroup
        state_path = os.path.join(cgroup, freezer.state_file)
        while self.pids():
            if time.monotonic() >= deadline:
                self._raise_not_empty()
            try:
                with cgroup_errors("freeze and kill the processes of", cgroup):
                    self._fs.write(state_path, freezer.frozen)
                    self._wait_frozen(method, deadline)
                    for pid in self.pids():
                        with contextlib.suppress(ProcessLookupError):
                            self._fs.kill_process(pid)
            finally:
                # A SIGKILLed frozen process dies only once thawed, so always thaw.
                with contextlib.suppress(OSError):
                    self._fs.write(state_path, freezer.thawed)
            time.sleep(0.01)

    def _wait_frozen(self, method: KillByFreezing, deadline: float) -> None:
        # Freezing is asynchronous (v1 reports FREEZING, v2 "frozen 0" in cgroup.events). If
        # it does not finish in time (a task stuck in the kernel), kill anyway: the pids just
        # read stay valid unless a process exits and its pid is reused within microseconds.
        status = os.path.join(method.cgroup, method.freezer.status_file)
        while time.monotonic() < deadline:
            if method.freezer.is_frozen(self._fs.read(status)):
                return
            time.sleep(0.002)

    def _raise_not_empty(self) -> None:
        left = self.pids()
        raise CgroupError(
            f"job {self.job_id} still has {len(left)} process(es) after being killed"
            f" (pids {', '.join(map(str, left[:8]))}); they may be stuck in the kernel"
        )

    # -- limits after creation (a pool jail's) ---------------------------------------------

    def fits(self, limits: Limits) -> bool:
        """Whether *limits* need no hierarchy these cgroups are not in (a pool jail's are made
        without limits, so not in v1's cpu hierarchy); CgroupError if no job could have them."""
        return set(self._strategy.job_roles(limits)) <= set(self._dirs)

    def apply_limits(self, limits: Limits) -> None:
        """Write *limits* to cgroups made without any, or with limits these all replace;
        CgroupError if one cannot be written (then the cgroups must not be used for the job)."""
        if not self.fits(limits):
            raise CgroupError(f"job {self.job_id}'s cgroups cannot take these limits")
        for write in self._strategy.plan_limits(self._dirs, limits):
            write_control(self._fs, self._dirs[write.role], write)

    # -- accounting --------------------------------------------------------------------------

    def usage(self) -> ResourceUsage:
        """What the job used so far; None for what this host cannot tell."""
        return self._strategy.usage(self._dirs)

    # -- removal -----------------------------------------------------------------------------

    def remove(self) -> None:
        """Remove the job's cgroups in every hierarchy; idempotent.

        Retries briefly while just-killed processes finish leaving; CgroupError if a cgroup
        still cannot be removed.
        """
        deadline = time.monotonic() + _REMOVE_RETRY_S
        # The directory processes are listed and killed through goes last: a crash half-way
        # must leave recovery the handle it kills the rest with.
        for top in reversed(self.directories):
            # Bottom-up, in case the job made cgroups of its own below its cgroup.
            for cgroup in reversed(self._fs.list_tree(top)):
                self._remove_one(cgroup, deadline)

    def _remove_one(self, cgroup: str, deadline: float) -> None:
        while True:
            with cgroup_errors("remove", cgroup, "kill the job's processes first"):
                try:
                    self._fs.remove_dir(cgroup)
                except FileNotFoundError:
                    return
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                        raise
                else:
                    return
            time.sleep(0.02)
