"""Bind sources (``--bind``/``--ro-bind``), opened as the client: what was checked is what is
mounted.

``open_bind_source`` resolves the client's path one component at a time, each an
``openat(O_PATH | O_NOFOLLOW)`` relative to the directory before it, *with the client's
credentials*, then asks the kernel whether the client may read (``--ro-bind``) or read and
write (``--bind``) the object it reached (``faccessat2`` on that fd). The result is that O_PATH
fd, so what is mounted later is the very inode that was checked, whatever happens to the path.

**Mounting it** is rootfs's: ``mount(MS_BIND)`` of ``/proc/self/fd/N`` fails (EINVAL) once the
job child has its own mount namespace, the fd's mount being in the daemon's, so the job child
takes a detached copy with open_tree(OPEN_TREE_CLONE) before it leaves the daemon's namespace
(``rootfs.open_bind_trees``) and attaches it with move_mount.

**Whose credentials, and how.** The daemon is one multi-threaded process, so it cannot become
the client: setuid() in glibc changes every thread. Forking a helper is no better: a fork of a
threaded Python process may deadlock before it gets to exec. Linux credentials belong to each
thread, though, and ``setfsuid``/``setfsgid`` (raw syscalls) plus a raw ``setgroups`` (glibc's
wrapper would broadcast it to every thread) change them for the calling thread only: file
access is then checked against the client's uid, gid and groups, and the kernel drops the
file-system capabilities (CAP_DAC_OVERRIDE…) from that thread while its fsuid is not 0. Each
check runs on a new thread that does exactly this and then exits, so the credentials die with
it and never reach other work. Nothing else in the daemon calls setuid/setgroups while it runs
(that would be broadcast to this thread too). A root client's check runs on the calling thread.

**Symlinks.** A symlink in the path is followed only when nobody but root or the client can
have put it there: it is owned by root or the client, and so is its directory, which nobody
else can write unless it is sticky (in /tmp only a link's owner can replace it). That follows
the system's links (/lib -> usr/lib, /var/run -> /run) and the client's own, and refuses one
planted by another user. Root clients get the same rule with "the client" being root: that is
what stops a user from steering a root-run job's ``--bind /tmp/x/data`` to /etc/shadow. Links
in /proc are never followed: their meaning depends on who resolves them (here, the daemon).
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import errno
import os
import platform
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeVar

from netjail.errors import BindSourceError, JailError, map_os_errors
from netjail.text import sanitize

if TYPE_CHECKING:
    # The wire's vocabulary, "ro" (--ro-bind) or "rw" (--bind): one home for it.
    from netjail.protocol import BindAccess

#: What the mount step needs to know to make the mount point: "file" is any non-directory.
SourceKind = Literal["directory", "file"]
SymlinkTrust = Literal["trusted", "foreign-owner", "shared-directory"]

#: As the kernel's own limit on symlinks followed in one lookup.
MAX_SYMLINKS = 40
_PATH_MAX = 4096
_PROC_SUPER_MAGIC = 0x9FA0
_AT_EMPTY_PATH = 0x1000
_AT_EACCESS = 0x200
_OPEN_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC

#: Raw syscall numbers (per-thread credentials; glibc's setgroups acts on every thread).
#: faccessat2 has one number everywhere; it is 5.8's, so older kernels fail closed (ENOSYS).
_SYSCALLS = {
    "x86_64": {"setgroups": 116, "setfsuid": 122, "setfsgid": 123, "faccessat2": 439},
    "aarch64": {"setgroups": 159, "setfsuid": 151, "setfsgid": 152, "faccessat2": 439},
}

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]

_T = TypeVar("_T")


@dataclass(frozen=True)
class Credentials:
    """Whose permissions a check uses: the client's uid, primary gid and supplementary groups."""

    uid: int
    gid: int
    groups: frozenset[int]


@dataclass(frozen=True)
class BindSource:
    """A checked bind source: an O_PATH, close-on-exec fd the caller owns (and must close)."""

    path: str
    fd: int
    kind: SourceKind

    def close(self) -> None:
        os.close(self.fd)


def option_name(access: BindAccess) -> str:
    """The option a user wrote for this access: --bind (read-write) or --ro-bind."""
    return "--bind" if access == "rw" else "--ro-bind"


def access_mode(access: BindAccess, kind: SourceKind) -> int:
    """What the client must be allowed: read (and write for --bind); search too on directories."""
    mode = os.R_OK | (os.W_OK if access == "rw" else 0)
    return mode | (os.X_OK if kind == "directory" else 0)


def symlink_trust(link: os.stat_result, directory: os.stat_result, uid: int) -> SymlinkTrust:
    """Whether a symlink (``link``, in ``directory``) is one only root or ``uid`` could plant."""
    owners = {0, uid}
    if link.st_uid not in owners:
        return "foreign-owner"
    shared = directory.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if directory.st_uid not in owners or (shared and not directory.st_mode & stat.S_ISVTX):
        return "shared-directory"
    return "trusted"


def _raw(name: str, *args: object) -> int:
    numbers = _SYSCALLS.get(platform.machine())
    if numbers is None:
        raise OSError(errno.ENOSYS, f"{platform.machine()} is not supported")
    result = int(_libc.syscall(ctypes.c_long(numbers[name]), *args))
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def _become(creds: Credentials) -> None:
    """Take ``creds`` for file access, on the calling thread only."""
    groups = sorted(creds.groups)
    array = (ctypes.c_uint32 * max(len(groups), 1))(*groups)
    _raw("setgroups", ctypes.c_long(len(groups)), array)
    _raw("setfsgid", ctypes.c_long(creds.gid))
    _raw("setfsuid", ctypes.c_long(creds.uid))
    # setfs[ug]id never fail: they return the old value. An invalid id (-1) changes nothing
    # and reports the current one, which must now be the client's.
    if _raw("setfsuid", ctypes.c_long(-1)) != creds.uid:
        raise OSError(errno.EPERM, f"fsuid is not {creds.uid}")
    if _raw("setfsgid", ctypes.c_long(-1)) != creds.gid:
        raise OSError(errno.EPERM, f"fsgid is not {creds.gid}")


