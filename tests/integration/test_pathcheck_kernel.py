"""Bind sources opened with the client's credentials, against the real kernel (no daemon)."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from netjail.errors import BindSourceError
from netjail.kernel import syscalls
from netjail.kernel.pathcheck import BindSource, Credentials, open_bind_source

from .conftest import TEST_GROUP

NOBODY = 65534


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory everyone may search, removed after the test."""
    path = Path(tempfile.mkdtemp(prefix="netjail-pathcheck-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def user(test_user: pwd.struct_passwd) -> Credentials:
    """The test user's credentials, supplementary groups (the netjail group) included."""
    groups = os.getgrouplist(test_user.pw_name, test_user.pw_gid)
    return Credentials(test_user.pw_uid, test_user.pw_gid, frozenset(groups))


ROOT = Credentials(0, 0, frozenset())


def _file(path: Path, mode: int, uid: int = 0, gid: int = 0) -> Path:
    path.write_text("secret\n")
    os.chown(path, uid, gid)
    path.chmod(mode)
    return path


def _same_inode(source: BindSource, path: str) -> bool:
    here, there = os.fstat(source.fd), os.stat(path)
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def test_non_root_cannot_bind_root_home(user: Credentials) -> None:
    """A non-root client cannot bind /root, read-only or read-write."""
    with pytest.raises(BindSourceError) as caught:
        open_bind_source("/root", user, "ro")
    assert str(caught.value) == f"--ro-bind /root: permission denied for uid {user.uid}"
    with pytest.raises(BindSourceError, match=r"^--bind /root: permission denied for uid"):
        open_bind_source("/root", user, "rw")


def test_non_root_cannot_bind_another_users_private_file(base: Path, user: Credentials) -> None:
    """Another user's 0600 file is refused; root may bind it."""
    private = _file(base / "private", 0o600, uid=NOBODY, gid=NOBODY)
    with pytest.raises(BindSourceError, match=r"^--ro-bind .*/private: permission denied for"):
        open_bind_source(str(private), user, "ro")
    source = open_bind_source(str(private), ROOT, "rw")
    try:
        assert _same_inode(source, str(private))
    finally:
        source.close()


def test_own_symlink_to_shadow_is_checked_as_the_client(base: Path, user: Credentials) -> None:
    """A symlink the client planted in its own directory leads to /etc/shadow: refused."""
    own = base / "own"
    own.mkdir()
    os.chown(own, user.uid, user.gid)
    (own / "link").symlink_to("/etc/shadow")
    os.lchown(own / "link", user.uid, user.gid)
    with pytest.raises(BindSourceError) as caught:
        open_bind_source(str(own / "link"), user, "ro")
    assert str(caught.value) == f"--ro-bind {own}/link: permission denied for uid {user.uid}"


def test_symlink_planted_by_another_user_is_not_followed(base: Path, user: Credentials) -> None:
    """Another user's symlink in a directory the client can write is refused, as a symlink."""
    shared = base / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    (shared / "link").symlink_to("/etc/passwd")
    os.lchown(shared / "link", NOBODY, NOBODY)
    with pytest.raises(BindSourceError) as caught:
        open_bind_source(str(shared / "link"), user, "ro")
    assert str(caught.value) == (
        f"--ro-bind {shared}/link: {shared}/link is a symlink owned by uid {NOBODY}; "
        "only root's and your own are followed"
    )


def test_root_does_not_follow_a_users_symlink(base: Path, user: Credentials) -> None:
    """A root client's bind through a user's symlink to /etc/shadow is refused."""
    own = base / "own"
    own.mkdir()
    os.chown(own, user.uid, user.gid)
    (own / "data").symlink_to("/etc/shadow")
    os.lchown(own / "data", user.uid, user.gid)
    with pytest.raises(BindSourceError, match=rf"is a symlink owned by uid {user.uid}; only"):
        open_bind_source(str(own / "data"), ROOT, "rw")


def test_symlink_in_a_directory_others_can_write_is_refused(base: Path) -> None:
    """Even root's own symlink is refused in a directory anyone can write (not sticky)."""
    open_dir = base / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    (open_dir / "link").symlink_to("/etc")
    with pytest.raises(BindSourceError, match=r"is a symlink in a directory others can change"):
        open_bind_source(str(open_dir / "link"), ROOT, "ro")


def test_system_symlinks_are_followed(user: Credentials) -> None:
    """Root's links in root's directories are followed: /lib -> usr/lib on merged /usr."""
    if not os.path.islink("/lib"):
        pytest.skip("/lib is not a symlink here")
    source = open_bind_source("/lib", user, "ro")
    try:
        assert source.kind == "directory"
        assert _same_inode(source, os.path.realpath("/lib"))
    finally:
        source.close()


def test_a_readable_path_opens_as_the_checked_inode(base: Path, user: Credentials) -> None:
    """A readable file opens; the fd stays on that inode when the path is swapped afterwards."""
    public = _file(base / "public", 0o644)
    source = open_bind_source(str(public), user, "ro")
    try:
        assert (source.path, source.kind) == (str(public), "file")
        assert _same_inode(source, str(public))
        public.rename(base / "moved")
        (base / "public").symlink_to("/etc/shadow")
        assert _same_inode(source, str(base / "moved"))
    finally:
        source.close()


def test_write_access_is_checked_for_bind_and_read_for_ro_bind(
    base: Path, user: Credentials
) -> None:
    """A file the client may read but not write: --ro-bind works, --bind is refused."""
    readable = _file(base / "readable", 0o644)
    open_bind_source(str(readable), user, "ro").close()
    with pytest.raises(BindSourceError, match=r"^--bind .*/readable: permission denied for uid"):
        open_bind_source(str(readable), user, "rw")
    mine = _file(base / "mine", 0o644, uid=user.uid, gid=user.gid)
    open_bind_source(str(mine), user, "rw").close()


def test_directories_need_search_permission(base: Path, user: Credentials) -> None:
    """A directory needs search too (0744 is refused); read-write needs it to be writable."""
    listable = base / "listable"
    listable.mkdir()
    listable.chmod(0o744)
    with pytest.raises(BindSourceError, match="permission denied"):
        open_bind_source(str(listable), user, "ro")
    listable.chmod(0o755)
    source = open_bind_source(str(listable), user, "ro")
    source.close()
    assert source.kind == "directory"
    with pytest.raises(BindSourceError, match=r"^--bind .*/listable: permission denied"):
        open_bind_source(str(listable), user, "rw")
    os.chown(listable, user.uid, user.gid)
    open_bind_source(str(listable), user, "rw").close()


def test_supplementary_groups_count(base: Path, user: Credentials) -> None:
    """A file readable by one of the client's supplementary groups opens; without it, not."""
    group = grp.getgrnam(TEST_GROUP).gr_gid
    assert group in user.groups
    assert group != user.gid
    shared = _file(base / "group-readable", 0o640, gid=group)
    open_bind_source(str(shared), user, "ro").close()
    without = Credentials(user.uid, user.gid, user.groups - {group})
    with pytest.raises(BindSourceError, match="permission denied"):
        open_bind_source(str(shared), without, "ro")


def test_missing_and_non_directory_paths_are_refused(base: Path, user: Credentials) -> None:
    """A missing path and a file named with a trailing slash are refused with the reason."""
    with pytest.raises(BindSourceError) as caught:
        open_bind_source(str(base / "absent"), user, "ro")
    assert str(caught.value) == f"--ro-bind {base}/absent: no such file or directory"
    _file(base / "plain", 0o644)
    with pytest.raises(BindSourceError, match=r"plain/: not a directory$"):
        open_bind_source(f"{base}/plain/", user, "ro")


def test_proc_links_are_not_followed() -> None:
    """/proc/self is the daemon's, not the job's: links in /proc are refused, even for root."""
    with pytest.raises(BindSourceError, match=r"/proc/self is a symlink in /proc"):
        open_bind_source("/proc/self/root/etc", ROOT, "ro")


def test_checks_leave_the_callers_credentials_and_fds_alone(base: Path, user: Credentials) -> None:
    """After many checks, granted or refused, this thread is still root and no fd leaked."""
    public = _file(base / "public", 0o644)
    before = sorted(os.listdir("/proc/self/fd"))
    for _ in range(20):
        open_bind_source(str(public), user, "ro").close()
        with pytest.raises(BindSourceError):
            open_bind_source("/root", user, "ro")
        with pytest.raises(BindSourceError):
            open_bind_source(str(base / "absent" / "deeper"), user, "ro")
    assert sorted(os.listdir("/proc/self/fd")) == before
    with open("/etc/shadow") as f:  # root-only: the check's credentials stayed on its thread
        assert f.readline()


def _in_own_mount_namespace(work: Callable[[], str]) -> str:
    """What ``work()`` returns in a forked child with a private mount namespace (gone after)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            syscalls.unshare(syscalls.CLONE_NEWNS)
            syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
            result = work()
        except BaseException as e:
            result = f"failed: {e!r}"
        os.write(write_end, result.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        output = f.read().decode()
    os.waitpid(pid, 0)
    return output


def test_the_checked_inode_is_what_a_job_mounts(base: Path, user: Credentials) -> None:
    """Cloned and attached in another mount namespace, the fd is the checked file, path swapped."""
    public = _file(base / "public", 0o644)
    target = _file(base / "target", 0o644)
    target.write_text("target\n")
    source = open_bind_source(str(public), user, "ro")
    public.rename(base / "moved")
    (base / "public").symlink_to("/etc/shadow")
    flags = syscalls.OPEN_TREE_CLONE | syscalls.OPEN_TREE_CLOEXEC | syscalls.AT_EMPTY_PATH
    tree = syscalls.open_tree(source.fd, "", flags)
    source.close()

    def work() -> str:
        syscalls.move_mount(
            tree, "", syscalls.AT_FDCWD, str(target), syscalls.MOVE_MOUNT_F_EMPTY_PATH
        )
        return target.read_text()

    try:
        assert _in_own_mount_namespace(work) == "secret\n"
    finally:
        os.close(tree)
    assert target.read_text() == "target\n"  # the host never had the mount
