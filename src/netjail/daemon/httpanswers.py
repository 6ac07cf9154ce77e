"""The HTTP responses an intercepting proxy makes itself, never the upstream's: a refusal (403,
400 or 502) that names its reason in ``X-Netjail-Reason`` and a one-line body, and a mock's
answer head. Every text in them comes from rules or from the job: one printable ASCII line.
"""

from __future__ import annotations

import h11

from netjail.httppolicy import Mock
from netjail.text import sanitize

#: The longest reason or rule text a header carries.
MAX_HEADER_TEXT = 200


def refusal(
    status: int, reason: str, detail: str | None, *, close: bool
) -> tuple[h11.Response, bytes]:
    """A refusal from the proxy itself: the reason in a header and a one-line body."""
    why = f"{reason}: {detail}" if detail else reason
    body = f"netjail: {header_text(why)}\n".encode("ascii")
    headers = [
        ("content-type", "text/plain; charset=utf-8"),
        ("content-length", str(len(body))),
        ("x-netjail-reason", header_text(why)),
    ]
    if close:
        headers.append(("connection", "close"))
    return h11.Response(status_code=status, headers=headers), body


def mock_head(mock: Mock, *, keep: bool) -> h11.Response:
    """The head of a mock's answer (its body is ``mock.body``), naming the mock."""
    headers = [
        ("content-type", mock.content_type),
        ("content-length", str(len(mock.body))),
        ("x-netjail-mock", header_text(mock.rule.text)),
    ]
    if not keep:
        headers.append(("connection", "close"))
    return h11.Response(status_code=mock.status, headers=headers)


def header_text(text: str) -> str:
    """A header value from rule text: one printable ASCII line, bounded."""
    return sanitize(text, MAX_HEADER_TEXT).encode("ascii", "replace").decode("ascii")
