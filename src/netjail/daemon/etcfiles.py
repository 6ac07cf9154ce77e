"""A job's own /etc/hosts and /etc/hostname: written per job under ``<state_dir>/etc`` (root
only) and bound read-only over the host's (the rest of /etc is the host's, read-only).

Without them the job sees the host's: the host's name in /etc/hostname, and an /etc/hosts that
does not know the job's own hostname, so a program resolving it (getent, Java, Python's
getfqdn) asks the DNS stub, which blocks it as an unknown destination. Other names still go
through the stub, where the policy and ``--add-host`` apply.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from netjail.kernel.fsplan import Bind, PathSource


@dataclass(frozen=True, slots=True)
class EtcFiles:
    """A job's hosts and hostname files on the host."""

    hosts: str
    hostname: str

    def binds(self) -> list[Bind]:
        """Where the job sees them."""
        return [
            Bind(PathSource(self.hosts), "/etc/hosts", "ro"),
            Bind(PathSource(self.hostname), "/etc/hostname", "ro"),
        ]


def hosts_text(hostname: str) -> str:
    """The job's /etc/hosts: the loopback names, and its own name on both loopbacks (as
    Debian does for a host without a fixed address)."""
    return (
        "127.0.0.1\tlocalhost\n"
        f"127.0.1.1\t{hostname}\n"
        f"::1\tlocalhost ip6-localhost ip6-loopback {hostname}\n"
    )


def make_etc_dir(state_dir: str) -> str:
    """``<state_dir>/etc``, root only, emptied: no job runs yet, so every file is left over."""
    return make_files_dir(state_dir, "etc")


def make_files_dir(state_dir: str, name: str) -> str:
    """``<state_dir>/<name>``, a root-only directory of per-job files, emptied (at start, no
    job runs yet, so every file in it is left over)."""
    path = os.path.join(state_dir, name)
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
    for entry in os.listdir(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(path, entry))
    return path


def write_etc_files(directory: str, job_id: str, hostname: str) -> EtcFiles:
    """The job's files, for ``hostname`` (already checked as an RFC 1123 name)."""
    files = EtcFiles(
        hosts=os.path.join(directory, f"{job_id}.hosts"),
        hostname=os.path.join(directory, f"{job_id}.hostname"),
    )
    for path, text in ((files.hosts, hosts_text(hostname)), (files.hostname, f"{hostname}\n")):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
    return files


def remove_etc_files(files: EtcFiles) -> None:
    for path in (files.hosts, files.hostname):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
