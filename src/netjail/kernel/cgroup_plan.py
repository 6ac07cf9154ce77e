"""What a job's cgroups are made of, as data (pure): limits, writes, roles, kill methods, usage.

The strategies (``cgroup_v2``, ``cgroup_hybrid``, ``cgroup_v1``) decide with these functions
and do the file I/O; everything here is tested on exact values, without a file system.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Literal, NamedTuple

from netjail.errors import CgroupError, RequestError
from netjail.units import MAX_CPUS, MIN_CPUS

#: Where a job cgroup lives: the cgroup2 tree, or the v1 hierarchy holding that controller.
Role = Literal["unified", "memory", "cpu", "cpuacct", "pids", "freezer"]
#: How a v1 memory limit keeps a job out of swap (see ``plan_v1_writes``).
SwapGuard = Literal["memsw", "swappiness"]

#: CFS bandwidth period; ``Limits.cpus`` is the share of it a job may run, across all CPUs.
CPU_PERIOD_US = 100_000
#: The kernel refuses a CFS quota below 1 ms (``units.MIN_CPUS`` is this share of the period).
MIN_CPU_QUOTA_US = 1_000

#: What to do when the kernel refuses to let the daemon manage its own cgroup.
DELEGATION_HINT = (
    "netjaild must run as root in a cgroup it may manage (under systemd: Delegate=yes)"
)

# v1 hierarchies a job always joins, when mounted, for accounting; "cpu" only for a CPU limit.
_V1_ACCOUNTING: tuple[Role, ...] = ("memory", "cpuacct", "pids")
# The v1 hierarchies a job may join besides the one that lists and kills it, in join order.
_V1_JOINABLE: tuple[Role, ...] = ("memory", "cpu", "cpuacct", "pids")


# --------------------------------------------------------------------------------------------
# Limits and usage


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
        if self.cpus is not None and not MIN_CPUS <= self.cpus <= MAX_CPUS:
            raise RequestError(
                f"invalid CPU limit: use {MIN_CPUS:g} to {MAX_CPUS:g} CPUs, e.g. 0.5"
            )
        if self.pids is not None and self.pids < 1:
            raise RequestError("invalid process limit: it must be at least 1")

    def controllers(self) -> tuple[str, ...]:
        """The controllers these limits need, of memory, cpu and pids, in that order."""
        needed = (
            ("memory", self.memory_bytes),
            ("cpu", self.cpus),
            ("pids", self.pids),
        )
        return tuple(controller for controller, limit in needed if limit is not None)


@dataclass(frozen=True)
class ResourceUsage:
    """What a job used; ``None`` where this host's kernel cannot tell (never a guess)."""

    cpu_user_s: float | None
    cpu_system_s: float | None
    memory_peak_bytes: int | None
    pids_peak: int | None
    #: The kernel OOM-killed a process of the job (False also when the host cannot tell).
    oom_killed: bool


class ControlWrite(NamedTuple):
    """One value to write into one control file of a job's cgroup."""

    role: Role
    file: str
    value: str


# --------------------------------------------------------------------------------------------
# Which cgroups a job joins


def unique_paths(paths: Iterable[str]) -> tuple[str, ...]:
    """*paths* without repeats, in order."""
    # cpu and cpuacct are often one hierarchy (mounted together), hence one directory.
    return tuple(dict.fromkeys(paths))


def check_v2_controllers(limits: Limits, enabled: Collection[str], parent: str) -> None:
    """CgroupError unless every controller *limits* need is *enabled* in *parent* (cgroup2)."""
    for controller in limits.controllers():
        if controller not in enabled:
            raise CgroupError(
                f"cannot apply the {controller} limit: the {controller} controller is not"
                f" enabled in {parent}; {DELEGATION_HINT}"
            )


def plan_v1_roles(tracker: Role, mounted: Collection[Role], limits: Limits) -> tuple[Role, ...]:
    """The v1 hierarchies a job with *limits* joins, *tracker* first; *mounted* are available.

    The *tracker* lists and kills the job's processes (the cgroup2 tree on hybrid, the freezer
    on v1). Memory, cpuacct and pids are joined whenever mounted (accounting), cpu only for a
    CPU limit. CgroupError if the tracker, or the hierarchy of a limit, is not mounted: a limit
    is never silently dropped.
    """
    if tracker not in mounted:
        raise CgroupError(
            f"cannot create a job cgroup: no {tracker} hierarchy is mounted to list and kill"
            " its processes by"
        )
    needed = limits.controllers()
    for controller in needed:
        if controller not in mounted:
            raise CgroupError(
                f"cannot apply the {controller} limit: no cgroup v1 {controller} hierarchy is"
                " mounted"
            )
    joined = (r for r in _V1_JOINABLE if r in mounted and (r in _V1_ACCOUNTING or r in needed))
    return (tracker, *joined)


# --------------------------------------------------------------------------------------------
# Limits as control-file writes


def cpu_quota_us(cpus: float) -> int:
    """The CFS quota, per ``CPU_PERIOD_US``, that gives *cpus* CPUs' worth of time."""
    return max(MIN_CPU_QUOTA_US, round(cpus * CPU_PERIOD_US))


