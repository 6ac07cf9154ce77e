"""The report never loses allowed traffic, and its figures add up after a burst."""

from __future__ import annotations

from netjail import Client

BURST = 10_000

# Distinct destinations, so that nothing folds: 40 documentation addresses x 250 ports.
BURST_SCRIPT = f"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sent = 0
for i in range({BURST}):
    try:
        s.sendto(b"x", ("198.51.100." + str(1 + i % 40), 20000 + i // 40))
    except OSError:
        pass
    sent += 1
print(sent)
"""


def test_a_burst_of_attempts_adds_up_to_what_was_sent(client: Client) -> None:
    """After 10,000 attempts: kept events' counts + lost_events == 10,000; nothing vanishes."""
    result = client.run(
        ["/usr/bin/python3", "-I", "-S", "-c", BURST_SCRIPT], stdio="capture", cwd="/"
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"{BURST}\n".encode()
    kept = sum(event.count for event in result.report.events if event.proto == "udp")
    assert kept + result.report.lost_events == BURST
    not_kept = result.report.events_not_kept.get("egress", 0)
    assert not_kept <= result.report.lost_events
