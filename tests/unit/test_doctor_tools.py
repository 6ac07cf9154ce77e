"""netjail doctor's checks of libnftables, libseccomp and iptables, on made-up findings."""

from __future__ import annotations

from netjail.doctor.result import Check, format_checks
from netjail.doctor.tools import LibseccompInfo, check_iptables, check_libnftables, check_libseccomp


def lines(check: Check) -> list[str]:
    return format_checks([check])


# --------------------------------------------------------------------------------------------
# libnftables, libseccomp and iptables


def test_libnftables() -> None:
    """libnftables.so.1 is ok; another soname or none is a blocker with the package to install."""
    assert lines(check_libnftables("libnftables.so.1")) == [
        "ok    libnftables: libnftables.so.1 found"
    ]
    assert lines(check_libnftables("/usr/lib/x86_64-linux-gnu/libnftables.so.1"))[0] == (
        "ok    libnftables: /usr/lib/x86_64-linux-gnu/libnftables.so.1 found"
    )
    assert lines(check_libnftables("libnftables.so.0")) == [
        "FAIL  libnftables: only libnftables.so.0 found; netjaild needs libnftables.so.1",
        "  fix: apt-get install libnftables1",
    ]
    assert lines(check_libnftables(None)) == [
        "FAIL  libnftables: libnftables.so.1 not found",
        "  fix: apt-get install libnftables1",
    ]


def test_iptables() -> None:
    """Both restore tools: ok with the version; one missing: a warning, never a blocker."""
    restore, restore6 = "/usr/sbin/iptables-restore", "/usr/sbin/ip6tables-restore"
    assert lines(check_iptables(restore, restore6, "v1.8.9 (nf_tables)")) == [
        "ok    iptables: /usr/sbin/iptables-restore v1.8.9 (nf_tables)"
    ]
    assert lines(check_iptables(restore, restore6, None)) == [
        "ok    iptables: /usr/sbin/iptables-restore"
    ]
    assert lines(check_iptables(None, None, None)) == [
        "warn  iptables: iptables-restore and ip6tables-restore not found (only firewall ="
        ' "iptables" needs them)',
        "  fix: apt-get install iptables",
    ]
    assert lines(check_iptables(restore, None, None))[0] == (
        'warn  iptables: ip6tables-restore not found (only firewall = "iptables" needs them)'
    )


def test_libseccomp_loaded_with_its_binding() -> None:
    """libseccomp.so.2 found and loaded, pyseccomp installed: ok, with the version if known."""
    assert lines(check_libseccomp(LibseccompInfo("libseccomp.so.2", version="2.5.4"))) == [
        "ok    libseccomp: libseccomp.so.2 2.5.4 loads (through pyseccomp)"
    ]
    assert lines(check_libseccomp(LibseccompInfo("/usr/lib/libseccomp.so.2"))) == [
        "ok    libseccomp: /usr/lib/libseccomp.so.2 loads (through pyseccomp)"
    ]


def test_libseccomp_missing_or_another_soname_is_a_blocker() -> None:
    """Not found, or only the 1.x soname: FAIL with the Debian package."""
    assert lines(check_libseccomp(LibseccompInfo(None))) == [
        "FAIL  libseccomp: libseccomp.so.2 not found",
        "  fix: apt-get install libseccomp2",
    ]
    assert lines(check_libseccomp(LibseccompInfo("libseccomp.so.1"))) == [
        "FAIL  libseccomp: only libseccomp.so.1 found; pyseccomp needs libseccomp.so.2",
        "  fix: apt-get install libseccomp2",
    ]


def test_libseccomp_that_does_not_load_is_a_blocker() -> None:
    """Found but dlopen fails: FAIL with the linker's message and a reinstall."""
    info = LibseccompInfo("libseccomp.so.2", load_error="libseccomp.so.2: file too short")
    assert lines(check_libseccomp(info)) == [
        "FAIL  libseccomp: libseccomp.so.2 is found but does not load: libseccomp.so.2: file too"
        " short",
        "  fix: apt-get install --reinstall libseccomp2",
    ]


def test_libseccomp_without_pyseccomp_is_a_blocker() -> None:
    """The library alone is not enough: netjaild loads its filter through pyseccomp."""
    info = LibseccompInfo("libseccomp.so.2", version="2.5.4", binding=False)
    assert lines(check_libseccomp(info)) == [
        "FAIL  libseccomp: libseccomp.so.2 2.5.4 loads, but pyseccomp (netjaild's binding to it)"
        " is not installed",
        "  fix: pip install pyseccomp, in the environment netjail is installed in",
    ]
