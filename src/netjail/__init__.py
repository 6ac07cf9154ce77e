"""netjail: run untrusted code in a network jail that reports every egress attempt.

The public API is the client library::

    from netjail import Client
    result = Client().run(["/usr/bin/curl", "https://203.0.113.9/"], stdio="capture")
"""

from __future__ import annotations

from netjail._version import __version__
from netjail.client import Client, JobResult
from netjail.errors import NetjailError
from netjail.protocol import Event, Report

__all__ = ["Client", "Event", "JobResult", "NetjailError", "Report", "__version__"]
