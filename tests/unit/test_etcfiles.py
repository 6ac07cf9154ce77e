"""The job's own /etc/hosts and /etc/hostname files."""

from __future__ import annotations

import os
from pathlib import Path

from netjail.daemon.etcfiles import hosts_text, make_etc_dir, remove_etc_files, write_etc_files


def test_hosts_names_localhost_and_the_job_on_both_loopbacks() -> None:
    """The job's hostname resolves from the file on IPv4 and IPv6, so it never asks the stub."""
    lines = [line.split() for line in hosts_text("netjail-j-1").splitlines()]
    assert lines == [
        ["127.0.0.1", "localhost"],
        ["127.0.1.1", "netjail-j-1"],
        ["::1", "localhost", "ip6-localhost", "ip6-loopback", "netjail-j-1"],
    ]


def test_files_are_written_world_readable_and_removed(tmp_path: Path) -> None:
    """Both files hold the job's name, readable once bound; removal leaves the directory empty."""
    directory = make_etc_dir(str(tmp_path))
    files = write_etc_files(directory, "j-1", "box")
    assert Path(files.hostname).read_text() == "box\n"
    assert "127.0.1.1\tbox\n" in Path(files.hosts).read_text()
    assert os.stat(files.hosts).st_mode & 0o777 == 0o644
    assert [(b.target, b.access) for b in files.binds()] == [
        ("/etc/hosts", "ro"),
        ("/etc/hostname", "ro"),
    ]
    remove_etc_files(files)
    remove_etc_files(files)  # a second removal (a retried undo) is no error
    assert os.listdir(directory) == []


def test_the_directory_is_root_only_and_emptied_of_leftovers(tmp_path: Path) -> None:
    """At start the directory is 0700 and a previous run's files are gone."""
    directory = make_etc_dir(str(tmp_path))
    write_etc_files(directory, "j-old", "old")
    os.chmod(directory, 0o755)  # noqa: S103 - as a careless admin might leave it
    assert make_etc_dir(str(tmp_path)) == directory
    assert os.stat(directory).st_mode & 0o777 == 0o700
    assert os.listdir(directory) == []
