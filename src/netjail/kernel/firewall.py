"""The jail's nftables ruleset: built as data (pure), applied in one atomic transaction.

``build_ruleset`` is pure and unit-tested on exact text. ``apply_ruleset`` hands that text to
libnftables in-process (a ctypes binding over Debian's libnftables1: ~1 ms per ruleset, versus
tens of ms to fork ``nft``), from a thread that is inside the jail's netns: the library's netlink
socket, and so the table, belong to the netns the calling thread is in.
"""

from __future__ import annotations

import ctypes
import ipaddress
import re
import threading
from dataclasses import dataclass, field

from netjail.errors import FirewallError

TABLE = "netjail"
#: NFLOG group used inside every jail. Groups are per network namespace, so the same number in
#: every jail never mixes jobs; the log prefix names the job as well.
NFLOG_GROUP = 1
#: Bytes of each logged packet copied to the daemon: enough for IPv6 + TCP/UDP/ICMP headers.
NFLOG_SNAPLEN = 128

_JOB_ID = re.compile(r"[a-z0-9-]{1,32}")

# IPv6 neighbour discovery and multicast listener reports are the kernel's own traffic on the
# jail's veth link; the only other end of that link is inside the jail, so nothing leaves.
_KERNEL_ICMPV6 = (
    "nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert, "
    "mld-listener-report, mld2-listener-report"
)


#: The daemon's in-jail transparent proxy port. Below 1024, so no unprivileged job can bind it
#: first, and the daemon binds it before the job exists anyway.
PROXY_PORT = 999
#: The DNS stub's port (on 127.0.0.1 and ::1 inside the jail).
DNS_PORT = 53
#: Suffix of the log prefix marking a DNS packet to a foreign resolver, redirected to the stub.
DNS_REDIRECT_MARK = "dns"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class ProxiedRange:
    """A CIDR rule's traffic: TCP to ``network`` (on ``ports``; None = all) goes to the proxy."""

    network: IPNetwork
    ports: frozenset[int] | None


@dataclass(frozen=True)
class JailRules:
    """What a jail's ruleset is made of."""

    job_id: str
    nflog_group: int = NFLOG_GROUP
    #: Redirect every DNS packet (any destination, UDP and TCP) to the in-jail stub.
    dns_stub: bool = False
    #: TCP to these networks is redirected to the in-jail proxy (the synthetic pool, CIDR rules).
    proxied: tuple[ProxiedRange, ...] = field(default_factory=tuple)


def log_prefix(job_id: str) -> str:
    """The log prefix naming a job: the kmsg reader routes events by it; NFLOG needs it only
    for its ``dns`` mark (an NFLOG socket is per jail already)."""
    return f"netjail {job_id} "


def build_ruleset(rules: JailRules) -> str:
    """Render the whole ruleset for one jail: deny everything but local, log, then reject.

    REJECT, never DROP: a dropped SYN makes the job's client hang until its own timeout, a
    reset fails it in milliseconds. The chain policy is drop only as a backstop.

    Local traffic is matched twice: ``oif "lo"`` for what was sent to a local address, and
    ``fib daddr type local`` for what the divert chain redirected to the stub or proxy — the
    output device a hook reports is fixed when the hook starts, so after the redirect's
    re-route the packet still shows the original device while it is going to lo.
    """
    if not _JOB_ID.fullmatch(rules.job_id):
        raise FirewallError(f"invalid job id for a log prefix: {rules.job_id!r}")
    prefix = log_prefix(rules.job_id)
    return (
        f"table inet {TABLE} {{\n" + _nat_chain(rules, prefix) + "\tchain output {\n"
        "\t\ttype filter hook output priority filter; policy drop;\n"
        '\t\toif "lo" accept\n'
        "\t\tfib daddr type local accept\n"
        f"\t\ticmpv6 type {{ {_KERNEL_ICMPV6} }} accept\n"
        f'\t\tlog prefix "{prefix}" group {rules.nflog_group} snaplen {NFLOG_SNAPLEN}\n'
        "\t\tmeta l4proto tcp reject with tcp reset\n"
        "\t\treject with icmpx admin-prohibited\n"
        "\t}\n"
        "}\n"
    )


