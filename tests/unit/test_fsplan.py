"""Tests for netjail.kernel.fsplan: the job's file system as an exact list of steps."""

from __future__ import annotations

import msgspec
import pytest

from netjail.errors import RequestError
from netjail.kernel.fsplan import (
    JOB_HOME,
    Bind,
    Cover,
    Device,
    Devpts,
    DevTmpfs,
    FdSource,
    FsPlan,
    HostDir,
    HostLayout,
    HostLink,
    KiB,
    MiB,
    PathSource,
    Proc,
    Symlink,
    Sysfs,
    Tmpfs,
    TmpfsSizes,
    build_fs_plan,
    check_target,
    shows_path,
    split_fs_plan,
)

HOST = HostLayout(
    (
        HostDir("/usr"),
        HostDir("/etc"),
        HostLink("/bin", "usr/bin"),
        HostLink("/lib", "usr/lib"),
        HostDir("/lib64"),
    )
)
HOME = PathSource("/var/lib/netjail/homes/j-1")
RESOLV = Bind(PathSource("/run/netjail/j-1/resolv.conf"), "/etc/resolv.conf", "ro")


def test_the_plan_is_exactly_the_allow_list() -> None:
    """System binds and links, tmpfs mounts, /dev, /proc, /sys, HOME, client binds, files."""
    binds = [Bind(FdSource(0), "/src", "rw"), Bind(FdSource(1), "/data/ref", "ro")]
    plan = build_fs_plan(
        host=HOST,
        home=HOME,
        binds=binds,
        files=[RESOLV],
        sizes=TmpfsSizes(tmp=1 * MiB, var_tmp=2 * MiB, run=3 * MiB, dev_shm=4 * MiB),
    )
    assert plan == FsPlan(
        root_size_bytes=1 * MiB,
        steps=(
            Bind(PathSource("/usr"), "/usr", "ro"),
            Bind(PathSource("/etc"), "/etc", "ro"),
            Symlink("/bin", "usr/bin"),
            Symlink("/lib", "usr/lib"),
            Bind(PathSource("/lib64"), "/lib64", "ro"),
            Tmpfs("/tmp", 1 * MiB, 0o1777),
            Tmpfs("/var/tmp", 2 * MiB, 0o1777),
            Tmpfs("/run", 3 * MiB, 0o755),
            DevTmpfs("/dev", 64 * KiB),
            Device("/dev/null", 1, 3),
            Device("/dev/zero", 1, 5),
            Device("/dev/full", 1, 7),
            Device("/dev/random", 1, 8),
            Device("/dev/urandom", 1, 9),
            Device("/dev/tty", 5, 0),
            Devpts("/dev/pts"),
            Tmpfs("/dev/shm", 4 * MiB, 0o1777),
            Symlink("/dev/fd", "/proc/self/fd"),
            Symlink("/dev/stdin", "/proc/self/fd/0"),
            Symlink("/dev/stdout", "/proc/self/fd/1"),
            Symlink("/dev/stderr", "/proc/self/fd/2"),
            Symlink("/dev/ptmx", "pts/ptmx"),
            Proc("/proc"),
            Cover("/proc/sys"),
            Cover("/proc/sysrq-trigger"),
            Cover("/proc/irq"),
            Cover("/proc/bus"),
            Sysfs("/sys"),
            Bind(HOME, JOB_HOME, "rw"),
            Bind(FdSource(0), "/src", "rw"),
            Bind(FdSource(1), "/data/ref", "ro"),
            RESOLV,
        ),
    )


def test_default_tmpfs_sizes() -> None:
    """The shipped limits: 256 MiB for /tmp, /var/tmp and /dev/shm, 16 MiB for /run, 64 KiB
    for /dev."""
    sizes = {
        s.target: s.size_bytes
        for s in build_fs_plan(host=HostLayout(()), home=HOME).steps
        if isinstance(s, Tmpfs | DevTmpfs)
    }
    assert sizes == {
        "/tmp": 256 * MiB,
        "/var/tmp": 256 * MiB,
        "/run": 16 * MiB,
        "/dev": 64 * KiB,
        "/dev/shm": 256 * MiB,
    }


def test_nothing_from_the_host_without_a_layout_entry() -> None:
    """Only the host paths the layout lists are bound: no /home, /root, /var or /srv."""
    plan = build_fs_plan(host=HostLayout((HostDir("/usr"),)), home=HOME)
    sources = [s.source for s in plan.steps if isinstance(s, Bind)]
    assert sources == [PathSource("/usr"), HOME]


