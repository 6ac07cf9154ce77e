"""Tests for the jail's rule model (netjail.kernel.rules), its nftables rendering
(netjail.kernel.nftables) and the backend choice (netjail.kernel.firewall), on exact data."""

from __future__ import annotations

import ctypes
import ipaddress

import pytest

from netjail.errors import FirewallError
from netjail.kernel import firewall, iptables, nftables
from netjail.kernel.backends import FirewallBackend, LogBackend
from netjail.kernel.firewall import JailFirewall
from netjail.kernel.nftables import render_nftables
from netjail.kernel.rules import (
    DNS_STUB,
    KERNEL_ICMPV6,
    NFLOG_GROUP,
    NFLOG_SNAPLEN,
    AcceptIcmpv6,
    AcceptLocalDestination,
    AcceptLoopback,
    Chain,
    JailRules,
    JailRuleset,
    KernelLog,
    LogForeignDns,
    LogPacket,
    LogPrefix,
    LogStrategy,
    Nflog,
    ProxiedRange,
    RedirectDns,
    RedirectTcp,
    RejectAdminProhibited,
    RejectTcpWithReset,
    build_jail_ruleset,
    log_prefix,
)

JOB = "j-0123abcd"

EXPECTED_RULESET = """\
table inet netjail {
\tchain output {
\t\ttype filter hook output priority filter; policy drop;
\t\toif "lo" accept
\t\tfib daddr type local accept
\t\ticmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert, \
mld-listener-report, mld2-listener-report } accept
\t\tlog prefix "netjail j-0123abcd " group 1 snaplen 128
\t\tmeta l4proto tcp reject with tcp reset
\t\treject with icmpx admin-prohibited
\t}
}
"""

EXPECTED_DIVERT = """\
\tchain divert {
\t\ttype nat hook output priority -100; policy accept;
\t\tmeta l4proto { tcp, udp } th dport 53 ip daddr != 127.0.0.1 \
log prefix "netjail j-0123abcd dns " group 1 snaplen 128
\t\tmeta l4proto { tcp, udp } th dport 53 ip6 daddr != ::1 \
log prefix "netjail j-0123abcd dns " group 1 snaplen 128
\t\tmeta l4proto { tcp, udp } th dport 53 redirect to :53
\t\tip daddr 198.18.0.0/15 meta l4proto tcp redirect to :999
\t\tip6 daddr 2001:db8::/32 tcp dport { 80, 443 } redirect to :999
\t}
"""

EXPECTED_KERNEL_LOG_RULESET = """\
table inet netjail {
\tchain divert {
\t\ttype nat hook output priority -100; policy accept;
\t\tmeta l4proto { tcp, udp } th dport 53 ip daddr != 127.0.0.1 \
log prefix "netjail j-0123abcd dns " flags skuid
\t\tmeta l4proto { tcp, udp } th dport 53 ip6 daddr != ::1 \
log prefix "netjail j-0123abcd dns " flags skuid
\t\tmeta l4proto { tcp, udp } th dport 53 redirect to :53
\t\tip daddr 198.18.0.0/15 meta l4proto tcp redirect to :999
\t\tip6 daddr 2001:db8::/32 tcp dport { 80, 443 } redirect to :999
\t}
\tchain output {
\t\ttype filter hook output priority filter; policy drop;
\t\toif "lo" accept
\t\tfib daddr type local accept
\t\ticmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert, \
mld-listener-report, mld2-listener-report } accept
\t\tlog prefix "netjail j-0123abcd " flags skuid
\t\tmeta l4proto tcp reject with tcp reset
\t\treject with icmpx admin-prohibited
\t}
}
"""

EXPECTED_KERNEL_LOG_OUTPUT_ONLY = """\
table inet netjail {
\tchain output {
\t\ttype filter hook output priority filter; policy drop;
\t\toif "lo" accept
\t\tfib daddr type local accept
\t\ticmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert, \
mld-listener-report, mld2-listener-report } accept
\t\tlog prefix "netjail j-0123abcd " flags skuid
\t\tmeta l4proto tcp reject with tcp reset
\t\treject with icmpx admin-prohibited
\t}
}
"""

