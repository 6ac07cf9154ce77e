"""The trust files of a job that intercepts: the host's CA bundle plus the job's CA, and the
job's CA alone, written under ``<state_dir>/trust`` (root only) and bound read-only into the
job (netjail.kernel.fsplan: JOB_CA_BUNDLE, JOB_CA_FILE, and over each of TRUST_BUNDLES the
host has as a regular file). Only certificates are written; the CA's key never is.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from netjail.daemon.etcfiles import make_files_dir
from netjail.kernel.fsplan import JOB_CA_BUNDLE, JOB_CA_FILE, TRUST_BUNDLES, Bind, PathSource

#: Largest host bundle read (Debian's is about 200 KiB).
_MAX_BUNDLE = 8 << 20


@dataclass(frozen=True, slots=True)
class TrustFiles:
    """A job's trust files on the host, and the system bundle paths they cover in the job."""

    bundle: str
    ca: str
    covers: tuple[str, ...]

    def binds(self) -> list[Bind]:
        """Where the job sees them: its own paths, then over the system bundles."""
        return [
            Bind(PathSource(self.bundle), JOB_CA_BUNDLE, "ro"),
            Bind(PathSource(self.ca), JOB_CA_FILE, "ro"),
            *(Bind(PathSource(self.bundle), path, "ro") for path in self.covers),
        ]


def make_trust_dir(state_dir: str) -> str:
    """``<state_dir>/trust``, root only, emptied: no job runs yet, so every file is left over."""
    return make_files_dir(state_dir, "trust")


def read_host_bundle() -> tuple[bytes, tuple[str, ...]]:
    """The host's system CA bundle (the first of TRUST_BUNDLES there is), and which of
    TRUST_BUNDLES are regular files a bind can cover (a symlink leads to one of them)."""
    covers = tuple(p for p in TRUST_BUNDLES if os.path.isfile(p) and not os.path.islink(p))
    for path in TRUST_BUNDLES:
        with contextlib.suppress(OSError), open(path, "rb") as f:
            return f.read(_MAX_BUNDLE), covers
    return b"", covers


def write_trust_files(directory: str, job_id: str, ca_pem: bytes) -> TrustFiles:
    """The job's bundle (host bundle + its CA) and CA file, readable by the job once bound."""
    host, covers = read_host_bundle()
    files = TrustFiles(
        bundle=os.path.join(directory, f"{job_id}.bundle.pem"),
        ca=os.path.join(directory, f"{job_id}.ca.pem"),
        covers=covers,
    )
    separator = b"" if not host or host.endswith(b"\n") else b"\n"
    for path, data in ((files.bundle, host + separator + ca_pem), (files.ca, ca_pem)):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    return files


def remove_trust_files(files: TrustFiles) -> None:
    for path in (files.bundle, files.ca):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
