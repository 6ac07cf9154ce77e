"""Job cgroups: resource limits, a complete process list, kill-everything and accounting.

Plain file I/O on cgroupfs, in three host layouts:

``v2``
    One cgroup2 tree holds every controller. Jobs live in ``<daemon's cgroup>/netjail/<job>``;
    limits are ``memory.max`` + ``memory.swap.max``, ``cpu.max``, ``pids.max``; killing is one
    write to ``cgroup.kill``. Because of cgroup2's "no internal processes" rule, ``setup`` first
    moves the daemon into a leaf (``<daemon's cgroup>/daemon``) before enabling controllers.
``hybrid``
    Controllers are bound to v1 hierarchies; a controller-less cgroup2 tree is mounted too
    (systemd's "unified" tree). Limits and accounting use v1 files; the job also gets a cgroup in
    the cgroup2 tree, purely for ``cgroup.kill`` and a process list no job can leave.
``v1``
    Only v1 hierarchies. Limits and accounting as in hybrid; killing freezes the job's freezer
    cgroup, SIGKILLs what it holds and thaws it, until nothing is left.

The pure half (layout detection, limit planning, stat parsing) is separate from the I/O half
(``CgroupManager``, ``JobCgroup``), and all I/O goes through ``CgroupFs`` so that unit tests can
emulate kernfs in a temporary directory. OSError is mapped to ``CgroupError`` here and only here.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, NamedTuple

from netjail.errors import CgroupError, RequestError
from netjail.mountinfo import V1_CONTROLLERS, parse_cgroup_mounts

CgroupMode = Literal["v2", "hybrid", "v1"]
#: Where a job cgroup lives: the cgroup2 tree, or the v1 hierarchy holding that controller.
Role = Literal["unified", "memory", "cpu", "cpuacct", "pids", "freezer"]
#: How a v1 memory limit keeps a job out of swap (see ``plan_v1_writes``).
SwapGuard = Literal["memsw", "swappiness"]

#: CFS bandwidth period; ``Limits.cpus`` is the share of it a job may run, across all CPUs.
CPU_PERIOD_US = 100_000
#: The kernel refuses a CFS quota below 1 ms.
MIN_CPU_QUOTA_US = 1_000
MAX_CPUS = 1024
#: Name of the leaf the daemon moves itself into on cgroup2 (see ``CgroupManager.setup``).
DAEMON_LEAF = "daemon"

# The cgroup2 controllers a job's limits need, in the order they are enabled.
_V2_CONTROLLERS = ("memory", "cpu", "pids")
# v1 hierarchies a job always joins, when mounted, for accounting; "cpu" only for a CPU limit.
_V1_ACCOUNTING: tuple[Role, ...] = ("memory", "cpuacct", "pids")
# Job ids and the parent name become directory names: keep them one safe path component.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# How long remove() keeps retrying rmdir while just-killed processes finish exiting.
_REMOVE_RETRY_S = 1.0
# Passes over the daemon's cgroup when moving its processes into the leaf; each pass moves
# everything listed, so more than a few only happen if something forks without pause.
_MOVE_PASSES = 20


# --------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class Limits:
    """Resource limits for one job; ``None`` means no limit of that kind."""

    #: RAM plus swap: a job at its limit is OOM-killed rather than pushed out into swap.
    memory_bytes: int | None = None
    #: Share of CPU time, e.g. 0.5 = half of one CPU (a CFS quota over a 100 ms period).
    cpus: float | None = None
    #: Most tasks (processes and threads) alive at once; stops fork bombs.
    pids: int | None = None

    def __post_init__(self) -> None:
        if self.memory_bytes is not None and self.memory_bytes < 1:
            raise RequestError("invalid memory limit: it must be at least one byte, e.g. 512M")
        if self.cpus is not None and not 0.01 <= self.cpus <= MAX_CPUS:
            raise RequestError(f"invalid CPU limit: use 0.01 to {MAX_CPUS} CPUs, e.g. 0.5")
        if self.pids is not None and self.pids < 1:
            raise RequestError("invalid process limit: it must be at least 1")


@dataclass(frozen=True)
class ResourceUsage:
    """What a job used; ``None`` where this host's kernel cannot tell (never a guess)."""

    cpu_user_s: float | None
    cpu_system_s: float | None
    memory_peak_bytes: int | None
    pids_peak: int | None
    #: The kernel OOM-killed a process of the job (False also when the host cannot tell).
    oom_killed: bool


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


