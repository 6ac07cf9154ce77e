"""The kernel backends a daemon can be configured with (chosen once, at start-up)."""

from __future__ import annotations

from typing import Literal

#: Who renders and applies the jail's ruleset.
FirewallBackend = Literal["nftables", "iptables"]
#: Where the jail's logged packets are read: per-jail NFLOG sockets, or the kernel log.
LogBackend = Literal["nflog", "kmsg"]
