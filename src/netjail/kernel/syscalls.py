"""Thin ctypes wrappers for the Linux syscalls Python 3.11's ``os`` lacks.

``os.setns``/``os.unshare`` arrived in Python 3.12; mount, the new mount API (open_tree,
move_mount), pivot_root, sethostname, capset and the prctl calls are in no stdlib version. Each
wrapper raises OSError with errno, exactly as ``os`` functions do.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Mapping, Sequence

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MNT_DETACH = 0x2

# The new mount API (Linux 5.2): a detached copy of a mount, and attaching it elsewhere.
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40

#: Syscall numbers glibc 2.36 has no wrapper for. open_tree and move_mount come from the
#: unified table (the same number on every architecture); pivot_root predates it.
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_SECUREBITS = 28
PR_SET_NO_NEW_PRIVS = 38
PR_SET_CHILD_SUBREAPER = 36
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

# securebits: root gets no capabilities from exec or setuid, and that is locked for the job's
# whole process tree, so a job run with uid 0 still has no capabilities. KEEP_CAPS is not
# locked: it only matters to a process holding CAP_SETUID (a job never does), and ping and
# other tools call prctl(PR_SET_KEEPCAPS), which a lock would make fail.
SECBIT_NOROOT = 1 << 0
SECBIT_NOROOT_LOCKED = 1 << 1
SECBIT_NO_SETUID_FIXUP_LOCKED = 1 << 3
SECBIT_NO_CAP_AMBIENT_RAISE = 1 << 6
SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED = 1 << 7
JOB_SECUREBITS = (
    SECBIT_NOROOT
    | SECBIT_NOROOT_LOCKED
    | SECBIT_NO_SETUID_FIXUP_LOCKED
    | SECBIT_NO_CAP_AMBIENT_RAISE
    | SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED
)

_LINUX_CAPABILITY_VERSION_3 = 0x20080522

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_libc.syscall.restype = ctypes.c_long
_libc.posix_spawnp.argtypes = [
    ctypes.POINTER(ctypes.c_int),
    ctypes.c_char_p,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_char_p),
    ctypes.POINTER(ctypes.c_char_p),
]
_libc.posix_spawn_file_actions_adddup2.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
_libc.posix_spawn_file_actions_addclose.argtypes = [ctypes.c_void_p, ctypes.c_int]
_libc.posix_spawnattr_setpgroup.argtypes = [ctypes.c_void_p, ctypes.c_int]
_libc.posix_spawnattr_setflags.argtypes = [ctypes.c_void_p, ctypes.c_short]
# Every function the job's init calls is looked up here, at import, with its prototype:
# looked up in the init, a fork of the fork server, each would be a dlsym and new objects
# there (copy-on-write faults included), for every job.
for _name in (
    "posix_spawn_file_actions_init",
    "posix_spawn_file_actions_destroy",
    "posix_spawnattr_init",
    "posix_spawnattr_destroy",
    "sigemptyset",
    "sigfillset",
):
    getattr(_libc, _name).argtypes = [ctypes.c_void_p]
_libc.posix_spawnattr_setsigmask.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
_libc.posix_spawnattr_setsigdefault.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
_libc.capset.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
#: glibc 2.35 and later: the child takes the terminal's foreground before it execs.
_addtcsetpgrp = getattr(_libc, "posix_spawn_file_actions_addtcsetpgrp_np", None)
if _addtcsetpgrp is not None:
    _addtcsetpgrp.argtypes = [ctypes.c_void_p, ctypes.c_int]

# glibc's posix_spawnattr flags.
_POSIX_SPAWN_SETPGROUP = 0x02
_POSIX_SPAWN_SETSIGDEF = 0x04
_POSIX_SPAWN_SETSIGMASK = 0x08
#: Room for glibc's opaque posix_spawn_file_actions_t (80 bytes), posix_spawnattr_t (336) and
#: sigset_t (128), with margin: they are only ever handled by glibc.
_OPAQUE = 1024
#: The spawned command's signal mask (none blocked) and the signals it gets at their default
#: (all), made once: glibc copies them into each spawn's attributes.
_NO_SIGNALS = ctypes.create_string_buffer(_OPAQUE)
_ALL_SIGNALS = ctypes.create_string_buffer(_OPAQUE)
_libc.sigemptyset(_NO_SIGNALS)
_libc.sigfillset(_ALL_SIGNALS)
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    """unshare(2) for the calling thread."""
    _check(_libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int) -> None:
    """setns(2): move the calling thread into the namespace open at ``fd``."""
    _check(_libc.setns(fd, nstype), "setns")


def mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None
) -> None:
    """mount(2)."""
    _check(
        _libc.mount(
            source.encode() if source is not None else None,
            target.encode(),
            fstype.encode() if fstype is not None else None,
            flags,
            data.encode() if data is not None else None,
        ),
        f"mount {target}",
    )


def umount2(target: str, flags: int) -> None:
    """umount2(2)."""
    _check(_libc.umount2(target.encode(), flags), f"umount {target}")


def madvise(address: int, length: int, advice: int) -> None:
    """madvise(2) on this process's own memory."""
    _check(_libc.madvise(address, length, advice), "madvise")


