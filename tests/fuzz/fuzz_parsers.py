"""Coverage-guided fuzzing (atheris, libFuzzer) of every parser of hostile input; not run by CI.

One process per target: ``python tests/fuzz/fuzz_parsers.py TARGET [libFuzzer options]``, e.g.
``-max_total_time=60``. ``run_fuzz.py`` runs each target for N seconds in turn. A target fails
(libFuzzer writes the input as crash-<sha1> and exits non-zero) when a parser raises anything
but its own error, or breaks a property the hypothesis tests state (tests/unit/*_properties.py).
"""

from __future__ import annotations

import contextlib
import sys
import tomllib
from collections.abc import Callable

import atheris

with atheris.instrument_imports():
    from netjail import protocol
    from netjail.daemon.config import find_problems, parse_config
    from netjail.dnsanswer import SyntheticPool, answer_query
    from netjail.errors import ConfigError, ProtocolError, RequestError
    from netjail.kernel import kmsg, nflog
    from netjail.policy import Policy, parse_rule
    from netjail.sniff import parse_http_host, parse_tls_sni

POLICY = Policy.parse(["api.example.test", "*.pkg.example.test:443", "192.0.2.0/24:443"])


def fuzz_frames(data: bytes) -> None:
    """Frames cut out of a byte stream, each decoded strictly; only ProtocolError."""
    buffer = protocol.FrameBuffer(max_frame=4096)
    middle = len(data) // 2
    try:
        frames = buffer.feed(data[:middle]) + buffer.feed(data[middle:])
    except ProtocolError:
        return
    for frame in frames:
        try:
            request = protocol.decode_request(frame)
        except ProtocolError:
            continue
        again = protocol.decode_request(protocol.encode_message(request)[:-1])
        if again != request:
            raise AssertionError(f"request does not round-trip: {request!r}")


def fuzz_replies(data: bytes) -> None:
    """A hostile daemon's frame, decoded leniently by a client; only ProtocolError."""
    with contextlib.suppress(ProtocolError):
        protocol.decode_reply(data)


def fuzz_dns(data: bytes) -> None:
    """One query packet; answer_query never raises, and never fails internally."""
    outcome = answer_query(data, POLICY, SyntheticPool(max_names=4))
    if outcome.reason == "internal_error":
        raise AssertionError("answer_query hit its internal-error fallback")


def fuzz_nflog(data: bytes) -> None:
    """A datagram from an NFLOG socket and each packet in it; never raises."""
    batch = nflog.parse_netlink_messages(data)
    for packet in batch.packets:
        nflog.parse_ip_packet(packet.payload)
    nflog.parse_ip_packet(data)


def fuzz_kmsg(data: bytes) -> None:
    """A /dev/kmsg record and a netfilter LOG line; never raises."""
    record = kmsg.parse_kmsg_record(data)
    if record is not None:
        kmsg.parse_logged_packet(record)
    kmsg.parse_log_message(data.decode("utf-8", "replace"))


def fuzz_policy(data: bytes) -> None:
    """Rule text, and names and ports matched against a policy; only RequestError."""
    provider = atheris.FuzzedDataProvider(data)
    text = provider.ConsumeUnicodeNoSurrogates(600)
    try:
        rule = parse_rule(text)
    except RequestError:
        pass
    else:
        if parse_rule(str(rule)) != rule:
            raise AssertionError(f"rule does not round-trip: {text!r}")
    name = provider.ConsumeUnicodeNoSurrogates(300)
    port = provider.ConsumeIntInRange(-1, 70000)
    POLICY.access(name, port)
    POLICY.name_verdict(name)


def fuzz_config(data: bytes) -> None:
    """TOML text read into a configuration; only ConfigError, and find_problems agrees."""
    try:
        document = tomllib.loads(data.decode("utf-8", "replace"))
    except tomllib.TOMLDecodeError:
        return
    problems = find_problems(document)
    try:
        parse_config(document, "fuzz.toml")
    except ConfigError:
        if not problems:
            raise AssertionError("ConfigError although find_problems found nothing") from None
    else:
        if problems:
            raise AssertionError(f"accepted despite {problems[0]!r}")


def fuzz_sniff(data: bytes) -> None:
    """A proxied connection's first bytes, as a TLS ClientHello and as an HTTP request head;
    never raises."""
    parse_tls_sni(data)
    parse_http_host(data)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "frames": fuzz_frames,
    "replies": fuzz_replies,
    "dns": fuzz_dns,
    "nflog": fuzz_nflog,
    "kmsg": fuzz_kmsg,
    "policy": fuzz_policy,
    "config": fuzz_config,
    "sniff": fuzz_sniff,
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer options]")
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
