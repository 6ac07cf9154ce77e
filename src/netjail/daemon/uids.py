"""A uid per job: leases over the configured range ``job_uids`` (uid = gid), kept on disk.

Each root job runs as a uid of its own, so jobs cannot signal or ptrace each other. The rule
that makes this hold: **a uid is not reused while any process of an earlier job holding it
could still exist.** The allocator cannot see processes, so the API puts the rule on the one
call that can: ``release(lease)`` is called only once the job's cgroup is empty and removed
(the end of teardown, or recovery once a crashed run's leftovers are killed). Until then the
uid stays leased, even across a daemon crash. On top of that, ``lease`` prefers the
least-recently-released uid (never-used ones first), which widens the gap between two jobs
on one uid for anything the rule does not cover.

Leases are files in ``<state_dir>/uids``, one per lease, named ``<uid>.<job id>`` and empty:
created with O_EXCL and removed on release, so a record is never half-written and needs no
rename. No fsync: a daemon crash keeps the page cache, and a power loss, which may lose a
record, also ends every process that could hold the uid.

Numbers listed in /etc/passwd or /etc/group (as a uid or a gid) are skipped; they are read when
the allocator is made. Two daemons on one host need disjoint ranges: each knows only its own
state directory.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
from dataclasses import dataclass

from netjail.errors import BusyError, ConfigError, JailError, map_os_errors
from netjail.jobid import is_job_id

#: The config key, and its default: systemd's DynamicUser range, below nobody (65534).
JOB_UIDS_KEY = "job_uids"
DEFAULT_JOB_UIDS = "61184-65519"
#: Where the lease records live, under the state directory.
LEASE_DIRECTORY = "uids"

_RANGE = re.compile(r"(0|[1-9][0-9]{0,9})-(0|[1-9][0-9]{0,9})")
#: uid 0 is root; 65535 is (uint16)-1 and 4294967295 is (uid_t)-1, both "no uid" to the kernel
#: and to tools. A job range must contain none of them.
_NEVER_JOB_UIDS = (0, 65535, 4294967295)
_RECORD = re.compile(r"([0-9]{1,10})\.([a-z0-9-]{1,32})")


@dataclass(frozen=True)
class UidRange:
    """The inclusive range of uids jobs may lease."""

    first: int
    last: int

    def __str__(self) -> str:
        return f"{self.first}-{self.last}"

    def __contains__(self, uid: object) -> bool:
        return isinstance(uid, int) and self.first <= uid <= self.last

    def __len__(self) -> int:
        return self.last - self.first + 1


def parse_uid_range(text: str, key: str = JOB_UIDS_KEY) -> UidRange:
    """``"FIRST-LAST"`` (decimal, no spaces or signs) as a UidRange; ConfigError naming ``key``."""
    match = _RANGE.fullmatch(text)
    if match is None:
        raise ConfigError(
            f"{key}: expected a uid range 'FIRST-LAST' such as '61184-65519', got {text!r}"
        )
    first, last = int(match[1]), int(match[2])
    if first > last:
        raise ConfigError(f"{key}: range {text!r} ends before it starts")
    reserved = [uid for uid in _NEVER_JOB_UIDS if first <= uid <= last]
    if reserved:
        raise ConfigError(f"{key}: range {text!r} contains uid {reserved[0]}, which no job may use")
    return UidRange(first, last)


def parse_id_database(text: str) -> frozenset[int]:
    """Every uid and gid in /etc/passwd or /etc/group text (fields 3 and, for passwd, 4)."""
    found: set[int] = set()
    for line in text.splitlines():
        fields = line.split(":")
        # NIS "+"/"-" lines and malformed ones name no number; skip them.
        for field in fields[2:4]:
            if field.isdigit():
                found.add(int(field))
    return frozenset(found)


def read_listed_ids(
    users_file: str = "/etc/passwd", groups_file: str = "/etc/group"
) -> frozenset[int]:
    """The uids and gids /etc/passwd and /etc/group list; ConfigError if either is unreadable."""
    listed: set[int] = set()
    for path in (users_file, groups_file):
        with map_os_errors(ConfigError, f"{JOB_UIDS_KEY}: reading {path}"), open(path) as f:
            listed |= parse_id_database(f.read())
    return frozenset(listed)


@dataclass(frozen=True)
class Lease:
    """``job_id`` holds ``uid`` (and the gid of the same number) until it is released."""

    uid: int
    job_id: str

    @property
    def gid(self) -> int:
        return self.uid


class UidLeases:
    """The allocator: hands out leases, persists them, and finds those a crashed run left."""

    def __init__(self, uid_range: UidRange, state_dir: str, listed_ids: frozenset[int]) -> None:
        """Over ``uid_range`` minus ``listed_ids``, with records in ``<state_dir>/uids``.

        Records already there (a previous run's) keep their uids out of use until ``recover``
        hands them to the caller and the caller releases them.
        """
        self.uid_range = uid_range
        self.directory = os.path.join(state_dir, LEASE_DIRECTORY)
        self._listed = listed_ids
        with map_os_errors(JailError, f"job uids: creating {self.directory}"):
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
        #: Never leased by this run: taken in ascending order from here, before any released.
        self._next_fresh = uid_range.first
        #: Released by this run, oldest release first.
        self._released: collections.deque[int] = collections.deque()
        self._held: dict[int, Lease] = {}
        self._stale: list[Lease] = []
        for lease in self._read_records():
            self._held[lease.uid] = lease
            self._stale.append(lease)

    @classmethod
    def open(
        cls,
        uid_range: UidRange,
        state_dir: str,
        users_file: str = "/etc/passwd",
        groups_file: str = "/etc/group",
    ) -> UidLeases:
        """An allocator that skips what the passwd and group files list, read now."""
        return cls(uid_range, state_dir, read_listed_ids(users_file, groups_file))

    def _read_records(self) -> list[Lease]:
        with map_os_errors(JailError, f"job uids: reading {self.directory}"):
            names = sorted(os.listdir(self.directory))
        leases = []
        for name in names:
            match = _RECORD.fullmatch(name)
            # Anything else is not a record of ours: never act on it.
            if match is not None and is_job_id(match[2]):
                leases.append(Lease(int(match[1]), match[2]))
        return leases

    def _path(self, lease: Lease) -> str:
        return os.path.join(self.directory, f"{lease.uid}.{lease.job_id}")

    @property
    def held(self) -> list[Lease]:
        """Every lease not yet released, stale ones included, by uid."""
        return [self._held[uid] for uid in sorted(self._held)]

    def _usable(self, uid: int) -> bool:
        return uid not in self._listed and uid not in self._held

    def _take_uid(self) -> int | None:
        while self._next_fresh <= self.uid_range.last:
            uid = self._next_fresh
            self._next_fresh += 1
            if self._usable(uid):
                return uid
        # Every uid below the cursor that is not held or listed is in _released.
        return self._released.popleft() if self._released else None

    def lease(self, job_id: str) -> Lease:
        """A uid for ``job_id``, recorded on disk before it is returned.

        Raises BusyError when every uid of the range is leased (or listed), JailError if the
        record cannot be written (the job must not start: it would hold an unrecorded uid).
        """
        uid = self._take_uid()
        if uid is None:
            usable = len(self.uid_range) - sum(1 for n in self._listed if n in self.uid_range)
            raise BusyError(
                f"no job uid is free: all {usable} uids of {JOB_UIDS_KEY} {self.uid_range} are "
                "leased to jobs that have not ended; retry when one ends, or widen "
                f"{JOB_UIDS_KEY}"
            )
        lease = Lease(uid, job_id)
        try:
            with map_os_errors(JailError, f"job uid: recording uid {uid} for {job_id}"):
                os.close(os.open(self._path(lease), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except JailError:
            # Not handed out: first in line among released uids, for a later try.
            self._released.appendleft(uid)
            raise
        self._held[uid] = lease
        return lease

    def release(self, lease: Lease) -> None:
        """Return ``lease``'s uid. Only once no process of its job can exist: its cgroup is
        empty and removed.

        Idempotent: releasing a lease that is not held (already released, or the uid now
        leased to another job) does nothing. JailError if the record cannot be removed; the
        uid then stays leased, which is the safe side.
        """
        if self._held.get(lease.uid) != lease:
            return
        with (
            map_os_errors(JailError, f"job uid: removing the lease of uid {lease.uid}"),
            contextlib.suppress(FileNotFoundError),
        ):
            os.unlink(self._path(lease))
        del self._held[lease.uid]
        if lease in self._stale:
            self._stale.remove(lease)
        # A uid the cursor has not reached yet (a stale one) is taken from there, in order.
        if lease.uid in self.uid_range and lease.uid < self._next_fresh:
            self._released.append(lease.uid)

    def recover(self) -> list[Lease]:
        """The leases a previous run left (its records found at start), not yet released.

        They stay leased: the caller kills what is left of each job (its cgroup, and any
        process running as its uid) and then calls ``release`` for each, as for a live job.
        A record outside the current range is reported too; releasing it removes the record
        without putting the uid into use.
        """
        return list(self._stale)
