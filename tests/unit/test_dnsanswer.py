"""Unit tests for netjail.dnsanswer: synthetic pool, DNS answers to hostile queries."""

from __future__ import annotations

import ipaddress
import struct

import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.tsigkeyring
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netjail.dnsanswer import (
    ANSWER_TTL,
    DnsOutcome,
    SyntheticPool,
    answer_query,
    sanitize_name,
)
from netjail.errors import PoolExhaustedError
from netjail.policy import Policy

POLICY = Policy.parse(["api.example.test", "*.cdn.example.test"], ["bad.cdn.example.test"])


def ask(
    wire: bytes,
    pool: SyntheticPool | None = None,
    policy: Policy = POLICY,
) -> DnsOutcome:
    return answer_query(wire, policy, pool if pool is not None else SyntheticPool())


def query(name: str, rdtype: str = "A", **kwargs: object) -> bytes:
    message = dns.message.make_query(name, rdtype, **kwargs)  # type: ignore[arg-type]
    message.id = 0x1234
    return message.to_wire()


def reply_of(outcome: DnsOutcome) -> dns.message.Message:
    assert outcome.reply is not None
    return dns.message.from_wire(outcome.reply)


def header(
    ident: int = 0x1234, flags: int = 0x0100, counts: tuple[int, ...] = (1, 0, 0, 0)
) -> bytes:
    return struct.pack("!HHHHHH", ident, flags, *counts)


A_QUESTION = b"\x03api\x07example\x04test\x00" + struct.pack("!HH", 1, 1)


# --- pool ------------------------------------------------------------------------------------


def test_pool_first_addresses() -> None:
    """Addresses are handed out from 198.18.0.1 upwards, skipping the network address."""
    pool = SyntheticPool()
    assert pool.address_for("a.example") == ipaddress.IPv4Address("198.18.0.1")
    assert pool.address_for("b.example") == ipaddress.IPv4Address("198.18.0.2")


def test_pool_is_stable_and_reversible() -> None:
    """A name keeps its address, and the address maps back to the name."""
    pool = SyntheticPool()
    first = pool.address_for("a.example")
    pool.address_for("b.example")
    assert pool.address_for("a.example") == first
    assert pool.name_for(first) == "a.example"
    assert pool.name_for(ipaddress.IPv6Address(f"::ffff:{first}")) == "a.example"
    assert pool.name_for(ipaddress.IPv4Address("198.18.0.99")) is None
    assert pool.name_for(ipaddress.IPv6Address("2001:db8::1")) is None
    assert len(pool) == 2


def test_pool_addresses_are_unique() -> None:
    """Distinct names get distinct addresses, all inside the pool, never .0 or broadcast."""
    pool = SyntheticPool(max_names=4096)
    addresses = {pool.address_for(f"h{i}.example") for i in range(4096)}
    assert len(addresses) == 4096
    network = ipaddress.IPv4Network("198.18.0.0/15")
    assert all(address in network for address in addresses)
    assert network.network_address not in addresses
    assert network.broadcast_address not in addresses


def test_pool_full_range_skips_broadcast() -> None:
    """A pool as large as the network ends one short of the broadcast address."""
    network = ipaddress.IPv4Network("198.18.0.0/29")
    pool = SyntheticPool(max_names=6, network=network)
    addresses = [pool.address_for(f"h{i}.example") for i in range(6)]
    assert addresses[-1] == ipaddress.IPv4Address("198.18.0.6")
    with pytest.raises(ValueError, match="max_names must be"):
        SyntheticPool(max_names=7, network=network)


def test_pool_exhaustion() -> None:
    """Past max_names a new name raises PoolExhaustedError; known names still resolve."""
    pool = SyntheticPool(max_names=2)
    known = pool.address_for("a.example")
    pool.address_for("b.example")
    with pytest.raises(PoolExhaustedError, match="more than 2 distinct names"):
        pool.address_for("c.example")
    assert pool.address_for("a.example") == known


def test_pool_exhaustion_answers_servfail() -> None:
    """A query that needs a new address from a full pool gets SERVFAIL, no address."""
    pool = SyntheticPool(max_names=1)
    assert ask(query("x.cdn.example.test"), pool).rcode == "NOERROR"
    outcome = ask(query("y.cdn.example.test"), pool)
    assert (outcome.rcode, outcome.verdict, outcome.reason) == (
        "SERVFAIL",
        "blocked",
        "pool_exhausted",
    )
    assert reply_of(outcome).answer == []


# --- allowed names ---------------------------------------------------------------------------


