"""The job seccomp filter against the real kernel: each probe runs in a forked child that makes
its own network and mount namespaces, drops to the test user (or stays root), loads the filter
as the job child does, and execs the probe. Without a daemon.

Each denial that an unprivileged process would also meet without the filter is checked where
the filter alone decides it: against a control run without the filter, or as root.
"""

from __future__ import annotations

import json
import platform
import pwd
import signal
import subprocess
import sys
import textwrap
from typing import Literal

import pytest

from netjail.kernel import seccomp

Filter = Literal["seccomp", "none"]

#: Runs in the forked child (root): namespaces, ping sockets allowed in that netns only, the
#: uid drop, the filter, exec. The order matches the job child's.
_CHILD = textwrap.dedent(
    """
    import json, os, subprocess, sys
    from netjail.kernel import seccomp, syscalls
    spec = json.loads(sys.argv[1])
    syscalls.unshare(syscalls.CLONE_NEWNET | syscalls.CLONE_NEWNS)
    syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    with open("/proc/sys/net/ipv4/ping_group_range", "w") as f:
        f.write("0 2147483647")
    if spec["filter"] == "seccomp":
        seccomp.prepare_job_filter()
    if spec["uid"] != 0:
        os.setgroups([])
        os.setresgid(spec["gid"], spec["gid"], spec["gid"])
        os.setresuid(spec["uid"], spec["uid"], spec["uid"])
    syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)
    if spec["filter"] == "seccomp":
        seccomp.load_job_filter()
    os.chdir("/")
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/", "LANG": "C.UTF-8"}
    os.execvpe(spec["argv"][0], spec["argv"], env)
    """
)

#: A probe in the system python: runs one statement; prints "ok" or the errno's name.
_PROBE = textwrap.dedent(
    """
    import ctypes, errno, fcntl, os, socket, sys, termios
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    def raw(*args):
        result = libc.syscall(*(ctypes.c_long(a) for a in args))
        if result == -1:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        return result
    def own_tty():
        # A session of our own with a new pty as its controlling terminal.
        os.setsid()
        master, slave = os.openpty()
        return os.open(os.ttyname(slave), os.O_RDWR)
    try:
        {statement}
    except OSError as e:
        print(errno.errorcode.get(e.errno, e.errno))
    else:
        print("ok")
    """
)


def _nr(name: str) -> int:
    """The native number of syscall ``name`` (libseccomp's table)."""
    import pyseccomp  # type: ignore[import-untyped]  # noqa: PLC0415 - ships no types

    number: int = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)
    return number


