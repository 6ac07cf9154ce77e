"""netjail: run untrusted code in a network jail that reports every egress attempt.

The public API is the client library::

    from netjail import Client
    result = Client().run(["/usr/bin/curl", "https://203.0.113.9/"], stdio="capture")

and its asyncio twin, ``AsyncClient`` (``await AsyncClient().run([...])``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from netjail._version import __version__
from netjail.client import Client, JobResult
from netjail.errors import NetjailError
from netjail.protocol import Event, Report

if TYPE_CHECKING:
    from netjail.asyncclient import AsyncClient

__all__ = ["AsyncClient", "Client", "Event", "JobResult", "NetjailError", "Report", "__version__"]


def __getattr__(name: str) -> object:
    # Loaded on first use: asyncio would add to every `netjail` command's start-up otherwise.
    if name == "AsyncClient":
        from netjail.asyncclient import AsyncClient  # noqa: PLC0415

        return AsyncClient
    raise AttributeError(f"module 'netjail' has no attribute {name!r}")
