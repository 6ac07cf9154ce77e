"""netjail doctor's kernel feature checks, on made-up configs and module lists."""

from __future__ import annotations

import errno

from netjail.doctor.features import (
    IPCNS,
    KERNEL_FEATURES,
    NAMESPACE_LINKS,
    NETNS,
    NF_TABLES,
    NFNETLINK_LOG,
    PIDNS,
    SECCOMP_FILTER,
    UTSNS,
    VETH,
    KernelInfo,
    SeccompInfo,
    check_jail_link,
    check_kernel_feature,
    check_seccomp,
    parse_kernel_config,
    parse_module_names,
    parse_seccomp_mode,
)
from netjail.doctor.result import Check, format_checks

RELEASE = "6.1.0-18-amd64"


def kernel(
    config: dict[str, str] | None,
    *,
    present: frozenset[str] = frozenset(),
    builtin: frozenset[str] | None = None,
    loadable: frozenset[str] | None = None,
) -> KernelInfo:
    return KernelInfo(RELEASE, config, present, builtin, loadable)


def lines(check: Check) -> list[str]:
    return format_checks([check])


# --------------------------------------------------------------------------------------------
# Kernel features


def test_parse_kernel_config_reads_values_and_unset_options() -> None:
    """CONFIG_X=v keeps its value, '# CONFIG_X is not set' becomes 'n', comments are skipped."""
    text = (
        "#\n# Automatically generated file; DO NOT EDIT.\n#\n"
        "CONFIG_NET_NS=y\nCONFIG_VETH=m\n# CONFIG_NFT_REJECT is not set\n"
        'CONFIG_LOCALVERSION=""\n\n# Networking options\n'
    )
    assert parse_kernel_config(text) == {
        "CONFIG_NET_NS": "y",
        "CONFIG_VETH": "m",
        "CONFIG_NFT_REJECT": "n",
        "CONFIG_LOCALVERSION": '""',
    }


def test_parse_module_names_from_dep_and_builtin_lists() -> None:
    """Module names are the file names without .ko*, with '-' read as '_'."""
    dep = (
        "kernel/drivers/net/veth.ko.xz:\n"
        "kernel/net/netfilter/nf_tables.ko.zst: kernel/net/netfilter/nfnetlink.ko.zst\n"
        "kernel/net/netfilter/nf-log-syslog.ko:\n"
    )
    builtin = "kernel/net/ipv4/tcp_cubic.ko\n\n"
    assert parse_module_names(dep) == {"veth", "nf_tables", "nf_log_syslog"}
    assert parse_module_names(builtin) == {"tcp_cubic"}


def test_feature_built_in() -> None:
    """=y in the config: ok, built in."""
    check = check_kernel_feature(VETH, kernel({"CONFIG_VETH": "y"}))
    assert lines(check) == ["ok    veth: built in (CONFIG_VETH=y)"]


def test_feature_module_loaded_or_loadable() -> None:
    """=m: ok when loaded, and ok when installed (or unknowable, as in a container)."""
    config = {"CONFIG_VETH": "m"}
    loaded = check_kernel_feature(VETH, kernel(config, present=frozenset({"veth"})))
    assert lines(loaded) == ["ok    veth: module veth, loaded"]
    installed = check_kernel_feature(VETH, kernel(config, loadable=frozenset({"veth"})))
    assert lines(installed) == ["ok    veth: module veth (CONFIG_VETH=m), loaded on first use"]
    no_list = check_kernel_feature(VETH, kernel(config))
    assert lines(no_list) == ["ok    veth: module veth (CONFIG_VETH=m), loaded on first use"]


def test_the_jail_link_is_ifb_when_the_kernel_has_it() -> None:
    """ifb in the kernel: its own ok line, whatever veth is."""
    assert lines(check_jail_link(kernel({"CONFIG_IFB": "y", "CONFIG_VETH": "n"}))) == [
        "ok    ifb: built in (CONFIG_IFB=y)"
    ]


def test_a_kernel_without_ifb_but_with_veth_is_a_warning() -> None:
    """No ifb: jails still build, with a veth pair each, so a warning that says what it costs."""
    check = check_jail_link(kernel({"CONFIG_IFB": "n", "CONFIG_VETH": "y"}))
    assert lines(check) == [
        "warn  ifb: not in this kernel (CONFIG_IFB is not set); jails get a veth pair instead"
        " (built in (CONFIG_VETH=y)), at ~4.7 ms more CPU each",
        "  fix: boot a kernel built with CONFIG_IFB=y or =m (Debian's and Ubuntu's kernels are)",
    ]


def test_a_kernel_with_neither_ifb_nor_veth_is_a_blocker() -> None:
    """Neither device: no jail can have a link, so FAIL naming both."""
    check = check_jail_link(kernel({"CONFIG_IFB": "n", "CONFIG_VETH": "n"}))
    assert check.status == "FAIL"
    assert lines(check)[0] == (
        "FAIL  ifb: not in this kernel (CONFIG_IFB is not set), and veth, the other device a"
        " jail's link can be: not in this kernel (CONFIG_VETH is not set)"
    )


