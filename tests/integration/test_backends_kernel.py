"""The firewall backends (``JailFirewall``) and the LOG/kmsg log backend against the real kernel.

Each test builds a jail the way the daemon does (a thread unshares a netns and configures it:
interfaces, ``JailFirewall.apply``, NFLOG socket) without the daemon (so it needs root), makes
blocked attempts from it as uid 65534, and checks what the kernel logged. Namespaces are named
``njtest-bk-*``, not ``netjail-*``, so a daemon started by another test (which removes every
leftover ``netjail-*`` netns) cannot pull one away mid-test; each is deleted in ``finally`` and
checked gone. The kernel-log tests flip the host-global nf_log_all_netns and always restore it.
Destinations are documentation ranges only, and nothing leaves the jail anyway.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import select
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import pytest

from netjail import hostns
from netjail.kernel import kmsg, netns, nflog
from netjail.kernel.backends import FirewallBackend, LogBackend
from netjail.kernel.firewall import JailFirewall
from netjail.kernel.iptables import render_iptables
from netjail.kernel.kmsg import KmsgReader, LoggedPacket, parse_logged_packet
from netjail.kernel.nflog import PacketSummary
from netjail.kernel.rules import JailRules, ProxiedRange, build_jail_ruleset

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]

NOBODY = 65534
BLOCKED4 = "203.0.113.9"
BLOCKED6 = "2001:db8::9"
RESOLVER4 = "198.51.100.53"  # a foreign resolver: redirected to the (absent) stub, logged
PROXIED4 = "198.51.100.80"  # in a proxied range: redirected to the (absent) proxy, not logged
PY = "/usr/bin/python3"
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]

T = TypeVar("T")


def _job_id() -> str:
    # Unique per test, so lines of other jails in the shared kernel log are never taken.
    return f"t-{secrets.token_hex(4)}"


def _domain_rules(job_id: str) -> JailRules:
    return JailRules(
        job_id,
        dns_stub=True,
        proxied=(ProxiedRange(ipaddress.ip_network("198.51.100.80/32"), frozenset({8080})),),
    )


@contextmanager
def jail(work: Callable[[], T]) -> Iterator[tuple[str, T]]:
    """A new netns with the jail's interfaces, ``work`` run on a thread inside it; deleted after."""
    name = f"njtest-bk-{secrets.token_hex(4)}"

    def build() -> T:
        netns.configure_jail_interfaces()
        return work()

    try:
        result = netns.run_in_new_netns(name, build).result(timeout=30)
        yield name, result
    finally:
        netns.delete_netns(name)
        assert not os.path.exists(netns.netns_path(name))


