"""The job's seccomp filter: one named profile, its rules as data, compiled once, loaded per job.

The profile allows every syscall except a short deny list, and each denied call fails with an
errno (EPERM, EAFNOSUPPORT or ENOSYS), never a kill, so programs take their normal "not
available" paths. The rule table (``JOB_RULES``) is pure data; libseccomp (through pyseccomp)
turns it into BPF for the native architecture. libseccomp assembles the program, not us.

Where this differs from Docker's default profile (moby/profiles seccomp/default.json), and why:

- **Default allow, not default deny.** Docker allows a list of some 350 syscalls and gates more
  on capabilities. A job holds no capability and runs under no_new_privs, so everything Docker
  gates on a capability already fails with EPERM from the kernel itself. What is left to deny is
  what an unprivileged process can reach; a deny list of that keeps new syscalls (``cachestat``,
  ``mseal``…, which Debian's libseccomp 2.5.4 cannot even name) working for new toolchains.
  Some capability-gated calls (mount API, modules, kexec, swap, reboot) are denied anyway, as
  defence in depth should a capability ever leak into a job.
- **socket() families.** Docker allows some forty families and blocks AF_VSOCK and AF_ALG;
  netjail allows four (AF_UNIX, AF_INET, AF_INET6, AF_NETLINK with NETLINK_ROUTE only), which
  also stops module autoloading of rarely used protocol families. The errno is EAFNOSUPPORT,
  not Docker's EPERM: it is what the kernel returns for a family it lacks, and what libraries
  probing for a family (libaudit for NETLINK_AUDIT, vsock and AF_ALG users) treat as "absent".
  socketpair() is held to AF_UNIX, the only family for which it means anything here.
- **io_uring is denied** (Docker also dropped it from its allow list): IORING_OP_SOCKET makes
  sockets without socket(2), so it would bypass the family rule. libuv and others fall back.
- **Namespaces.** clone/unshare with any namespace flag fail with EPERM, clone3 with ENOSYS
  (its flags are behind a pointer; glibc then falls back to clone), as in Docker. setns is not
  filtered: without a user namespace of its own a job has no capability to use it.
- **ioctl TIOCSTI and TIOCLINUX** are denied; Docker filters no ioctl. A job may hold the
  client's terminal as its stdio, and TIOCSTI would type commands into the user's shell.
- **syslog(2)** is denied (Docker: CAP_SYSLOG); the kernel log carries the kmsg backend's
  records of every job, not only this one's.
- **ptrace, process_vm_*, personality** stay allowed, as Docker allows ptrace from kernel 4.8:
  jobs are kept apart by uid, and a job may debug its own processes.

Architectures: the filter is for the native ABI only (x86_64 or aarch64). A syscall made
through any other ABI (i386 ``int 0x80``, x32, 32-bit ARM compat) kills the process with
SIGSYS: such a call either comes from a binary the filter cannot police (its numbers differ),
or is an attempt to reach calls the filter does not check (i386's socketcall hides socket's
family behind a pointer). Ending the process at once is unambiguous in the report; an errno
would let the attempt retry, and would leave a 32-bit program failing later, less clearly.

Cost, per job (medians over 300 forked children, 2-core VM, several runs): compiled in the
job child, the filter took 2.4-3.6 ms; a pyseccomp filter built before fork still runs
libseccomp's BPF generation in ``load()``: 0.4-0.7 ms. So the program is compiled once per
process (``prepare_job_filter``, in the fork server before it forks), and the child only hands
the ready program to prctl: 0.20-0.23 ms, of which the kernel's own set-up is about 0.09 ms.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal

from netjail.errors import SpawnError, map_os_errors
from netjail.kernel import syscalls

#: The profile's name and version, for the job report and ``netjail doctor``. Bump the
#: number whenever ``JOB_RULES`` changes what a job can do.
PROFILE = "netjail-default-1"

JobArch = Literal["x86_64", "aarch64"]

AF_UNIX = 1
AF_INET = 2
AF_INET6 = 10
AF_NETLINK = 16
NETLINK_ROUTE = 0

CLONE_NEWTIME = 0x00000080
CLONE_NEWNS = syscalls.CLONE_NEWNS
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = syscalls.CLONE_NEWUTS
CLONE_NEWIPC = syscalls.CLONE_NEWIPC
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = syscalls.CLONE_NEWPID
CLONE_NEWNET = syscalls.CLONE_NEWNET
#: clone's flags hold the exit signal in their low byte, so CLONE_NEWTIME (0x80) is unshare's.
CLONE_NAMESPACE_FLAGS = (
    CLONE_NEWNS,
    CLONE_NEWCGROUP,
    CLONE_NEWUTS,
    CLONE_NEWIPC,
    CLONE_NEWUSER,
    CLONE_NEWPID,
    CLONE_NEWNET,
)

TIOCSTI = 0x5412
TIOCLINUX = 0x541C

_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_BPF_INSTRUCTION_SIZE = 8


@dataclass(frozen=True)
class ArgEquals:
    """The whole 64-bit argument equals ``value``."""

    index: int
    value: int


@dataclass(frozen=True)
class ArgNotEquals:
    """The whole 64-bit argument differs from ``value`` (junk in the upper half differs too)."""

    index: int
    value: int


@dataclass(frozen=True)
class ArgAtLeast:
    """The argument, as an unsigned 64-bit number, is ``value`` or more."""

    index: int
    value: int


@dataclass(frozen=True)
class ArgHasBits:
    """Every bit of ``bits`` is set in the argument."""

    index: int
    bits: int


@dataclass(frozen=True)
class ArgLow32Equals:
    """The low 32 bits equal ``value``: for ``unsigned int`` arguments such as ioctl's request,
    whose upper half the kernel ignores, so a job cannot dodge the rule by setting it."""

    index: int
    value: int


ArgCheck = ArgEquals | ArgNotEquals | ArgAtLeast | ArgHasBits | ArgLow32Equals


@dataclass(frozen=True)
class SyscallRule:
    """``syscall`` fails with ``errno`` when every check in ``args`` holds (always, if none).

    Several rules for one syscall are alternatives: any one that matches denies the call.
    """

    syscall: str
    errno: int
    args: tuple[ArgCheck, ...] = ()


#: Denied outright with EPERM, grouped by what they expose.
DENIED_SYSCALLS = (
    # Kernel keyrings: shared across the host per uid, and a recurring source of kernel bugs.
    "keyctl",
    "add_key",
    "request_key",
    # Kernel attack surface an unprivileged process can reach; userfaultfd is an exploit aid.
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    # Replacing the kernel or loading code into it.
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    # The mount API, old and new (x86_64 and aarch64 have umount2 only, no umount).
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
    # The host itself.
    "swapon",
    "swapoff",
    "reboot",
    "syslog",
    # File handles bypass the path walk (the "shocker" container escape).
    "open_by_handle_at",
)

_ALLOWED_FAMILIES = (AF_UNIX, AF_INET, AF_INET6, AF_NETLINK)


def _family_rules(syscall: str, allowed: tuple[int, ...]) -> tuple[SyscallRule, ...]:
    """EAFNOSUPPORT for every domain not in ``allowed``, as rules libseccomp can express.

    A rule cannot compare one argument twice, so "not in the set" is spelled as one equality
    per refused value up to the highest allowed one, plus "at least highest + 1", which also
    catches negative domains and junk in the upper 32 bits (the kernel would ignore it).
    """
    top = max(allowed)
    refused = [family for family in range(top) if family not in allowed]
    return (
        *(SyscallRule(syscall, errno.EAFNOSUPPORT, (ArgEquals(0, family),)) for family in refused),
        SyscallRule(syscall, errno.EAFNOSUPPORT, (ArgAtLeast(0, top + 1),)),
    )


def _build_job_rules() -> tuple[SyscallRule, ...]:
    return (
        *(SyscallRule(name, errno.EPERM) for name in DENIED_SYSCALLS),
        *_family_rules("socket", _ALLOWED_FAMILIES),
        # Netlink only for NETLINK_ROUTE (ip, getifaddrs): audit, uevents, netfilter, xfrm,
        # sock_diag (every socket on the host netns's view) and the rest stay closed.
        SyscallRule(
            "socket",
            errno.EAFNOSUPPORT,
            (ArgEquals(0, AF_NETLINK), ArgNotEquals(2, NETLINK_ROUTE)),
        ),
        *_family_rules("socketpair", (AF_UNIX,)),
        *(SyscallRule("clone", errno.EPERM, (ArgHasBits(0, f),)) for f in CLONE_NAMESPACE_FLAGS),
        *(
            SyscallRule("unshare", errno.EPERM, (ArgHasBits(0, f),))
            for f in (*CLONE_NAMESPACE_FLAGS, CLONE_NEWTIME)
        ),
        SyscallRule("clone3", errno.ENOSYS),
        SyscallRule("ioctl", errno.EPERM, (ArgLow32Equals(1, TIOCSTI),)),
        SyscallRule("ioctl", errno.EPERM, (ArgLow32Equals(1, TIOCLINUX),)),
    )


#: The whole profile: every rule of ``PROFILE``; anything they do not match is allowed.
JOB_RULES = _build_job_rules()


@dataclass(frozen=True)
class CompiledFilter:
    """``PROFILE`` compiled by libseccomp for one architecture: the BPF program, ready to load."""

    profile: str
    arch: JobArch
    program: bytes

    @property
    def instructions(self) -> int:
        return len(self.program) // _BPF_INSTRUCTION_SIZE


def _libseccomp() -> Any:
    """The pyseccomp module; imported late, so a host without libseccomp fails here, clearly."""
    try:
        # Late: pyseccomp raises RuntimeError at import on a host without libseccomp, and
        # that must become a netjail error naming the step. It ships no type information.
        import pyseccomp  # type: ignore[import-untyped]  # noqa: PLC0415
    except (ImportError, RuntimeError, OSError) as e:
        raise SpawnError(
            f"seccomp filter: libseccomp is not usable ({e}); install libseccomp2 and pyseccomp"
        ) from None
    return pyseccomp


_ARCH_TOKENS: dict[JobArch, str] = {"x86_64": "X86_64", "aarch64": "AARCH64"}


def native_arch() -> JobArch:
    """The architecture libseccomp reports for this process; SpawnError if not supported."""
    lib = _libseccomp()
    native = lib.system_arch()
    for arch, token in _ARCH_TOKENS.items():
        if native == getattr(lib.Arch, token):
            return arch
    raise SpawnError(
        f"seccomp filter: architecture token {native:#x} is not supported (x86_64, aarch64)"
    )


def _arg(lib: Any, check: ArgCheck) -> Any:
    match check:
        case ArgEquals(index, value):
            return lib.Arg(index, lib.EQ, value)
        case ArgNotEquals(index, value):
            return lib.Arg(index, lib.NE, value)
        case ArgAtLeast(index, value):
            return lib.Arg(index, lib.GE, value)
        case ArgHasBits(index, bits):
            return lib.Arg(index, lib.MASKED_EQ, bits, bits)
        case ArgLow32Equals(index, value):
            return lib.Arg(index, lib.MASKED_EQ, 0xFFFF_FFFF, value)


def _build_filter(arch: JobArch, rules: tuple[SyscallRule, ...]) -> Any:
    """A pyseccomp SyscallFilter for ``arch`` alone: default allow, foreign ABIs killed."""
    lib = _libseccomp()
    syscall_filter = lib.SyscallFilter(lib.ALLOW)
    token = getattr(lib.Arch, _ARCH_TOKENS[arch])
    if not syscall_filter.exist_arch(token):
        # Compiling for another architecture than ours (the unit tests do, for aarch64).
        syscall_filter.add_arch(token)
        syscall_filter.remove_arch(lib.Arch.NATIVE)
    # Only this one ABI is in the filter: libseccomp then also sends x32 numbers on x86_64
    # (nr | 0x40000000) to the bad-arch action. See the module docstring for why it kills.
    syscall_filter.set_attr(lib.Attr.ACT_BADARCH, lib.KILL_PROCESS)
    for rule in rules:
        syscall_filter.add_rule(
            lib.ERRNO(rule.errno), rule.syscall, *(_arg(lib, a) for a in rule.args)
        )
    return syscall_filter


def _scratch_file() -> BinaryIO:
    """A file in memory for libseccomp to write to (it exports only to an fd)."""
    return os.fdopen(os.memfd_create("netjail-seccomp", os.MFD_CLOEXEC), "w+b")


def compile_job_filter(arch: JobArch) -> CompiledFilter:
    """``JOB_RULES`` as a BPF program for ``arch``; SpawnError naming the step if that fails."""
    with map_os_errors(SpawnError, f"seccomp filter: compiling {PROFILE} for {arch}"):
        syscall_filter = _build_filter(arch, JOB_RULES)
        with _scratch_file() as out:
            syscall_filter.export_bpf(out)
            out.seek(0)
            program = out.read()
    return CompiledFilter(PROFILE, arch, program)


def render_job_filter(arch: JobArch) -> str:
    """libseccomp's pseudo-code for the compiled profile (for tests and for reading)."""
    with map_os_errors(SpawnError, f"seccomp filter: rendering {PROFILE} for {arch}"):
        syscall_filter = _build_filter(arch, JOB_RULES)
        with _scratch_file() as out:
            syscall_filter.export_pfc(out)
            out.seek(0)
            return out.read().decode()


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


