"""Crash recovery over a fake JailHost: records drive the sweep; failures are logged, kept."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from netjail.daemon.recovery import StateRecords, recover
from netjail.daemon.uids import UidLeases, UidRange
from tests.unit.fakehost import FakeJailHost


def _leases(tmp_path: Path) -> UidLeases:
    return UidLeases(UidRange(70000, 70009), str(tmp_path), frozenset())


class Logged:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __call__(self, level: str, message: str, **fields: Any) -> None:
        self.lines.append((level, message, fields))


def test_leftovers_of_recorded_jobs_are_removed_and_their_records_deleted(tmp_path: Path) -> None:
    """A recorded job's cgroup and netns are removed (processes killed first); the record goes."""
    records = StateRecords(str(tmp_path))
    records.write("j-0000aaaa", "netjail-j-0000aaaa", 1.0)
    host = FakeJailHost()
    host.leftovers_cgroups = ["j-0000aaaa", "j-0000bbbb"]
    host.leftovers_netns = ["netjail-j-0000aaaa"]
    log = Logged()
    removed = recover(host, records, log, _leases(tmp_path), str(tmp_path / "homes"))
    assert removed == ["cgroup of j-0000aaaa", "netns netjail-j-0000aaaa"]
    assert host.leftovers_cgroups == ["j-0000bbbb"]  # not ours: no record names it
    assert "kill_netns_processes netjail-j-0000aaaa" in host.journal
    assert os.listdir(records.directory) == []


def test_what_cannot_be_removed_is_logged_and_its_record_kept(tmp_path: Path) -> None:
    """A failed removal is an error line, and the record stays for the next start."""
    records = StateRecords(str(tmp_path))
    records.write("j-0000aaaa", "netjail-j-0000aaaa", 1.0)
    host = FakeJailHost()
    host.leftovers_cgroups = ["j-0000aaaa"]
    host.fail_at = "remove_leftover_cgroup"
    log = Logged()
    assert recover(host, records, log, _leases(tmp_path), str(tmp_path / "homes")) == []
    assert log.lines == [
        (
            "error",
            "cannot remove a leftover cgroup",
            {"job": "j-0000aaaa", "error": "[Errno 5] injected failure at remove_leftover_cgroup"},
        )
    ]
    assert os.listdir(records.directory) == ["j-0000aaaa.json"]


def test_unreadable_records_are_removed_and_foreign_ones_ignored(tmp_path: Path) -> None:
    """A corrupt record is removed with a warning; one naming a foreign netns is never acted on."""
    records = StateRecords(str(tmp_path))
    Path(records.directory, "broken.json").write_text("{not json")
    Path(records.directory, "foreign.json").write_text(
        json.dumps({"job": "j-0000cccc", "netns": "../../etc"})
    )
    host = FakeJailHost()
    host.leftovers_netns = ["../../etc"]
    log = Logged()
    assert recover(host, records, log, _leases(tmp_path), str(tmp_path / "homes")) == []
    assert [(lv, m) for lv, m, _ in log.lines] == [
        ("warning", "unreadable job state record removed"),
        ("warning", "foreign job state record ignored"),
    ]
    assert host.leftovers_netns == ["../../etc"]
    assert sorted(os.listdir(records.directory)) == ["foreign.json"]


def test_a_record_is_written_and_removed(tmp_path: Path) -> None:
    """write() makes <job>.json naming the job, its netns and start time; remove() is idempotent."""
    records = StateRecords(str(tmp_path))
    records.write("j-0000dddd", "netjail-j-0000dddd", 12.5)
    with open(os.path.join(records.directory, "j-0000dddd.json")) as f:
        assert json.load(f) == {"job": "j-0000dddd", "netns": "netjail-j-0000dddd", "started": 12.5}
    records.remove("j-0000dddd")
    records.remove("j-0000dddd")
    assert os.listdir(records.directory) == []
    assert oct(os.stat(records.directory).st_mode & 0o777) == "0o700"


def test_a_lease_stays_held_while_its_job_is_not_cleaned_up(tmp_path: Path) -> None:
    """A job whose leftovers could not be removed keeps its uid; a lease with no record goes."""
    records = StateRecords(str(tmp_path))
    records.write("j-0000aaaa", "netjail-j-0000aaaa", 1.0)
    leases = _leases(tmp_path)
    stuck, orphan = leases.lease("j-0000aaaa"), leases.lease("j-0000bbbb")
    host = FakeJailHost()
    host.leftovers_cgroups = ["j-0000aaaa"]
    host.fail_at = "remove_leftover_cgroup"
    # A new start: the leases on disk are a crashed run's.
    removed = recover(host, records, Logged(), _leases(tmp_path), str(tmp_path / "homes"))
    assert removed == [f"uid {orphan.uid} of j-0000bbbb"]
    reopened = _leases(tmp_path)
    assert [lease.uid for lease in reopened.recover()] == [stuck.uid]