def in_jail(name: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", name, *argv],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def curl_as_nobody(name: str, url: str) -> subprocess.CompletedProcess[str]:
    return in_jail(name, [*AS_NOBODY, "curl", "-sS", "-m", "5", url])


def udp_as_nobody(name: str, host: str, port: int) -> subprocess.CompletedProcess[str]:
    code = (
        "import socket\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"s.sendto(b'x', ({host!r}, {port}))\n"
    )
    return in_jail(name, [*AS_NOBODY, PY, "-c", code])


@contextmanager
def nf_log_all_netns_enabled() -> Iterator[None]:
    """nf_log_all_netns=1 for the block, then back to whatever it was."""
    with open(kmsg.NF_LOG_ALL_NETNS) as f:
        previous = f.read().strip()
    try:
        kmsg.enable_nf_log_all_netns()
        yield
    finally:
        with open(kmsg.NF_LOG_ALL_NETNS, "w") as f:
            f.write(previous + "\n")
        with open(kmsg.NF_LOG_ALL_NETNS) as f:
            assert f.read().strip() == previous


def _rule_lines(restore_text: str) -> dict[str, list[str]]:
    """The "-A" lines of each table of an iptables-restore/-save text, in order."""
    tables: dict[str, list[str]] = {}
    current = ""
    for line in restore_text.splitlines():
        if line.startswith("*"):
            current = line[1:]
            tables.setdefault(current, [])
        elif line.startswith("-A "):
            tables[current].append(line)
    return {table: rules for table, rules in tables.items() if rules}


def _nflog_packets(sock: socket.socket, want: int, timeout: float = 5.0) -> list[nflog.NflogPacket]:
    """NFLOG packets from ``sock`` until ``want`` have a uid (the job's) or time is up."""
    packets: list[nflog.NflogPacket] = []
    deadline = time.monotonic() + timeout
    while sum(p.uid is not None for p in packets) < want:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([sock], [], [], remaining)[0]:
            break
        packets.extend(nflog.parse_netlink_messages(sock.recv(65536)).packets)
    return packets


def _logged_packets(
    reader: KmsgReader, job_id: str, want: int, timeout: float = 5.0
) -> list[LoggedPacket]:
    """This job's packets from the kernel log until ``want`` arrived or time is up."""
    found: list[LoggedPacket] = []
    deadline = time.monotonic() + timeout
    while len(found) < want:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([reader], [], [], remaining)[0]:
            break
        records, _lost = reader.read_records()
        for record in records:
            packet = parse_logged_packet(record)
            if packet is not None and packet.job_id == job_id:
                found.append(packet)
    return found


# --------------------------------------------------------------------------- iptables


@pytest.mark.parametrize("log_backend", ["nflog", "kmsg"])
def test_iptables_rules_are_what_the_jail_holds(log_backend: LogBackend) -> None:
    """JailFirewall for iptables loads exactly the rendered rules into the jail, not the host."""
    chosen = JailFirewall.for_backends("iptables", log_backend)
    rules = _domain_rules(_job_id())
    expected = render_iptables(build_jail_ruleset(rules), chosen.log)
    with jail(lambda: chosen.apply(rules)) as (name, _):
        saved4 = in_jail(name, ["iptables-save"])
        saved6 = in_jail(name, ["ip6tables-save"])
        host4 = subprocess.run(["iptables-save"], capture_output=True, text=True, check=False)
    assert saved4.returncode == saved6.returncode == 0, saved4.stderr + saved6.stderr
    assert _rule_lines(saved4.stdout) == _rule_lines(expected.v4)
    assert _rule_lines(saved6.stdout) == _rule_lines(expected.v6)
    assert ":OUTPUT DROP [" in saved4.stdout
    assert ":OUTPUT DROP [" in saved6.stdout
    assert "netjail t-" not in host4.stdout  # nothing landed in the host's netns


@pytest.mark.parametrize("firewall", ["nftables", "iptables"])
def test_nflog_reports_blocked_connects_with_uid(firewall: FirewallBackend) -> None:
    """Either firewall rejects at once and logs to NFLOG with prefix and uid; proxied TCP is not."""
    job_id = _job_id()
    chosen = JailFirewall.for_backends(firewall, "nflog")
    group = chosen.nflog
    assert group is not None

    def build() -> socket.socket:
        chosen.apply(_domain_rules(job_id))
        return nflog.open_nflog_socket(group.group, group.snaplen)

    with jail(build) as (name, sock):
        try:
            refused4 = curl_as_nobody(name, f"http://{BLOCKED4}/")
            refused6 = curl_as_nobody(name, f"http://[{BLOCKED6}]:8443/")
            proxied = curl_as_nobody(name, f"http://{PROXIED4}:8080/")
            dns = udp_as_nobody(name, RESOLVER4, 53)
            packets = _nflog_packets(sock, want=3)
        finally:
            sock.close()
    assert refused4.returncode == 7, refused4.stderr
    assert refused6.returncode == 7, refused6.stderr
    assert proxied.returncode == 7, proxied.stderr  # nothing listens on the proxy port here
    assert dns.returncode == 0, dns.stderr
    seen = {
        (p.prefix, p.uid, nflog.parse_ip_packet(p.payload)) for p in packets if p.uid is not None
    }
    assert seen == {
        (f"netjail {job_id} ", NOBODY, PacketSummary(4, "tcp", BLOCKED4, 80)),
        (f"netjail {job_id} ", NOBODY, PacketSummary(6, "tcp", BLOCKED6, 8443)),
        (f"netjail {job_id} dns ", NOBODY, PacketSummary(4, "udp", RESOLVER4, 53)),
    }


# --------------------------------------------------------------------------- kmsg


@pytest.mark.parametrize("firewall", ["nftables", "iptables"])
def test_kmsg_backend_reports_blocked_connects_with_uid(firewall: FirewallBackend) -> None:
    """Either firewall's LOG rules put each blocked attempt in the kernel log, prefix and uid."""
    job_id = _job_id()
    chosen = JailFirewall.for_backends(firewall, "kmsg")
    with (
        KmsgReader() as reader,
        nf_log_all_netns_enabled(),
        jail(lambda: chosen.apply(_domain_rules(job_id))) as (name, _),
    ):
        refused4 = curl_as_nobody(name, f"http://{BLOCKED4}/")
        refused6 = curl_as_nobody(name, f"http://[{BLOCKED6}]:8443/")
        proxied = curl_as_nobody(name, f"http://{PROXIED4}:8080/")
        dns = udp_as_nobody(name, RESOLVER4, 53)
        packets = _logged_packets(reader, job_id, want=3)
        packets += _logged_packets(reader, job_id, want=1, timeout=0.2)  # nothing more
    assert (refused4.returncode, refused6.returncode, proxied.returncode) == (7, 7, 7)
    assert dns.returncode == 0, dns.stderr
    assert len(packets) == 3, packets  # one line per attempt, none for the proxied connect
    assert {(p.prefix, p.uid, p.gid, p.summary) for p in packets} == {
        (f"netjail {job_id} ", NOBODY, NOBODY, PacketSummary(4, "tcp", BLOCKED4, 80)),
        (f"netjail {job_id} ", NOBODY, NOBODY, PacketSummary(6, "tcp", BLOCKED6, 8443)),
        (f"netjail {job_id} dns ", NOBODY, NOBODY, PacketSummary(4, "udp", RESOLVER4, 53)),
    }


def test_kmsg_backend_is_silent_without_nf_log_all_netns() -> None:
    """LOG in a jail prints nothing with nf_log_all_netns=0, and one line per attempt with 1."""
    with open(kmsg.NF_LOG_ALL_NETNS) as f:
        if f.read().strip() != "0":
            pytest.skip("nf_log_all_netns is already 1 on this host")
    job_id = _job_id()
    chosen = JailFirewall.for_backends("nftables", "kmsg")
    with KmsgReader() as reader, jail(lambda: chosen.apply(JailRules(job_id))) as (name, _):
        silent = curl_as_nobody(name, f"http://{BLOCKED4}/")
        unlogged = _logged_packets(reader, job_id, want=1, timeout=0.5)
        # The same rules in the same jail, now printed: so the silence was the sysctl's doing,
        # not a LOG rule that never fired or a parser that reads nothing.
        with nf_log_all_netns_enabled():
            heard = curl_as_nobody(name, f"http://{BLOCKED4}/")
            logged = _logged_packets(reader, job_id, want=1)
            logged += _logged_packets(reader, job_id, want=1, timeout=0.2)  # nothing more
    assert (silent.returncode, heard.returncode) == (7, 7), silent.stderr + heard.stderr
    assert unlogged == []
    assert [(p.prefix, p.uid, p.gid, p.summary) for p in logged] == [
        (f"netjail {job_id} ", NOBODY, NOBODY, PacketSummary(4, "tcp", BLOCKED4, 80))
    ]


def test_sysctl_state_is_reported_from_the_initial_netns() -> None:
    """The test host is the initial netns, which has the sysctl; a new netns does not have it."""
    assert hostns.in_initial_netns() is True

    def look() -> bool:
        return os.path.exists(kmsg.NF_LOG_ALL_NETNS)

    with jail(look) as (_name, visible_inside):
        assert visible_inside is False