@dataclass(frozen=True)
class _Prepared:
    compiled: CompiledFilter
    #: The program in C memory, and the sock_fprog pointing at it: what prctl takes.
    buffer: ctypes.Array[ctypes.c_char]
    fprog: _SockFprog


@functools.cache
def _prepared() -> _Prepared:
    compiled = compile_job_filter(native_arch())
    buffer = ctypes.create_string_buffer(compiled.program, len(compiled.program))
    return _Prepared(compiled, buffer, _SockFprog(compiled.instructions, ctypes.addressof(buffer)))


def prepare_job_filter() -> CompiledFilter:
    """The native profile, compiled once per process and kept, ready for ``load_job_filter``.

    Call it in the fork server before it serves (or in the daemon before the fork server
    starts): each job child then inherits the program and only loads it (one prctl), and a
    host without libseccomp fails at start-up, not at the first job.
    """
    return _prepared().compiled


def load_job_filter() -> None:
    """Install ``PROFILE`` on the calling thread, for it and everything it execs (irrevocable).

    For the job's child right before exec, after the uid drop. Sets no_new_privs (which the
    kernel requires of a process without CAP_SYS_ADMIN; it is set already in the job child).
    Compiles first if ``prepare_job_filter`` was not called in this process or a parent.
    Raises SpawnError("seccomp filter: …") on failure.
    """
    fprog = _prepared().fprog
    with map_os_errors(SpawnError, f"seccomp filter: loading {PROFILE}"):
        syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)
        syscalls.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(fprog))
