"""Job uid leases: the range grammar, the order uids are handed out in, and their records."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netjail.daemon.uids import (
    DEFAULT_JOB_UIDS,
    Lease,
    UidLeases,
    UidRange,
    parse_id_database,
    parse_uid_range,
    read_listed_ids,
)
from netjail.errors import BusyError, ConfigError, JailError


def test_default_range_is_systemds_dynamic_user_range() -> None:
    """The default job_uids is 61184-65519, 4336 uids."""
    uid_range = parse_uid_range(DEFAULT_JOB_UIDS)
    assert uid_range == UidRange(61184, 65519)
    assert len(uid_range) == 4336
    assert str(uid_range) == "61184-65519"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("61184", "job_uids: expected a uid range 'FIRST-LAST' such as '61184-65519', got '61184'"),
        (" 1-2", "job_uids: expected a uid range"),
        ("1 - 2", "job_uids: expected a uid range"),
        ("+1-2", "job_uids: expected a uid range"),
        ("01-2", "job_uids: expected a uid range"),
        ("1-2-3", "job_uids: expected a uid range"),
        ("a-b", "job_uids: expected a uid range"),
        ("1-99999999999", "job_uids: expected a uid range"),
        ("65519-61184", "job_uids: range '65519-61184' ends before it starts"),
        ("0-100", "job_uids: range '0-100' contains uid 0, which no job may use"),
        ("65000-66000", "job_uids: range '65000-66000' contains uid 65535, which no job"),
        ("100000-4294967295", "contains uid 4294967295"),
    ],
)
def test_bad_ranges_are_refused_naming_the_key(text: str, message: str) -> None:
    """A malformed, reversed or reserved-uid range is a ConfigError that names job_uids."""
    with pytest.raises(ConfigError, match=r"^job_uids: ") as caught:
        parse_uid_range(text)
    assert message in str(caught.value)


def test_range_error_names_the_key_it_is_given() -> None:
    """The key in the message is the one the caller read the range from."""
    with pytest.raises(ConfigError, match=r"^pool\.job_uids: "):
        parse_uid_range("x", key="pool.job_uids")


@given(st.text(max_size=30))
def test_range_parser_accepts_only_the_grammar(text: str) -> None:
    """Any text either parses to a range that prints back the same, or is a ConfigError."""
    outcome: UidRange | str
    try:
        outcome = parse_uid_range(text)
    except ConfigError as e:
        outcome = str(e)
    if isinstance(outcome, str):
        assert outcome.startswith("job_uids: ")
    else:
        assert str(outcome) == text
        assert 0 < outcome.first <= outcome.last


def test_id_database_collects_uids_and_gids() -> None:
    """passwd's uid and gid fields and group's gid field are collected; odd lines skipped."""
    users = "root:x:0:0:root:/root:/bin/bash\nsvc:x:61190:61191::/:/sbin/nologin\n+::::::\n\nbad"
    groups = "root:x:0:\nnetjail:x:61200:alice,bob\n"
    assert parse_id_database(users) == {0, 61190, 61191}
    assert parse_id_database(groups) == {0, 61200}


def test_listed_ids_are_read_from_both_files(tmp_path: Path) -> None:
    """read_listed_ids unites both files; a missing one is a ConfigError naming it."""
    (tmp_path / "passwd").write_text("a:x:61185:61185::/:/bin/sh\n")
    (tmp_path / "group").write_text("g:x:61187:\n")
    assert read_listed_ids(str(tmp_path / "passwd"), str(tmp_path / "group")) == {61185, 61187}
    with pytest.raises(ConfigError, match=r"^job_uids: reading .*/nothing: No such file"):
        read_listed_ids(str(tmp_path / "passwd"), str(tmp_path / "nothing"))


def _leases(
    tmp_path: Path, first: int = 61184, last: int = 61189, listed: frozenset[int] = frozenset()
) -> UidLeases:
    return UidLeases(UidRange(first, last), str(tmp_path), listed)


def _records(tmp_path: Path) -> list[str]:
    return sorted(os.listdir(tmp_path / "uids"))


def test_leases_ascend_and_skip_listed_ids(tmp_path: Path) -> None:
    """Fresh uids are handed out in order, skipping those passwd or group list; gid = uid."""
    leases = _leases(tmp_path, listed=frozenset({61185, 61186}))
    first, second = leases.lease("j-1"), leases.lease("j-2")
    assert (first, second) == (Lease(61184, "j-1"), Lease(61187, "j-2"))
    assert second.gid == 61187


def test_released_uids_come_back_oldest_first_after_fresh_ones(tmp_path: Path) -> None:
    """Never-used uids go first; then released ones, least recently released first."""
    leases = _leases(tmp_path, last=61186)
    a, b, c = (leases.lease(f"j-{n}") for n in range(3))
    leases.release(b)
    leases.release(a)
    leases.release(c)
    assert [leases.lease(f"j-{n}").uid for n in range(3, 6)] == [b.uid, a.uid, c.uid]


def test_exhaustion_is_busy_with_a_clear_message(tmp_path: Path) -> None:
    """When every uid is leased, lease raises BusyError saying which range and what to do."""
    leases = _leases(tmp_path, last=61186, listed=frozenset({61185}))
    leases.lease("j-1")
    leases.lease("j-2")
    with pytest.raises(BusyError) as caught:
        leases.lease("j-3")
    assert str(caught.value) == (
        "no job uid is free: all 2 uids of job_uids 61184-61186 are leased to jobs that have "
        "not ended; retry when one ends, or widen job_uids"
    )


def test_each_lease_is_a_record_until_released(tmp_path: Path) -> None:
    """A lease is a file <uid>.<job> while held; release removes it."""
    leases = _leases(tmp_path)
    lease = leases.lease("j-3f9c01ab")
    assert _records(tmp_path) == ["61184.j-3f9c01ab"]
    assert leases.held == [lease]
    leases.release(lease)
    assert _records(tmp_path) == []
    assert leases.held == []


def test_release_is_idempotent_and_never_frees_another_jobs_uid(tmp_path: Path) -> None:
    """Releasing twice does nothing the second time, even once the uid went to another job."""
    leases = _leases(tmp_path, last=61184)
    old = leases.lease("j-old")
    leases.release(old)
    new = leases.lease("j-new")
    assert new.uid == old.uid
    leases.release(old)
    assert leases.held == [new]
    assert _records(tmp_path) == ["61184.j-new"]


def test_a_new_run_finds_stale_leases_and_keeps_them_until_released(tmp_path: Path) -> None:
    """After a crash, the records' uids are reported and not reused until the caller releases."""
    crashed = _leases(tmp_path)
    crashed.lease("j-a")
    crashed.lease("j-b")
    restarted = _leases(tmp_path)
    stale = restarted.recover()
    assert stale == [Lease(61184, "j-a"), Lease(61185, "j-b")]
    assert restarted.lease("j-c").uid == 61186
    for lease in stale:
        restarted.release(lease)
    assert restarted.recover() == []
    assert _records(tmp_path) == ["61186.j-c"]
    # Released stale uids come after the fresh ones.
    assert [restarted.lease(f"j-{n}").uid for n in range(5)] == [61187, 61188, 61189, 61184, 61185]