DOMAIN_RULES = JailRules(
    JOB,
    dns_stub=True,
    proxied=(
        ProxiedRange(ipaddress.ip_network("198.18.0.0/15"), None),
        ProxiedRange(ipaddress.ip_network("2001:db8::/32"), frozenset({443, 80})),
    ),
)
WITH_DIVERT = EXPECTED_RULESET.replace(
    "table inet netjail {\n", "table inet netjail {\n" + EXPECTED_DIVERT
)


# --------------------------------------------------------------------------- the model


def test_build_jail_ruleset_exact_data() -> None:
    """DNS logged (dns mark) and stubbed, TCP proxied on sorted ports; the rest logged, rejected."""
    assert build_jail_ruleset(DOMAIN_RULES) == JailRuleset(
        redirect=Chain(
            "accept",
            (
                LogForeignDns(LogPrefix(JOB, "dns"), 53, ("tcp", "udp"), DNS_STUB),
                RedirectDns(53, ("tcp", "udp")),
                RedirectTcp(ipaddress.ip_network("198.18.0.0/15"), None, 999),
                RedirectTcp(ipaddress.ip_network("2001:db8::/32"), (80, 443), 999),
            ),
        ),
        output=Chain(
            "drop",
            (
                AcceptLoopback(),
                AcceptLocalDestination(),
                AcceptIcmpv6(KERNEL_ICMPV6),
                LogPacket(LogPrefix(JOB)),
                RejectTcpWithReset(),
                RejectAdminProhibited(),
            ),
        ),
    )


def test_a_jail_without_stub_or_proxy_has_an_empty_redirect_chain() -> None:
    """No DNS stub and no proxied range: nothing to redirect."""
    assert build_jail_ruleset(JailRules(JOB)).redirect == Chain("accept", ())


def test_log_prefixes_lists_every_logging_rule_in_order() -> None:
    """The dns-marked prefix of the redirect chain comes first, then the output chain's."""
    prefixes = build_jail_ruleset(DOMAIN_RULES).log_prefixes
    assert [p.text for p in prefixes] == ["netjail j-0123abcd dns ", "netjail j-0123abcd "]


def test_kernel_icmpv6_names_and_numbers() -> None:
    """The kernel's ICMPv6 on the jail link: RS, NS, NA, MLD, MLDv2 reports, name and number."""
    assert [(t.name, t.number) for t in KERNEL_ICMPV6] == [
        ("nd-router-solicit", 133),
        ("nd-neighbor-solicit", 135),
        ("nd-neighbor-advert", 136),
        ("mld-listener-report", 131),
        ("mld2-listener-report", 143),
    ]


def test_a_proxied_range_without_ports_is_refused() -> None:
    """An empty port set would redirect nothing; it is an error for every backend alike."""
    rules = JailRules(JOB, proxied=(ProxiedRange(ipaddress.ip_network("10.0.0.0/8"), frozenset()),))
    with pytest.raises(FirewallError, match=r"proxied range 10\.0\.0\.0/8 has no ports"):
        build_jail_ruleset(rules)


@pytest.mark.parametrize("job_id", ["j-0", "0", "a" * 32, "abc-def-123"])
def test_lowercase_ids_up_to_32_are_accepted(job_id: str) -> None:
    """Job ids of 1 to 32 lowercase letters, digits and dashes make a log prefix."""
    text = render_nftables(build_jail_ruleset(JailRules(job_id)), Nflog())
    assert f'\t\tlog prefix "netjail {job_id} " group 1 snaplen 128\n' in text


