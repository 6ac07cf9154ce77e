"""Tests for netjail.kernel.iptables: the exact restore texts of the jail's ruleset, and how
applying them fails."""

from __future__ import annotations

import ipaddress
import subprocess
from typing import Any

import pytest

from netjail.errors import FirewallError
from netjail.kernel.firewall import JailFirewall
from netjail.kernel.iptables import RestoreInput, apply_iptables_rules, render_iptables
from netjail.kernel.rules import (
    JailRules,
    KernelLog,
    LogStrategy,
    Nflog,
    ProxiedRange,
    build_jail_ruleset,
)

JOB = "j-0123abcd"
RULES = JailRules(JOB)


def render(rules: JailRules, log: LogStrategy) -> RestoreInput:
    """The restore texts of ``rules``' model, as ``JailFirewall.apply`` renders them."""
    return render_iptables(build_jail_ruleset(rules), log)


NFLOG_V4 = """\
*filter
:OUTPUT DROP [0:0]
-A OUTPUT -o lo -j ACCEPT
-A OUTPUT -m addrtype --dst-type LOCAL -j ACCEPT
-A OUTPUT -j NFLOG --nflog-prefix "netjail j-0123abcd " --nflog-group 1 --nflog-size 128
-A OUTPUT -p tcp -j REJECT --reject-with tcp-reset
-A OUTPUT -j REJECT --reject-with icmp-admin-prohibited
COMMIT
"""

NFLOG_V6 = """\
*filter
:OUTPUT DROP [0:0]
-A OUTPUT -o lo -j ACCEPT
-A OUTPUT -m addrtype --dst-type LOCAL -j ACCEPT
-A OUTPUT -p ipv6-icmp -m icmp6 --icmpv6-type 133 -j ACCEPT
-A OUTPUT -p ipv6-icmp -m icmp6 --icmpv6-type 135 -j ACCEPT
-A OUTPUT -p ipv6-icmp -m icmp6 --icmpv6-type 136 -j ACCEPT
-A OUTPUT -p ipv6-icmp -m icmp6 --icmpv6-type 131 -j ACCEPT
-A OUTPUT -p ipv6-icmp -m icmp6 --icmpv6-type 143 -j ACCEPT
-A OUTPUT -j NFLOG --nflog-prefix "netjail j-0123abcd " --nflog-group 1 --nflog-size 128
-A OUTPUT -p tcp -j REJECT --reject-with tcp-reset
-A OUTPUT -j REJECT --reject-with icmp6-adm-prohibited
COMMIT
"""

LOG_V4 = """\
*filter
:OUTPUT DROP [0:0]
-A OUTPUT -o lo -j ACCEPT
-A OUTPUT -m addrtype --dst-type LOCAL -j ACCEPT
-A OUTPUT -j LOG --log-prefix "netjail j-0123abcd " --log-uid
-A OUTPUT -p tcp -j REJECT --reject-with tcp-reset
-A OUTPUT -j REJECT --reject-with icmp-admin-prohibited
COMMIT
"""

LOG_V6 = """\
*filter
:OUTPUT DROP [0:0]
-A OUTPUT -o lo -j ACCEPT
-A OUTPUT -m addrtype --dst-type LOCAL -j ACCEPT
-A OUTPUT -p ipv6-icmp -m icmp6 --icmpv6-type 133 -j ACCEPT
-A OUTPUT -p ipv6-icmp -m icmp6 --icmpv6-type 135 -j ACCEPT
-A OUTPUT -p ipv6-icmp -m icmp6 --icmpv6-type 136 -j ACCEPT
-A OUTPUT -p ipv6-icmp -m icmp6 --icmpv6-type 131 -j ACCEPT
-A OUTPUT -p ipv6-icmp -m icmp6 --icmpv6-type 143 -j ACCEPT
-A OUTPUT -j LOG --log-prefix "netjail j-0123abcd " --log-uid
-A OUTPUT -p tcp -j REJECT --reject-with tcp-reset
-A OUTPUT -j REJECT --reject-with icmp6-adm-prohibited
COMMIT
"""


