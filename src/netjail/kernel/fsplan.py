"""The job's file system as data: an allow-list of mounts, built by one pure function.

bubblewrap's model, not a deny-list: the job's root is an empty tmpfs, and only what is listed
here appears in it. ``build_fs_plan`` turns the host's layout (``HostLayout``, read once by
``netjail.kernel.rootfs.read_host_layout``), the job's HOME, the client's binds and the
daemon's own files into an ordered list of steps; ``netjail.kernel.rootfs`` applies them in the
job's mount namespace. The plan is a msgspec struct, so it crosses the fork server's socket as
it is; nothing here does I/O.

What a job sees, and why:

- ``/usr``, ``/etc``, ``/opt`` (when present): read-only binds of the host's. Non-recursive:
  mounts below them on the host are not carried in.
- ``/bin``, ``/sbin``, ``/lib``, ``/lib32``, ``/lib64``, ``/libx32``: the same symlinks as the
  host's on a merged-/usr system, read-only binds where the host has real directories.
- ``/tmp``, ``/var/tmp``, ``/run``, ``/dev/shm``: private tmpfs mounts with size limits, freed
  when the job's mount namespace goes away. So no host Unix socket in them is reachable.
- ``/dev``: a tmpfs with the nodes null, zero, full, random, urandom and tty, a private devpts
  instance, and the fd/stdin/stdout/stderr links (bubblewrap's ``--dev``). The nodes are
  made (mknod, as runc does when it may) rather than bound from the host as bubblewrap must in
  a user namespace: six mounts fewer to make and to tear down for every job. A job cannot
  make a node itself (it holds no CAP_MKNOD).
- ``/proc`` for the job's PID namespace, with /proc/sys, sysrq-trigger, irq and bus covered
  read-only as bubblewrap does: a job run as uid 0 holds no capability, yet the kernel lets
  euid 0 write most sysctls (core_pattern among them) and /proc/sysrq-trigger.
- ``/sys``: sysfs mounted read-only from inside the jail's network namespace, so
  /sys/class/net lists only the jail's interfaces. Kept rather than left out because glibc,
  Python and Node read CPU and memory topology there; a fresh sysfs carries none of the
  host's submounts (cgroup, bpf, debugfs, securityfs).
- ``/home/job``: the per-job HOME, a host directory the daemon makes empty for the job and
  removes after it, bound read-write. One fixed path for every job, whatever its uid: no
  /etc/passwd entry names it, so a job never takes it for its user's real home (whose
  contents it does not have), and no host user name shows in paths the job reports.
- the client's ``--bind``/``--ro-bind`` mounts, then the daemon's own files (resolv.conf, a CA
  bundle) last, so a client bind over /etc cannot hide them.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from typing import Literal

import msgspec

from netjail.errors import RequestError

MiB = 1 << 20
KiB = 1 << 10

#: Where the per-job HOME appears in the jail; also the job's default cwd and $HOME.
JOB_HOME = "/home/job"
#: For a job that intercepts: the trust bundle (the host's CAs and the job's) and the job's CA
#: alone, where the job's trust variables point. The bundle is also bound over each of
#: TRUST_BUNDLES that the host has as a regular file.
JOB_CA_BUNDLE = "/run/netjail/ca-bundle.pem"
JOB_CA_FILE = "/run/netjail/job-ca.pem"
#: The system trust bundles of Debian/Ubuntu, Fedora/RHEL (and its older path), and Alpine.
TRUST_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
)

#: Read-write or read-only; a field of the data, not a mode of any function.
Access = Literal["ro", "rw"]

#: Host directories bound read-only when they exist (symlinks to directories are followed).
SYSTEM_DIRS = ("/usr", "/etc", "/opt")
#: Top-level entries that a merged-/usr host has as symlinks into /usr.
MERGED_USR = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
#: The private /dev's nodes: (name, major, minor), Linux's fixed numbers (devices.txt).
DEVICES = (
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
)
#: Links in the private /dev, as bubblewrap makes them.
DEV_LINKS = (
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("ptmx", "pts/ptmx"),
)
#: Parts of /proc made read-only (bubblewrap's cover_proc_dirs); one missing is skipped.
PROC_COVERS = ("sys", "sysrq-trigger", "irq", "bus")

#: The root holds only mount points and links, and is made read-only once built.
ROOT_SIZE_BYTES = 1 * MiB
#: /dev holds only device nodes and links.
DEV_SIZE_BYTES = 64 * KiB
_MAX_TARGET = 4096


class PathSource(msgspec.Struct, frozen=True, tag="path"):
    """A host path the daemon chose itself: a system directory, the job's HOME, resolv.conf."""

    path: str