@pytest.mark.parametrize(
    "job_id",
    [
        pytest.param("J-0123ABCD", id="uppercase"),
        pytest.param('j-1" accept', id="double-quote"),
        pytest.param("j-1'", id="single-quote"),
        pytest.param("j 1", id="space"),
        pytest.param("a" * 33, id="too-long"),
        pytest.param("", id="empty"),
        pytest.param("j_1", id="underscore"),
        pytest.param("j-1;", id="semicolon"),
        pytest.param("j-\u0131", id="non-ascii"),
        pytest.param("j-0123abcd\n", id="trailing-newline"),
    ],
)
def test_invalid_job_ids_are_refused(job_id: str) -> None:
    """A job id that could break out of, or does not fit, the quoted log prefix is refused."""
    with pytest.raises(FirewallError, match="invalid job id for a log prefix"):
        build_jail_ruleset(JailRules(job_id, dns_stub=True))


def test_log_prefix_format() -> None:
    """A prefix is "netjail ", the job id and a space, then the mark and a space if any."""
    assert log_prefix(JOB) == "netjail j-0123abcd "
    assert LogPrefix(JOB, "dns").text == "netjail j-0123abcd dns "


def test_default_nflog_strategy_is_group_1_snaplen_128() -> None:
    """NFLOG logs to group 1 with 128 bytes of each packet unless told otherwise."""
    assert Nflog() == Nflog(NFLOG_GROUP, NFLOG_SNAPLEN) == Nflog(1, 128)


@pytest.mark.parametrize(
    ("group", "snaplen", "message"),
    [
        (-1, 128, "invalid NFLOG group: -1"),
        (65536, 128, "invalid NFLOG group: 65536"),
        (1, 0, "invalid NFLOG snaplen: 0"),
        (1, 2**32, "invalid NFLOG snaplen: 4294967296"),
    ],
)
def test_out_of_range_nflog_settings_are_refused(group: int, snaplen: int, message: str) -> None:
    """NFLOG groups are 16-bit and snaplens 32-bit and positive; anything else is refused."""
    with pytest.raises(FirewallError, match=message):
        Nflog(group, snaplen)


# --------------------------------------------------------------------------- nftables text


def test_render_nftables_exact_text() -> None:
    """The ruleset is exactly: allow local and kernel ICMPv6, log, reset TCP, reject the rest."""
    assert render_nftables(build_jail_ruleset(JailRules(JOB)), Nflog()) == EXPECTED_RULESET


def test_render_nftables_with_dns_stub_and_proxy_exact_text() -> None:
    """DNS (any resolver) is logged then redirected to the stub; proxied TCP to the proxy."""
    assert render_nftables(build_jail_ruleset(DOMAIN_RULES), Nflog()) == WITH_DIVERT


def test_render_nftables_with_kernel_log_exact_text() -> None:
    """Kernel log: every log statement, the dns-marked too, says "flags skuid"; nothing else."""
    ruleset = build_jail_ruleset(DOMAIN_RULES)
    assert render_nftables(ruleset, KernelLog()) == EXPECTED_KERNEL_LOG_RULESET


def test_render_nftables_with_kernel_log_and_no_divert_exact_text() -> None:
    """Without a stub or proxy, the kernel-log ruleset is the output chain with "flags skuid"."""
    ruleset = build_jail_ruleset(JailRules(JOB))
    assert render_nftables(ruleset, KernelLog()) == EXPECTED_KERNEL_LOG_OUTPUT_ONLY


def test_render_nftables_uses_the_strategys_group_and_snaplen() -> None:
    """A non-default NFLOG group and snaplen appear in every log statement, nothing else."""
    text = render_nftables(build_jail_ruleset(DOMAIN_RULES), Nflog(group=7, snaplen=64))
    assert text == WITH_DIVERT.replace(" group 1 snaplen 128", " group 7 snaplen 64")


def test_missing_libnftables_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """A host without libnftables1 gets a FirewallError naming the package."""

    def absent(*_args: object, **_kwargs: object) -> None:
        raise OSError("libnftables.so.1: cannot open shared object file")

    monkeypatch.setattr(nftables, "_nft", None)
    monkeypatch.setattr(ctypes, "CDLL", absent)
    with pytest.raises(FirewallError) as caught:
        nftables.apply_nftables(EXPECTED_RULESET)
    assert str(caught.value) == (
        "libnftables not available: libnftables.so.1: cannot open shared object file; "
        "apt-get install libnftables1"
    )