class ControlWrite(NamedTuple):
    """One value to write into one control file of a job's cgroup."""

    role: Role
    file: str
    value: str


# --------------------------------------------------------------------------------------------
# Pure: layout detection


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


def load_cgroup_layout() -> CgroupLayout:
    """Detect the layout of the running host, for the calling process."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            mountinfo = f.read()
        with open("/proc/self/cgroup", encoding="utf-8") as f:
            own = f.read()
    except OSError as exc:
        raise CgroupError(f"cannot read the process's cgroup information: {exc.strerror}") from exc
    return detect_cgroup_layout(mountinfo, own)


# --------------------------------------------------------------------------------------------
# Pure: limits as control-file writes


def cpu_quota_us(cpus: float) -> int:
    """The CFS quota, per ``CPU_PERIOD_US``, that gives *cpus* CPUs' worth of time."""
    return max(MIN_CPU_QUOTA_US, round(cpus * CPU_PERIOD_US))


def plan_v2_writes(limits: Limits) -> tuple[ControlWrite, ...]:
    """The cgroup2 control-file writes that apply *limits*, in order."""
    writes = []
    if limits.memory_bytes is not None:
        writes.append(ControlWrite("unified", "memory.max", str(limits.memory_bytes)))
        # memory.max bounds RAM only; without a zero swap.max a job at its limit would keep
        # going by swapping, which is both slower for the host and a way round the limit.
        writes.append(ControlWrite("unified", "memory.swap.max", "0"))
    if limits.cpus is not None:
        quota = cpu_quota_us(limits.cpus)
        writes.append(ControlWrite("unified", "cpu.max", f"{quota} {CPU_PERIOD_US}"))
    if limits.pids is not None:
        writes.append(ControlWrite("unified", "pids.max", str(limits.pids)))
    return tuple(writes)


def plan_v1_writes(limits: Limits, swap_guard: SwapGuard) -> tuple[ControlWrite, ...]:
    """The cgroup v1 control-file writes that apply *limits*, in order.

    *swap_guard* says how swap is kept out of a memory limit: "memsw" (swap accounting is on)
    caps RAM + swap together; "swappiness" (it is off, so there is no memsw file) sets the job's
    swappiness to 0, which stops reclaim at the job's limit from swapping its memory out.
    """
    writes = []
    if limits.memory_bytes is not None:
        size = str(limits.memory_bytes)
        # limit_in_bytes first: the kernel refuses a memsw limit below the memory limit, and a
        # fresh cgroup's memory limit is "unlimited".
        writes.append(ControlWrite("memory", "memory.limit_in_bytes", size))
        if swap_guard == "memsw":
            writes.append(ControlWrite("memory", "memory.memsw.limit_in_bytes", size))
        else:
            writes.append(ControlWrite("memory", "memory.swappiness", "0"))
    if limits.cpus is not None:
        writes.append(ControlWrite("cpu", "cpu.cfs_period_us", str(CPU_PERIOD_US)))
        writes.append(ControlWrite("cpu", "cpu.cfs_quota_us", str(cpu_quota_us(limits.cpus))))
    if limits.pids is not None:
        writes.append(ControlWrite("pids", "pids.max", str(limits.pids)))
    return tuple(writes)


# --------------------------------------------------------------------------------------------
# Pure: reading control files


def parse_keyed_counters(text: str) -> dict[str, int]:
    """Parse "key value" lines (cpu.stat, memory.events, memory.oom_control, cpuacct.stat)."""
    counters = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            counters[parts[0]] = int(parts[1])
    return counters


def parse_counter(text: str) -> int | None:
    """Parse a file holding one number (memory.peak, pids.peak); None if it is not one."""
    value = text.strip()
    return int(value) if value.isdigit() else None


def parse_pids(text: str) -> list[int]:
    """Parse a cgroup.procs file."""
    return [int(word) for word in text.split() if word.isdigit()]


def usage_from_v2(
    cpu_stat: str | None, memory_peak: str | None, pids_peak: str | None, memory_events: str | None
) -> ResourceUsage:
    """A job's usage from its cgroup2 files (None for files that do not exist)."""
    cpu = parse_keyed_counters(cpu_stat) if cpu_stat is not None else {}
    events = parse_keyed_counters(memory_events) if memory_events is not None else {}
    return ResourceUsage(
        cpu_user_s=_usec_to_s(cpu.get("user_usec")),
        cpu_system_s=_usec_to_s(cpu.get("system_usec")),
        memory_peak_bytes=parse_counter(memory_peak) if memory_peak is not None else None,
        pids_peak=parse_counter(pids_peak) if pids_peak is not None else None,
        oom_killed=events.get("oom_kill", 0) > 0,
    )


