"""The job seccomp profile: its rule table exactly, and what libseccomp compiles from it."""

from __future__ import annotations

import re
from errno import EAFNOSUPPORT, ENOSYS, EPERM

import pytest

from netjail.kernel import seccomp
from netjail.kernel.seccomp import (
    ArgAtLeast,
    ArgEquals,
    ArgHasBits,
    ArgLow32Equals,
    ArgNotEquals,
    SyscallRule,
)

_DENIED = [
    "keyctl",
    "add_key",
    "request_key",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "mount",
    "umount2",
    "pivot_root",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    "swapon",
    "swapoff",
    "reboot",
    "syslog",
    "open_by_handle_at",
]
_NAMESPACE_BITS = [
    0x00020000,
    0x02000000,
    0x04000000,
    0x08000000,
    0x10000000,
    0x20000000,
    0x40000000,
]

EXPECTED_RULES = (
    *(SyscallRule(name, EPERM) for name in _DENIED),
    # socket: AF_UNIX 1, AF_INET 2, AF_INET6 10 and AF_NETLINK 16 only.
    *(
        SyscallRule("socket", EAFNOSUPPORT, (ArgEquals(0, family),))
        for family in (0, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 15)
    ),
    SyscallRule("socket", EAFNOSUPPORT, (ArgAtLeast(0, 17),)),
    SyscallRule("socket", EAFNOSUPPORT, (ArgEquals(0, 16), ArgNotEquals(2, 0))),
    SyscallRule("socketpair", EAFNOSUPPORT, (ArgEquals(0, 0),)),
    SyscallRule("socketpair", EAFNOSUPPORT, (ArgAtLeast(0, 2),)),
    *(SyscallRule("clone", EPERM, (ArgHasBits(0, bit),)) for bit in _NAMESPACE_BITS),
    *(SyscallRule("unshare", EPERM, (ArgHasBits(0, bit),)) for bit in [*_NAMESPACE_BITS, 0x80]),
    SyscallRule("clone3", ENOSYS),
    SyscallRule("ioctl", EPERM, (ArgLow32Equals(1, 0x5412),)),
    SyscallRule("ioctl", EPERM, (ArgLow32Equals(1, 0x541C),)),
)


def test_rule_table_is_exactly_the_profile() -> None:
    """JOB_RULES is exactly the documented deny list, family rules, namespace and ioctl rules."""
    assert seccomp.JOB_RULES == EXPECTED_RULES


def test_profile_name_carries_a_version() -> None:
    """PROFILE is a name and a version number, as the report and doctor show it."""
    assert re.fullmatch(r"netjail-default-[0-9]+", seccomp.PROFILE)


def test_no_rule_kills() -> None:
    """Every rule answers with an errno: EPERM, EAFNOSUPPORT or ENOSYS, never a kill."""
    assert {rule.errno for rule in seccomp.JOB_RULES} == {EPERM, EAFNOSUPPORT, ENOSYS}


# What libseccomp makes of the table (needs libseccomp, not root).

_NUMBERS = {
    "x86_64": {"socket": 41, "socketpair": 53, "clone": 56, "clone3": 435, "ioctl": 16},
    "aarch64": {"socket": 198, "socketpair": 199, "clone": 220, "clone3": 435, "ioctl": 29},
}


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_every_rule_compiles_for_both_architectures(arch: seccomp.JobArch) -> None:
    """Each syscall of the table is known on x86_64 and aarch64, with that ABI's number."""
    text = seccomp.render_job_filter(arch)
    filtered = set(re.findall(r'# filter for syscall "([a-z0-9_]+)" \((\d+)\)', text))
    assert {name for name, _number in filtered} == {rule.syscall for rule in seccomp.JOB_RULES}
    assert {(name, str(number)) for name, number in _NUMBERS[arch].items()} <= filtered


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_only_the_native_abi_and_foreign_ones_kill(arch: seccomp.JobArch) -> None:
    """The filter holds one ABI (no x32, i386 or arm32), and any other is killed, not allowed."""
    text = seccomp.render_job_filter(arch)
    assert re.findall(r"# filter for arch (\S+)", text) == [arch]
    assert text.split("# invalid architecture action")[1].split()[:2] == ["action", "KILL_PROCESS;"]
    assert text.split("# default action")[1].split()[:2] == ["action", "ALLOW;"]


def test_ioctl_rules_ignore_the_upper_half() -> None:
    """The TIOCSTI and TIOCLINUX rules mask the request's upper 32 bits away, as the kernel does."""
    text = seccomp.render_job_filter("x86_64")
    ioctl = text.split('# filter for syscall "ioctl"')[1].split("# filter for syscall")[0]
    assert re.findall(r"\$a1\.hi32[^)]*", ioctl) == ["$a1.hi32 & 0x00000000 == 0"]
    assert sorted(re.findall(r"\$a1\.lo32 & 0xffffffff == (\d+)", ioctl)) == ["21522", "21532"]


def test_compiled_program_is_whole_instructions() -> None:
    """compile_job_filter gives PROFILE for the arch, as whole 8-byte BPF instructions."""
    compiled = seccomp.compile_job_filter("aarch64")
    assert (compiled.profile, compiled.arch) == (seccomp.PROFILE, "aarch64")
    assert len(compiled.program) % 8 == 0
    assert compiled.instructions == len(compiled.program) // 8 > len(seccomp.JOB_RULES)