def open_tree(dirfd: int, path: str, flags: int) -> int:
    """open_tree(2): with OPEN_TREE_CLONE, a detached copy of the mount at ``path``; its fd.

    The copy belongs to no mount namespace until ``move_mount`` attaches it, so a tree taken in
    one mount namespace can be attached in another, which a plain bind mount refuses.
    """
    fd = _libc.syscall(
        ctypes.c_long(_SYS_OPEN_TREE), ctypes.c_int(dirfd), path.encode(), ctypes.c_uint(flags)
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"open_tree {path}: {os.strerror(err)}")
    return int(fd)


def move_mount(from_dirfd: int, from_path: str, to_dirfd: int, to_path: str, flags: int) -> None:
    """move_mount(2): attach (or move) the mount at ``from`` onto ``to``."""
    result = _libc.syscall(
        ctypes.c_long(_SYS_MOVE_MOUNT),
        ctypes.c_int(from_dirfd),
        from_path.encode(),
        ctypes.c_int(to_dirfd),
        to_path.encode(),
        ctypes.c_uint(flags),
    )
    _check(int(result), "move_mount")


def pivot_root(new_root: str, put_old: str) -> None:
    """pivot_root(2)."""
    number = _SYS_PIVOT_ROOT.get(os.uname().machine)
    if number is None:
        raise OSError(errno.ENOSYS, f"pivot_root: no syscall number known for {os.uname().machine}")
    result = _libc.syscall(ctypes.c_long(number), new_root.encode(), put_old.encode())
    _check(int(result), "pivot_root")


def sethostname(name: str) -> None:
    """sethostname(2), for the calling process's UTS namespace."""
    encoded = name.encode()
    _check(_libc.sethostname(encoded, len(encoded)), "sethostname")


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> None:
    """prctl(2) for options that return 0 on success."""
    _check(_libc.prctl(option, arg2, arg3, arg4, arg5), f"prctl({option})")


def lock_out_capabilities() -> None:
    """Clear the ambient set and lock securebits so that no exec or setuid grants capabilities.

    Must run while the process still has CAP_SETPCAP (i.e. before setuid). Together with
    ``clear_capability_sets`` after setuid and no_new_privs before exec, the job holds no
    capability and can gain none.

    The bounding set is deliberately left alone: emptying it makes the kernel refuse to exec
    any binary with file capabilities (ping, for one) with EPERM — the attempt would then never
    reach the firewall to be logged — while it adds nothing: under no_new_privs, file
    capabilities and setuid bits grant nothing anyway.
    """
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    prctl(PR_SET_SECUREBITS, JOB_SECUREBITS)


def clear_capability_sets() -> None:
    """capset(2) every set to empty for the calling thread."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(header), ctypes.byref(data)), "capset")


def spawn_command(
    argv: Sequence[str],
    env: Mapping[str, str],
    stdio: Sequence[int],
    *,
    foreground_of: int | None,
) -> int:
    """posix_spawnp(3): run ``argv`` with exactly ``env``; its pid, or OSError (the exec's errno).

    glibc clones with CLONE_VM|CLONE_VFORK and the child runs only glibc's code until exec, so
    no page table is copied and no Python runs in it. The child gets ``stdio`` on fds 0-2
    (every other fd of the caller must be close-on-exec), a process group of its own, every
    signal at its default and none blocked. With ``foreground_of`` (a terminal's fd number in
    the child, after the dup2s) it first makes its group that terminal's foreground group;
    glibc blocks every signal in the child until exec, so doing that from the background does
    not stop it. The command is looked up in the caller's PATH, as posix_spawnp does.
    """
    actions = ctypes.create_string_buffer(_OPAQUE)
    attr = ctypes.create_string_buffer(_OPAQUE)
    _libc.posix_spawn_file_actions_init(actions)
    _libc.posix_spawnattr_init(attr)
    try:
        for target, fd in enumerate(stdio):
            _libc.posix_spawn_file_actions_adddup2(actions, fd, target)
        for fd in sorted({fd for fd in stdio if fd > 2}):
            _libc.posix_spawn_file_actions_addclose(actions, fd)
        if foreground_of is not None:
            if _addtcsetpgrp is None:
                # Without it the command would start in the background of its terminal, and
                # stop at its first read: refuse rather than hang.
                raise OSError(errno.ENOSYS, "this glibc cannot give a spawned process a terminal")
            _addtcsetpgrp(actions, foreground_of)
        _libc.posix_spawnattr_setflags(
            attr, _POSIX_SPAWN_SETPGROUP | _POSIX_SPAWN_SETSIGDEF | _POSIX_SPAWN_SETSIGMASK
        )
        _libc.posix_spawnattr_setpgroup(attr, 0)
        _libc.posix_spawnattr_setsigmask(attr, _NO_SIGNALS)
        _libc.posix_spawnattr_setsigdefault(attr, _ALL_SIGNALS)
        args = (ctypes.c_char_p * (len(argv) + 1))(*(a.encode() for a in argv), None)
        pairs = [f"{key}={value}".encode() for key, value in env.items()]
        envp = (ctypes.c_char_p * (len(pairs) + 1))(*pairs, None)
        pid = ctypes.c_int()
        err = _libc.posix_spawnp(ctypes.byref(pid), args[0], actions, attr, args, envp)
    finally:
        _libc.posix_spawn_file_actions_destroy(actions)
        _libc.posix_spawnattr_destroy(attr)
    if err:
        raise OSError(err, os.strerror(err))
    return pid.value