def _usec_to_s(usec: int | None) -> float | None:
    return None if usec is None else usec / 1e6


# --------------------------------------------------------------------------------------------
# I/O


class CgroupFs:
    """Every cgroupfs access netjail makes, in one place, so that tests can emulate kernfs.

    Methods raise OSError; ``CgroupManager`` and ``JobCgroup`` map it to CgroupError.
    """

    def make_dir(self, path: str) -> None:
        """Create a cgroup (the kernel fills the directory with control files)."""
        os.mkdir(path, 0o755)

    def remove_dir(self, path: str) -> None:
        """Remove an empty cgroup (control files go with it); EBUSY while it has processes."""
        os.rmdir(path)

    def write(self, path: str, value: str) -> None:
        """Write *value* to a control file."""
        # Never O_CREAT: a missing control file means a missing controller or kernel feature,
        # which must be an error, not a stray regular file. One write() call, because kernfs
        # takes each write as one complete value.
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode("ascii"))
        finally:
            os.close(fd)

    def read(self, path: str) -> str:
        """Read a control file."""
        with open(path, encoding="ascii") as f:
            return f.read()

    def exists(self, path: str) -> bool:
        """Whether a control file or cgroup exists."""
        return os.path.exists(path)


def _cgroup_error(action: str, path: str, exc: OSError, hint: str = "") -> CgroupError:
    """The one place an OSError from cgroupfs becomes a CgroupError."""
    reason = exc.strerror or errno.errorcode.get(exc.errno or 0, type(exc).__name__)
    return CgroupError(f"cannot {action} {path}: {reason}" + (f"; {hint}" if hint else ""))


def _check_name(name: str, what: str) -> None:
    if not _NAME_RE.fullmatch(name) or name in (".", ".."):
        raise CgroupError(
            f"invalid {what} {name[:64]!r}: use 1-64 letters, digits, '_', '.' or '-'"
        )


def _unique(paths: Iterable[str]) -> list[str]:
    # cpu and cpuacct are often one hierarchy (mounted together), hence one directory.
    return list(dict.fromkeys(paths))


_DELEGATION_HINT = (
    "netjaild must run as root in a cgroup it may manage (under systemd: Delegate=yes)"
)


