"""A job's own files on the host (steps 9 and 9a): its HOME, a tmpfs of its own, and its
/etc/hosts and /etc/hostname (netjail.daemon.etcfiles).

Both depend on the job only through its uid, its hostname and the HOME size, all of which a
pool jail knows before any job: the uid it leased, ``netjail-<its job id>``, and the config's
``home_size``. So a pool jail makes them ahead (``make_job_files``, one worker-thread hop at
its build), and a job that claims it takes them as they are when they are what it would have
made (``JobFiles.fit``); otherwise (a non-root client's job or ``--uid``: another owner;
``--hostname``; a reload that changed ``home_size``) it remakes the part that differs, at the
same path, whose undo is already on the stack. A cold job makes both, in one hop.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Literal

from netjail.daemon.etcfiles import EtcFiles, remove_etc_files, write_etc_files
from netjail.kernel.host import JailHost


@dataclass(frozen=True, slots=True)
class HomeShape:
    """What makes one HOME fit a job: its owner and its size."""

    uid: int
    gid: int
    size_bytes: int


@dataclass(frozen=True, slots=True)
class JobFiles:
    """Job ``job_id``'s HOME (``home``, mounted as ``shape``) and its /etc files (for
    ``hostname``)."""

    job_id: str
    home: str
    shape: HomeShape
    etc: EtcFiles
    hostname: str

    def misfits(self, shape: HomeShape, hostname: str) -> frozenset[Misfit]:
        """What would have to be remade for a job with a HOME of ``shape`` named ``hostname``."""
        wrong: set[Misfit] = set()
        if shape != self.shape:
            wrong.add("home")
        if hostname != self.hostname:
            wrong.add("etc")
        return frozenset(wrong)


#: A part of a job's files: its HOME, or its /etc files.
Misfit = Literal["home", "etc"]


def make_job_files(
    host: JailHost, *, homes_dir: str, etc_dir: str, job_id: str, shape: HomeShape, hostname: str
) -> JobFiles:
    """Make job ``job_id``'s HOME under ``homes_dir`` and its /etc files under ``etc_dir``;
    on failure, nothing of them is left."""
    home = os.path.join(homes_dir, job_id)
    host.make_home(home, shape.uid, shape.gid, shape.size_bytes)
    try:
        etc = write_etc_files(etc_dir, job_id, hostname)
    except BaseException:
        host.remove_home(home)
        raise
    return JobFiles(job_id=job_id, home=home, shape=shape, etc=etc, hostname=hostname)


def remake_job_files(
    host: JailHost, files: JobFiles, parts: frozenset[Misfit], shape: HomeShape, hostname: str
) -> JobFiles:
    """``files`` with ``parts`` made again for ``shape`` and ``hostname``, at the same paths
    (so ``remove_job_files(files)`` still removes them)."""
    if "home" in parts:
        host.remove_home(files.home)
        host.make_home(files.home, shape.uid, shape.gid, shape.size_bytes)
        files = replace(files, shape=shape)
    if "etc" in parts:
        remove_etc_files(files.etc)
        etc = write_etc_files(os.path.dirname(files.etc.hosts), files.job_id, hostname)
        files = replace(files, etc=etc, hostname=hostname)
    return files


def remove_job_files(host: JailHost, files: JobFiles) -> None:
    """Remove a job's HOME and /etc files (whatever of them is still there)."""
    try:
        remove_etc_files(files.etc)
    finally:
        host.remove_home(files.home)
