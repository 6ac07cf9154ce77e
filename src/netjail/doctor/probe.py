"""Doctor's probes: thin reads of the running system, and nothing else.

Plain reads of /proc, /sys and /boot, a library search, one harmless prctl, two system tools and
one status exchange with the daemon. None of them decides anything (the ``check_*`` functions
do), and none raises for a missing or unreadable file: that is an observation like any other.
The initial-network-namespace probe is :func:`netjail.hostns.probe_netns_evidence`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import grp
import gzip
import importlib.util
import os
import pwd
import shutil
import stat
import subprocess
import sys
import zlib

from netjail import protocol as p
from netjail.client import Client
from netjail.doctor.access import SocketInfo
from netjail.doctor.features import (
    NAMESPACE_LINKS,
    NFNETLINK_LOG,
    KernelInfo,
    parse_kernel_config,
    parse_module_names,
)
from netjail.doctor.tools import LIBNFTABLES_SONAME, IptablesInfo, LibseccompInfo
from netjail.errors import NetjailError
from netjail.mountinfo import CgroupMount

# <linux/prctl.h>, <linux/seccomp.h>
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
#: open_tree's number in the unified syscall table, the same on every architecture. netjail's
#: kernel side has it too (netjail.kernel.syscalls), which doctor may not import.
SYS_OPEN_TREE = 428


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _read_module_list(path: str) -> frozenset[str] | None:
    text = _read_text(path)
    return parse_module_names(text) if text is not None else None


def _read_kernel_config(release: str) -> dict[str, str] | None:
    # /proc/config.gz is the running kernel's own (CONFIG_IKCONFIG_PROC); /boot/config-* is
    # what the distribution ships next to the kernel image.
    try:
        with gzip.open("/proc/config.gz", "rt", encoding="utf-8", errors="replace") as f:
            return parse_kernel_config(f.read())
    except (OSError, EOFError, zlib.error):
        pass
    text = _read_text(f"/boot/config-{release}")
    return parse_kernel_config(text) if text is not None else None


def probe_kernel() -> KernelInfo:
    """The running kernel's config and module lists, as far as they are readable."""
    release = os.uname().release
    try:
        present = frozenset(os.listdir("/sys/module"))
    except OSError:
        present = frozenset()
    return KernelInfo(
        release=release,
        config=_read_kernel_config(release),
        present_modules=present,
        builtin_modules=_read_module_list(f"/lib/modules/{release}/modules.builtin"),
        loadable_modules=_read_module_list(f"/lib/modules/{release}/modules.dep"),
    )


def probe_kernel_evidence() -> dict[str, str]:
    """Direct signs of kernel features, by check name: stronger than any config file."""
    evidence = {}
    # Each link exists only in kernels built with that namespace (fs/proc/namespaces.c).
    for check, link in NAMESPACE_LINKS.items():
        if os.path.lexists(f"/proc/self/ns/{link}"):
            evidence[check] = f"/proc/self/ns/{link} exists"
    nf_log = _read_text("/proc/net/netfilter/nf_log")
    if nf_log is not None and "nfnetlink_log" in nf_log:
        evidence[NFNETLINK_LOG.check] = "registered in /proc/net/netfilter/nf_log"
    return evidence


def probe_euid() -> int:
    """Who doctor runs as: root is judged by its effective capabilities, others by the bound."""
    return os.geteuid()


def probe_status() -> str | None:
    """/proc/self/status: the capability sets and the seccomp mode."""
    return _read_text("/proc/self/status")


