"""The job id: its one grammar, shared by everything that names a job (pure).

A job id names the job's netns (``netjail-<id>``), its cgroup directory, its state record and
its log prefix, so every one of those places must accept exactly the same strings. Ids the
daemon makes are ``j-`` and 8 hex digits; the grammar is wider so that older records and tests
with readable ids still parse, but it never admits ``/``, ``..``, spaces or quotes.
"""

from __future__ import annotations

import re
import secrets

#: What every job id matches: lower-case letters, digits and '-', 1 to 32 characters.
JOB_ID_PATTERN = re.compile(r"[a-z0-9-]{1,32}")
#: Every id the daemon makes starts with this; the marker of a job cgroup in /proc/PID/cgroup.
JOB_ID_PREFIX = "j-"


def new_job_id() -> str:
    """A fresh random job id, e.g. ``j-3f9c01ab``."""
    return f"{JOB_ID_PREFIX}{secrets.token_hex(4)}"


def is_job_id(text: str) -> bool:
    """Does ``text`` follow the job-id grammar?"""
    return JOB_ID_PATTERN.fullmatch(text) is not None
