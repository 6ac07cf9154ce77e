"""Live decisions: a client decides, while the job runs, the names and requests no rule covers.

**Names.** The DNS stub holds a query for such a name until the client's answer comes, or the
job's decision timeout (:data:`netjail.requests.DECISION_TIMEOUT_S` unless the config says
otherwise) passes: then the name is denied. Each name is asked once per job; an allowed name
is added to the job's policy as ``--allow NAME`` would (ports 80 and 443), so the proxy lets
its connections through too. The outcome is the held query's event ``reason``.

**Requests.** On an intercepted name with ``--allow-request`` rules, a request that matches
none is held (its connection waits) while the client is asked about that method, host and
path. The answer, or the timeout (a deny), is remembered for the rest of the job: a later
request with the same method, host and path (whatever its query) gets it without a question.
The outcome is the request's event ``reason``; a denied one gets the 403 with
``X-Netjail-Reason`` that a rule's denial gets.

The outcomes are ``decided_allow``, ``decided_deny`` and ``decision_timeout``. Past
:data:`MAX_QUESTIONS` names (and, apart, as many requests) a new one is denied at once as its
rule says (``not_allowed``, ``not_allowed_request``) and not remembered, since a job can send
millions of them: counted in ``unasked``, and logged once per job.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from netjail.policy import Policy
from netjail.protocol import MAX_ASKED_METHOD, MAX_ASKED_PATH, AskedRequest
from netjail.requests import DECISION_TIMEOUT_S
from netjail.text import sanitize

#: Most names, and apart most requests, one job may have asked about (beyond that, new ones
#: are denied unasked).
MAX_QUESTIONS = 256

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Question:
    """What a job waits on: a name, or one request to it, and how long the daemon waits."""

    job: str
    domain: str
    timeout_s: float
    #: None: the name itself (as on the wire, where ``request`` is then absent).
    request: AskedRequest | None = None


#: Asks the client a question; True allows.
Ask = Callable[[Question], Awaitable[bool]]
#: What became of a name or a request: the reason on its event.
Outcome = Literal["decided_allow", "decided_deny", "decision_timeout"]

_Key = TypeVar("_Key", bound=Hashable)


class _AskedOnce(Generic[_Key]):
    """Questions asked at most once each, at most MAX_QUESTIONS of them, answers kept."""

    def __init__(self, job_id: str, what: str, ask: Ask, timeout_s: float) -> None:
        self.job_id = job_id
        self._what = what
        self._ask = ask
        self.timeout_s = timeout_s
        self.outcomes: dict[_Key, asyncio.Future[Outcome]] = {}
        #: New ones denied unasked, the bound reached.
        self.unasked = 0

    def known(self, key: _Key) -> bool:
        return key in self.outcomes

    def has_room(self) -> bool:
        """Whether a new question may be asked (otherwise it is counted as unasked)."""
        if len(self.outcomes) < MAX_QUESTIONS:
            return True
        self.count_unasked()
        return False

    def count_unasked(self) -> None:
        if self.unasked == 0:
            log.warning(
                "job %s asked about %d %s: new ones are denied unasked",
                self.job_id,
                MAX_QUESTIONS,
                self._what,
            )
        self.unasked += 1

    async def decide(
        self, key: _Key, question: Question, on_allow: Callable[[], None] = lambda: None
    ) -> Outcome:
        """The decision on ``key``, asking ``question`` the first time; never raises."""
        future = self.outcomes.get(key)
        if future is None:
            if len(self.outcomes) >= MAX_QUESTIONS:
                # Held before the bound was reached: denied, and not remembered.
                self.count_unasked()
                return "decided_deny"
            # A task of its own: a waiter that stops waiting leaves the others' answer coming.
            future = self.outcomes[key] = asyncio.ensure_future(self._ask_once(question, on_allow))
        return await asyncio.shield(future)

    async def _ask_once(self, question: Question, on_allow: Callable[[], None]) -> Outcome:
        try:
            allowed = await asyncio.wait_for(self._ask(question), self.timeout_s)
        except TimeoutError:
            return "decision_timeout"
        except Exception:  # a client gone, or a broken answer: it stays denied
            return "decided_deny"
        if not allowed:
            return "decided_deny"
        on_allow()
        return "decided_allow"


class NameDecisions:
    """One job's live decisions on names."""

    def __init__(
        self, job_id: str, ask: Ask, policy: Policy, timeout_s: float = DECISION_TIMEOUT_S
    ) -> None:
        self._asked: _AskedOnce[str] = _AskedOnce(job_id, "names", ask, timeout_s)
        self._policy = policy

    @property
    def unasked(self) -> int:
        """New names denied unasked, the bound reached."""
        return self._asked.unasked

    def undecided(self, name: str) -> bool:
        """Whether a query for the canonical ``name`` must wait for a decision: not once
        MAX_QUESTIONS names were asked about (then it is denied at once, counted)."""
        if self._asked.known(name) or self._policy.covers(name):
            return False
        return self._asked.has_room()

    async def decide(self, name: str) -> Outcome:
        """The decision on ``name``, asking the client the first time; never raises."""
        question = Question(self._asked.job_id, name, self._asked.timeout_s)
        return await self._asked.decide(name, question, lambda: self._policy.allow_name(name))


@dataclass(frozen=True, slots=True)
class HeldRequest:
    """A request no rule allowed: its method, canonical host and decoded path, as sent."""

    method: str
    host: str
    path: str

    def key(self) -> bytes:
        """What its decision is remembered by: a digest, so that the memory a job's long
        paths take stays bounded (MAX_QUESTIONS digests)."""
        text = "\0".join((self.method, self.host, self.path))
        return hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=16).digest()

    def asked(self) -> AskedRequest:
        """The request as the question shows it: sanitised and bounded."""
        return AskedRequest(
            method=sanitize(self.method, MAX_ASKED_METHOD),
            path=sanitize(self.path, MAX_ASKED_PATH),
        )


class RequestDecisions:
    """One job's live decisions on requests that no ``--allow-request`` rule allows."""

    def __init__(self, job_id: str, ask: Ask, timeout_s: float = DECISION_TIMEOUT_S) -> None:
        self._asked: _AskedOnce[bytes] = _AskedOnce(job_id, "requests", ask, timeout_s)

    @property
    def unasked(self) -> int:
        """New requests denied unasked, the bound reached."""
        return self._asked.unasked

    @property
    def timeout_s(self) -> float:
        return self._asked.timeout_s

    def asks(self, request: HeldRequest) -> bool:
        """Whether ``request`` is decided by the client (asked now, or answered before): not a
        new one once MAX_QUESTIONS were asked about (it is denied by its rule, counted)."""
        return self._asked.known(request.key()) or self._asked.has_room()

    async def decide(self, request: HeldRequest) -> Outcome:
        """The decision on ``request``'s method, host and path, asking the client the first
        time; never raises."""
        question = Question(self._asked.job_id, request.host, self.timeout_s, request.asked())
        return await self._asked.decide(request.key(), question)