# --------------------------------------------------------------------------- backend choice


@pytest.mark.parametrize(
    ("backend", "log_backend", "load", "log"),
    [
        ("nftables", "nflog", nftables.load_nftables, Nflog()),
        ("nftables", "kmsg", nftables.load_nftables, KernelLog()),
        ("iptables", "nflog", iptables.load_iptables, Nflog()),
        ("iptables", "kmsg", iptables.load_iptables, KernelLog()),
    ],
)
def test_for_backends_picks_the_loader_and_log_strategy(
    backend: FirewallBackend,
    log_backend: LogBackend,
    load: firewall.RulesetLoader,
    log: LogStrategy,
) -> None:
    """Each configured firewall gets its own loader; nflog logs to group 1, kmsg with LOG."""
    chosen = JailFirewall.for_backends(backend, log_backend)
    assert (chosen.backend, chosen.load, chosen.log) == (backend, load, log)


def test_nflog_property_names_the_group_to_bind() -> None:
    """The NFLOG strategy is what a jail's NFLOG socket binds; the kernel log has none."""
    assert JailFirewall.for_backends("nftables", "nflog").nflog == Nflog(1, 128)
    assert JailFirewall.for_backends("iptables", "kmsg").nflog is None


@pytest.mark.parametrize(
    ("backend", "log_backend", "message"),
    [
        ("nft", "nflog", "unknown firewall backend: 'nft'"),
        ("iptables", "ulog", "unknown log backend: 'ulog'"),
    ],
)
def test_for_backends_refuses_unknown_names(backend: str, log_backend: str, message: str) -> None:
    """A name that is not a backend (e.g. an unchecked config string) is an error."""
    with pytest.raises(FirewallError, match=message):
        JailFirewall.for_backends(backend, log_backend)  # type: ignore[arg-type]


def test_apply_loads_the_model_with_the_chosen_strategy() -> None:
    """apply builds the jail's ruleset once and hands it, with its strategy, to the loader."""
    loaded: list[tuple[JailRuleset, LogStrategy]] = []

    def load(ruleset: JailRuleset, log: LogStrategy) -> None:
        loaded.append((ruleset, log))

    chosen = JailFirewall("nftables", KernelLog(), load, load)
    chosen.apply(DOMAIN_RULES)
    assert loaded == [(build_jail_ruleset(DOMAIN_RULES), KernelLog())]


@pytest.mark.parametrize("log", [Nflog(), KernelLog()], ids=["nflog", "kernel-log"])
def test_apply_with_an_invalid_job_id_loads_nothing(log: LogStrategy) -> None:
    """A job id that cannot be a log prefix fails before anything reaches the kernel."""
    loaded: list[JailRuleset] = []

    def load(ruleset: JailRuleset, _log: LogStrategy) -> None:
        loaded.append(ruleset)

    chosen = JailFirewall("nftables", log, load, load)
    with pytest.raises(FirewallError, match="invalid job id"):
        chosen.apply(JailRules('j-1" accept'))
    assert loaded == []


@pytest.mark.parametrize(
    ("log_backend", "expected"),
    [("nflog", WITH_DIVERT), ("kmsg", EXPECTED_KERNEL_LOG_RULESET)],
)
def test_nftables_apply_loads_the_rendered_text(
    log_backend: LogBackend, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With nftables, apply gives libnftables exactly the rendered ruleset for the log backend."""
    loaded: list[str] = []
    monkeypatch.setattr(nftables, "apply_nftables", loaded.append)
    JailFirewall.for_backends("nftables", log_backend).apply(DOMAIN_RULES)
    assert loaded == [expected]


def test_nftables_replace_deletes_the_old_table_in_the_same_load(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pool jail's ruleset is replaced in one transaction: declare, delete, then the new."""
    loaded: list[str] = []
    monkeypatch.setattr(nftables, "apply_nftables", loaded.append)
    JailFirewall.for_backends("nftables", "nflog").replace(DOMAIN_RULES)
    assert loaded == ["table inet netjail\ndelete table inet netjail\n" + WITH_DIVERT]