def test_nflog_rules_exact_text() -> None:
    """NFLOG: local and kernel ICMPv6 accepted, the rest logged, then reset or rejected; no nat."""
    assert render(RULES, Nflog()) == RestoreInput(NFLOG_V4, NFLOG_V6)


def test_log_rules_exact_text() -> None:
    """Kernel-log strategy: the same policy, logged with LOG and the owner's UID."""
    assert render(RULES, KernelLog()) == RestoreInput(LOG_V4, LOG_V6)


NAT_V4 = """\
*nat
:OUTPUT ACCEPT [0:0]
-A OUTPUT ! -d 127.0.0.1/32 -p tcp -m tcp --dport 53 -j NFLOG \
--nflog-prefix "netjail j-0123abcd dns " --nflog-group 1 --nflog-size 128
-A OUTPUT ! -d 127.0.0.1/32 -p udp -m udp --dport 53 -j NFLOG \
--nflog-prefix "netjail j-0123abcd dns " --nflog-group 1 --nflog-size 128
-A OUTPUT -p tcp -m tcp --dport 53 -j REDIRECT --to-ports 53
-A OUTPUT -p udp -m udp --dport 53 -j REDIRECT --to-ports 53
-A OUTPUT -d 198.18.0.0/15 -p tcp -j REDIRECT --to-ports 999
-A OUTPUT -d 203.0.113.0/24 -p tcp -m multiport --dports 443 -j REDIRECT --to-ports 999
COMMIT
"""

NAT_V6 = """\
*nat
:OUTPUT ACCEPT [0:0]
-A OUTPUT ! -d ::1/128 -p tcp -m tcp --dport 53 -j NFLOG \
--nflog-prefix "netjail j-0123abcd dns " --nflog-group 1 --nflog-size 128
-A OUTPUT ! -d ::1/128 -p udp -m udp --dport 53 -j NFLOG \
--nflog-prefix "netjail j-0123abcd dns " --nflog-group 1 --nflog-size 128
-A OUTPUT -p tcp -m tcp --dport 53 -j REDIRECT --to-ports 53
-A OUTPUT -p udp -m udp --dport 53 -j REDIRECT --to-ports 53
-A OUTPUT -d 2001:db8::/32 -p tcp -m multiport --dports 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15 \
-j REDIRECT --to-ports 999
-A OUTPUT -d 2001:db8::/32 -p tcp -m multiport --dports 16,17 -j REDIRECT --to-ports 999
COMMIT
"""

DOMAIN_RULES = JailRules(
    JOB,
    dns_stub=True,
    proxied=(
        ProxiedRange(ipaddress.ip_network("198.18.0.0/15"), None),
        ProxiedRange(ipaddress.ip_network("2001:db8::/32"), frozenset(range(17, 0, -1))),
        ProxiedRange(ipaddress.ip_network("203.0.113.0/24"), frozenset({443})),
    ),
)


def test_dns_stub_and_proxy_add_a_nat_table_exact_text() -> None:
    """Foreign DNS is logged (dns mark) and stubbed, proxied TCP redirected, per family, in nat."""
    assert render(DOMAIN_RULES, Nflog()) == RestoreInput(NFLOG_V4 + NAT_V4, NFLOG_V6 + NAT_V6)


def test_dns_redirect_is_logged_with_log_target() -> None:
    """With the LOG target the DNS redirect is logged to the kernel log too, with UID."""
    restore = render(DOMAIN_RULES, KernelLog())
    nflog_dns = '-j NFLOG --nflog-prefix "netjail j-0123abcd dns " --nflog-group 1 --nflog-size 128'
    log_dns = '-j LOG --log-prefix "netjail j-0123abcd dns " --log-uid'
    assert restore == RestoreInput(
        LOG_V4 + NAT_V4.replace(nflog_dns, log_dns), LOG_V6 + NAT_V6.replace(nflog_dns, log_dns)
    )


def test_proxied_ports_are_split_for_multiport() -> None:
    """xt_multiport takes 15 ports: 17 ports become a rule of 15 and a rule of 2, sorted."""
    v6 = render(DOMAIN_RULES, Nflog()).v6
    assert "--dports 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15 " in v6
    assert "--dports 16,17 " in v6


