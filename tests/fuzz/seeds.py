"""A few valid inputs per fuzz target, written into an empty corpus so that libFuzzer starts
from the formats' real shapes rather than from nothing."""

from __future__ import annotations

import struct

import dns.message

from netjail import protocol


def _nflog_message() -> bytes:
    def attribute(kind: int, value: bytes) -> bytes:
        length = 4 + len(value)
        return struct.pack("=HH", length, kind) + value + b"\0" * (-length % 4)

    ipv4 = bytes.fromhex("450000280000400040060000a9fe4d01cb007109") + struct.pack(
        ">HH", 40000, 443
    )
    body = struct.pack("=BBH", 2, 0, 0) + attribute(10, b"netjail j-0123abcd \0")
    body += attribute(11, struct.pack(">I", 1000)) + attribute(9, ipv4)
    return struct.pack("=IHHII", 16 + len(body), 0x0400, 0, 0, 0) + body


SEEDS: dict[str, list[bytes]] = {
    "frames": [
        protocol.encode_message(protocol.Hello(version=1))
        + protocol.encode_message(protocol.RunRequest(argv=["true"], allow=["pypi.org"])),
        protocol.encode_message(protocol.EventsRequest(job="j-0123abcd", follow=True)),
    ],
    "replies": [
        protocol.encode_message(protocol.HelloReply(version=1, daemon="0"))[:-1],
        protocol.encode_message(protocol.Killed(job="j-0123abcd"))[:-1],
    ],
    "dns": [
        dns.message.make_query("api.example.test", "A").to_wire(),
        dns.message.make_query("x.pkg.example.test", "AAAA", use_edns=0).to_wire(),
    ],
    "nflog": [_nflog_message()],
    "kmsg": [
        b"4,2119,1537392374,-;netjail j-0123abcd IN= OUT=nj0 SRC=169.254.77.1 DST=203.0.113.9 "
        b"LEN=60 TOS=0x00 PREC=0x00 TTL=64 ID=1 DF PROTO=TCP SPT=40000 DPT=443 WINDOW=64240 "
        b"RES=0x00 SYN URGP=0 UID=1000 GID=1000 \n SUBSYSTEM=net\n",
    ],
    "policy": [
        b"*.pkg.example.test:443\x00api.example.test",
        b"[2001:db8::/32]:443",
        b"tcp://db:5432",
    ],
    "config": [
        b'socket = "/run/netjail/netjail.sock"\n[limits]\nmax_memory = "1G"\nkill_grace = "2s"\n'
        b'[policy]\ndefault_allow = ["pypi.org"]\n[hosts]\n"db.example.test" = "192.0.2.7"\n',
    ],
    "sniff": [
        b"GET / HTTP/1.1\r\nHost: api.example.test\r\n\r\n",
        bytes.fromhex(
            "16030100310100002d0303" + "00" * 32 + "0000020013010100000200000016001400001161"
            "70692e6578616d706c652e74657374"
        ),
    ],
}
