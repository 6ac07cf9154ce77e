"""Crash safety: a record per job, written before anything of it is built, and the sweep that
removes what a crashed daemon left behind.

Only jobs recorded in this daemon's own state directory are touched: another netjaild's jails
on the same machine are not ours. What cannot be removed is logged, never swallowed.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable

from netjail.daemon.uids import UidLeases
from netjail.jobid import is_job_id
from netjail.kernel import netns
from netjail.kernel.host import JailHost

Log = Callable[..., None]


class StateRecords:
    """One small JSON file per job under ``<state_dir>/jobs`` (mode 0700)."""

    def __init__(self, state_dir: str) -> None:
        self.directory = os.path.join(state_dir, "jobs")
        os.makedirs(self.directory, mode=0o700, exist_ok=True)

    def _path(self, job_id: str) -> str:
        return os.path.join(self.directory, f"{job_id}.json")

    def write(self, job_id: str, netns_name: str, started: float) -> None:
        """Record a job about to be built (the first step: a crash after it leaves a trace)."""
        with open(self._path(job_id), "w") as f:
            json.dump({"job": job_id, "netns": netns_name, "started": started}, f)

    def remove(self, job_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(job_id))

    def read_all(self, log: Log) -> list[tuple[str, str]]:
        """(job id, netns name) of every record; unreadable or foreign records are removed."""
        found: list[tuple[str, str]] = []
        for entry in sorted(os.listdir(self.directory)):
            path = os.path.join(self.directory, entry)
            try:
                with open(path) as f:
                    record = json.load(f)
                job_id, netns_name = str(record["job"]), str(record["netns"])
            except (OSError, ValueError, KeyError, TypeError):
                log("warning", "unreadable job state record removed", file=entry)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                continue
            if not is_job_id(job_id) or netns_name != f"{netns.NETNS_PREFIX}{job_id}":
                # Not a record of ours: never act on an arbitrary name or path.
                log("warning", "foreign job state record ignored", file=entry)
                continue
            found.append((job_id, netns_name))
        return found


def recover(
    host: JailHost, records: StateRecords, log: Log, uids: UidLeases, homes_dir: str
) -> list[str]:
    """Remove what recorded jobs left behind (after a crash); blocking. What was removed.

    A record is written before anything of its job is built, so every netns, cgroup, HOME,
    process and uid lease a crashed daemon could leave is found from it. A record is deleted,
    and its job's uid lease returned, only once its leftovers are gone; one that could not be
    cleaned up stays for the next start, and its uid stays out of use.
    """
    removed: list[str] = []
    leases = {lease.job_id: lease for lease in uids.recover()}
    leftover_cgroups = set(host.leftover_cgroups())
    leftover_netns = set(host.leftover_netns())
    unclean: set[str] = set()
    for job_id, netns_name in records.read_all(log):
        clean = True
        if job_id in leftover_cgroups:
            try:
                host.remove_leftover_cgroup(job_id)
                removed.append(f"cgroup of {job_id}")
            except Exception as e:
                clean = False
                log("error", "cannot remove a leftover cgroup", job=job_id, error=str(e))
        if netns_name in leftover_netns:
            try:
                host.kill_netns_processes(netns_name)
                host.delete_netns(netns_name)
                removed.append(f"netns {netns_name}")
            except Exception as e:
                clean = False
                log("error", "cannot remove a leftover netns", netns=netns_name, error=str(e))
        home = os.path.join(homes_dir, job_id)
        if os.path.lexists(home):
            try:
                host.remove_home(home)
                removed.append(f"home of {job_id}")
            except Exception as e:
                clean = False
                log("error", "cannot remove a leftover home", job=job_id, error=str(e))
        if clean:
            lease = leases.pop(job_id, None)
            if lease is not None:
                uids.release(lease)
                removed.append(f"uid {lease.uid} of {job_id}")
            records.remove(job_id)
        else:
            unclean.add(job_id)
    for lease in leases.values():
        # Leased after its record was written and released before it was removed, so a lease
        # with no record is one whose job was cleaned up but not released: nothing holds it.
        if lease.job_id not in unclean:
            uids.release(lease)
            removed.append(f"uid {lease.uid} of {lease.job_id}")
    return removed