def test_allowed_a_gets_synthetic_address() -> None:
    """An allowed name's A query is answered with its synthetic address, short TTL."""
    pool = SyntheticPool()
    outcome = ask(query("api.example.test"), pool)
    assert outcome == DnsOutcome(
        reply=outcome.reply,
        domain="api.example.test",
        qtype="A",
        verdict="allowed",
        reason=None,
        rcode="NOERROR",
        address=ipaddress.IPv4Address("198.18.0.1"),
    )
    reply = reply_of(outcome)
    assert reply.id == 0x1234
    assert reply.flags & dns.flags.QR
    assert reply.flags & dns.flags.RD
    assert reply.flags & dns.flags.RA
    assert reply.rcode() == dns.rcode.NOERROR
    assert len(reply.answer) == 1
    rrset = reply.answer[0]
    assert rrset.rdtype == dns.rdatatype.A
    assert rrset.ttl == ANSWER_TTL
    assert [rdata.address for rdata in rrset] == ["198.18.0.1"]
    assert pool.name_for(ipaddress.IPv4Address("198.18.0.1")) == "api.example.test"


def test_case_variants_share_one_address_and_echo_case() -> None:
    """0x20-style mixed case maps to the same address and is echoed as asked."""
    pool = SyntheticPool()
    first = ask(query("api.example.test"), pool)
    mixed = ask(query("ApI.ExAmPlE.TeSt"), pool)
    assert mixed.address == first.address
    assert mixed.domain == "api.example.test"
    reply = reply_of(mixed)
    assert reply.question[0].name.to_text() == "ApI.ExAmPlE.TeSt."
    assert reply.answer[0].name.to_text() == "ApI.ExAmPlE.TeSt."


def test_wildcard_name_allowed() -> None:
    """A name under an allowed wildcard gets an address."""
    outcome = ask(query("a.b.cdn.example.test"))
    assert (outcome.verdict, outcome.rcode) == ("allowed", "NOERROR")


def test_allowed_aaaa_is_nodata() -> None:
    """AAAA for an allowed name is NODATA: NOERROR with no answer."""
    pool = SyntheticPool()
    outcome = ask(query("api.example.test", "AAAA"), pool)
    assert (outcome.rcode, outcome.verdict, outcome.reason, outcome.qtype) == (
        "NOERROR",
        "allowed",
        "nodata",
        "AAAA",
    )
    assert reply_of(outcome).answer == []
    assert len(pool) == 0


@pytest.mark.parametrize("rdtype", ["TXT", "MX", "HTTPS", "SRV", "CNAME", "NS"])
def test_allowed_other_types_are_nodata(rdtype: str) -> None:
    """Other record types for an allowed name are NODATA."""
    outcome = ask(query("api.example.test", rdtype))
    assert (outcome.rcode, outcome.verdict, outcome.reason, outcome.qtype) == (
        "NOERROR",
        "allowed",
        "nodata",
        rdtype,
    )
    assert reply_of(outcome).answer == []


@pytest.mark.parametrize("rdtype", ["ANY", "AXFR", "IXFR"])
def test_meta_types_refused(rdtype: str) -> None:
    """ANY and zone transfers are refused even for an allowed name."""
    outcome = ask(query("api.example.test", rdtype))
    assert (outcome.rcode, outcome.verdict, outcome.reason) == ("REFUSED", "blocked", "meta_query")


def test_unknown_type_reported_by_number() -> None:
    """A type with no mnemonic is reported as its number."""
    outcome = ask(query("api.example.test", "TYPE65280"))
    assert (outcome.qtype, outcome.rcode) == ("65280", "NOERROR")


def test_edns_query_answered_with_edns() -> None:
    """An EDNS0 query gets an EDNS0 reply advertising 1232 bytes."""
    outcome = ask(query("api.example.test", use_edns=0, payload=4096))
    reply = reply_of(outcome)
    assert reply.edns == 0
    assert reply.payload == 1232
    assert reply.rcode() == dns.rcode.NOERROR


def test_edns_version_1_gets_badvers() -> None:
    """An EDNS version above 0 is answered BADVERS."""
    outcome = ask(query("api.example.test", use_edns=1))
    assert (outcome.rcode, outcome.reason) == ("BADVERS", "edns_version")
    assert reply_of(outcome).rcode() == dns.rcode.BADVERS


# --- blocked names ---------------------------------------------------------------------------


def test_blocked_name_nxdomain() -> None:
    """A name no rule allows gets NXDOMAIN and no address."""
    pool = SyntheticPool()
    outcome = ask(query("evil.example"), pool)
    assert (outcome.rcode, outcome.verdict, outcome.reason, outcome.domain) == (
        "NXDOMAIN",
        "blocked",
        "not_allowed",
        "evil.example",
    )
    reply = reply_of(outcome)
    assert reply.answer == []
    assert reply.rcode() == dns.rcode.NXDOMAIN
    assert len(pool) == 0