def test_the_daemons_files_come_after_client_binds() -> None:
    """A client's bind over /etc cannot hide the job's resolv.conf: files are mounted last."""
    over_etc = Bind(FdSource(0), "/etc", "ro")
    plan = build_fs_plan(host=HOST, home=HOME, binds=[over_etc], files=[RESOLV])
    assert plan.steps[-2:] == (over_etc, RESOLV)


def test_the_plan_crosses_the_fork_servers_socket_intact() -> None:
    """The plan survives a msgpack round trip, every step's type included."""
    plan = build_fs_plan(host=HOST, home=HOME, binds=[Bind(FdSource(2), "/x", "rw")])
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(plan), type=FsPlan)
    assert decoded == plan


@pytest.mark.parametrize(
    "target",
    [
        "",
        "relative",
        "/",
        "//etc",
        "/a/../etc",
        "/a/./b",
        "/a//b",
        "/a/",
        "/a\0b",
        "/" + "a" * 5000,
    ],
)
def test_bad_targets_are_refused(target: str) -> None:
    """A bind target must be absolute and normalised, and not the root itself."""
    with pytest.raises(RequestError, match="must be an absolute path"):
        check_target(target)
    with pytest.raises(RequestError):
        build_fs_plan(host=HOST, home=HOME, binds=[Bind(FdSource(0), target, "ro")])


@pytest.mark.parametrize("target", ["/src", "/home/job/project", "/etc/ssl/certs/ca.pem"])
def test_good_targets_pass(target: str) -> None:
    """Absolute, normalised paths are accepted as they are."""
    check_target(target)
    plan = build_fs_plan(host=HOST, home=HOME, files=[Bind(PathSource("/f"), target, "ro")])
    assert plan.steps[-1].target == target


def test_a_bad_target_names_itself_safely() -> None:
    """The refusal quotes the target with control characters escaped."""
    with pytest.raises(RequestError) as caught:
        check_target("/a/../\x1b[31m")
    assert "\x1b" not in str(caught.value)
    assert "\\x1b" in str(caught.value)


@pytest.mark.parametrize(
    ("path", "shown"),
    [
        ("/", True),
        ("/usr", True),
        ("/usr/bin/python3", True),
        ("/bin", True),
        ("/dev/null", True),
        ("/proc/self", True),
        ("/home/job/project", True),
        ("/src/lib", True),
        ("/home", True),  # on the way to /home/job
        ("/var", True),
        ("/var/tmp", True),
        ("/dev/pts/0", True),
        ("/home/alice", False),
        ("/root", False),
        ("/srcx", False),
        ("/var/tmp/x", False),  # below an empty tmpfs
        ("/tmp/work", False),
        ("/dev/sda", False),
    ],
)
def test_shows_path(path: str, shown: bool) -> None:
    """A path is in the job's view at a mount point or on the way to one, and below a bind, a
    symlink or a kernel file system; below a tmpfs only at mount points made in it."""
    plan = build_fs_plan(host=HOST, home=HOME, binds=[Bind(FdSource(0), "/src", "rw")])
    assert shows_path(plan, path) is shown


def test_split_fs_plan_puts_every_jobs_own_steps_after_the_shared_part() -> None:
    """The shared part ends before HOME: the system, tmpfs mounts, /dev, /proc and /sys; the
    job's part is HOME, its binds and the daemon's files, in order, and the two make the plan."""
    home = PathSource("/var/lib/netjail/homes/j-1")
    binds = [Bind(FdSource(0), "/data", "ro")]
    files = [Bind(PathSource("/etc/netjail/resolv.conf"), "/etc/resolv.conf", "ro")]
    plan = build_fs_plan(host=HostLayout((HostDir("/usr"),)), home=home, binds=binds, files=files)
    base, own = split_fs_plan(plan)
    assert [step.target for step in own] == [JOB_HOME, "/data", "/etc/resolv.conf"]
    assert (*base.steps, *own) == plan.steps
    assert base.root_size_bytes == plan.root_size_bytes
    other = build_fs_plan(host=HostLayout((HostDir("/usr"),)), home=PathSource("/elsewhere"))
    assert split_fs_plan(other)[0] == base
