"""Where the CPU went during a run: per process from /proc/PID/stat deltas, kernel threads
included, grouped by role (the daemon, its helpers, the jobs, the kernel, everyone else).

A job's processes are short-lived: their CPU is counted where the kernel folds it, in the
reaper's ``cutime``/``cstime`` (the fork server reaps every init, and each init its command),
so "jobs" is the fork server's children's time. A process that started during the run counts
whole. Kernel threads are grouped by their name without the work item (``kworker/u8:2-netns``
is a kworker); the work they do for jobs (netns cleanup, cgroup destruction, RCU callbacks) is
not told apart from the rest of the machine's.

Each role's time is also split into user and system (kernel) time: the kernel's part (making
and destroying namespaces, devices, mounts and cgroups, page faults, exits) bounds the rate no
user-space work can raise.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from typing import Literal

_HZ = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class _Proc:
    comm: str
    ppid: int
    start: int
    #: (user, system) ticks: its own, and its reaped descendants'.
    own_parts: tuple[int, int]
    children_parts: tuple[int, int]

    @property
    def own(self) -> int:
        return sum(self.own_parts)

    def ticks(self, part: Part) -> tuple[int, int]:
        """(own, children) ticks of ``part``."""
        if part == "all":
            return self.own, sum(self.children_parts)
        index = 0 if part == "user" else 1
        return self.own_parts[index], self.children_parts[index]


#: Which CPU time: all of it, user space's, or the kernel's (system time).
Part = Literal["all", "user", "system"]


@dataclass(frozen=True)
class CpuSnapshot:
    procs: dict[int, _Proc]
    #: /proc/stat's first line: user, nice, system, idle, iowait, irq, softirq, steal.
    totals: tuple[int, ...]


def take_snapshot() -> CpuSnapshot:
    """Every process's CPU ticks so far, and the machine's."""
    procs = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (proc := _read_proc(int(name))) is not None:
            procs[int(name)] = proc
    with open("/proc/stat") as f:
        totals = tuple(int(x) for x in f.readline().split()[1:9])
    return CpuSnapshot(procs, totals)


def cpu_seconds(pid: int) -> float:
    """The CPU seconds process ``pid`` has used itself so far (OSError if it is gone)."""
    proc = _read_proc(pid)
    if proc is None:
        raise ProcessLookupError(pid)
    return proc.own / _HZ


def _read_proc(pid: int) -> _Proc | None:
    """Process ``pid``'s /proc/PID/stat; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    close = data.rindex(")")
    fields = data[close + 2 :].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return _Proc(
        comm=data[data.index("(") + 1 : close],
        ppid=int(fields[1]),
        start=int(fields[19]),
        own_parts=(utime, stime),
        children_parts=(cutime, cstime),
    )


def _kernel_thread(pid: int, proc: _Proc) -> bool:
    return pid == 2 or proc.ppid == 2


def cpu_by_role(
    before: CpuSnapshot, after: CpuSnapshot, roles: dict[int, str], part: Part = "all"
) -> Counter[str]:
    """CPU seconds (of ``part``) from ``before`` to ``after`` by role: ``roles`` names pids
    (their own time); their descendants' time, reaped or still running, is "<role>
    children"; kernel threads are "kernel threads"; everything else "other"."""
    used: Counter[str] = Counter()
    for pid, proc in after.procs.items():
        old = before.procs.get(pid)
        own, children = proc.ticks(part)
        if old is not None and old.start == proc.start:
            old_own, old_children = old.ticks(part)
            own, children = own - old_own, children - old_children
        if pid in roles:
            used[roles[pid]] += own
            used[f"{roles[pid]} children"] += children
        elif _kernel_thread(pid, proc):
            used["kernel threads"] += own
        else:
            ancestor = _role_ancestor(after, proc.ppid, roles)
            used[f"{ancestor} children" if ancestor else "other"] += own + children
    return Counter({role: ticks / _HZ for role, ticks in used.items()})


def _role_ancestor(snapshot: CpuSnapshot, pid: int, roles: dict[int, str]) -> str | None:
    seen = 0
    while pid > 1 and seen < 64:
        if pid in roles:
            return roles[pid]
        proc = snapshot.procs.get(pid)
        if proc is None:
            return None
        pid, seen = proc.ppid, seen + 1
    return None


def busy_share(before: CpuSnapshot, after: CpuSnapshot) -> tuple[float, float]:
    """(CPU seconds the machine had, the share of them that was busy) between the two."""
    deltas = [b - a for a, b in zip(before.totals, after.totals, strict=True)]
    whole = sum(deltas)
    idle = deltas[3] + deltas[4]
    return whole / _HZ, (whole - idle) / whole if whole else 0.0
