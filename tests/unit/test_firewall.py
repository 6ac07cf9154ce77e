"""Tests for netjail.kernel.firewall's pure part: the ruleset text and its log prefix."""

from __future__ import annotations

import ipaddress

import pytest

from netjail.errors import FirewallError
from netjail.kernel.firewall import (
    NFLOG_GROUP,
    JailRules,
    ProxiedRange,
    build_ruleset,
    log_prefix,
)

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


def test_build_ruleset_exact_text() -> None:
    """The ruleset is exactly: allow local and kernel ICMPv6, log, reset TCP, reject the rest."""
    assert build_ruleset(JailRules("j-0123abcd")) == EXPECTED_RULESET


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


def test_build_ruleset_with_dns_stub_and_proxy_exact_text() -> None:
    """DNS (any resolver) is logged then redirected to the stub; proxied TCP to the proxy."""
    rules = JailRules(
        "j-0123abcd",
        dns_stub=True,
        proxied=(
            ProxiedRange(ipaddress.ip_network("198.18.0.0/15"), None),
            ProxiedRange(ipaddress.ip_network("2001:db8::/32"), frozenset({443, 80})),
        ),
    )
    expected = EXPECTED_RULESET.replace(
        "table inet netjail {\n", "table inet netjail {\n" + EXPECTED_DIVERT
    )
    assert build_ruleset(rules) == expected


def test_build_ruleset_uses_the_given_nflog_group() -> None:
    """A non-default NFLOG group appears in the log rule and nowhere else changes."""
    ruleset = build_ruleset(JailRules("j-0123abcd", nflog_group=7))
    assert ruleset == EXPECTED_RULESET.replace(" group 1 ", " group 7 ")


def test_default_nflog_group_is_1() -> None:
    """JailRules defaults to the module's NFLOG group, 1."""
    assert JailRules("j-1").nflog_group == NFLOG_GROUP == 1


@pytest.mark.parametrize("job_id", ["j-0", "0", "a" * 32, "abc-def-123"])
def test_build_ruleset_accepts_lowercase_ids_up_to_32(job_id: str) -> None:
    """Job ids of 1 to 32 lowercase letters, digits and dashes are accepted."""
    assert f'log prefix "netjail {job_id} "' in build_ruleset(JailRules(job_id))


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
    ],
)
def test_build_ruleset_rejects_invalid_job_ids(job_id: str) -> None:
    """A job id that could break out of, or does not fit, the quoted log prefix is refused."""
    with pytest.raises(FirewallError, match="invalid job id for a log prefix"):
        build_ruleset(JailRules(job_id))


def test_build_ruleset_rejects_job_id_with_trailing_newline() -> None:
    """A job id ending in a newline is refused, not put inside the quoted log prefix."""
    with pytest.raises(FirewallError, match="invalid job id for a log prefix"):
        build_ruleset(JailRules("j-0123abcd\n"))


def test_log_prefix_format() -> None:
    """The log prefix is "netjail ", the job id and a trailing space."""
    assert log_prefix("j-0123abcd") == "netjail j-0123abcd "