def test_an_undecidable_ifb_keeps_its_own_warning() -> None:
    """No config and no module list: "cannot tell" for ifb, not a claim about veth."""
    assert check_jail_link(kernel(None, present=frozenset({"veth"}))).detail.startswith(
        "cannot tell"
    )


def test_feature_module_not_installed_is_a_blocker() -> None:
    """=m but absent from modules.dep: FAIL, with the package that ships the module."""
    check = check_kernel_feature(
        VETH, kernel({"CONFIG_VETH": "m"}, loadable=frozenset({"nf_tables"}))
    )
    assert check.status == "FAIL"
    assert lines(check) == [
        f"FAIL  veth: CONFIG_VETH=m, but the veth module is not installed for {RELEASE}",
        f"  fix: install the kernel's modules (Debian: the linux-image package of {RELEASE};"
        f" Ubuntu: apt-get install linux-modules-extra-{RELEASE})",
    ]


def test_feature_not_set_is_a_blocker() -> None:
    """Not set (or absent) in a readable config: FAIL."""
    check = check_kernel_feature(NFNETLINK_LOG, kernel({"CONFIG_NETFILTER_NETLINK_LOG": "n"}))
    assert lines(check) == [
        "FAIL  nfnetlink_log: not in this kernel (CONFIG_NETFILTER_NETLINK_LOG is not set)",
        "  fix: boot a kernel built with CONFIG_NETFILTER_NETLINK_LOG=y or =m (Debian's and"
        " Ubuntu's kernels are)",
    ]
    absent = check_kernel_feature(NETNS, kernel({}))
    assert absent.status == "FAIL"


def test_nf_tables_needs_the_expressions_the_ruleset_uses() -> None:
    """nf_tables without reject or the inet family is a blocker; unknown options are not."""
    config = {"CONFIG_NF_TABLES": "m", "CONFIG_NFT_REJECT": "n", "CONFIG_NF_TABLES_INET": "n"}
    check = check_kernel_feature(NF_TABLES, kernel(config))
    assert lines(check) == [
        "FAIL  nf_tables: CONFIG_NF_TABLES=m, but CONFIG_NF_TABLES_INET, CONFIG_NFT_REJECT are"
        " not set",
        "  fix: boot a kernel built with CONFIG_NF_TABLES_INET, CONFIG_NFT_REJECT (=y or =m)",
    ]
    # An option missing altogether may be named differently in this kernel version.
    ok = check_kernel_feature(NF_TABLES, kernel({"CONFIG_NF_TABLES": "y"}))
    assert lines(ok) == ["ok    nf_tables: built in (CONFIG_NF_TABLES=y)"]


def test_evidence_outweighs_a_config_that_disagrees() -> None:
    """Seen working (e.g. registered in nf_log): ok even if a /boot config says otherwise."""
    check = check_kernel_feature(
        NFNETLINK_LOG,
        kernel({"CONFIG_NETFILTER_NETLINK_LOG": "n"}),
        "registered in /proc/net/netfilter/nf_log",
    )
    assert lines(check) == [
        "ok    nfnetlink_log: present (registered in /proc/net/netfilter/nf_log)"
    ]


def test_feature_without_config_uses_module_lists() -> None:
    """No config: /sys/module, modules.builtin and modules.dep decide."""
    assert lines(check_kernel_feature(VETH, kernel(None, present=frozenset({"veth"})))) == [
        "ok    veth: present (/sys/module/veth)"
    ]
    assert lines(check_kernel_feature(VETH, kernel(None, builtin=frozenset({"veth"})))) == [
        "ok    veth: built in (modules.builtin)"
    ]
    assert lines(check_kernel_feature(VETH, kernel(None, loadable=frozenset({"veth"})))) == [
        "ok    veth: module veth, loaded on first use"
    ]


def test_feature_unknown_is_a_warning_not_a_blocker() -> None:
    """No config and no sign either way: warn, since the feature may well be there."""
    check = check_kernel_feature(VETH, kernel(None))
    assert lines(check) == [
        f"warn  veth: cannot tell: no kernel config (/proc/config.gz, /boot/config-{RELEASE})"
        " and no other sign of it",
        "  fix: nothing, if jobs start; otherwise check that the kernel has CONFIG_VETH",
    ]


def test_bool_options_are_asked_for_as_y_only() -> None:
    """A namespace option cannot be a module: the fix asks for =y, not =y or =m."""
    assert lines(check_kernel_feature(NETNS, kernel({"CONFIG_NET_NS": "n"}))) == [
        "FAIL  netns: not in this kernel (CONFIG_NET_NS is not set)",
        "  fix: boot a kernel built with CONFIG_NET_NS=y (Debian's and Ubuntu's kernels are)",
    ]


# --------------------------------------------------------------------------------------------
# The deep jail's other namespaces