def test_nflog_group_and_snaplen_are_used() -> None:
    """A non-default NFLOG group and snaplen replace 1 and 128 in both families, nothing else."""
    restore = render(RULES, Nflog(group=7, snaplen=64))
    old, new = "--nflog-group 1 --nflog-size 128", "--nflog-group 7 --nflog-size 64"
    assert restore == RestoreInput(NFLOG_V4.replace(old, new), NFLOG_V6.replace(old, new))


def test_a_range_of_one_family_adds_a_nat_table_to_that_family_only() -> None:
    """Without a DNS stub, an IPv4 proxied range gives IPv4 a nat table and IPv6 none."""
    rules = JailRules(JOB, proxied=(ProxiedRange(ipaddress.ip_network("198.18.0.0/15"), None),))
    restore = render(rules, Nflog())
    assert restore.v4 == NFLOG_V4 + (
        "*nat\n:OUTPUT ACCEPT [0:0]\n"
        "-A OUTPUT -d 198.18.0.0/15 -p tcp -j REDIRECT --to-ports 999\nCOMMIT\n"
    )
    assert restore.v6 == NFLOG_V6


@pytest.mark.parametrize(
    "job_id",
    [
        pytest.param("J-0123ABCD", id="uppercase"),
        pytest.param('j-1" -j ACCEPT', id="double-quote"),
        pytest.param("j 1", id="space"),
        pytest.param("a" * 33, id="too-long"),
        pytest.param("", id="empty"),
        pytest.param("j_1", id="underscore"),
        pytest.param("j-0123abcd\n", id="trailing-newline"),
        pytest.param("j-\u0131", id="non-ascii"),
    ],
)
@pytest.mark.parametrize("log", [Nflog(), KernelLog()], ids=["nflog", "kernel-log"])
def test_invalid_job_ids_are_refused(job_id: str, log: LogStrategy) -> None:
    """A job id that could break out of, or does not fit, the quoted prefix is refused."""
    with pytest.raises(FirewallError, match="invalid job id for a log prefix"):
        render(JailRules(job_id), log)


def test_log_prefix_limit_refuses_ids_iptables_would_truncate() -> None:
    """LOG keeps 29 prefix bytes and iptables cuts longer ones silently: ids over 20 refused."""
    v4 = render(JailRules("a" * 20), KernelLog()).v4
    assert f'--log-prefix "netjail {"a" * 20} "' in v4
    with pytest.raises(FirewallError, match=r"too long for an iptables LOG prefix \(at most 20"):
        render(JailRules("a" * 21), KernelLog())


def test_log_prefix_limit_counts_the_dns_mark() -> None:
    """With a DNS stub the longer "netjail <id> dns " prefix must fit: ids up to 16."""
    job_id = "a" * 16
    restore = render(JailRules(job_id, dns_stub=True), KernelLog())
    dns_log = f'-j LOG --log-prefix "netjail {job_id} dns " --log-uid'
    assert [line for line in restore.v4.splitlines() if "-j LOG" in line] == [
        f'-A OUTPUT -j LOG --log-prefix "netjail {job_id} " --log-uid',
        f"-A OUTPUT ! -d 127.0.0.1/32 -p tcp -m tcp --dport 53 {dns_log}",
        f"-A OUTPUT ! -d 127.0.0.1/32 -p udp -m udp --dport 53 {dns_log}",
    ]
    with pytest.raises(FirewallError, match=r"too long for an iptables LOG prefix \(at most 16"):
        render(JailRules("a" * 17, dns_stub=True), KernelLog())


def test_nflog_accepts_the_longest_job_id() -> None:
    """NFLOG prefixes hold 63 bytes, so a 32-character job id is fine there."""
    v4 = render(JailRules("a" * 32, dns_stub=True), Nflog()).v4
    assert f'--nflog-prefix "netjail {"a" * 32} dns "' in v4


