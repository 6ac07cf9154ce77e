"""The jail's interface requests as rtnetlink batches: each request's ack is checked, and a
refused one names its step."""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterator

import pytest

from netjail.errors import NetnsError
from netjail.kernel import netns

HEADER = struct.Struct("=IHHII")


def _ack(seq: int, error: int = 0) -> bytes:
    """An NLMSG_ERROR answer to request ``seq`` (0: an ack)."""
    body = struct.pack("=i", -error) + HEADER.pack(HEADER.size, 16, 0, seq, 0)
    return HEADER.pack(HEADER.size + len(body), 2, 0, seq, 0) + body


def _batch(*seqs: int) -> netns._Batch:
    return netns._Batch(b"requests", tuple((seq, f"step {seq}") for seq in seqs))


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    yield ours, kernel
    ours.close()
    kernel.close()


def test_every_request_acked_is_done(pair: tuple[socket.socket, socket.socket]) -> None:
    """Acks for every request, in one answer or several, complete the batch."""
    ours, kernel = pair
    kernel.send(_ack(7) + _ack(8))
    kernel.send(_ack(9))
    netns._send_batch(ours, _batch(7, 8, 9))
    assert kernel.recv(100) == b"requests"


def test_a_refused_request_names_its_step(pair: tuple[socket.socket, socket.socket]) -> None:
    """An error answer raises NetnsError with the step and the kernel's reason."""
    ours, kernel = pair
    kernel.send(_ack(7) + _ack(8, errno.EEXIST))
    with pytest.raises(NetnsError, match="step 8: File exists"):
        netns._send_batch(ours, _batch(7, 8))


def test_answers_to_other_requests_are_not_acks(pair: tuple[socket.socket, socket.socket]) -> None:
    """An answer with another sequence number does not complete a request: it waits on."""
    ours, kernel = pair
    ours.settimeout(0.2)
    kernel.send(_ack(99))
    with pytest.raises(TimeoutError):
        netns._send_batch(ours, _batch(7))


def test_a_malformed_answer_is_an_error(pair: tuple[socket.socket, socket.socket]) -> None:
    """A header whose length is shorter than a header is refused, not looped on."""
    ours, kernel = pair
    kernel.send(HEADER.pack(4, 2, 0, 7, 0) + b"\0" * 4)
    with pytest.raises(NetnsError, match="malformed"):
        netns._send_batch(ours, _batch(7))


def test_the_requests_are_encoded_one_per_step() -> None:
    """pyroute2 encodes one request per named step, each with its own sequence number."""
    batches = [netns._link_requests(kind) for kind in ("ifb", "veth")]
    batches += [netns._address_requests(3, None), netns._address_requests(3, 2)]
    for batch in batches:
        seqs = [seq for seq, _step in batch.steps]
        assert len(set(seqs)) == len(seqs) > 1
        assert sum(1 for _ in _headers(batch.data)) == len(seqs)


def test_every_ack_is_read_and_the_first_refusal_is_kept(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """After a refused request the later acks are still read (none is left for the next
    batch), and the first refused step comes back with its errno."""
    ours, kernel = pair
    kernel.send(_ack(7) + _ack(8, errno.EOPNOTSUPP) + _ack(9, errno.ENODEV))
    assert netns._refusal_of(ours, _batch(7, 8, 9)) == ("step 8", errno.EOPNOTSUPP)
    ours.setblocking(False)
    with pytest.raises(BlockingIOError):
        ours.recv(100)


def test_the_link_is_an_ifb_and_names_its_step() -> None:
    """New jails get an ifb link until the kernel refuses one; each kind names its step."""
    assert netns.jail_link_kind() == "ifb"
    assert netns._link_requests("ifb").steps[1][1] == "ifb nj0"
    assert netns._link_requests("veth").steps[1][1] == "veth nj0/nj1"


def test_a_refused_ifb_makes_every_later_jail_use_veth(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fall-back happens once and sticks; a second refusal of ifb changes nothing more."""
    monkeypatch.setattr(netns, "_link_kinds", ["ifb", "veth"])
    assert netns._fall_back_to_veth("ifb") == "veth"
    assert netns.jail_link_kind() == "veth"
    assert netns._fall_back_to_veth("ifb") == "veth"
    assert netns._fall_back_to_veth("veth") == "veth"
    assert netns.jail_link_kind() == "veth"


def _headers(data: bytes) -> list[tuple[int, ...]]:
    out = []
    offset = 0
    while offset < len(data):
        header = HEADER.unpack_from(data, offset)
        out.append(header)
        offset += (header[0] + 3) & ~3
    return out