def test_stale_lease_ahead_of_the_cursor_is_handed_out_once(tmp_path: Path) -> None:
    """A stale uid released before the fresh cursor reaches it is leased once, in order."""
    _leases(tmp_path, first=61188, last=61188).lease("j-old")
    leases = _leases(tmp_path)
    leases.release(leases.recover()[0])
    uids = [leases.lease(f"j-{n}").uid for n in range(6)]
    assert uids == [61184, 61185, 61186, 61187, 61188, 61189]
    with pytest.raises(BusyError):
        leases.lease("j-more")


def test_stale_lease_outside_the_range_is_reported_but_not_reused(tmp_path: Path) -> None:
    """A record from an older, wider range is recovered; releasing it does not add its uid."""
    _leases(tmp_path, first=70000, last=70001).lease("j-old")
    leases = _leases(tmp_path, last=61184)
    (stale,) = leases.recover()
    assert stale == Lease(70000, "j-old")
    leases.release(stale)
    assert _records(tmp_path) == []
    leases.lease("j-1")
    with pytest.raises(BusyError):
        leases.lease("j-2")


def test_foreign_files_are_left_alone(tmp_path: Path) -> None:
    """Files that are not <uid>.<job id> records are neither recovered nor removed."""
    (tmp_path / "uids").mkdir()
    for name in ("notes.txt", "61184", "61185.J-UPPER", "61186.j-x.y"):
        (tmp_path / "uids" / name).write_text("")
    leases = _leases(tmp_path)
    assert leases.recover() == []
    assert leases.lease("j-1").uid == 61184
    assert "notes.txt" in _records(tmp_path)


def test_unwritable_record_means_no_lease(tmp_path: Path) -> None:
    """If the record cannot be made, lease raises JailError and the uid is not taken."""
    leases = _leases(tmp_path)
    (tmp_path / "uids" / "61184.j-1").mkdir()  # O_EXCL creation fails with EEXIST
    with pytest.raises(JailError, match=r"^job uid: recording uid 61184 for j-1: File exists"):
        leases.lease("j-1")
    assert leases.held == []
    assert leases.lease("j-2") == Lease(61185, "j-2")
    assert leases.held == [Lease(61185, "j-2")]