class FdSource(msgspec.Struct, frozen=True, tag="fd"):
    """The ``index``-th fd sent along with the plan: a client's bind source, already opened
    (O_PATH) and checked with the client's credentials (``pathcheck.open_bind_source``)."""

    index: int


BindSource = PathSource | FdSource


class Bind(msgspec.Struct, frozen=True, tag="bind"):
    """Bind ``source`` (a directory or any other file) at ``target``; read-only unless ``rw``.

    Every bind is nosuid and nodev, and keeps the flags its source mount has (noexec, atime).
    """

    source: BindSource
    target: str
    access: Access


class Device(msgspec.Struct, frozen=True, tag="device"):
    """A character device node ``major``:``minor`` at ``target``, mode 0666."""

    target: str
    major: int
    minor: int


class Tmpfs(msgspec.Struct, frozen=True, tag="tmpfs"):
    """A private tmpfs (nosuid, nodev) of at most ``size_bytes``."""

    target: str
    size_bytes: int
    mode: int


class DevTmpfs(msgspec.Struct, frozen=True, tag="devtmpfs"):
    """The private /dev: a tmpfs of at most ``size_bytes``, mode 0755, nosuid but not nodev,
    since its ``Device`` nodes are made in it."""

    target: str
    size_bytes: int


class Symlink(msgspec.Struct, frozen=True, tag="symlink"):
    """A symlink at ``target`` whose content is ``points_to``."""

    target: str
    points_to: str


class Proc(msgspec.Struct, frozen=True, tag="proc"):
    """procfs for the PID namespace of the process that mounts it (nosuid, nodev, noexec)."""

    target: str


class Sysfs(msgspec.Struct, frozen=True, tag="sysfs"):
    """sysfs, read-only, for the network namespace of the process that mounts it."""

    target: str


class Devpts(msgspec.Struct, frozen=True, tag="devpts"):
    """A new devpts instance: the job's ptys are its own (ptmxmode=0666, mode=620)."""

    target: str


class Cover(msgspec.Struct, frozen=True, tag="cover"):
    """Bind ``target`` onto itself read-only; skipped if it does not exist."""

    target: str


FsStep = Bind | Device | Tmpfs | DevTmpfs | Symlink | Proc | Sysfs | Devpts | Cover


class FsPlan(msgspec.Struct, frozen=True):
    """The job's whole file system: a tmpfs root of ``root_size_bytes``, then ``steps`` in order.

    Every target is an absolute path in the job's view; missing mount points are created.
    """

    root_size_bytes: int
    steps: tuple[FsStep, ...]


class TmpfsSizes(msgspec.Struct, frozen=True):
    """Size limits of the job's tmpfs mounts, in bytes (the pages also count against the
    job's memory cgroup, as the writer's)."""

    tmp: int = 256 * MiB
    var_tmp: int = 256 * MiB
    run: int = 16 * MiB
    dev_shm: int = 256 * MiB


class HostDir(msgspec.Struct, frozen=True, tag="dir"):
    """A system path that is a directory on the host."""

    path: str


class HostLink(msgspec.Struct, frozen=True, tag="link"):
    """A system path that is a symlink on the host, and what it says."""

    path: str
    points_to: str