class CgroupManager:
    """Creates and finds job cgroups under a parent cgroup the daemon owns.

    *root* is prefixed to every cgroupfs path (tests point it at a fake tree); *fs* performs
    the file I/O.
    """

    def __init__(
        self,
        layout: CgroupLayout,
        *,
        root: str = "/",
        parent_name: str = "netjail",
        fs: CgroupFs | None = None,
    ) -> None:
        _check_name(parent_name, "parent cgroup name")
        if parent_name == DAEMON_LEAF:
            raise CgroupError(f"invalid parent cgroup name {parent_name!r}: it is reserved")
        self.layout = layout
        self.mode: CgroupMode = layout.mode
        self.parent_name = parent_name
        self._root = root
        self._fs = fs if fs is not None else CgroupFs()
        self._own_unified: str | None = None
        #: The parent cgroup of all jobs, per role (cpu and cpuacct may share a directory).
        self._parents: dict[Role, str] = {}
        if layout.unified_mount is not None and layout.unified_own_cgroup is not None:
            self._own_unified = self._path(layout.unified_mount, layout.unified_own_cgroup)
            self._parents["unified"] = os.path.join(self._own_unified, parent_name)
        if self.mode != "v2":
            roles: tuple[Role, ...] = ("freezer", "memory", "cpu", "cpuacct", "pids")
            for role in roles:
                hierarchy = layout.v1_hierarchy(role)
                # The freezer is only used where there is no cgroup.kill: pure v1.
                if hierarchy is not None and (role != "freezer" or self.mode == "v1"):
                    own = self._path(hierarchy.mount_point, hierarchy.own_cgroup)
                    self._parents[role] = os.path.join(own, parent_name)

    def _path(self, mount_point: str, cgroup: str) -> str:
        return os.path.normpath(
            os.path.join(self._root, mount_point.lstrip("/"), cgroup.lstrip("/"))
        )

    @property
    def parent_dirs(self) -> tuple[str, ...]:
        """The daemon-owned parent cgroup directories, one per hierarchy used."""
        return tuple(_unique(self._parents.values()))

    # -- setup and teardown ------------------------------------------------------------------

    def setup(self) -> None:
        """Create the parent cgroups; on cgroup2, make the daemon's cgroup able to hold them.

        Idempotent, so a restarted daemon reuses what it made before.
        """
        if self.mode == "v1" and "freezer" not in self._parents:
            raise CgroupError(
                "cgroup v1 without a freezer hierarchy: netjail could not kill a job reliably;"
                " mount the freezer controller or use cgroup2"
            )
        if self.mode == "v2":
            self._setup_v2()
            return
        for path in self.parent_dirs:
            self._make_dir_exist_ok(path)

    def _setup_v2(self) -> None:
        own = self._own_unified
        if own is None:  # cannot happen: detect_cgroup_layout says v2 only with a cgroup2 tree
            raise CgroupError("cgroup2 mode without a cgroup2 mount; this is a netjail bug")
        parent = self._parents["unified"]
        available = self._read_words(os.path.join(own, "cgroup.controllers"))
        # Enable what the daemon's cgroup was given; create_job refuses a limit whose
        # controller is missing, so nothing is silently left unlimited.
        wanted = [c for c in _V2_CONTROLLERS if c in available]
        enabled = self._read_words(os.path.join(own, "cgroup.subtree_control"))
        if any(c not in enabled for c in wanted):
            # cgroup2's "no internal processes" rule: a cgroup that hands controllers to its
            # children may not hold processes itself. The kernel's root cgroup is exempt, and
            # is the only one without cgroup.type.
            if self._fs.exists(os.path.join(own, "cgroup.type")):
                self._move_processes_to_leaf(own)
            self._enable_controllers(own, [c for c in wanted if c not in enabled])
        self._make_dir_exist_ok(parent)
        parent_enabled = self._read_words(os.path.join(parent, "cgroup.subtree_control"))
        self._enable_controllers(parent, [c for c in wanted if c not in parent_enabled])

    def _move_processes_to_leaf(self, own: str) -> None:
        leaf = os.path.join(own, DAEMON_LEAF)
        self._make_dir_exist_ok(leaf)
        leaf_procs = os.path.join(leaf, "cgroup.procs")
        for _ in range(_MOVE_PASSES):
            pids = parse_pids(self._read(os.path.join(own, "cgroup.procs")))
            if not pids:
                return
            for pid in pids:
                try:
                    self._fs.write(leaf_procs, str(pid))
                except ProcessLookupError:
                    continue  # it exited meanwhile
                except OSError as exc:
                    raise _cgroup_error(
                        f"move process {pid} into", leaf, exc, _DELEGATION_HINT
                    ) from exc
        raise CgroupError(f"cannot empty {own}: processes keep appearing in it; {_DELEGATION_HINT}")

    def _enable_controllers(self, cgroup: str, controllers: Iterable[str]) -> None:
        path = os.path.join(cgroup, "cgroup.subtree_control")
        for controller in controllers:
            try:
                self._fs.write(path, f"+{controller}")
            except OSError as exc:
                raise _cgroup_error(
                    f"enable the {controller} controller in", cgroup, exc, _DELEGATION_HINT
                ) from exc

    def teardown(self) -> None:
        """Remove the parent cgroups; CgroupError if job cgroups remain in them."""
        for path in self.parent_dirs:
            try:
                self._fs.remove_dir(path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise _cgroup_error(
                    "remove", path, exc, "remove the job cgroups in it first"
                ) from exc

    # -- jobs --------------------------------------------------------------------------------

    def create_job(self, job_id: str, limits: Limits) -> JobCgroup:
        """Create job *job_id*'s cgroups with *limits* applied.

        On failure raises CgroupError and leaves nothing behind.
        """
        _check_name(job_id, "job id")
        dirs = {role: os.path.join(self._parents[role], job_id) for role in self._roles(limits)}
        created: list[str] = []
        try:
            for path in _unique(dirs.values()):
                try:
                    self._fs.make_dir(path)
                except OSError as exc:
                    raise _cgroup_error("create cgroup", path, exc) from exc
                created.append(path)
            for write in self._plan(dirs, limits):
                self._write_control(dirs[write.role], write)
        except BaseException:
            for path in reversed(created):
                # A fresh cgroup holds no process yet, so rmdir succeeds; if it still does
                # not, the original error is the one worth reporting.
                with contextlib.suppress(OSError):
                    self._fs.remove_dir(path)
            raise
        return JobCgroup(job_id, self.mode, dirs, fs=self._fs)

    def _roles(self, limits: Limits) -> list[Role]:
        """The hierarchies a job with *limits* joins; the one used to list and kill first."""
        needed: dict[str, bool] = {
            "memory": limits.memory_bytes is not None,
            "cpu": limits.cpus is not None,
            "pids": limits.pids is not None,
        }
        if self.mode == "v2":
            parent = self._parents["unified"]
            enabled = self._read_words(os.path.join(parent, "cgroup.subtree_control"))
            for controller, is_needed in needed.items():
                if is_needed and controller not in enabled:
                    raise CgroupError(
                        f"cannot apply the {controller} limit: the {controller} controller is"
                        f" not enabled in {parent}; {_DELEGATION_HINT}"
                    )
            return ["unified"]
        roles: list[Role] = ["unified" if self.mode == "hybrid" else "freezer"]
        if roles[0] not in self._parents:
            raise CgroupError(
                f"cannot create a job cgroup: no {roles[0]} hierarchy is mounted to list and"
                " kill its processes by"
            )
        for controller, is_needed in needed.items():
            if is_needed and controller not in self._parents:
                raise CgroupError(
                    f"cannot apply the {controller} limit: no cgroup v1 {controller} hierarchy"
                    " is mounted"
                )
        candidates: tuple[Role, ...] = ("memory", "cpu", "cpuacct", "pids")
        for role in candidates:
            if role in self._parents and (role in _V1_ACCOUNTING or needed.get(role)):
                roles.append(role)
        return roles

    def _plan(self, dirs: Mapping[Role, str], limits: Limits) -> tuple[ControlWrite, ...]:
        if self.mode == "v2":
            writes = plan_v2_writes(limits)
            # With oom.group the kernel's OOM killer takes the whole job, not one process of
            # it, so a job never carries on half-killed in a state nobody tested.
            if self._fs.exists(os.path.join(dirs["unified"], "memory.oom.group")):
                writes += (ControlWrite("unified", "memory.oom.group", "1"),)
            return writes
        memory = dirs.get("memory")
        memsw = memory is not None and self._fs.exists(
            os.path.join(memory, "memory.memsw.limit_in_bytes")
        )
        return plan_v1_writes(limits, "memsw" if memsw else "swappiness")

    def _write_control(self, cgroup: str, write: ControlWrite) -> None:
        path = os.path.join(cgroup, write.file)
        try:
            self._fs.write(path, write.value)
        except FileNotFoundError as exc:
            raise CgroupError(
                f"cannot set {write.file} to {write.value} in {cgroup}: the file does not exist"
                " (this kernel lacks the control, or its controller is not enabled)"
            ) from exc
        except OSError as exc:
            raise _cgroup_error(f"set {write.file} to {write.value} in", cgroup, exc) from exc

    def leftover_job_ids(self) -> list[str]:
        """Ids of the job cgroups under the parent cgroups, e.g. left by a crashed daemon."""
        ids: set[str] = set()
        for parent in self.parent_dirs:
            try:
                with os.scandir(parent) as entries:
                    ids.update(
                        e.name
                        for e in entries
                        if e.is_dir(follow_symlinks=False) and _NAME_RE.fullmatch(e.name)
                    )
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise _cgroup_error("list", parent, exc) from exc
        return sorted(ids)

    def open_job(self, job_id: str) -> JobCgroup:
        """The existing cgroups of job *job_id* (e.g. a leftover), to kill and remove it."""
        _check_name(job_id, "job id")
        dirs = {
            role: os.path.join(parent, job_id)
            for role, parent in self._parents.items()
            if self._fs.exists(os.path.join(parent, job_id))
        }
        if not dirs:
            raise CgroupError(f"no cgroup exists for job {job_id}")
        return JobCgroup(job_id, self.mode, dirs, fs=self._fs)

    # -- helpers -----------------------------------------------------------------------------

    def _make_dir_exist_ok(self, path: str) -> None:
        try:
            self._fs.make_dir(path)
        except FileExistsError:
            pass
        except OSError as exc:
            raise _cgroup_error("create cgroup", path, exc, _DELEGATION_HINT) from exc

    def _read(self, path: str) -> str:
        try:
            return self._fs.read(path)
        except OSError as exc:
            raise _cgroup_error("read", path, exc) from exc

    def _read_words(self, path: str) -> set[str]:
        return set(self._read(path).split())


def _gone(exc: OSError) -> bool:
    """The cgroup was removed while we used it: an open control file then gives ENODEV."""
    return exc.errno in (errno.ENOENT, errno.ENODEV)


class JobCgroup:
    """The cgroups of one job, in every hierarchy it joined."""

    def __init__(
        self, job_id: str, mode: CgroupMode, dirs: Mapping[Role, str], *, fs: CgroupFs
    ) -> None:
        self.job_id = job_id
        self.mode: CgroupMode = mode
        self._dirs: dict[Role, str] = dict(dirs)
        self._fs = fs
        #: The job's cgroup directories; the one used to list and kill processes first.
        self.directories: tuple[str, ...] = tuple(_unique(self._dirs.values()))
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
            for cgroup, _subdirs, _files in os.walk(top):
                try:
                    found.update(parse_pids(self._fs.read(os.path.join(cgroup, "cgroup.procs"))))
                except OSError as exc:
                    if _gone(exc):
                        continue  # removed while we looked: it holds nobody
                    raise _cgroup_error("list the processes of", cgroup, exc) from exc
        return sorted(found)

    def contains(self, pid: int) -> bool:
        """Whether process *pid* is in the job's cgroups."""
        return pid in self.pids()

    def kill_all(self, timeout: float = 2.0) -> None:
        """SIGKILL every process of the job and wait until none is left.

        Raises CgroupError if processes remain after *timeout* seconds.
        """
        deadline = time.monotonic() + timeout
        unified = self._dirs.get("unified")
        if unified is not None and self._fs.exists(os.path.join(unified, "cgroup.kill")):
            # cgroup.kill (5.14+) kills the whole subtree in the kernel, with forks blocked
            # meanwhile: no race with a job that forks while we look at its process list.
            self._kill_with_cgroup_kill(unified, deadline)
        elif unified is not None:
            # cgroup2 before 5.14: freeze instead, as on v1.
            self._kill_frozen(unified, "cgroup.freeze", ("1", "0"), deadline)
        elif "freezer" in self._dirs:
            self._kill_frozen(
                self._dirs["freezer"], "freezer.state", ("FROZEN", "THAWED"), deadline
            )
        else:
            raise CgroupError(f"cannot kill job {self.job_id}: it has no cgroup to kill it by")

    def _kill_with_cgroup_kill(self, cgroup: str, deadline: float) -> None:
        kill_file = os.path.join(cgroup, "cgroup.kill")
        delay = 0.002
        while True:
            try:
                self._fs.write(kill_file, "1")
            except OSError as exc:
                if not _gone(exc):  # removed meanwhile means already empty
                    raise _cgroup_error("kill the processes of", cgroup, exc) from exc
            if not self.pids():
                return
            # Killed processes leave the cgroup as they finish exiting; writing again also
            # catches one that got into a hierarchy while we waited.
            if time.monotonic() >= deadline:
                self._raise_not_empty()
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _kill_frozen(
        self, cgroup: str, state_file: str, values: tuple[str, str], deadline: float
    ) -> None:
        # Without cgroup.kill, killing by pid is only safe while the job is frozen: a frozen
        # process can neither fork a child we have not seen nor exit and have its pid reused.
        frozen, thawed = values
        state_path = os.path.join(cgroup, state_file)
        while self.pids():
            if time.monotonic() >= deadline:
                self._raise_not_empty()
            try:
                self._fs.write(state_path, frozen)
                self._wait_frozen(cgroup, state_file, deadline)
                for pid in self.pids():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            except OSError as exc:
                raise _cgroup_error("freeze and kill the processes of", cgroup, exc) from exc
            finally:
                # A SIGKILLed frozen process dies only once thawed, so always thaw.
                with contextlib.suppress(OSError):
                    self._fs.write(state_path, thawed)
            time.sleep(0.01)

    def _wait_frozen(self, cgroup: str, state_file: str, deadline: float) -> None:
        # Freezing is asynchronous (v1 reports FREEZING, v2 "frozen 0" in cgroup.events). If
        # it does not finish in time (a task stuck in the kernel), kill anyway: the pids just
        # read stay valid unless a process exits and its pid is reused within microseconds.
        while time.monotonic() < deadline:
            if state_file == "freezer.state":
                if self._fs.read(os.path.join(cgroup, state_file)).strip() == "FROZEN":
                    return
            elif parse_keyed_counters(self._fs.read(os.path.join(cgroup, "cgroup.events"))).get(
                "frozen"
            ):
                return
            time.sleep(0.002)

    def _raise_not_empty(self) -> None:
        left = self.pids()
        raise CgroupError(
            f"job {self.job_id} still has {len(left)} process(es) after being killed"
            f" (pids {', '.join(map(str, left[:8]))}); they may be stuck in the kernel"
        )

    # -- accounting --------------------------------------------------------------------------

    def usage(self) -> ResourceUsage:
        """What the job used so far; None for what this host cannot tell."""
        if self.mode == "v2":
            cgroup = self._dirs["unified"]
            return usage_from_v2(
                self._read_optional(cgroup, "cpu.stat"),
                self._read_optional(cgroup, "memory.peak"),
                self._read_optional(cgroup, "pids.peak"),
                self._read_optional(cgroup, "memory.events"),
            )
        user_s, system_s = self._v1_cpu_seconds()
        peak = self._read_optional(self._dirs.get("memory"), "memory.max_usage_in_bytes")
        oom = self._read_optional(self._dirs.get("memory"), "memory.oom_control")
        pids_peak = self._read_optional(self._dirs.get("pids"), "pids.peak")
        return ResourceUsage(
            cpu_user_s=user_s,
            cpu_system_s=system_s,
            memory_peak_bytes=parse_counter(peak) if peak is not None else None,
            pids_peak=parse_counter(pids_peak) if pids_peak is not None else None,
            oom_killed=oom is not None and parse_keyed_counters(oom).get("oom_kill", 0) > 0,
        )

    def _v1_cpu_seconds(self) -> tuple[float | None, float | None]:
        cpuacct = self._dirs.get("cpuacct")
        user_ns = self._read_optional(cpuacct, "cpuacct.usage_user")
        sys_ns = self._read_optional(cpuacct, "cpuacct.usage_sys")
        if user_ns is not None and sys_ns is not None:
            user, system = parse_counter(user_ns), parse_counter(sys_ns)
            return (
                None if user is None else user / 1e9,
                None if system is None else system / 1e9,
            )
        stat = self._read_optional(cpuacct, "cpuacct.stat")
        if stat is not None:
            # Older kernels only have cpuacct.stat, in clock ticks (USER_HZ).
            ticks = parse_keyed_counters(stat)
            hz = os.sysconf("SC_CLK_TCK")
            user_t, system_t = ticks.get("user"), ticks.get("system")
            return (
                None if user_t is None else user_t / hz,
                None if system_t is None else system_t / hz,
            )
        # No cpuacct hierarchy: the cgroup2 tree of a hybrid host still counts CPU time.
        cpu_stat = self._read_optional(self._dirs.get("unified"), "cpu.stat")
        if cpu_stat is not None:
            counters = parse_keyed_counters(cpu_stat)
            return _usec_to_s(counters.get("user_usec")), _usec_to_s(counters.get("system_usec"))
        return None, None

    def _read_optional(self, cgroup: str | None, name: str) -> str | None:
        # Accounting must never fail a job's report: a file this kernel lacks, or one that went
        # away with its cgroup, is reported as unknown.
        if cgroup is None:
            return None
        try:
            return self._fs.read(os.path.join(cgroup, name))
        except OSError:
            return None

    # -- removal -----------------------------------------------------------------------------

    def remove(self) -> None:
        """Remove the job's cgroups in every hierarchy; idempotent.

        Retries briefly while just-killed processes finish leaving; CgroupError if a cgroup
        still cannot be removed.
        """
        deadline = time.monotonic() + _REMOVE_RETRY_S
        for top in self.directories:
            # Bottom-up, in case the job made cgroups of its own below its cgroup.
            for cgroup, _subdirs, _files in os.walk(top, topdown=False):
                self._remove_one(cgroup, deadline)

    def _remove_one(self, cgroup: str, deadline: float) -> None:
        while True:
            try:
                self._fs.remove_dir(cgroup)
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                    raise _cgroup_error(
                        "remove", cgroup, exc, "kill the job's processes first"
                    ) from exc
            time.sleep(0.02)