def plan_v2_writes(limits: Limits, *, oom_group: bool) -> tuple[ControlWrite, ...]:
    """The cgroup2 control-file writes that apply *limits*, in order.

    *oom_group* says the kernel has ``memory.oom.group``, which is then set.
    """
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
    if oom_group:
        # With oom.group the kernel's OOM killer takes the whole job, not one process of it,
        # so a job never carries on half-killed in a state nobody tested.
        writes.append(ControlWrite("unified", "memory.oom.group", "1"))
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
# How a job is killed


@dataclass(frozen=True)
class Freezer:
    """A cgroup freezer: cgroup2's ``cgroup.freeze``, or the v1 ``freezer`` hierarchy."""

    #: The file written to freeze and to thaw, and the two values.
    state_file: str
    frozen: str
    thawed: str
    #: Freezing is asynchronous; this file tells when it is done, by ``is_frozen``.
    status_file: str
    is_frozen: Callable[[str], bool]


def _cgroup2_is_frozen(events: str) -> bool:
    return parse_keyed_counters(events).get("frozen") == 1


def _v1_is_frozen(state: str) -> bool:
    return state.strip() == "FROZEN"  # it reads FREEZING until every task has stopped


CGROUP2_FREEZER = Freezer("cgroup.freeze", "1", "0", "cgroup.events", _cgroup2_is_frozen)
V1_FREEZER = Freezer("freezer.state", "FROZEN", "THAWED", "freezer.state", _v1_is_frozen)


@dataclass(frozen=True)
class KillByCgroupKill:
    """Write ``cgroup.kill`` (5.14+): the kernel kills the whole subtree, forks blocked."""

    cgroup: str


@dataclass(frozen=True)
class KillByFreezing:
    """Freeze *cgroup*, SIGKILL every listed process, thaw, and repeat until it is empty."""

    cgroup: str
    freezer: Freezer


KillMethod = KillByCgroupKill | KillByFreezing


# --------------------------------------------------------------------------------------------
# Reading control files


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


def _optional_counter(text: str | None) -> int | None:
    return None if text is None else parse_counter(text)


def _usec_to_s(usec: int | None) -> float | None:
    return None if usec is None else usec / 1e6


def usage_from_v2(
    cpu_stat: str | None, memory_peak: str | None, pids_peak: str | None, memory_events: str | None
) -> ResourceUsage:
    """A job's usage from its cgroup2 files (None for files that do not exist)."""
    cpu = parse_keyed_counters(cpu_stat) if cpu_stat is not None else {}
    events = parse_keyed_counters(memory_events) if memory_events is not None else {}
    return ResourceUsage(
        cpu_user_s=_usec_to_s(cpu.get("user_usec")),
        cpu_system_s=_usec_to_s(cpu.get("system_usec")),
        memory_peak_bytes=_optional_counter(memory_peak),
        pids_peak=_optional_counter(pids_peak),
        oom_killed=events.get("oom_kill", 0) > 0,
    )


@dataclass(frozen=True)
class V1UsageFiles:
    """A job's cgroup v1 accounting files, as read; None for each that does not exist."""

    cpuacct_usage_user: str | None = None
    cpuacct_usage_sys: str | None = None
    #: Older kernels only have this one, in clock ticks.
    cpuacct_stat: str | None = None
    memory_max_usage_in_bytes: str | None = None
    memory_oom_control: str | None = None
    pids_peak: str | None = None
    #: The job's cgroup2 cpu.stat on a hybrid host: CPU time when no cpuacct is mounted.
    unified_cpu_stat: str | None = None


def usage_from_v1(files: V1UsageFiles, clock_ticks: int) -> ResourceUsage:
    """A job's usage from its v1 files; *clock_ticks* per second is the kernel's USER_HZ."""
    oom = files.memory_oom_control
    user_s, system_s = _v1_cpu_seconds(files, clock_ticks)
    return ResourceUsage(
        cpu_user_s=user_s,
        cpu_system_s=system_s,
        memory_peak_bytes=_optional_counter(files.memory_max_usage_in_bytes),
        pids_peak=_optional_counter(files.pids_peak),
        oom_killed=oom is not None and parse_keyed_counters(oom).get("oom_kill", 0) > 0,
    )


def _v1_cpu_seconds(files: V1UsageFiles, clock_ticks: int) -> tuple[float | None, float | None]:
    if files.cpuacct_usage_user is not None and files.cpuacct_usage_sys is not None:
        user_ns = parse_counter(files.cpuacct_usage_user)
        sys_ns = parse_counter(files.cpuacct_usage_sys)
        return (
            None if user_ns is None else user_ns / 1e9,
            None if sys_ns is None else sys_ns / 1e9,
        )
    if files.cpuacct_stat is not None:
        ticks = parse_keyed_counters(files.cpuacct_stat)
        user_t, system_t = ticks.get("user"), ticks.get("system")
        return (
            None if user_t is None else user_t / clock_ticks,
            None if system_t is None else system_t / clock_ticks,
        )
    if files.unified_cpu_stat is not None:
        counters = parse_keyed_counters(files.unified_cpu_stat)
        return _usec_to_s(counters.get("user_usec")), _usec_to_s(counters.get("system_usec"))
    return None, None