HostEntry = HostDir | HostLink


class HostLayout(msgspec.Struct, frozen=True):
    """Which of SYSTEM_DIRS and MERGED_USR the host has, and as what; absent ones are left out."""

    entries: tuple[HostEntry, ...]


def build_fs_plan(
    *,
    host: HostLayout,
    home: PathSource,
    binds: Sequence[Bind] = (),
    files: Sequence[Bind] = (),
    sizes: TmpfsSizes = TmpfsSizes(),  # noqa: B008 - a frozen struct, never mutated
) -> FsPlan:
    """The job's file system: the system from ``host``, HOME, the client's ``binds`` (in their
    order), then the daemon's ``files``. Raise RequestError for a target that is not an
    absolute, normalised path other than /."""
    for bind in (*binds, *files):
        check_target(bind.target)
    steps: list[FsStep] = []
    for entry in host.entries:
        if isinstance(entry, HostLink):
            steps.append(Symlink(entry.path, entry.points_to))
        else:
            steps.append(Bind(PathSource(entry.path), entry.path, "ro"))
    # Paths in the job's view, each a fresh tmpfs there: not the host's shared temp directories.
    steps += [
        Tmpfs("/tmp", sizes.tmp, 0o1777),  # noqa: S108
        Tmpfs("/var/tmp", sizes.var_tmp, 0o1777),  # noqa: S108
        Tmpfs("/run", sizes.run, 0o755),
        DevTmpfs("/dev", DEV_SIZE_BYTES),
        *(Device(f"/dev/{name}", major, minor) for name, major, minor in DEVICES),
        Devpts("/dev/pts"),
        Tmpfs("/dev/shm", sizes.dev_shm, 0o1777),  # noqa: S108
        *(Symlink(f"/dev/{name}", points_to) for name, points_to in DEV_LINKS),
        Proc("/proc"),
        *(Cover(f"/proc/{name}") for name in PROC_COVERS),
        Sysfs("/sys"),
        Bind(home, JOB_HOME, "rw"),
        *binds,
        *files,
    ]
    return FsPlan(root_size_bytes=ROOT_SIZE_BYTES, steps=tuple(steps))


def split_fs_plan(plan: FsPlan) -> tuple[FsPlan, tuple[FsStep, ...]]:
    """The part of ``plan`` that is the same for every job (the system, the tmpfs mounts,
    /dev, /proc, /sys), as a plan of its own, and the job's own steps after it (HOME, the
    client's binds, the daemon's files), in order (pure). A pool jail's standby builds the
    first before any job exists."""
    for index, step in enumerate(plan.steps):
        if step.target == JOB_HOME:
            return FsPlan(plan.root_size_bytes, plan.steps[:index]), plan.steps[index:]
    return plan, ()


def check_target(target: str) -> None:
    """Raise RequestError unless ``target`` is an absolute, normalised path other than /."""
    if (
        not target.startswith("/")
        or target == "/"
        or len(target) > _MAX_TARGET
        or "\0" in target
        or posixpath.normpath(target) != target
        or target.startswith("//")
    ):
        raise RequestError(
            f"bind target {target[:200]!a} must be an absolute path without '..', "
            "'.' or repeated slashes, and not /"
        )


def shows_path(plan: FsPlan, path: str) -> bool:
    """Whether the job can find anything at ``path`` (absolute, normalised) (pure): it is /, a
    mount point or a directory on the way to one, or it lies below a bind, a symlink or a
    kernel file system (/proc, /sys, /dev/pts). Below a tmpfs there is nothing but the mount
    points made in it: the job's tmpfs mounts start empty."""
    if path == "/":
        return True
    for step in plan.steps:
        target = step.target
        if path == target or target.startswith(path + "/"):
            return True
        if path.startswith(target + "/") and not isinstance(step, Tmpfs | DevTmpfs):
            return True
    return False
