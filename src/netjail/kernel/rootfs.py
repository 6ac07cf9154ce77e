"""Applying a job's ``FsPlan``: a tmpfs root filled from the plan, then pivot_root into it.

Two halves, because of where they must run (see netjail.kernel.jailinit):

- ``open_bind_trees`` runs in the job's init *before* it leaves the daemon's mount namespace.
  It takes a detached copy (``open_tree(OPEN_TREE_CLONE)``) of every bind source. The kernel
  refuses a plain bind mount whose source belongs to another mount namespace, and a client's
  bind source is an fd the daemon opened, in its own.
- ``apply_fs_plan`` runs in the init once it is in its new mount namespace. It mounts the root
  tmpfs at ``STAGING``, attaches the trees, mounts and makes the rest, pivots into the new
  root, detaches the old one, and makes the root read-only.

No path is followed through a symlink while the root is built: every mount point is reached
component by component with O_PATH|O_NOFOLLOW from the root's fd, created where missing, and
mounted through /proc/self/fd/N. So a client's bound directory cannot point a later mount
point, or a directory created for one, at the host (the daemon is root here).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator, Sequence
from typing import Literal

from netjail.errors import SpawnError, map_os_errors
from netjail.kernel import syscalls
from netjail.kernel.fsplan import (
    MERGED_USR,
    SYSTEM_DIRS,
    Bind,
    BindSource,
    Cover,
    Device,
    Devpts,
    DevTmpfs,
    FdSource,
    FsPlan,
    FsStep,
    HostDir,
    HostEntry,
    HostLayout,
    HostLink,
    Proc,
    Symlink,
    Sysfs,
    Tmpfs,
)

#: Where the new root is built, inside the job's private mount namespace (bubblewrap's choice:
#: it exists everywhere). It only hides the host's /tmp from the job child, which by then
#: reaches every source through a tree fd, never through a path.
STAGING = "/tmp"  # noqa: S108 - a mount point in the child's own mount namespace

_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR = _PATH | os.O_DIRECTORY
_CLONE = syscalls.OPEN_TREE_CLONE | syscalls.OPEN_TREE_CLOEXEC
_ATTACH = syscalls.MOVE_MOUNT_F_EMPTY_PATH | syscalls.MOVE_MOUNT_T_EMPTY_PATH
_NEW_FS = syscalls.MS_NOSUID | syscalls.MS_NODEV

#: statvfs f_flag bits, and the mount flags they stand for (they differ for relatime).
_STATVFS_TO_MS = (
    (os.ST_RDONLY, syscalls.MS_RDONLY),
    (os.ST_NOSUID, syscalls.MS_NOSUID),
    (os.ST_NODEV, syscalls.MS_NODEV),
    (os.ST_NOEXEC, syscalls.MS_NOEXEC),
    (os.ST_NOATIME, syscalls.MS_NOATIME),
    (os.ST_NODIRATIME, syscalls.MS_NODIRATIME),
    (os.ST_RELATIME, syscalls.MS_RELATIME),
)


def read_host_layout() -> HostLayout:
    """Which system paths this host has, and as what (the input of ``build_fs_plan``)."""
    entries: list[HostEntry] = []
    for path in SYSTEM_DIRS:
        if os.path.isdir(path):
            entries.append(HostDir(path))
    for path in MERGED_USR:
        if os.path.islink(path):
            entries.append(HostLink(path, os.readlink(path)))
        elif os.path.isdir(path):
            entries.append(HostDir(path))
    return HostLayout(tuple(entries))


def mount_flags_of(statvfs_flags: int) -> int:
    """The MS_* flags a mount has, from its statvfs ``f_flag`` (pure)."""
    return sum(ms for st, ms in _STATVFS_TO_MS if statvfs_flags & st)


def remount_flags(statvfs_flags: int, wanted: int) -> int | None:
    """The flags for a MS_BIND|MS_REMOUNT that adds ``wanted`` and keeps what the mount has.

    A bind remount sets every per-mount flag at once, so one not passed is cleared: the flags
    the source mount has (noexec, nosuid, atime) must be passed back, as bubblewrap does.
    None when the mount already has everything wanted (pure).
    """
    current = mount_flags_of(statvfs_flags)
    if current | wanted == current:
        return None
    return current | wanted


@contextlib.contextmanager
def _step(what: str) -> Iterator[None]:
    # The syscall wrappers name /proc/self/fd/N in their messages; the user needs the mount.
    with map_os_errors(SpawnError, what):
        try:
            yield
        except OSError as e:
            raise OSError(e.errno, os.strerror(e.errno or 0)) from e


def _clone(source: BindSource, source_fds: Sequence[int]) -> int:
    if isinstance(source, FdSource):
        if not 0 <= source.index < len(source_fds):
            raise OSError(errno.EBADF, f"no fd {source.index} came with the plan")
        return syscalls.open_tree(source_fds[source.index], "", _CLONE | syscalls.AT_EMPTY_PATH)
    return syscalls.open_tree(syscalls.AT_FDCWD, source.path, _CLONE)


def open_bind_trees(plan: FsPlan, source_fds: Sequence[int]) -> list[int]:
    """A detached copy of each Bind's source, in plan order (their fds, close-on-exec).

    Run in the daemon's mount namespace; ``source_fds`` are the fds ``FdSource`` indexes into.
    """
    trees: list[int] = []
    try:
        for step in plan.steps:
            if isinstance(step, Bind):
                with _step(f"opening the source of {step.target}"):
                    trees.append(_clone(step.source, source_fds))
    except BaseException:
        for fd in trees:
            os.close(fd)
        raise
    return trees


def _fd_path(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def _walk(root: int, parts: Sequence[str], create: bool) -> int:
    """An O_PATH fd of the directory ``parts`` below ``root``, following no symlink; ``root``
    itself when ``parts`` is empty (then the caller must not close it: see ``_release``)."""
    fd = root
    try:
        for name in parts:
            try:
                child = os.open(name, _DIR, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(name, 0o755, dir_fd=fd)
                child = os.open(name, _DIR, dir_fd=fd)
            _release(fd, root)
            fd = child
    except BaseException:
        _release(fd, root)
        raise
    return fd


def _release(fd: int, root: int) -> None:
    if fd != root:
        os.close(fd)


def _mount_point(root: int, target: str, kind: Literal["dir", "file"]) -> int:
    """An O_PATH fd of ``target`` below ``root``, made (with its parents) if missing."""
    *parents, name = target.strip("/").split("/")
    parent = _walk(root, parents, create=True)
    try:
        try:
            return os.open(name, _PATH, dir_fd=parent)
        except FileNotFoundError:
            if kind == "dir":
                os.mkdir(name, 0o755, dir_fd=parent)
            else:
                flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
                os.close(os.open(name, flags, 0o644, dir_fd=parent))
            return os.open(name, _PATH, dir_fd=parent)
    finally:
        _release(parent, root)


def _attach(root: int, tree: int, target: str, wanted: int) -> None:
    """Attach the detached ``tree`` at ``target``, then add the ``wanted`` flags."""
    kind: Literal["dir", "file"] = "dir" if stat.S_ISDIR(os.fstat(tree).st_mode) else "file"
    point = _mount_point(root, target, kind)
    try:
        syscalls.move_mount(tree, "", point, "", _ATTACH)
    finally:
        os.close(point)
    # The tree's fd now names the attached mount's root: the remount reaches it, not what is
    # under it (the mount point's fd would).
    flags = remount_flags(os.fstatvfs(tree).f_flag, wanted)
    if flags is not None:
        syscalls.mount(None, _fd_path(tree), None, syscalls.MS_BIND | syscalls.MS_REMOUNT | flags)


def _mount_new(root: int, target: str, fstype: str, flags: int, data: str | None) -> None:
    point = _mount_point(root, target, "dir")
    try:
        syscalls.mount(fstype, _fd_path(point), fstype, flags, data)
    finally:
        os.close(point)


def _cover(root: int, target: str) -> None:
    *parents, name = target.strip("/").split("/")
    try:
        parent = _walk(root, parents, create=False)
        try:
            point = os.open(name, _PATH, dir_fd=parent)
        finally:
            _release(parent, root)
    except FileNotFoundError:
        return  # nothing there to protect
    try:
        tree = syscalls.open_tree(point, "", _CLONE | syscalls.AT_EMPTY_PATH)
    finally:
        os.close(point)
    try:
        _attach(root, tree, target, syscalls.MS_RDONLY | _NEW_FS)
    finally:
        os.close(tree)


def _make_device(root: int, device: Device) -> None:
    *parents, name = device.target.strip("/").split("/")
    parent = _walk(root, parents, create=True)
    try:
        os.mknod(name, stat.S_IFCHR | 0o666, os.makedev(device.major, device.minor), dir_fd=parent)
        # mknod's mode is cut by the umask, which the job keeps: set it exactly.
        os.chmod(name, 0o666, dir_fd=parent)  # noqa: S103 - null, tty and the rest are 0666
    finally:
        _release(parent, root)


def _symlink(root: int, target: str, points_to: str) -> None:
    *parents, name = target.strip("/").split("/")
    parent = _walk(root, parents, create=True)
    try:
        os.symlink(points_to, name, dir_fd=parent)
    finally:
        _release(parent, root)


def _apply_step(root: int, step: FsStep, trees: Iterator[int]) -> None:
    if isinstance(step, Bind):
        read_only = syscalls.MS_RDONLY if step.access == "ro" else 0
        _attach(root, next(trees), step.target, _NEW_FS | read_only)
    elif isinstance(step, Device):
        _make_device(root, step)
    elif isinstance(step, DevTmpfs):
        options = f"size={step.size_bytes},mode=755"
        _mount_new(root, step.target, "tmpfs", syscalls.MS_NOSUID, options)
    elif isinstance(step, Tmpfs):
        options = f"size={step.size_bytes},mode={step.mode:o}"
        _mount_new(root, step.target, "tmpfs", _NEW_FS, options)
    elif isinstance(step, Symlink):
        _symlink(root, step.target, step.points_to)
    elif isinstance(step, Proc):
        _mount_new(root, step.target, "proc", _NEW_FS | syscalls.MS_NOEXEC, None)
    elif isinstance(step, Sysfs):
        flags = _NEW_FS | syscalls.MS_NOEXEC | syscalls.MS_RDONLY
        _mount_new(root, step.target, "sysfs", flags, None)
    elif isinstance(step, Devpts):
        options = "newinstance,ptmxmode=0666,mode=620"
        flags = syscalls.MS_NOSUID | syscalls.MS_NOEXEC
        _mount_new(root, step.target, "devpts", flags, options)
    elif isinstance(step, Cover):
        _cover(root, step.target)


def apply_fs_plan(plan: FsPlan, trees: Sequence[int]) -> None:
    """Build ``plan`` and make it the calling process's root; the old root is detached.

    Run in a private mount namespace (``/`` already MS_PRIVATE), in the PID namespace /proc is
    for, and in the network namespace /sys is for. Closes ``trees`` (from
    ``open_bind_trees``). Raise SpawnError naming the mount that failed.
    """
    enter_new_root(plan, trees)
    seal_root()


def enter_new_root(plan: FsPlan, trees: Sequence[int]) -> None:
    """As ``apply_fs_plan``, but the new root stays writable: a pool jail's standby builds
    the part of every job's plan ahead (``fsplan.split_fs_plan``), and ``finish_root`` adds
    the job's own steps and seals it."""
    remaining = iter(trees)
    try:
        with _step("mounting the new root"):
            options = f"size={plan.root_size_bytes},mode=755"
            syscalls.mount("tmpfs", STAGING, "tmpfs", _NEW_FS, options)
            root = os.open(STAGING, _DIR)
        try:
            _apply_steps(root, plan.steps, remaining)
            with _step("pivot_root"):
                _pivot_into(root)
        finally:
            os.close(root)
    finally:
        _close_all(trees)


