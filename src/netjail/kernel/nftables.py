"""The jail's ruleset for nftables: rendered from netjail.kernel.rules (pure), loaded by a helper.

``render_nftables`` is pure and unit-tested on exact text: one ``inet`` table with a ``divert``
chain (nat) when there is anything to redirect, and the ``output`` chain (filter).
``apply_nftables`` hands that text to libnftables (a ctypes binding over Debian's libnftables1:
~1 ms per ruleset, versus tens of ms to fork ``nft``) in one atomic transaction, for the netns
of the calling thread, which is inside the jail. The library runs in a helper process
(netjail.kernel.nfthelper) that enters that netns for the load: in the daemon, the library's
select() would abort it past fd 1023, and its exit() on EMFILE would end it.
"""

from __future__ import annotations

import threading
from typing import assert_never

from netjail.kernel import nfthelper
from netjail.kernel.rules import (
    AcceptIcmpv6,
    AcceptLocalDestination,
    AcceptLoopback,
    JailRuleset,
    KernelLog,
    LogForeignDns,
    LogPacket,
    LogPrefix,
    LogStrategy,
    Nflog,
    OutputRule,
    RedirectDns,
    RedirectRule,
    RedirectTcp,
    RejectAdminProhibited,
    RejectTcpWithReset,
)

TABLE = "netjail"


def render_nftables(ruleset: JailRuleset, log: LogStrategy) -> str:
    """The nft text that loads ``ruleset`` as table ``inet netjail``, logging by ``log``."""
    lines = [f"table inet {TABLE} {{"]
    if ruleset.redirect.rules:
        lines += [
            "\tchain divert {",
            f"\t\ttype nat hook output priority -100; policy {ruleset.redirect.policy};",
            *(f"\t\t{line}" for rule in ruleset.redirect.rules for line in _redirect(rule, log)),
            "\t}",
        ]
    lines += [
        "\tchain output {",
        f"\t\ttype filter hook output priority filter; policy {ruleset.output.policy};",
        *(f"\t\t{_output(rule, log)}" for rule in ruleset.output.rules),
        "\t}",
        "}",
    ]
    return "\n".join(lines) + "\n"


def _log(prefix: LogPrefix, log: LogStrategy) -> str:
    # nft keeps 127 bytes of a prefix (NF_LOG_PREFIXLEN) for both statements: every valid job
    # id fits, so unlike iptables there is no length to check.
    match log:
        case Nflog(group=group, snaplen=snaplen):
            return f'log prefix "{prefix.text}" group {group} snaplen {snaplen}'
        case KernelLog():
            # skuid makes the kernel append the sending socket's "UID=… GID=…".
            return f'log prefix "{prefix.text}" flags skuid'
        case _:
            assert_never(log)


def _transports(transports: tuple[str, ...]) -> str:
    return "{ " + ", ".join(transports) + " }" if len(transports) > 1 else transports[0]


def _redirect(rule: RedirectRule, log: LogStrategy) -> list[str]:
    match rule:
        case LogForeignDns(prefix=prefix, port=port, transports=transports, stub=stub):
            dns = f"meta l4proto {_transports(transports)} th dport {port}"
            statement = _log(prefix, log)
            return [
                f"{dns} ip daddr != {stub.v4} {statement}",
                f"{dns} ip6 daddr != {stub.v6} {statement}",
            ]
        case RedirectDns(port=port, transports=transports):
            return [f"meta l4proto {_transports(transports)} th dport {port} redirect to :{port}"]
        case RedirectTcp(network=network, ports=ports, to_port=to_port):
            family = "ip" if network.version == 4 else "ip6"
            selector = "meta l4proto tcp"
            if ports is not None:
                selector = "tcp dport { " + ", ".join(str(p) for p in ports) + " }"
            return [f"{family} daddr {network} {selector} redirect to :{to_port}"]
        case _:
            assert_never(rule)


def _output(rule: OutputRule, log: LogStrategy) -> str:
    match rule:
        case AcceptLoopback():
            return 'oif "lo" accept'
        case AcceptLocalDestination():
            return "fib daddr type local accept"
        case AcceptIcmpv6(types=types):
            return "icmpv6 type { " + ", ".join(t.name for t in types) + " } accept"
        case LogPacket(prefix=prefix):
            return _log(prefix, log)
        case RejectTcpWithReset():
            return "meta l4proto tcp reject with tcp reset"
        case RejectAdminProhibited():
            return "reject with icmpx admin-prohibited"
        case _:
            assert_never(rule)


# --------------------------------------------------------------------------- libnftables

#: The library, loaded in the daemon only to check that it is there (so that a host without it
#: gets the package to install before any helper starts); never called here.
_nft: nfthelper.Libnftables | None = None
_nft_loading = threading.Lock()


def _check_libnftables() -> None:
    global _nft  # noqa: PLW0603 - one check per process, on first use
    with _nft_loading:  # first use may come from several jail threads at once
        if _nft is None:
            _nft = nfthelper.Libnftables()


def apply_nftables(text: str) -> None:
    """Load nft ``text`` atomically into the calling thread's netns (FirewallError on failure).

    libnftables runs in its helper process (netjail.kernel.nfthelper), never in the daemon:
    in-process, it aborts the daemon once fds pass 1023, and exits it when fds run out.
    """
    _check_libnftables()
    nfthelper.load_in_calling_netns(text)


def load_nftables(ruleset: JailRuleset, log: LogStrategy) -> None:
    """Render ``ruleset`` for nftables and load it into the calling thread's netns."""
    apply_nftables(render_nftables(ruleset, log))


def replace_nftables(ruleset: JailRuleset, log: LogStrategy) -> None:
    """As ``load_nftables``, replacing the jail's table in the same transaction: declaring
    the table first makes the delete valid whether or not it exists."""
    text = f"table inet {TABLE}\ndelete table inet {TABLE}\n" + render_nftables(ruleset, log)
    apply_nftables(text)