def test_denied_name_nxdomain() -> None:
    """A name under an allowed wildcard but denied gets NXDOMAIN."""
    outcome = ask(query("bad.cdn.example.test"))
    assert (outcome.rcode, outcome.verdict) == ("NXDOMAIN", "blocked")


def test_wildcard_base_name_not_allowed() -> None:
    """'*.cdn.example.test' does not make cdn.example.test resolvable."""
    assert ask(query("cdn.example.test")).rcode == "NXDOMAIN"


def test_blocked_rcode_refused() -> None:
    """blocked_rcode="REFUSED" answers blocked names with REFUSED."""
    outcome = answer_query(query("evil.example"), POLICY, SyntheticPool(), blocked_rcode="REFUSED")
    assert (outcome.rcode, outcome.verdict) == ("REFUSED", "blocked")


def test_bad_blocked_rcode_is_a_programming_error() -> None:
    """An unknown blocked_rcode is the caller's bug, refused at once."""
    with pytest.raises(ValueError, match="blocked_rcode"):
        answer_query(query("x.example"), POLICY, SyntheticPool(), blocked_rcode="NOERROR")  # type: ignore[arg-type]


def test_dns_tunnel_txt_query_gets_nxdomain() -> None:
    """Long TXT queries under a denied zone are NXDOMAIN; nothing is allocated."""
    pool = SyntheticPool()
    label = "a" * 63
    name = f"{label}.{label}.{label}.t.tunnel.example"
    outcome = ask(query(name, "TXT"), pool)
    assert (outcome.rcode, outcome.verdict, outcome.qtype) == ("NXDOMAIN", "blocked", "TXT")
    assert outcome.domain == name
    assert len(pool) == 0


def test_binary_label_is_blocked_and_sanitised() -> None:
    """A label with NUL, dot or escape bytes is not a host name; the event name is clean."""
    wire = header() + b"\x07ap\x00i\x1b[.\x07example\x04test\x00" + struct.pack("!HH", 1, 1)
    outcome = ask(wire)
    assert (outcome.rcode, outcome.verdict, outcome.reason) == (
        "NXDOMAIN",
        "blocked",
        "invalid_name",
    )
    assert outcome.domain == "ap\\000i\\027[\\..example.test"


def test_root_query_blocked() -> None:
    """A query for the root name is blocked."""
    outcome = ask(query(".", "NS"))
    assert (outcome.rcode, outcome.reason, outcome.domain) == ("NXDOMAIN", "invalid_name", ".")


def test_non_in_class_refused() -> None:
    """A CHAOS query (version.bind) is refused."""
    wire = query("version.bind", "TXT", rdclass=dns.rdataclass.CH)
    outcome = ask(wire)
    assert (outcome.rcode, outcome.reason) == ("REFUSED", "class")


# --- malformed packets -----------------------------------------------------------------------