def finish_root(steps: Sequence[FsStep], trees: Sequence[int]) -> None:
    """Apply ``steps`` to the calling process's root (made by ``enter_new_root``), with
    ``trees`` detached copies of their binds' sources (made in the daemon's mount namespace,
    by the fork server), then seal it. Closes ``trees``."""
    try:
        root = os.open("/", _DIR)
        try:
            _apply_steps(root, steps, iter(trees))
        finally:
            os.close(root)
        seal_root()
    finally:
        _close_all(trees)


def _apply_steps(root: int, steps: Sequence[FsStep], trees: Iterator[int]) -> None:
    for step in steps:
        with _step(f"mounting {step.target}"):
            _apply_step(root, step, trees)


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _pivot_into(root: int) -> None:
    # pivot_root(".", ".") stacks the old root on top of the new one at "/"; detaching it
    # (MNT_DETACH: lazily, so nothing still open in it can make this fail) leaves only the new.
    # No directory for the old root is needed in the new one.
    os.fchdir(root)
    syscalls.pivot_root(".", ".")
    syscalls.umount2(".", syscalls.MNT_DETACH)
    os.chdir("/")


def seal_root() -> None:
    """Make the root read-only: it holds only mount points and links, so not even a uid-0
    job can fill it or plant files beside the system directories."""
    with _step("sealing the root"):
        syscalls.mount(
            None, "/", None, syscalls.MS_BIND | syscalls.MS_REMOUNT | _NEW_FS | syscalls.MS_RDONLY
        )
