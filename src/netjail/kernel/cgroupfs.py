"""Every kernel access the cgroup code makes, in one thin class, and its one error mapping.

``CgroupFs`` is the seam: the cgroup strategies (``cgroup_v2``, ``cgroup_hybrid``,
``cgroup_v1``), ``CgroupManager`` and ``JobCgroup`` touch cgroupfs, /proc and processes only
through it, so unit tests run them against a fake kernfs in a temporary directory (a subclass
of this class). Its methods raise OSError; ``cgroup_errors`` is where the cgroup code turns
that into CgroupError.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal

from netjail.errors import CgroupError, map_os_errors
from netjail.kernel.cgroup_plan import DELEGATION_HINT


class CgroupFs:
    """cgroupfs (and /proc) file I/O, and SIGKILL, for the cgroup code; raises OSError."""

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
        """Read a control file, or a /proc file such as /proc/self/cgroup."""
        # surrogateescape: a cgroup or mount path that is not UTF-8 still round-trips to the
        # same bytes when it is joined into a path and handed back to the kernel.
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return f.read()

    def exists(self, path: str) -> bool:
        """Whether a control file or cgroup exists."""
        return os.path.exists(path)

    def list_dirs(self, path: str) -> list[str]:
        """The names of the cgroups directly below *path*; FileNotFoundError if it is gone."""
        with os.scandir(path) as entries:
            return [e.name for e in entries if e.is_dir(follow_symlinks=False)]

    def list_tree(self, top: str) -> list[str]:
        """*top* and every cgroup below it, each parent before its children; [] if *top* is gone.

        Reversed, the list is an order in which each cgroup comes after all its children.
        """
        # os.walk skips what vanishes while it walks: a cgroup removed meanwhile holds nobody.
        return [cgroup for cgroup, _subdirs, _files in os.walk(top)]

    def kill_process(self, pid: int) -> None:
        """SIGKILL process *pid*; ProcessLookupError if it is gone."""
        os.kill(pid, signal.SIGKILL)


def cgroup_errors(
    action: str, path: str, hint: str = ""
) -> contextlib.AbstractContextManager[None]:
    """Map OSError to CgroupError("cannot <action> <path>: <strerror>[; <hint>]")."""
    return map_os_errors(CgroupError, f"cannot {action} {path}", hint)


def is_gone(exc: OSError) -> bool:
    """The cgroup was removed while we used it: an open control file then gives ENODEV."""
    return exc.errno in (errno.ENOENT, errno.ENODEV)


def read_words(fs: CgroupFs, path: str) -> set[str]:
    """The words of a control file such as cgroup.controllers; CgroupError if unreadable."""
    with cgroup_errors("read", path):
        return set(fs.read(path).split())


def read_optional(fs: CgroupFs, cgroup: str | None, name: str) -> str | None:
    """Control file *name* of *cgroup*, or None if either does not exist (or went away)."""
    # For accounting, which must never fail a job's report: a file this kernel lacks, or one
    # that went away with its cgroup, is reported as unknown.
    if cgroup is None:
        return None
    try:
        return fs.read(os.path.join(cgroup, name))
    except OSError:
        return None


def make_dirs_exist_ok(fs: CgroupFs, paths: tuple[str, ...]) -> None:
    """Create the cgroups *paths*, in order, keeping those that already exist."""
    for path in paths:
        # One that exists was made by this daemon before a restart: reuse it.
        with (
            cgroup_errors("create cgroup", path, DELEGATION_HINT),
            contextlib.suppress(FileExistsError),
        ):
            fs.make_dir(path)