def _run_as(creds: Credentials, work: Callable[[], _T]) -> _T:
    """``work()`` with ``creds`` on a thread of its own that exits after (root: right here)."""
    if creds.uid == 0:
        return work()
    results: list[_T] = []
    errors: list[BaseException] = []

    def body() -> None:
        try:
            with map_os_errors(JailError, f"bind check: taking uid {creds.uid}'s credentials"):
                _become(creds)
            results.append(work())
        except BaseException as e:  # re-raised on the caller's thread
            errors.append(e)

    thread = threading.Thread(target=body, name=f"bindcheck-{creds.uid}")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return results[0]


def _on_procfs(fd: int) -> bool:
    buffer = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on both arches
    if _libc.fstatfs(fd, buffer) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    # f_type, a long, is the first field.
    return ctypes.c_long.from_buffer(buffer).value == _PROC_SUPER_MAGIC


def _shown(names: list[str]) -> str:
    return "/" + "/".join(names)


def _refuse_symlink(link: os.stat_result, directory: int, names: list[str], uid: int) -> None:
    """Raise BindSourceError (the reason alone) unless the symlink at ``names`` may be followed."""
    where = sanitize(_shown(names))
    if _on_procfs(directory):
        raise BindSourceError(f"{where} is a symlink in /proc, which is never followed")
    trust = symlink_trust(link, os.fstat(directory), uid)
    if trust == "foreign-owner":
        raise BindSourceError(
            f"{where} is a symlink owned by uid {link.st_uid}; only root's and your own are "
            "followed"
        )
    if trust == "shared-directory":
        raise BindSourceError(
            f"{where} is a symlink in a directory others can change; give the path without it"
        )


def _resolve(path: str, uid: int) -> int:
    """The O_PATH fd ``path`` leads to, following only trusted symlinks (see module docs)."""
    pending = collections.deque(path.split("/"))
    names: list[str] = []
    current = os.open("/", _OPEN_FLAGS | os.O_DIRECTORY)
    followed = 0
    try:
        while pending:
            name = pending.popleft()
            if name in ("", "."):
                continue
            found = os.open(name, _OPEN_FLAGS, dir_fd=current)
            info = os.fstat(found)
            if name == "..":
                names = names[:-1]
            else:
                names.append(name)
            if not stat.S_ISLNK(info.st_mode):
                os.close(current)
                current = found
                continue
            try:
                followed += 1
                if followed > MAX_SYMLINKS:
                    raise BindSourceError(f"more than {MAX_SYMLINKS} symlinks")
                _refuse_symlink(info, current, names, uid)
                target = os.readlink("", dir_fd=found)
            finally:
                os.close(found)
            names.pop()
            if target.startswith("/"):
                names = []
                os.close(current)
                current = os.open("/", _OPEN_FLAGS | os.O_DIRECTORY)
            pending.extendleft(reversed(target.split("/")))
        if path.endswith("/") and not stat.S_ISDIR(os.fstat(current).st_mode):
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
    except BaseException:
        os.close(current)
        raise
    return current


def _check_access(fd: int, access: BindAccess, kind: SourceKind) -> None:
    flags = _AT_EMPTY_PATH | _AT_EACCESS
    mode = access_mode(access, kind)
    _raw("faccessat2", ctypes.c_long(fd), b"", ctypes.c_long(mode), ctypes.c_long(flags))


def _open_checked(path: str, creds: Credentials, access: BindAccess) -> tuple[int, SourceKind]:
    fd = _resolve(path, creds.uid)
    try:
        kind: SourceKind = "directory" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        _check_access(fd, access, kind)
    except BaseException:
        os.close(fd)
        raise
    return fd, kind


def _reason(e: OSError, creds: Credentials) -> str:
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied for uid {creds.uid}"
    if e.errno == errno.ENOSYS:
        return "the kernel cannot check access (faccessat2 needs Linux 5.8)"
    return (e.strerror or str(e)).lower()


def open_bind_source(path: str, creds: Credentials, access: BindAccess) -> BindSource:
    """Open ``path`` as the client ``creds`` for a bind mount with ``access``, or refuse.

    ``path`` must be absolute. Raises BindSourceError, one line naming the option and path:
    "--bind /root: permission denied for uid 1000". JailError if the check itself cannot run.
    """
    prefix = f"{option_name(access)} {sanitize(path)}"
    if not path.startswith("/") or "\0" in path or len(os.fsencode(path)) >= _PATH_MAX:
        raise BindSourceError(f"{prefix}: not an absolute path")
    try:
        fd, kind = _run_as(creds, lambda: _open_checked(path, creds, access))
    except BindSourceError as e:
        # Raised by the walk with the reason alone; the option and path go in front here.
        raise BindSourceError(f"{prefix}: {e}") from None
    except OSError as e:
        raise BindSourceError(f"{prefix}: {_reason(e, creds)}") from None
    try:
        on_procfs = _on_procfs(fd)
    except OSError as e:
        os.close(fd)
        raise BindSourceError(f"{prefix}: {_reason(e, creds)}") from None
    if on_procfs:
        # /proc/PID/cwd, /root and /fd of the host's processes lead to their files with the
        # processes' access, whatever the bind's: a read-only bind of /proc is no fence.
        os.close(fd)
        raise BindSourceError(f"{prefix}: /proc cannot be bound (it reaches host processes)")
    return BindSource(path, fd, kind)
