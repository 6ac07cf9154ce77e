"""Live decisions on names: asked once, held until answered or timed out (deny)."""

from __future__ import annotations

import asyncio

from netjail.daemon.decisions import MAX_QUESTIONS, NameDecisions
from netjail.policy import Policy


def test_an_allowed_name_joins_the_policy_and_is_asked_once() -> None:
    """Two queries for one name: one question; once allowed, the name is allowed on 80/443."""
    policy = Policy.parse(["pypi.org"])
    asked: list[tuple[str, str]] = []

    async def ask(job: str, name: str) -> bool:
        asked.append((job, name))
        await asyncio.sleep(0)
        return True

    decisions = NameDecisions("j-1", ask, policy)

    async def scenario() -> list[str]:
        return list(await asyncio.gather(decisions.decide("x.test"), decisions.decide("x.test")))

    assert decisions.undecided("x.test")
    assert asyncio.run(scenario()) == ["decided_allow", "decided_allow"]
    assert asked == [("j-1", "x.test")]
    assert policy.allows("x.test", 443)
    assert not policy.allows("x.test", 22)
    assert not decisions.undecided("x.test")


def test_names_a_rule_covers_are_never_asked() -> None:
    """An allowed or denied name is the policy's to decide, not the client's."""
    decisions = NameDecisions(
        "j-1", lambda job, name: asyncio.sleep(0, True), Policy.parse(["a.test"], ["b.test"])
    )
    assert not decisions.undecided("a.test")
    assert not decisions.undecided("b.test")
    assert decisions.undecided("c.test")


def test_no_answer_in_time_and_a_failing_client_both_deny() -> None:
    """The timeout and an exception from the asker leave the name denied."""
    policy = Policy.parse([])

    async def silent(job: str, name: str) -> bool:
        await asyncio.sleep(10)
        return True

    async def broken(job: str, name: str) -> bool:
        raise ConnectionResetError

    slow = NameDecisions("j-1", silent, policy, timeout_s=0.01)
    assert asyncio.run(slow.decide("x.test")) == "decision_timeout"
    assert asyncio.run(NameDecisions("j-1", broken, policy).decide("y.test")) == "decided_deny"
    assert not policy.allows("x.test", 443)
    assert not policy.allows("y.test", 443)


def test_names_past_the_question_bound_are_denied_and_not_remembered() -> None:
    """Past MAX_QUESTIONS, new names are denied unasked and counted, and the daemon's memory
    of names stays bounded (a job can send millions of distinct names)."""
    asked: list[str] = []

    async def ask(_job: str, name: str) -> bool:
        asked.append(name)
        return False

    decisions = NameDecisions("j-1", ask, Policy.parse([]))

    async def scenario() -> None:
        for i in range(MAX_QUESTIONS * 20):
            name = f"n{i}.example.test"
            if decisions.undecided(name):
                await decisions.decide(name)

    asyncio.run(scenario())
    assert len(decisions._outcomes) == MAX_QUESTIONS
    assert len(asked) == MAX_QUESTIONS
    assert decisions.unasked == MAX_QUESTIONS * 19
    assert not decisions.undecided("n0.example.test")


def test_queries_held_before_the_bound_are_denied_past_it() -> None:
    """Names that all passed undecided() before any was decided still store at most
    MAX_QUESTIONS outcomes: the rest are denied without asking."""

    async def ask(_job: str, _name: str) -> bool:
        return True

    decisions = NameDecisions("j-1", ask, Policy.parse([]))
    names = [f"h{i}.example.test" for i in range(MAX_QUESTIONS + 3)]
    assert all(decisions.undecided(name) for name in names)

    async def scenario() -> list[str]:
        return list(await asyncio.gather(*(decisions.decide(name) for name in names)))

    outcomes = asyncio.run(scenario())
    assert outcomes.count("decided_deny") == 3
    assert len(decisions._outcomes) == MAX_QUESTIONS
    assert decisions.unasked == 3