@pytest.mark.parametrize("wire", [b"", b"\x12", b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00"])
def test_truncated_header_not_answered(wire: bytes) -> None:
    """Fewer than 12 bytes: no header to answer, so no reply."""
    outcome = ask(wire)
    assert (outcome.reply, outcome.reason, outcome.verdict) == (None, "short_header", "blocked")


def test_response_packet_not_answered() -> None:
    """A packet with QR set is a response: never answered (no reflection loops)."""
    outcome = ask(header(flags=0x8180) + A_QUESTION)
    assert (outcome.reply, outcome.reason) == (None, "not_a_query")


def test_zero_questions_formerr() -> None:
    """A query with no question gets a header-only FORMERR echoing its ID."""
    outcome = ask(header(counts=(0, 0, 0, 0)))
    assert (outcome.rcode, outcome.reason) == ("FORMERR", "question_count")
    assert outcome.reply == struct.pack("!HHHHHH", 0x1234, 0x8181, 0, 0, 0, 0)


def test_two_questions_formerr() -> None:
    """Two questions get FORMERR, even when both are allowed names."""
    outcome = ask(header(counts=(2, 0, 0, 0)) + A_QUESTION + A_QUESTION)
    assert (outcome.rcode, outcome.reason) == ("FORMERR", "question_count")
    assert outcome.reply == struct.pack("!HHHHHH", 0x1234, 0x8181, 0, 0, 0, 0)


def test_compression_pointer_loop_formerr() -> None:
    """A name whose compression pointer points at itself is FORMERR."""
    outcome = ask(header() + b"\xc0\x0c" + struct.pack("!HH", 1, 1))
    assert (outcome.rcode, outcome.reason) == ("FORMERR", "malformed")


def test_compression_pointer_backward_loop_formerr() -> None:
    """A label then a pointer back to the name's start (an endless name) is FORMERR."""
    outcome = ask(header() + b"\x01a\xc0\x0c" + struct.pack("!HH", 1, 1))
    assert (outcome.rcode, outcome.reason) == ("FORMERR", "malformed")


def test_overlong_name_formerr() -> None:
    """A 300-byte label sequence (over DNS's 255-byte name limit) is FORMERR."""
    labels = b"".join(b"\x3f" + b"a" * 63 for _ in range(5))  # 320 bytes of labels
    outcome = ask(header() + labels + b"\x00" + struct.pack("!HH", 1, 1))
    assert (outcome.rcode, outcome.reason) == ("FORMERR", "malformed")
    assert outcome.domain is None


def test_label_type_bits_formerr() -> None:
    """A length byte with reserved type bits (0x40) is FORMERR."""
    outcome = ask(header() + b"\x41" + b"a" * 65 + b"\x00" + struct.pack("!HH", 1, 1))
    assert (outcome.rcode, outcome.reason) == ("FORMERR", "malformed")


def test_truncated_question_formerr() -> None:
    """A question cut off before its type and class is FORMERR."""
    outcome = ask(header() + A_QUESTION[:-3])
    assert (outcome.rcode, outcome.reason) == ("FORMERR", "malformed")


def test_trailing_junk_formerr() -> None:
    """Bytes after the last record are FORMERR."""
    outcome = ask(header() + A_QUESTION + b"junk")
    assert (outcome.rcode, outcome.reason) == ("FORMERR", "malformed")


def test_answer_records_in_query_formerr() -> None:
    """A query carrying answer records is FORMERR."""
    outcome = ask(header(counts=(1, 1, 0, 0)) + A_QUESTION)
    assert (outcome.rcode, outcome.reason) == ("FORMERR", "malformed")


def test_update_opcode_notimp() -> None:
    """An UPDATE (opcode 5) gets NOTIMP with the opcode echoed."""
    outcome = ask(header(flags=0x2800) + A_QUESTION)
    assert (outcome.rcode, outcome.reason) == ("NOTIMP", "opcode")
    assert outcome.reply == struct.pack("!HHHHHH", 0x1234, 0xA884, 0, 0, 0, 0)


def test_tsig_signed_query_formerr() -> None:
    """A TSIG-signed query (we hold no keys) is FORMERR."""
    message = dns.message.make_query("api.example.test", "A")
    keyring = dns.tsigkeyring.from_text({"k.": "MTIzNDU2Nzg5MDEyMzQ1Ng=="})
    message.use_tsig(keyring, keyname="k.")
    outcome = ask(message.to_wire())
    assert (outcome.rcode, outcome.reason) == ("FORMERR", "malformed")


GOOD_QUERY = query("api.example.test", use_edns=0)


@st.composite
def mutated_query(draw: st.DrawFn) -> bytes:
    """A good query with a few bytes changed, then truncated somewhere."""
    data = bytearray(GOOD_QUERY)
    for _ in range(draw(st.integers(1, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))])


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64) | mutated_query())
def test_hostile_packets_get_an_outcome_and_a_well_formed_reply(wire: bytes) -> None:
    """Any packet gives an outcome, never an error; a reply, if any, is a DNS response."""
    outcome = answer_query(wire, POLICY, SyntheticPool(max_names=8))
    assert outcome.reason != "internal_error"
    if outcome.reply is not None:
        assert dns.message.from_wire(outcome.reply).flags & dns.flags.QR


# --- sanitize_name ---------------------------------------------------------------------------


def test_sanitize_strips_control_and_invisible_characters() -> None:
    """Control, escape and bidi-override characters are dropped."""
    assert sanitize_name("ev\x1b[31mil\x00.exa\u202emple\n") == "ev[31mil.example"


def test_sanitize_bounds_length() -> None:
    """Names over 253 characters are cut to 253 plus an ellipsis."""
    assert sanitize_name("a" * 253) == "a" * 253
    assert sanitize_name("a" * 254) == "a" * 253 + "\u2026"
    assert sanitize_name("a" * 1_000_000) == "a" * 253 + "\u2026"


def test_sanitize_huge_control_input_is_cheap_and_marked() -> None:
    """A megabyte of control characters gives just the truncation mark."""
    assert sanitize_name("\x00" * 1_000_000 + "tail") == "\u2026"
