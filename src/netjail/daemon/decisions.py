"""Live decisions: a client decides, while the job runs, the names no rule covers.

The DNS stub holds a query for such a name until the client's answer comes, or
:data:`DECISION_TIMEOUT_S` passes (then the name is denied). Each name is asked once per job;
an allowed name is added to the job's policy as ``--allow NAME`` would (ports 80 and 443), so
the proxy lets its connections through too. The outcome is the held query's event ``reason``:
``decided_allow``, ``decided_deny`` or ``decision_timeout``. Past :data:`MAX_QUESTIONS` names a
new name is denied at once (its event says ``not_allowed``) and not remembered, since a job can
send millions of names: counted in ``unasked``, and logged once per job.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Literal

from netjail.policy import Policy
from netjail.requests import DECISION_TIMEOUT_S

#: Most names one job may have asked about (beyond that, they are denied unasked).
MAX_QUESTIONS = 256

log = logging.getLogger(__name__)

#: Asks the client about a name for a job (job id, name); True allows it.
Ask = Callable[[str, str], Awaitable[bool]]
#: What became of a name: the reason on its DNS event.
Outcome = Literal["decided_allow", "decided_deny", "decision_timeout"]


class NameDecisions:
    """One job's live decisions on names."""

    def __init__(
        self, job_id: str, ask: Ask, policy: Policy, timeout_s: float = DECISION_TIMEOUT_S
    ) -> None:
        self._job_id = job_id
        self._ask = ask
        self._policy = policy
        self._timeout_s = timeout_s
        self._outcomes: dict[str, asyncio.Future[Outcome]] = {}
        #: New names denied unasked, the bound reached.
        self.unasked = 0

    def undecided(self, name: str) -> bool:
        """Whether a query for the canonical ``name`` must wait for a decision: not once
        MAX_QUESTIONS names were asked about (then it is denied at once, counted)."""
        if name in self._outcomes or self._policy.covers(name):
            return False
        if len(self._outcomes) >= MAX_QUESTIONS:
            self._count_unasked()
            return False
        return True

    def _count_unasked(self) -> None:
        if self.unasked == 0:
            log.warning(
                "job %s asked about %d names: new names are denied unasked",
                self._job_id,
                MAX_QUESTIONS,
            )
        self.unasked += 1

    async def decide(self, name: str) -> Outcome:
        """The decision on ``name``, asking the client the first time; never raises."""
        future = self._outcomes.get(name)
        if future is None:
            if len(self._outcomes) >= MAX_QUESTIONS:
                # Queries held before the bound was reached: denied, and not remembered.
                self._count_unasked()
                return "decided_deny"
            # A task of its own: a query that stops waiting leaves the others' answer coming.
            future = self._outcomes[name] = asyncio.ensure_future(self._ask_once(name))
        return await asyncio.shield(future)

    async def _ask_once(self, name: str) -> Outcome:
        try:
            allowed = await asyncio.wait_for(self._ask(self._job_id, name), self._timeout_s)
        except TimeoutError:
            return "decision_timeout"
        except Exception:  # a client gone, or a broken answer: the name stays denied
            return "decided_deny"
        if not allowed:
            return "decided_deny"
        self._policy.allow_name(name)
        return "decided_allow"
