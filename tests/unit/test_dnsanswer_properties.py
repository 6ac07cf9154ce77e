"""Properties of the DNS stub's answers (netjail.dnsanswer.answer_query) on generated queries:
well-formed questions of any name, type, class, id and EDNS version get one of the documented
outcomes, and each reply answers that query. (Raw and mutated packets are in test_dnsanswer.)"""

from __future__ import annotations

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netjail.dnsanswer import SYNTHETIC_NETWORK, SyntheticPool, answer_query
from netjail.policy import Policy

POLICY = Policy.parse(["api.example.test", "*.pkg.example.test:443"], ["bad.pkg.example.test"])
REASONS = {
    None,
    "nodata",
    "not_allowed",
    "invalid_name",
    "meta_query",
    "pool_exhausted",
    "malformed",
    "opcode",
    "question_count",
    "class",
    "edns_version",
}

#: Labels as a job could put on the wire: any bytes, or pieces of the names the policy knows.
LABELS = st.binary(min_size=1, max_size=20) | st.sampled_from(
    [b"api", b"example", b"test", b"pkg", b"bad", b"API", b"xn--strae-oqa", b"-x", b"a_b", b"*"]
)
#: Names the policy allows or denies (in any case), and names made of any labels.
NAMES = st.one_of(
    st.sampled_from(
        [
            "api.example.test",
            "API.Example.TEST",
            "a.pkg.example.test",
            "x.y.pkg.example.test",
            "bad.pkg.example.test",
            "pkg.example.test",
        ]
    ).map(dns.name.from_text),
    st.lists(LABELS, max_size=4).map(lambda labels: dns.name.Name([*labels, b""])),
)
#: Mostly IN and no EDNS or version 0, so that the cases past the header checks are reached.
CLASSES = st.one_of(st.just(1), st.just(1), st.just(1), st.integers(0, 65535))
TYPES = st.one_of(
    st.just(1), st.sampled_from([28, 16, 15, 65, 255, 252, 41]), st.integers(0, 65535)
)
EDNS = st.one_of(st.just(-1), st.just(0), st.just(0), st.sampled_from([1, 255]))


@st.composite
def queries(draw: st.DrawFn) -> tuple[bytes, int]:
    """A well-formed query message, and its id."""
    name = draw(NAMES)
    rdtype, rdclass = draw(TYPES), draw(CLASSES)
    message = dns.message.Message(id=draw(st.integers(0, 65535)))
    message.flags = draw(st.sampled_from([0, dns.flags.RD, dns.flags.RD | dns.flags.CD]))
    message.question.append(dns.rrset.RRset(name, rdclass, rdtype))
    edns = draw(EDNS)
    if edns >= 0:
        message.use_edns(edns=edns, payload=draw(st.integers(512, 4096)))
    return message.to_wire(), message.id


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(queries(), st.sampled_from(["NXDOMAIN", "REFUSED"]))
def test_a_well_formed_query_gets_a_documented_outcome_and_a_reply_to_it(
    query: tuple[bytes, int], blocked: str
) -> None:
    """Every query is answered (it is one, with one question), with a reply of the same id and
    question, and one of the documented reasons; allowed answers are synthetic A records."""
    wire, query_id = query
    pool = SyntheticPool(max_names=4)
    outcome = answer_query(wire, POLICY, pool, blocked_rcode=blocked)  # type: ignore[arg-type]
    assert outcome.reason in REASONS
    assert outcome.reply is not None
    reply = dns.message.from_wire(outcome.reply)
    assert reply.id == query_id
    assert reply.flags & dns.flags.QR
    assert dns.rcode.to_text(reply.rcode()) == outcome.rcode
    if outcome.reason in ("not_allowed", "invalid_name"):
        assert outcome.rcode == blocked
        assert outcome.verdict == "blocked"
    if outcome.verdict == "allowed":
        assert outcome.domain is not None
        assert POLICY.name_verdict(outcome.domain)
    if outcome.reason is None:
        (answer,) = reply.answer
        (record,) = answer
        assert answer.rdtype == dns.rdatatype.A
        assert record.address == str(outcome.address)
        assert outcome.address in SYNTHETIC_NETWORK
        assert pool.name_for(outcome.address) == outcome.domain
    else:
        assert reply.answer == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["api.example.test", "x.pkg.example.test", "y.pkg.example.test"])))
def test_the_pool_gives_each_allowed_name_one_stable_address(names: list[str]) -> None:
    """Asking again for a name gives the address it got the first time; distinct names get
    distinct addresses."""
    pool = SyntheticPool(max_names=8)
    seen: dict[str, object] = {}
    for name in names:
        wire = dns.message.make_query(name, "A", use_edns=False).to_wire()
        outcome = answer_query(wire, POLICY, pool)
        assert outcome.reason is None
        assert seen.setdefault(name, outcome.address) == outcome.address
    assert len(set(seen.values())) == len(seen)
