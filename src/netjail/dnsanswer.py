"""What a job's DNS stub answers: synthetic addresses for allowed names, nothing for the rest.

Pure: bytes in, bytes out; the stub (kernel side) only moves datagrams and TCP frames.

An allowed name gets an A record holding a *synthetic* address from a per-job pool in
198.18.0.0/15 (RFC 2544 benchmarking space: never a real destination). The jail's firewall
sends connections to that range to the job's proxy, which maps the address back to the name
(:meth:`SyntheticPool.name_for`) and connects to the real host itself. So the job never learns
a real address, and a rule allows a *name*, not whatever else shares its IP.

Answers, by case:

- Allowed name (:meth:`Policy.name_verdict`), type A: the synthetic address, TTL 5 s (short,
  so that a client holds nothing stale past the job; the mapping itself is stable per job).
- Allowed name, AAAA: NODATA (NOERROR, empty answer). Chosen over synthetic IPv6 because
  clients then fall back to A on their own (getaddrinfo, happy eyeballs), the firewall needs
  one synthetic family only, and there is no second pool to keep in step. Cost: an IPv6-only
  client cannot reach allowed names.
- Allowed name, any other type (TXT, MX, HTTPS…): NODATA. Meta types (ANY, AXFR, IXFR, OPT…)
  are REFUSED.
- Any other name: NXDOMAIN (or REFUSED, per ``blocked_rcode``), and no query ever leaves the
  jail. This is what defeats DNS tunnelling: data encoded in long TXT queries under a denied
  zone gets NXDOMAIN and reaches nobody.

Every packet is hostile. :func:`answer_query` never raises; it answers FORMERR (bad packet,
not exactly one question), NOTIMP (opcode other than QUERY), REFUSED (class other than IN,
meta types), BADVERS (EDNS version above 0), SERVFAIL (pool full), or nothing at all when
there is no header to answer or the packet is itself a response (answering those invites
loops). Negative answers carry no SOA: the job's resolver is a stub that caches nothing.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Final, Literal

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from netjail.errors import PoolExhaustedError
from netjail.policy import MAX_NAME_LENGTH, Policy, canonical_name

#: Where synthetic addresses come from (RFC 2544; routed nowhere).
SYNTHETIC_NETWORK: Final = ipaddress.IPv4Network("198.18.0.0/15")
#: Most distinct names one job may resolve.
DEFAULT_MAX_NAMES: Final = 4096
#: TTL of synthetic A records, in seconds.
ANSWER_TTL: Final = 5
#: Largest UDP payload we advertise in EDNS replies (the DNS Flag Day 2020 value).
EDNS_PAYLOAD: Final = 1232

Verdict = Literal["allowed", "blocked"]
BlockedRcode = Literal["NXDOMAIN", "REFUSED"]

_HEADER = struct.Struct("!HHHHHH")
_QR: Final = 0x8000
_OPCODE_MASK: Final = 0x7800
_RD: Final = 0x0100
_RA: Final = 0x0080
_MAX_MESSAGE: Final = 65535
_ELLIPSIS: Final = "\u2026"
# Bytes a label may hold to be treated as a host name; anything else is blocked unread.
_LABEL_BYTES: Final = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


class SyntheticPool:
    """One job's stable name ↔ synthetic IPv4 address map, bounded in size.

    Addresses are handed out in order from the network's first host address, skipping the
    network and broadcast addresses. Names must be canonical (see ``policy.canonical_name``),
    so that spellings of one name share one address.
    """

    __slots__ = ("_by_address", "_by_name", "max_names", "network")

    def __init__(
        self,
        max_names: int = DEFAULT_MAX_NAMES,
        network: ipaddress.IPv4Network = SYNTHETIC_NETWORK,
    ) -> None:
        if not 1 <= max_names <= network.num_addresses - 2:
            raise ValueError(
                f"max_names must be 1..{network.num_addresses - 2} for {network}, not {max_names}"
            )
        self.network = network
        self.max_names = max_names
        self._by_name: dict[str, ipaddress.IPv4Address] = {}
        self._by_address: dict[ipaddress.IPv4Address, str] = {}

    def __len__(self) -> int:
        return len(self._by_name)

    def address_for(self, name: str) -> ipaddress.IPv4Address:
        """The name's address, allocated on first use; raises PoolExhaustedError when full."""
        address = self._by_name.get(name)
        if address is not None:
            return address
        if not name or len(name) > MAX_NAME_LENGTH:
            raise ValueError("a synthetic address is only given to a canonical host name")
        if len(self._by_name) >= self.max_names:
            raise PoolExhaustedError(
                f"the job resolved more than {self.max_names} distinct names;"
                " its synthetic address pool is full"
            )
        address = self.network.network_address + 1 + len(self._by_name)
        self._by_name[name] = address
        self._by_address[address] = name
        return address

    def name_for(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
        """The name given ``address``, or None (also for IPv4-mapped IPv6 of one)."""
        if isinstance(address, ipaddress.IPv6Address):
            mapped = address.ipv4_mapped
            if mapped is None:
                return None
            address = mapped
        return self._by_address.get(address)


@dataclass(frozen=True, slots=True)
class DnsOutcome:
    """What the stub sends back and what it reports about one query.

    ``reason`` is a fixed token, never job text: ``None`` (A answered), ``"nodata"``,
    ``"not_allowed"``, ``"invalid_name"``, ``"meta_query"``, ``"pool_exhausted"``,
    ``"malformed"``, ``"short_header"``, ``"not_a_query"``, ``"opcode"``,
    ``"question_count"``, ``"class"``, ``"edns_version"`` or ``"internal_error"``.
    """

    #: The reply to send; None when the packet cannot or must not be answered.
    reply: bytes | None
    #: The queried name, canonical when valid, else sanitised and bounded; for events only.
    domain: str | None
    #: "A", "AAAA", "TXT"… or the type number for types without a mnemonic.
    qtype: str | None
    verdict: Verdict
    reason: str | None
    #: The reply's rcode ("NOERROR", "NXDOMAIN"…), None when there is no reply.
    rcode: str | None
    #: The synthetic address answered, if any.
    address: ipaddress.IPv4Address | None = None


def answer_query(
    wire: bytes,
    policy: Policy,
    pool: SyntheticPool,
    *,
    blocked_rcode: BlockedRcode = "NXDOMAIN",
) -> DnsOutcome:
    """Answer one DNS query message (no TCP length prefix). Never raises on the packet."""
    if blocked_rcode not in ("NXDOMAIN", "REFUSED"):
        raise ValueError(f"blocked_rcode must be NXDOMAIN or REFUSED, not {blocked_rcode!r}")
    try:
        return _answer(bytes(wire), policy, pool, dns.rcode.from_text(blocked_rcode))
    except Exception:
        # Only a bug gets here. Answer SERVFAIL (no address leaves) rather than let one
        # packet take down the stub.
        return _header_outcome(bytes(wire[:12]), dns.rcode.SERVFAIL, "internal_error")


def sanitize_name(text: str) -> str:
    """``text`` without control or non-printable characters, at most 253 of them (+ "…")."""
    kept: list[str] = []
    # Look at a bounded prefix only: a megabyte of control characters costs nothing.
    for char in text[: 4 * MAX_NAME_LENGTH]:
        if char.isprintable():
            kept.append(char)
            if len(kept) > MAX_NAME_LENGTH:
                break
    if len(kept) > MAX_NAME_LENGTH or len(text) > 4 * MAX_NAME_LENGTH:
        return "".join(kept[:MAX_NAME_LENGTH]) + _ELLIPSIS
    return "".join(kept)


def _answer(  # noqa: PLR0911 - one return per answer case, in the module docstring's order
    wire: bytes, policy: Policy, pool: SyntheticPool, blocked: dns.rcode.Rcode
) -> DnsOutcome:
    refused = _check_header(wire)
    if refused is not None:
        return refused
    try:
        query = dns.message.from_wire(wire)
    except (dns.exception.DNSException, ValueError, struct.error):
        # dnspython raises these for short packets, compression loops and forward pointers,
        # bad label types, names over 255 bytes, trailing junk, bad EDNS and signed messages
        # (no keyring: we take no TSIG).
        return _header_outcome(wire, dns.rcode.FORMERR, "malformed")
    question = query.question[0]
    qname: dns.name.Name = question.name
    domain, canonical = _domain_of(qname)
    reply = _Replier(query, domain, _qtype_text(question.rdtype))
    if query.edns > 0:
        return reply(dns.rcode.BADVERS, "blocked", "edns_version")
    if question.rdclass != dns.rdataclass.IN:
        return reply(dns.rcode.REFUSED, "blocked", "class")
    if canonical is None:
        return reply(blocked, "blocked", "invalid_name")
    if not policy.name_verdict(canonical):
        return reply(blocked, "blocked", "not_allowed")
    if dns.rdatatype.is_metatype(question.rdtype):
        return reply(dns.rcode.REFUSED, "blocked", "meta_query")
    if question.rdtype != dns.rdatatype.A:
        return reply(dns.rcode.NOERROR, "allowed", "nodata")
    try:
        address = pool.address_for(canonical)
    except PoolExhaustedError:
        return reply(dns.rcode.SERVFAIL, "blocked", "pool_exhausted")
    return reply(dns.rcode.NOERROR, "allowed", None, address=address)


def _check_header(wire: bytes) -> DnsOutcome | None:
    """The outcome for a packet refused on its header alone, or None to parse it."""
    if len(wire) < _HEADER.size or len(wire) > _MAX_MESSAGE:
        return _silent("short_header")
    _, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(wire)
    if flags & _QR:
        return _silent("not_a_query")
    if flags & _OPCODE_MASK:
        return _header_outcome(wire, dns.rcode.NOTIMP, "opcode")
    # Exactly one question (RFC 9619), and nothing a query has no use for: a stub never sends
    # answer or authority records, and one additional record is room for EDNS's OPT.
    if qdcount != 1:
        return _header_outcome(wire, dns.rcode.FORMERR, "question_count")
    if ancount or nscount or arcount > 1:
        return _header_outcome(wire, dns.rcode.FORMERR, "malformed")
    return None


@dataclass(frozen=True, slots=True)
class _Replier:
    """Builds full replies to one parsed query, echoing its question (and its case, for
    clients that randomise case as a spoofing defence)."""

    query: dns.message.Message
    domain: str
    qtype: str

    def __call__(
        self,
        rcode: dns.rcode.Rcode,
        verdict: Verdict,
        reason: str | None,
        *,
        address: ipaddress.IPv4Address | None = None,
    ) -> DnsOutcome:
        response = dns.message.make_response(
            self.query, recursion_available=True, our_payload=EDNS_PAYLOAD
        )
        response.set_rcode(rcode)
        if address is not None:
            qname = self.query.question[0].name
            response.answer.append(dns.rrset.from_text(qname, ANSWER_TTL, "IN", "A", str(address)))
        return DnsOutcome(
            reply=response.to_wire(),
            domain=self.domain,
            qtype=self.qtype,
            verdict=verdict,
            reason=reason,
            rcode=dns.rcode.to_text(rcode),
            address=address,
        )


def _header_outcome(wire: bytes, rcode: dns.rcode.Rcode, reason: str) -> DnsOutcome:
    """A header-only reply, built by hand: the packet may be too broken for dnspython."""
    if len(wire) < 4:
        return _silent(reason)
    ident, flags = struct.unpack_from("!HH", wire)
    reply_flags = _QR | (flags & (_OPCODE_MASK | _RD)) | _RA | rcode
    return DnsOutcome(
        reply=_HEADER.pack(ident, reply_flags, 0, 0, 0, 0),
        domain=None,
        qtype=None,
        verdict="blocked",
        reason=reason,
        rcode=dns.rcode.to_text(rcode),
    )


def _silent(reason: str) -> DnsOutcome:
    return DnsOutcome(
        reply=None, domain=None, qtype=None, verdict="blocked", reason=reason, rcode=None
    )


def _domain_of(qname: dns.name.Name) -> tuple[str, str | None]:
    """(name for events, canonical name or None when it is not a valid host name)."""
    labels = qname.labels[:-1] if qname.is_absolute() else qname.labels
    # Check the raw bytes first: a label holding "." or NUL must not be re-read as two
    # labels or as text.
    if labels and all(label and _LABEL_BYTES.issuperset(label) for label in labels):
        canonical = canonical_name(b".".join(labels).decode("ascii"))
        if canonical is not None:
            return canonical, canonical
    return sanitize_name(qname.to_text(omit_final_dot=True)), None


def _qtype_text(rdtype: dns.rdatatype.RdataType) -> str:
    text = dns.rdatatype.to_text(rdtype)
    # dnspython spells types it has no mnemonic for "TYPE65280"; events carry the number.
    return str(int(rdtype)) if text.startswith("TYPE") else text