def probe_seccomp_filter() -> int | None:
    """The errno of ``prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, NULL)``; None if not made.

    With a NULL filter the call cannot succeed and changes nothing: a kernel with filter mode
    fails it with EFAULT when it reads the filter, one without with EINVAL (systemd's test).
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.restype = ctypes.c_int
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    result = prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, 0, 0, 0)
    return ctypes.get_errno() if result != 0 else 0


def probe_open_tree() -> int | None:
    """The errno of ``open_tree(-1, NULL, 0)``, which fails without touching any mount.

    No path to look up: a kernel with the call fails it with EFAULT (EBADF, EINVAL are as
    good), one without it with ENOSYS. glibc 2.36 has no wrapper, hence syscall(2).
    """
    try:
        syscall = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None
    syscall.restype = ctypes.c_long
    result = syscall(ctypes.c_long(SYS_OPEN_TREE), ctypes.c_int(-1), None, ctypes.c_uint(0))
    if result >= 0:
        os.close(result)  # not expected without a path; never leak it
        return 0
    return ctypes.get_errno()


def probe_mountinfo() -> str | None:
    """/proc/self/mountinfo: the cgroup mounts and the root mount."""
    return _read_text("/proc/self/mountinfo")


def probe_unified_controllers(mounts: list[CgroupMount]) -> str | None:
    """cgroup.controllers at the first cgroup2 mount, if there is one and it can be read."""
    unified = next((m for m in mounts if m.fstype == "cgroup2"), None)
    if unified is None:
        return None
    return _read_text(os.path.join(unified.mount_point, "cgroup.controllers"))


def probe_nf_log_all_netns() -> str | None:
    """The value of net.netfilter.nf_log_all_netns, or None where it cannot be read."""
    value = _read_text("/proc/sys/net/netfilter/nf_log_all_netns")
    return value.strip() if value is not None else None


def probe_libnftables() -> str | None:
    """The libnftables the dynamic linker would find, e.g. "libnftables.so.1"."""
    # find_library asks ldconfig's cache and may name another soname first; a library
    # installed without ldconfig having run is still found by dlopen in the default
    # directories, so look there too before settling for what find_library said.
    found = ctypes.util.find_library("nftables")
    if found is not None and os.path.basename(found) == LIBNFTABLES_SONAME:
        return found
    multiarch = getattr(sys.implementation, "_multiarch", "")
    for directory in ("/usr/lib", "/lib", "/usr/lib64", "/lib64", "/usr/local/lib"):
        for candidate in (
            os.path.join(directory, multiarch, LIBNFTABLES_SONAME),
            os.path.join(directory, LIBNFTABLES_SONAME),
        ):
            if os.path.exists(candidate):
                return candidate
    if found is not None:
        return found  # another soname: reported as such
    others = sorted(
        glob.glob("/usr/lib/*/libnftables.so.*") + glob.glob("/usr/lib/libnftables.so.*")
    )
    return os.path.basename(others[0]) if others else None


class _ScmpVersion(ctypes.Structure):
    _fields_ = [
        ("major", ctypes.c_uint),
        ("minor", ctypes.c_uint),
        ("micro", ctypes.c_uint),
    ]


def probe_libseccomp() -> LibseccompInfo:
    """Find and load libseccomp the way pyseccomp does, without importing pyseccomp.

    pyseccomp raises at import when find_library finds nothing, so that search is the one that
    counts, even where dlopen alone would find the library.
    """
    binding = importlib.util.find_spec("pyseccomp") is not None
    found = ctypes.util.find_library("seccomp")
    if found is None:
        return LibseccompInfo(None, binding=binding)
    try:
        library = ctypes.CDLL(found)
    except OSError as exc:
        return LibseccompInfo(found, load_error=str(exc), binding=binding)
    version = ""
    if hasattr(library, "seccomp_version"):  # since libseccomp 2.3
        library.seccomp_version.restype = ctypes.POINTER(_ScmpVersion)
        library.seccomp_version.argtypes = []
        v = library.seccomp_version().contents
        version = f"{v.major}.{v.minor}.{v.micro}"
    return LibseccompInfo(found, version=version, binding=binding)


def _which_admin_tool(name: str) -> str | None:
    # An unprivileged user's PATH often lacks the sbin directories these tools live in.
    path = os.environ.get("PATH", os.defpath) + ":/usr/sbin:/sbin"
    return shutil.which(name, path=path)


def probe_iptables() -> IptablesInfo:
    """Where iptables-restore and ip6tables-restore are, and which iptables the first is."""
    restore = _which_admin_tool("iptables-restore")
    restore6 = _which_admin_tool("ip6tables-restore")
    version = None
    if restore is not None:
        try:
            result = subprocess.run(
                [restore, "--version"], capture_output=True, text=True, timeout=5, check=False
            )
            lines = result.stdout.strip().splitlines()
        except (OSError, subprocess.SubprocessError):
            lines = []
        # "iptables-restore v1.8.9 (nf_tables)": the version, and which kernel API it drives.
        if lines:
            version = lines[0].removeprefix(os.path.basename(restore)).strip() or None
    return IptablesInfo(restore, restore6, version)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def probe_socket(path: str) -> SocketInfo:
    """The daemon socket at *path*, and who the current user is, for ``check_socket``."""
    euid = os.geteuid()
    user = _user_name(euid)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return SocketInfo(path, "missing", euid=euid, user=user)
    except OSError:
        return SocketInfo(path, "unreachable", euid=euid, user=user)
    if not stat.S_ISSOCK(st.st_mode):
        return SocketInfo(path, "other", euid=euid, user=user)
    try:
        member = frozenset(os.getgrouplist(user, pwd.getpwuid(euid).pw_gid))
    except (KeyError, OSError):
        member = frozenset()
    return SocketInfo(
        path,
        "socket",
        mode=st.st_mode,
        owner=_user_name(st.st_uid),
        group=_group_name(st.st_gid),
        gid=st.st_gid,
        usable=os.access(path, os.R_OK | os.W_OK),
        euid=euid,
        user=user,
        session_gids=frozenset([os.getegid(), *os.getgroups()]),
        member_gids=member,
    )


def probe_daemon(path: str) -> p.StatusReply | NetjailError:
    """The daemon's status through the client library (hello, then status), or why not."""
    try:
        return Client(path, timeout=5).status()
    except NetjailError as exc:
        return exc