def _run(
    argv: list[str], user: pwd.struct_passwd | None, job_filter: Filter
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as ``user`` (root when None) with or without the job filter."""
    uid, gid = (user.pw_uid, user.pw_gid) if user is not None else (0, 0)
    spec = {"argv": argv, "uid": uid, "gid": gid, "filter": job_filter}
    return subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _probe(statement: str, user: pwd.struct_passwd | None, job_filter: Filter) -> str:
    """What ``statement`` gives in the system python: "ok" or an errno name."""
    result = _run(["/usr/bin/python3", "-c", _PROBE.format(statement=statement)], user, job_filter)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_vsock_socket_fails_with_eafnosupport(test_user: pwd.struct_passwd) -> None:
    """socket(AF_VSOCK) fails with EAFNOSUPPORT under the filter, where it works without it."""
    statement = "socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close()"
    if _probe(statement, test_user, "none") != "ok":
        pytest.skip("this kernel has no AF_VSOCK to deny")
    assert _probe(statement, test_user, "seccomp") == "EAFNOSUPPORT"


def test_vsock_with_junk_in_the_upper_half_still_fails(test_user: pwd.struct_passwd) -> None:
    """A domain of (1 << 32) | AF_VSOCK, which the kernel truncates to AF_VSOCK, is refused."""
    statement = f"os.close(raw({_nr('socket')}, (1 << 32) | socket.AF_VSOCK, 1, 0))"
    if _probe(statement, test_user, "none") != "ok":
        pytest.skip("this kernel has no AF_VSOCK to deny")
    assert _probe(statement, test_user, "seccomp") == "EAFNOSUPPORT"


@pytest.mark.parametrize(
    ("family", "kind", "protocol"),
    [
        ("socket.AF_PACKET", "socket.SOCK_DGRAM", 0),
        ("socket.AF_ALG", "socket.SOCK_SEQPACKET", 0),
        ("socket.AF_NETLINK", "socket.SOCK_RAW", 9),  # NETLINK_AUDIT
        ("socket.AF_NETLINK", "socket.SOCK_RAW", 4),  # NETLINK_SOCK_DIAG
    ],
)
def test_other_families_fail_with_eafnosupport(family: str, kind: str, protocol: int) -> None:
    """Other families fail with EAFNOSUPPORT under the filter, even for root, who can make them."""
    statement = f"socket.socket({family}, {kind}, {protocol}).close()"
    if _probe(statement, None, "none") != "ok":
        pytest.skip(f"this kernel cannot make {family} {protocol} sockets anyway")
    assert _probe(statement, None, "seccomp") == "EAFNOSUPPORT"


@pytest.mark.parametrize(
    "statement",
    [
        "socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()",
        "socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).close()",
        "socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close()",
        "socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0).close()",
        "[s.close() for s in socket.socketpair(socket.AF_UNIX)]",
    ],
)
def test_allowed_families_work(test_user: pwd.struct_passwd, statement: str) -> None:
    """unix, inet, inet6 and netlink-route sockets (and unix socketpairs) are still made."""
    assert _probe(statement, test_user, "seccomp") == "ok"


def test_unshare_user_namespace_fails(test_user: pwd.struct_passwd) -> None:
    """`unshare -U true` fails under the filter; without it, the same user may do it."""
    control = _run(["/usr/bin/unshare", "-U", "true"], test_user, "none")
    if control.returncode != 0:
        pytest.skip(f"unprivileged user namespaces are off here: {control.stderr.strip()}")
    result = _run(["/usr/bin/unshare", "-U", "true"], test_user, "seccomp")
    assert result.returncode != 0
    assert "Operation not permitted" in result.stderr


def test_clone_with_a_user_namespace_fails(test_user: pwd.struct_passwd) -> None:
    """clone(CLONE_NEWUSER) fails with EPERM, and clone3 with ENOSYS."""
    # Raw clone with SIGCHLD: a child that would exit at once (it never starts here).
    statement = f"raw({_nr('clone')}, 0x10000000 | 17, 0, 0, 0, 0)"
    assert _probe(statement, test_user, "seccomp") == "EPERM"
    assert _probe(f"raw({_nr('clone3')}, 0, 0)", test_user, "seccomp") == "ENOSYS"


def test_keyctl_fails(test_user: pwd.struct_passwd) -> None:
    """keyctl fails with EPERM under the filter; without it, the user reaches its keyring."""
    # KEYCTL_GET_KEYRING_ID of KEY_SPEC_USER_KEYRING (-4).
    statement = f"raw({_nr('keyctl')}, 0, -4, 0)"
    assert _probe(statement, test_user, "none") == "ok"
    assert _probe(statement, test_user, "seccomp") == "EPERM"


def test_mount_fails_even_for_root() -> None:
    """mount fails with EPERM under the filter even for root, which could mount without it."""
    # The strings go by address; the child's mount namespace is private and dies with it.
    mount = (
        f"raw({_nr('mount')}, *(ctypes.cast(ctypes.c_char_p(s), ctypes.c_void_p).value"
        " for s in (b'none', b'/mnt', b'tmpfs')), 0, 0)"
    )
    assert _probe(mount, None, "none") == "ok"
    assert _probe(mount, None, "seccomp") == "EPERM"


def _tiocsti_allowed() -> bool:
    with open("/proc/sys/dev/tty/legacy_tiocsti") as f:
        return f.read().strip() == "1"


def test_tiocsti_fails(test_user: pwd.struct_passwd) -> None:
    """TIOCSTI on the job's own terminal fails with EPERM; without the filter it works."""
    if not _tiocsti_allowed():
        pytest.skip("dev.tty.legacy_tiocsti=0: the kernel refuses TIOCSTI already")
    statement = "fcntl.ioctl(own_tty(), termios.TIOCSTI, b'x')"
    assert _probe(statement, test_user, "none") == "ok"
    assert _probe(statement, test_user, "seccomp") == "EPERM"


def test_tiocsti_with_junk_in_the_upper_half_still_fails(test_user: pwd.struct_passwd) -> None:
    """An ioctl request of (1 << 32) | TIOCSTI, which the kernel truncates, is refused too."""
    if not _tiocsti_allowed():
        pytest.skip("dev.tty.legacy_tiocsti=0: the kernel refuses TIOCSTI already")
    statement = (
        f"raw({_nr('ioctl')}, own_tty(), (1 << 32) | termios.TIOCSTI,"
        " ctypes.addressof(ctypes.c_char(b'x')))"
    )
    assert _probe(statement, test_user, "none") == "ok"
    assert _probe(statement, test_user, "seccomp") == "EPERM"


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x32 is an x86_64 ABI")
def test_x32_syscall_kills_the_process(test_user: pwd.struct_passwd) -> None:
    """A syscall through the x32 ABI (nr | 0x40000000) kills the process with SIGSYS."""
    statement = f"raw(0x40000000 | {_nr('getpid')})"
    control = _run(
        ["/usr/bin/python3", "-c", _PROBE.format(statement=statement)], test_user, "none"
    )
    assert control.returncode == 0, control.stderr
    result = _run(
        ["/usr/bin/python3", "-c", _PROBE.format(statement=statement)], test_user, "seccomp"
    )
    assert result.returncode == -signal.SIGSYS


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["/usr/bin/python3", "-c", "print('python', 6 * 7)"], "python 42"),
        (
            [
                "/usr/bin/python3",
                "-c",
                "import threading; t = threading.Thread(target=print, args=('thread',));"
                " t.start(); t.join()",
            ],
            "thread",
        ),
        (["/bin/bash", "-c", "echo bash $((6 * 7))"], "bash 42"),
        (["git", "--version"], "git version"),
    ],
)
def test_programs_still_work(test_user: pwd.struct_passwd, argv: list[str], expected: str) -> None:
    """python3 (threads too: clone3 falls back to clone), bash and git run under the filter."""
    result = _run(argv, test_user, "seccomp")
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout


def test_ping_through_the_ping_socket_works(test_user: pwd.struct_passwd) -> None:
    """ping 127.0.0.1 works for an unprivileged user under the filter (ICMP datagram socket)."""
    result = _run(["ping", "-c1", "-W1", "127.0.0.1"], test_user, "seccomp")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 received" in result.stdout


def test_prepared_filter_is_the_native_profile() -> None:
    """The prepared filter is PROFILE for this machine's architecture."""
    prepared = seccomp.prepare_job_filter()
    assert (prepared.profile, prepared.arch) == (seccomp.PROFILE, platform.machine())
    assert prepared.instructions > len(seccomp.JOB_RULES)