def test_deep_jail_namespaces_are_checked_after_the_network_jail() -> None:
    """PID, IPC and UTS namespaces follow the four network-jail features, each from its option."""
    assert [(f.check, f.option) for f in KERNEL_FEATURES[3:]] == [
        ("pidns", "CONFIG_PID_NS"),
        ("ipcns", "CONFIG_IPC_NS"),
        ("utsns", "CONFIG_UTS_NS"),
    ]
    assert NAMESPACE_LINKS == {"netns": "net", "pidns": "pid", "ipcns": "ipc", "utsns": "uts"}


def test_deep_jail_namespace_built_in_or_seen() -> None:
    """=y: built in; no config, but the /proc/self/ns link exists: present."""
    assert lines(check_kernel_feature(PIDNS, kernel({"CONFIG_PID_NS": "y"}))) == [
        "ok    pidns: built in (CONFIG_PID_NS=y)"
    ]
    assert lines(check_kernel_feature(IPCNS, kernel(None), "/proc/self/ns/ipc exists")) == [
        "ok    ipcns: present (/proc/self/ns/ipc exists)"
    ]


def test_deep_jail_namespace_missing_is_a_blocker() -> None:
    """Not set: FAIL, since no jail can be built without it."""
    assert lines(check_kernel_feature(UTSNS, kernel({"CONFIG_UTS_NS": "n"}))) == [
        "FAIL  utsns: not in this kernel (CONFIG_UTS_NS is not set)",
        "  fix: boot a kernel built with CONFIG_UTS_NS=y (Debian's and Ubuntu's kernels are)",
    ]


def test_deep_jail_namespace_unknown_warns() -> None:
    """No config and no link to see: cannot tell, which warns (a module list cannot help)."""
    assert lines(check_kernel_feature(PIDNS, kernel(None, loadable=frozenset({"veth"})))) == [
        f"warn  pidns: cannot tell: no kernel config (/proc/config.gz, /boot/config-{RELEASE})"
        " and no other sign of it",
        "  fix: nothing, if jobs start; otherwise check that the kernel has CONFIG_PID_NS",
    ]


# --------------------------------------------------------------------------------------------
# seccomp


def test_parse_seccomp_mode() -> None:
    """The Seccomp: line names the mode; no line (no CONFIG_SECCOMP) or an odd value is None."""
    assert parse_seccomp_mode("Name:\tx\nSeccomp:\t0\nSeccomp_filters:\t0\n") == "disabled"
    assert parse_seccomp_mode("Seccomp:\t1\n") == "strict"
    assert parse_seccomp_mode("Seccomp_filters:\t3\nSeccomp:\t2\n") == "filter"
    assert parse_seccomp_mode("Name:\tx\n") is None
    assert parse_seccomp_mode("Seccomp:\t9\n") is None


def test_seccomp_built_in() -> None:
    """CONFIG_SECCOMP_FILTER=y: ok, built in."""
    info = SeccompInfo("disabled", errno.EFAULT)
    assert lines(check_seccomp(kernel({"CONFIG_SECCOMP_FILTER": "y"}), info)) == [
        "ok    seccomp: built in (CONFIG_SECCOMP_FILTER=y)"
    ]


def test_seccomp_seen_without_a_config() -> None:
    """No config: a filter over this process, or the kernel's EFAULT to a NULL filter, proves it."""
    assert lines(check_seccomp(kernel(None), SeccompInfo("filter", None))) == [
        "ok    seccomp: present (this process runs under a filter: Seccomp: 2 in /proc/self/status)"
    ]
    assert lines(check_seccomp(kernel(None), SeccompInfo("disabled", errno.EFAULT))) == [
        "ok    seccomp: present (the kernel knows prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER))"
    ]


def test_seccomp_without_filter_mode_is_a_blocker() -> None:
    """EINVAL to the filter request outweighs a config file; a config without it FAILs too."""
    einval = check_seccomp(
        kernel({"CONFIG_SECCOMP_FILTER": "y"}), SeccompInfo("disabled", errno.EINVAL)
    )
    assert lines(einval) == [
        "FAIL  seccomp: no filter mode in this kernel (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER)"
        " fails with EINVAL)",
        "  fix: boot a kernel built with CONFIG_SECCOMP_FILTER=y (Debian's and Ubuntu's kernels"
        " are)",
    ]
    unset = check_seccomp(kernel({"CONFIG_SECCOMP_FILTER": "n"}), SeccompInfo(None, None))
    assert lines(unset)[0] == (
        "FAIL  seccomp: not in this kernel (CONFIG_SECCOMP_FILTER is not set)"
    )


def test_seccomp_unknown_warns() -> None:
    """No config and no answer from prctl (e.g. EPERM from a filter): cannot tell, a warning."""
    check = check_seccomp(kernel(None), SeccompInfo("disabled", errno.EPERM))
    assert check.status == "warn"
    assert check.check == SECCOMP_FILTER.check
    assert check.detail.startswith("cannot tell: no kernel config")
