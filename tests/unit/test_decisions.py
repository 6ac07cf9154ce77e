"""Live decisions on names: asked once, held until answered or timed out (deny)."""

from __future__ import annotations

import asyncio

from netjail.daemon.decisions import (
    MAX_QUESTIONS,
    HeldRequest,
    NameDecisions,
    Question,
    RequestDecisions,
)
from netjail.policy import Policy
from netjail.protocol import AskedRequest


def test_an_allowed_name_joins_the_policy_and_is_asked_once() -> None:
    """Two queries for one name: one question; once allowed, the name is allowed on 80/443."""
    policy = Policy.parse(["pypi.org"])
    asked: list[Question] = []

    async def ask(question: Question) -> bool:
        asked.append(question)
        await asyncio.sleep(0)
        return True

    decisions = NameDecisions("j-1", ask, policy)

    async def scenario() -> list[str]:
        return list(await asyncio.gather(decisions.decide("x.test"), decisions.decide("x.test")))

    assert decisions.undecided("x.test")
    assert asyncio.run(scenario()) == ["decided_allow", "decided_allow"]
    assert asked == [Question("j-1", "x.test", 30.0)]
    assert policy.allows("x.test", 443)
    assert not policy.allows("x.test", 22)
    assert not decisions.undecided("x.test")


def test_names_a_rule_covers_are_never_asked() -> None:
    """An allowed or denied name is the policy's to decide, not the client's."""
    decisions = NameDecisions(
        "j-1", lambda question: asyncio.sleep(0, True), Policy.parse(["a.test"], ["b.test"])
    )
    assert not decisions.undecided("a.test")
    assert not decisions.undecided("b.test")
    assert decisions.undecided("c.test")


def test_no_answer_in_time_and_a_failing_client_both_deny() -> None:
    """The timeout and an exception from the asker leave the name denied."""
    policy = Policy.parse([])

    async def silent(question: Question) -> bool:
        await asyncio.sleep(10)
        return True

    async def broken(question: Question) -> bool:
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

    async def ask(question: Question) -> bool:
        asked.append(question.domain)
        return False

    decisions = NameDecisions("j-1", ask, Policy.parse([]))

    async def scenario() -> None:
        for i in range(MAX_QUESTIONS * 20):
            name = f"n{i}.example.test"
            if decisions.undecided(name):
                await decisions.decide(name)

    asyncio.run(scenario())
    assert len(decisions._asked.outcomes) == MAX_QUESTIONS
    assert len(asked) == MAX_QUESTIONS
    assert decisions.unasked == MAX_QUESTIONS * 19
    assert not decisions.undecided("n0.example.test")


def test_queries_held_before_the_bound_are_denied_past_it() -> None:
    """Names that all passed undecided() before any was decided still store at most
    MAX_QUESTIONS outcomes: the rest are denied without asking."""

    async def ask(_question: Question) -> bool:
        return True

    decisions = NameDecisions("j-1", ask, Policy.parse([]))
    names = [f"h{i}.example.test" for i in range(MAX_QUESTIONS + 3)]
    assert all(decisions.undecided(name) for name in names)

    async def scenario() -> list[str]:
        return list(await asyncio.gather(*(decisions.decide(name) for name in names)))

    outcomes = asyncio.run(scenario())
    assert outcomes.count("decided_deny") == 3
    assert len(decisions._asked.outcomes) == MAX_QUESTIONS
    assert decisions.unasked == 3


def test_a_request_is_asked_once_per_method_host_and_path_and_its_answer_kept() -> None:
    """The first request with a method, host and path asks, and the answer stands for the
    same three later (allow or deny); another method or path asks again."""
    asked: list[Question] = []

    async def ask(question: Question) -> bool:
        asked.append(question)
        await asyncio.sleep(0)
        return question.request is not None and question.request.method == "GET"

    decisions = RequestDecisions("j-1", ask, timeout_s=5.0)
    get = HeldRequest("GET", "api.test", "/v1/x")
    post = HeldRequest("POST", "api.test", "/v1/x")
    other = HeldRequest("GET", "api.test", "/v1/y")

    async def scenario() -> list[str]:
        outcomes = list(await asyncio.gather(decisions.decide(get), decisions.decide(get)))
        for held in (post, post, other):
            outcomes.append(await decisions.decide(held))
        return outcomes

    expected = ["decided_allow", "decided_allow", "decided_deny", "decided_deny", "decided_allow"]
    assert asyncio.run(scenario()) == expected
    assert asked == [
        Question("j-1", "api.test", 5.0, AskedRequest(method="GET", path="/v1/x")),
        Question("j-1", "api.test", 5.0, AskedRequest(method="POST", path="/v1/x")),
        Question("j-1", "api.test", 5.0, AskedRequest(method="GET", path="/v1/y")),
    ]


def test_a_request_question_is_sanitised_and_bounded_but_remembered_exactly() -> None:
    """The question shows a control-free, bounded path; two paths that differ only past
    the bound are still two questions (a shown prefix never allows another request)."""
    asked: list[Question] = []

    async def ask(question: Question) -> bool:
        asked.append(question)
        return True

    decisions = RequestDecisions("j-1", ask)
    long_a = HeldRequest("GET", "api.test", "/\x1b[2J" + "a" * 5000 + "1")
    long_b = HeldRequest("GET", "api.test", "/\x1b[2J" + "a" * 5000 + "2")

    async def scenario() -> None:
        await decisions.decide(long_a)
        await decisions.decide(long_b)

    asyncio.run(scenario())
    assert len(asked) == 2
    shown = asked[0].request
    assert shown is not None
    assert shown.path.startswith("/?[2J")
    assert "\x1b" not in shown.path
    assert len(shown.path) == 1024 + 1
    assert shown.path.endswith("…")


def test_requests_time_out_to_a_deny_and_past_the_bound_are_not_asked() -> None:
    """No answer in time is decision_timeout (remembered); past MAX_QUESTIONS a new request
    is not asked (its rule denies it) while the ones asked before still get their answer."""

    async def silent(question: Question) -> bool:
        await asyncio.sleep(10)
        return True

    slow = RequestDecisions("j-1", silent, timeout_s=0.01)
    held = HeldRequest("GET", "api.test", "/x")
    assert asyncio.run(slow.decide(held)) == "decision_timeout"
    assert slow.asks(held)
    assert asyncio.run(slow.decide(held)) == "decision_timeout"

    async def yes(question: Question) -> bool:
        return True

    decisions = RequestDecisions("j-1", yes)

    async def fill() -> None:
        for i in range(MAX_QUESTIONS):
            await decisions.decide(HeldRequest("GET", "api.test", f"/{i}"))

    asyncio.run(fill())
    assert not decisions.asks(HeldRequest("GET", "api.test", "/new"))
    assert decisions.unasked == 1
    assert decisions.asks(HeldRequest("GET", "api.test", "/0"))