def _nat_chain(rules: JailRules, prefix: str) -> str:
    """Redirects, evaluated before the filter chain: DNS to the stub, proxied TCP to the proxy.

    A redirected packet leaves on lo, so the filter chain's ``oif "lo" accept`` lets it through;
    nothing redirected can leave the jail. DNS to a foreign resolver is logged first (with a
    distinct prefix) so the report can say which resolver the job tried.
    """
    if not rules.dns_stub and not rules.proxied:
        return ""
    lines = ["\tchain divert {", "\t\ttype nat hook output priority -100; policy accept;"]
    if rules.dns_stub:
        mark = (
            f'log prefix "{prefix}{DNS_REDIRECT_MARK} " '
            f"group {rules.nflog_group} snaplen {NFLOG_SNAPLEN}"
        )
        lines += [
            f"\t\tmeta l4proto {{ tcp, udp }} th dport {DNS_PORT} ip daddr != 127.0.0.1 {mark}",
            f"\t\tmeta l4proto {{ tcp, udp }} th dport {DNS_PORT} ip6 daddr != ::1 {mark}",
            f"\t\tmeta l4proto {{ tcp, udp }} th dport {DNS_PORT} redirect to :{DNS_PORT}",
        ]
    for item in rules.proxied:
        family = "ip" if item.network.version == 4 else "ip6"
        match = "meta l4proto tcp"
        if item.ports is not None:
            match = "tcp dport { " + ", ".join(str(p) for p in sorted(item.ports)) + " }"
        lines.append(f"\t\t{family} daddr {item.network} {match} redirect to :{PROXY_PORT}")
    lines.append("\t}")
    return "\n".join(lines) + "\n"


class _Libnftables:
    """The few libnftables calls we need, loaded once."""

    def __init__(self) -> None:
        try:
            lib = ctypes.CDLL("libnftables.so.1", use_errno=True)
        except OSError as e:
            raise FirewallError(
                f"libnftables not available ({e}): apt-get install libnftables1"
            ) from None
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        self.lib = lib
        self.lock = threading.Lock()

    def run(self, commands: str) -> str:
        """Run nft commands in the calling thread's netns; return output or raise."""
        # libnftables is not thread-safe when linked against libxtables, as Debian's is: its
        # maintainers say so (netfilter-devel, 2023: "libxtables is full of global variables").
        # Jails are built on threads of their own; without this lock the daemon once died of
        # "double free or corruption" when three jails were built at once. Held ~1 ms.
        with self.lock:
            return self._run(commands)

    def _run(self, commands: str) -> str:
        ctx = self.lib.nft_ctx_new(0)
        if not ctx:
            raise FirewallError("nft_ctx_new failed")
        try:
            self.lib.nft_ctx_buffer_output(ctx)
            self.lib.nft_ctx_buffer_error(ctx)
            rc = self.lib.nft_run_cmd_from_buffer(ctx, commands.encode())
            if rc != 0:
                err = (self.lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
                first = err.strip().splitlines()[0] if err.strip() else f"rc={rc}"
                raise FirewallError(f"nftables refused the jail ruleset: {first}")
            return (self.lib.nft_ctx_get_output_buffer(ctx) or b"").decode(errors="replace")
        finally:
            self.lib.nft_ctx_free(ctx)


_nft: _Libnftables | None = None


_nft_loading = threading.Lock()


def _libnftables() -> _Libnftables:
    global _nft  # noqa: PLW0603 - one library handle per process, loaded on first use
    with _nft_loading:  # first use may come from several jail threads at once
        if _nft is None:
            _nft = _Libnftables()
        return _nft


def apply_ruleset(ruleset: str) -> None:
    """Load ``ruleset`` atomically into the calling thread's netns (FirewallError on failure)."""
    _libnftables().run(ruleset)
