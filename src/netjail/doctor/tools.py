"""User-space libraries and tools netjaild uses: libnftables, libseccomp, iptables (pure).

libnftables (the firewall) and libseccomp (the jail's seccomp filter, through the pyseccomp
binding) are blockers; iptables only warns, since only firewall = "iptables" needs it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from netjail.doctor.result import Check

NFTABLES_FIX = "apt-get install libnftables1"
SECCOMP_FIX = "apt-get install libseccomp2"

#: The library netjail.kernel.firewall loads.
LIBNFTABLES_SONAME = "libnftables.so.1"


def check_libnftables(found: str | None) -> Check:
    """Whether libnftables.so.1 is there; *found* is what the library search found, if any."""
    name = "libnftables"
    if found is not None and os.path.basename(found) == LIBNFTABLES_SONAME:
        return Check.ok(name, f"{found} found")
    if found is not None:
        return Check.fail(
            name, f"only {found} found; netjaild needs {LIBNFTABLES_SONAME}", NFTABLES_FIX
        )
    return Check.fail(name, f"{LIBNFTABLES_SONAME} not found", NFTABLES_FIX)


#: The library pyseccomp binds to (libseccomp 2.x; the 1.x ABI is another soname).
LIBSECCOMP_SONAME = "libseccomp.so.2"


@dataclass(frozen=True)
class LibseccompInfo:
    """libseccomp as pyseccomp would load it: ctypes.util.find_library("seccomp"), then dlopen."""

    #: What find_library named, e.g. "libseccomp.so.2"; None when it found nothing.
    found: str | None
    #: Why dlopen failed, if it did (the dynamic linker's message).
    load_error: str | None = None
    #: The version the loaded library reports, e.g. "2.5.4"; "" if it cannot say (before 2.3).
    version: str = ""
    #: Whether the pyseccomp package is installed (found, not imported).
    binding: bool = True


def check_libseccomp(info: LibseccompInfo) -> Check:
    """Whether netjaild can load the jail's seccomp filter: libseccomp.so.2 and pyseccomp."""
    name = "libseccomp"
    if info.found is None:
        return Check.fail(name, f"{LIBSECCOMP_SONAME} not found", SECCOMP_FIX)
    if os.path.basename(info.found) != LIBSECCOMP_SONAME:
        return Check.fail(
            name, f"only {info.found} found; pyseccomp needs {LIBSECCOMP_SONAME}", SECCOMP_FIX
        )
    if info.load_error is not None:
        return Check.fail(
            name,
            f"{info.found} is found but does not load: {info.load_error}",
            "apt-get install --reinstall libseccomp2",
        )
    shown = f"{info.found} {info.version}" if info.version else info.found
    if not info.binding:
        return Check.fail(
            name,
            f"{shown} loads, but pyseccomp (netjaild's binding to it) is not installed",
            "pip install pyseccomp, in the environment netjail is installed in",
        )
    return Check.ok(name, f"{shown} loads (through pyseccomp)")


@dataclass(frozen=True)
class IptablesInfo:
    """Where iptables-restore and ip6tables-restore are, and what the first says it is."""

    restore: str | None
    restore6: str | None
    #: e.g. "v1.8.9 (nf_tables)": the version, and which kernel API it drives.
    version: str | None


def check_iptables(restore: str | None, restore6: str | None, version: str | None) -> Check:
    """Whether iptables-restore and ip6tables-restore are there, for firewall = "iptables"."""
    name = "iptables"
    missing = [
        tool
        for tool, path in (("iptables-restore", restore), ("ip6tables-restore", restore6))
        if path is None
    ]
    if missing:
        return Check.warn(
            name,
            f'{" and ".join(missing)} not found (only firewall = "iptables" needs them)',
            "apt-get install iptables",
        )
    return Check.ok(name, f"{restore} {version}" if version else f"{restore}")
