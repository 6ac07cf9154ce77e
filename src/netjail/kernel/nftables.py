"""The jail's ruleset for nftables: rendered from netjail.kernel.rules (pure), loaded in-process.

``render_nftables`` is pure and unit-tested on exact text: one ``inet`` table with a ``divert``
chain (nat) when there is anything to redirect, and the ``output`` chain (filter).
``apply_nftables`` hands that text to libnftables in-process (a ctypes binding over Debian's
libnftables1: ~1 ms per ruleset, versus tens of ms to fork ``nft``) in one atomic transaction,
from a thread that is inside the jail's netns: the library's netlink socket, and so the table,
belong to the netns the calling thread is in.
"""

from __future__ import annotations

import ctypes
import threading
from typing import assert_never

from netjail.errors import FirewallError, map_os_errors
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


class _Libnftables:
    """The few libnftables calls we need, loaded once."""

    def __init__(self) -> None:
        with map_os_errors(
            FirewallError, "libnftables not available", "apt-get install libnftables1"
        ):
            lib = ctypes.CDLL("libnftables.so.1", use_errno=True)
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


def apply_nftables(text: str) -> None:
    """Load nft ``text`` atomically into the calling thread's netns (FirewallError on failure)."""
    _libnftables().run(text)


def load_nftables(ruleset: JailRuleset, log: LogStrategy) -> None:
    """Render ``ruleset`` for nftables and load it into the calling thread's netns."""
    apply_nftables(render_nftables(ruleset, log))
