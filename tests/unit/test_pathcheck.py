"""Bind-source checks: the pure rules (symlink trust, access modes) and path validation."""

from __future__ import annotations

import os
import stat

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netjail.errors import BindSourceError, RequestError
from netjail.kernel.pathcheck import (
    Credentials,
    SourceKind,
    access_mode,
    open_bind_source,
    option_name,
    symlink_trust,
)
from netjail.protocol import BindAccess

CLIENT = 1000
OTHER = 1001


def _stat(kind: int, mode: int, uid: int) -> os.stat_result:
    return os.stat_result((kind | mode, 1, 1, 1, uid, uid, 0, 0, 0, 0))


def _link(uid: int) -> os.stat_result:
    return _stat(stat.S_IFLNK, 0o777, uid)


def _dir(mode: int, uid: int) -> os.stat_result:
    return _stat(stat.S_IFDIR, mode, uid)


@pytest.mark.parametrize(
    ("link_uid", "dir_mode", "dir_uid", "expected"),
    [
        (0, 0o755, 0, "trusted"),  # /lib -> usr/lib
        (CLIENT, 0o755, CLIENT, "trusted"),  # the client's own, in its own directory
        (CLIENT, 0o1777, 0, "trusted"),  # /tmp: only the link's owner may replace it
        (0, 0o1777, 0, "trusted"),
        (OTHER, 0o1777, 0, "foreign-owner"),  # planted in /tmp by someone else
        (OTHER, 0o755, CLIENT, "foreign-owner"),
        (CLIENT, 0o755, OTHER, "shared-directory"),  # the directory's owner can swap it
        (CLIENT, 0o1777, OTHER, "shared-directory"),  # a sticky directory's owner too
        (0, 0o777, 0, "shared-directory"),  # anyone can replace it
        (0, 0o775, 0, "shared-directory"),  # the group can replace it
        (CLIENT, 0o757, CLIENT, "shared-directory"),
    ],
)
def test_symlink_trust_for_a_client(
    link_uid: int, dir_mode: int, dir_uid: int, expected: str
) -> None:
    """A symlink is trusted only if root or the client owns it and its directory, unshared."""
    assert symlink_trust(_link(link_uid), _dir(dir_mode, dir_uid), CLIENT) == expected


def test_symlink_trust_for_root_trusts_only_root() -> None:
    """For a root client, a user's symlink is foreign even in the user's own directory."""
    assert symlink_trust(_link(CLIENT), _dir(0o755, CLIENT), 0) == "foreign-owner"
    assert symlink_trust(_link(0), _dir(0o755, CLIENT), 0) == "shared-directory"
    assert symlink_trust(_link(0), _dir(0o755, 0), 0) == "trusted"


@pytest.mark.parametrize(
    ("access", "kind", "mode"),
    [
        ("ro", "file", os.R_OK),
        ("rw", "file", os.R_OK | os.W_OK),
        ("ro", "directory", os.R_OK | os.X_OK),
        ("rw", "directory", os.R_OK | os.W_OK | os.X_OK),
    ],
)
def test_access_mode(access: BindAccess, kind: SourceKind, mode: int) -> None:
    """--ro-bind needs read, --bind read and write; a directory needs search as well."""
    assert access_mode(access, kind) == mode


def test_option_names() -> None:
    """Messages name the option the user typed: "rw" is --bind, "ro" is --ro-bind."""
    assert (option_name("rw"), option_name("ro")) == ("--bind", "--ro-bind")


@pytest.mark.parametrize(
    ("path", "shown"),
    [
        ("relative/path", "relative/path"),
        ("", ""),
        ("/etc/\0passwd", "/etc/?passwd"),
        ("/" + "a" * 5000, "/" + "a" * 255 + "…"),
    ],
)
def test_paths_that_are_not_absolute_are_refused(path: str, shown: str) -> None:
    """A relative, empty, NUL-bearing or too long path is refused before any lookup."""
    with pytest.raises(BindSourceError) as caught:
        open_bind_source(path, Credentials(CLIENT, CLIENT, frozenset()), "ro")
    assert str(caught.value) == f"--ro-bind {shown}: not an absolute path"


def test_refusals_are_request_errors() -> None:
    """A refused bind source is the client's request failing (code "request"), not the jail."""
    with pytest.raises(RequestError) as caught:
        open_bind_source("x", Credentials(CLIENT, CLIENT, frozenset()), "rw")
    assert caught.value.code == "request"
    assert str(caught.value) == "--bind x: not an absolute path"


@given(st.text(max_size=300).filter(lambda text: not text.startswith("/")))
def test_any_relative_text_is_refused_in_one_printable_line(path: str) -> None:
    """Any text a client sends that is not absolute is refused in one printable line."""
    with pytest.raises(BindSourceError) as caught:
        open_bind_source(path, Credentials(CLIENT, CLIENT, frozenset()), "rw")
    message = str(caught.value)
    assert message.startswith("--bind ")
    assert message.endswith(": not an absolute path")
    assert message.isprintable()