class _FakeRun:
    """Stands in for subprocess.run: records calls, returns or raises what it is told."""

    def __init__(self, results: list[subprocess.CompletedProcess[str] | BaseException]) -> None:
        self.results = results
        self.calls: list[tuple[list[str], dict[str, Any]]] = []

    def __call__(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        self.calls.append((argv, kwargs))
        result = self.results.pop(0)
        if isinstance(result, BaseException):
            raise result
        return result


def _done(code: int, stderr: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.CompletedProcess([], code, "", stderr)


def test_apply_runs_one_restore_per_family(monkeypatch: pytest.MonkeyPatch) -> None:
    """IPv4 rules go to iptables-restore, IPv6 to ip6tables-restore, on stdin, no preexec_fn."""
    fake = _FakeRun([_done(0), _done(0)])
    monkeypatch.setattr(subprocess, "run", fake)
    apply_iptables_rules("V4", "V6")
    assert [(argv[0], kw["input"]) for argv, kw in fake.calls] == [
        ("iptables-restore", "V4"),
        ("ip6tables-restore", "V6"),
    ]
    for _argv, kwargs in fake.calls:
        assert "preexec_fn" not in kwargs
        assert kwargs["env"]["PATH"] == "/usr/sbin:/usr/bin:/sbin:/bin"


def test_apply_reports_the_tools_first_error_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failing restore raises FirewallError with the tool's first stderr line."""
    stderr = "iptables-restore v1.8.9 (nf_tables): Chain 'BOGUS' does not exist\nError at 3\n"
    monkeypatch.setattr(subprocess, "run", _FakeRun([_done(2, stderr)]))
    with pytest.raises(FirewallError) as caught:
        apply_iptables_rules("V4", "V6")
    assert str(caught.value) == (
        "iptables-restore refused the jail rules: "
        "iptables-restore v1.8.9 (nf_tables): Chain 'BOGUS' does not exist"
    )


def test_apply_stops_at_ipv6_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    """An ip6tables-restore failure after IPv4 succeeded is still a FirewallError."""
    monkeypatch.setattr(subprocess, "run", _FakeRun([_done(0), _done(1)]))
    with pytest.raises(
        FirewallError, match="ip6tables-restore refused the jail rules: exit status 1"
    ):
        apply_iptables_rules("V4", "V6")


def test_apply_without_iptables_installed_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A missing iptables-restore is a FirewallError naming the package to install."""
    monkeypatch.setattr(subprocess, "run", _FakeRun([FileNotFoundError(2, "No such file")]))
    with pytest.raises(FirewallError, match=r"iptables-restore not found: .*apt-get install"):
        apply_iptables_rules("V4", "V6")


def test_apply_that_cannot_exec_the_tool_is_a_firewall_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An OSError other than a missing tool (e.g. EACCES) names the tool and the reason."""
    monkeypatch.setattr(subprocess, "run", _FakeRun([PermissionError(13, "Permission denied")]))
    with pytest.raises(FirewallError) as caught:
        apply_iptables_rules("V4", "V6")
    assert str(caught.value) == "cannot run iptables-restore: Permission denied"


def test_iptables_apply_restores_the_rendered_texts(monkeypatch: pytest.MonkeyPatch) -> None:
    """JailFirewall for iptables + kmsg restores exactly the LOG texts, IPv4 then IPv6."""
    fake = _FakeRun([_done(0), _done(0)])
    monkeypatch.setattr(subprocess, "run", fake)
    JailFirewall.for_backends("iptables", "kmsg").apply(DOMAIN_RULES)
    log_dns = '-j LOG --log-prefix "netjail j-0123abcd dns " --log-uid'
    nflog_dns = '-j NFLOG --nflog-prefix "netjail j-0123abcd dns " --nflog-group 1 --nflog-size 128'
    assert [(argv[0], kw["input"]) for argv, kw in fake.calls] == [
        ("iptables-restore", LOG_V4 + NAT_V4.replace(nflog_dns, log_dns)),
        ("ip6tables-restore", LOG_V6 + NAT_V6.replace(nflog_dns, log_dns)),
    ]


def test_apply_timeout_is_a_firewall_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A restore that hangs (e.g. on the xtables lock) ends as a FirewallError."""
    timeout = subprocess.TimeoutExpired(["iptables-restore"], 30)
    monkeypatch.setattr(subprocess, "run", _FakeRun([timeout]))
    with pytest.raises(FirewallError, match="did not finish"):
        apply_iptables_rules("V4", "V6")
