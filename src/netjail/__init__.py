"""netjail: run untrusted code in a network jail that reports every egress attempt.

The public API is the client library::

    from netjail import Client
    result = Client().run(["/usr/bin/curl", "https://203.0.113.9/"], stdio="capture")

and its asyncio twin, ``AsyncClient`` (``await AsyncClient().run([...])``).

Its names are loaded on first use (PEP 562): importing any ``netjail.*`` module runs this file
first, and neither the CLI's start nor the daemon's lean fork server should pay for the client
library (or asyncio) it does not use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from netjail._version import __version__

if TYPE_CHECKING:
    from netjail.asyncclient import AsyncClient
    from netjail.client import Client, JobResult
    from netjail.errors import NetjailError
    from netjail.protocol import Event, Report

__all__ = ["AsyncClient", "Client", "Event", "JobResult", "NetjailError", "Report", "__version__"]

#: Where each public name lives.
_HOMES = {
    "AsyncClient": "netjail.asyncclient",
    "Client": "netjail.client",
    "JobResult": "netjail.client",
    "NetjailError": "netjail.errors",
    "Event": "netjail.protocol",
    "Report": "netjail.protocol",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'netjail' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value
