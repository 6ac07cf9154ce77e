"""Copy-on-write ahead of the job: a standby init copies, while it waits, the pages its job's
steps will write.

A standby is a fork of the fork server, so every page of its Python heap is shared with the
fork server until written. After its plan comes, each page its steps write first (a
reference count, a frame, a small object) is copied then, on the job's path: about a hundred
faults, 0.3-0.4 ms of a warm job's 4-5 ms here. Copying every private page ahead does away
with them, but costs ~9 MB more per jail, held by each running job's init. So the fork
server learns which pages those steps write, and later standbys copy only those:

- a *learning* standby opens its own ``/proc/self/pagemap`` (it could not once its
  privileges are dropped) and notes which of its private writable pages it alone maps when it
  says ``ready`` (``PageWatch``); after its job's status record, it notes them again and
  writes the page numbers that are new to a pipe the fork server reads (``encode_pages``);
- the fork server merges what the first ``LEARN_FROM`` jobs wrote (``HotPages``), and every
  standby forked after copies those pages before it says ``ready`` (``populate``:
  ``madvise(MADV_POPULATE_WRITE)``), off the job's path. Forks share the fork server's
  address layout, so its page numbers are theirs.

It is only ahead-of-time work: a page list that is wrong or stale (the fork server's heap
moved) costs a few copies and faults, never a failure. On a kernel without
MADV_POPULATE_WRITE (before 5.14) nothing is copied ahead.
"""

from __future__ import annotations

import array
import contextlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from netjail.kernel import syscalls

__all__ = ["LEARN_FROM", "HotPages", "PageWatch", "decode_pages", "encode_pages", "populate"]

MADV_POPULATE_WRITE = 23
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
#: The most pages learned (16 MB of 4 KB pages): a bound on what a learner can make later
#: standbys copy, and on what the fork server reads.
MAX_PAGES = 4096
#: How many jobs' pages are merged before learning stops.
LEARN_FROM = 2
#: pagemap's bit for a page mapped by this process alone (since Linux 4.2).
_EXCLUSIVE = 1 << 56
_ENTRY = 8


def writable_ranges(maps: str) -> list[tuple[int, int]]:
    """The [first, end) page numbers of the private writable mappings in ``maps`` (the text of
    /proc/PID/maps): where copy-on-write happens."""
    ranges = []
    for line in maps.splitlines():
        fields = line.split(maxsplit=2)
        if len(fields) < 2 or fields[1] != "rw-p":
            continue
        low, _, high = fields[0].partition("-")
        ranges.append((int(low, 16) // PAGE_SIZE, int(high, 16) // PAGE_SIZE))
    return ranges


class PageWatch:
    """This process's private writable pages that it alone maps, at its creation and later:
    the difference is what it wrote (copied, or faulted in new) in between."""

    def __init__(self) -> None:
        with open("/proc/self/maps") as f:
            self._ranges = writable_ranges(f.read())
        self._pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        self._before = self._exclusive()

    def _exclusive(self) -> set[int]:
        pages: set[int] = set()
        for first, end in self._ranges:
            data = os.pread(self._pagemap, (end - first) * _ENTRY, first * _ENTRY)
            entries = array.array("Q", data[: len(data) - len(data) % _ENTRY])
            pages.update(first + i for i, entry in enumerate(entries) if entry & _EXCLUSIVE)
        return pages

    def written(self) -> list[int]:
        """The pages written since the watch began (at most MAX_PAGES); the watch ends."""
        try:
            return sorted(self._exclusive() - self._before)[:MAX_PAGES]
        finally:
            os.close(self._pagemap)


def encode_pages(pages: Sequence[int]) -> bytes:
    return array.array("Q", pages[:MAX_PAGES]).tobytes()


def decode_pages(data: bytes) -> list[int]:
    """The page numbers a learner sent; [] for anything malformed."""
    if len(data) % _ENTRY or len(data) > MAX_PAGES * _ENTRY:
        return []
    return list(array.array("Q", data))


def page_runs(pages: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted ``pages`` as (first page, count) runs of consecutive pages."""
    runs: list[tuple[int, int]] = []
    for page in sorted(set(pages)):
        if runs and runs[-1][0] + runs[-1][1] == page:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((page, 1))
    return runs


def populate(runs: Sequence[tuple[int, int]]) -> None:
    """Write-fault the pages of ``runs`` in now (copy-on-write done ahead); what fails (a
    range no longer mapped, an old kernel) is skipped."""
    for first, count in runs:
        with contextlib.suppress(OSError):
            syscalls.madvise(first * PAGE_SIZE, count * PAGE_SIZE, MADV_POPULATE_WRITE)


@dataclass
class _Learner:
    pid: int
    received: bytearray = field(default_factory=bytearray)


@dataclass
class HotPages:
    """The fork server's side: the pages learners wrote, merged, and whether to learn more."""

    pages: set[int] = field(default_factory=set)
    runs: list[tuple[int, int]] = field(default_factory=list)
    #: Jobs whose pages were merged.
    learned: int = 0
    #: Learning standbys not yet heard from, by their pipe's read end.
    learners: dict[int, _Learner] = field(default_factory=dict)

    def wants_learner(self) -> bool:
        return self.learned + len(self.learners) < LEARN_FROM

    def add_learner(self, fd: int, pid: int) -> None:
        self.learners[fd] = _Learner(pid)

    def watched(self) -> list[tuple[int, int]]:
        """(fd, pid) pairs the selector must watch now."""
        return [(fd, learner.pid) for fd, learner in self.learners.items()]

    def on_readable(self, fd: int) -> None:
        """Read learner ``fd``'s pipe; at its end, merge what it sent and close it. A learner
        that ended without sending (its job failed, or its jail was destroyed unused) or sent
        too much is forgotten, and another standby learns instead."""
        learner = self.learners.get(fd)
        if learner is None:
            return
        try:
            chunk = os.read(fd, MAX_PAGES * _ENTRY + 1)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if chunk and len(learner.received) + len(chunk) <= MAX_PAGES * _ENTRY:
            learner.received += chunk
            return
        del self.learners[fd]
        os.close(fd)
        pages = [] if chunk else decode_pages(bytes(learner.received))
        if pages:
            self.pages.update(pages)
            self.runs = page_runs(sorted(self.pages)[:MAX_PAGES])
            self.learned += 1
