"""A job's trust files: the host bundle plus the job's CA, bound over the bundles there are."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from netjail.daemon import trust
from netjail.kernel.fsplan import JOB_CA_BUNDLE, JOB_CA_FILE


def test_the_bundle_is_the_host_bundle_then_the_ca_and_covers_regular_files_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Symlinked bundle paths are not covered (their target is); missing ones are skipped."""
    real = tmp_path / "ca-certificates.crt"
    real.write_bytes(b"HOST CERTS")  # no final newline: one is added before the CA
    link = tmp_path / "cert.pem"
    link.symlink_to(real)
    monkeypatch.setattr(trust, "TRUST_BUNDLES", (str(link), str(real), str(tmp_path / "none")))
    directory = trust.make_trust_dir(str(tmp_path))
    files = trust.write_trust_files(directory, "j-1", b"JOB CA\n")
    assert Path(files.bundle).read_bytes() == b"HOST CERTS\nJOB CA\n"
    assert Path(files.ca).read_bytes() == b"JOB CA\n"
    assert files.covers == (str(real),)
    assert [b.target for b in files.binds()] == [JOB_CA_BUNDLE, JOB_CA_FILE, str(real)]
    assert all(b.access == "ro" for b in files.binds())
    trust.remove_trust_files(files)
    assert os.listdir(directory) == []


def test_the_trust_dir_is_root_only_and_emptied_at_start(tmp_path: Path) -> None:
    """Files a crashed run left are removed; the directory is 0700."""
    directory = trust.make_trust_dir(str(tmp_path))
    (Path(directory) / "j-old.bundle.pem").write_text("x")
    assert trust.make_trust_dir(str(tmp_path)) == directory
    assert os.listdir(directory) == []
    assert os.stat(directory).st_mode & 0o777 == 0o700
