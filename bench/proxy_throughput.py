"""Proxy cost: bulk throughput and connection set-up, through the jail's proxy vs direct.

Run as root: ``.venv/bin/python bench/proxy_throughput.py [--mib 1024] [--connects 100]
[--rounds 5]``.

An HTTP-ish upstream server runs on this host's loopback. The same client script (system
Python, sockets only) runs in alternating rounds: directly on the host, and as a netjail job
allowed to reach ``bulk.test`` (``--add-host bulk.test:127.0.0.1``), so every byte goes job →
in-jail listener → proxy → upstream. Each round downloads and uploads --mib MiB and makes
--connects connect+GET round trips. Prints the median MiB/s each way and connect+request
latency p50/p95 of each, the ratios of the median throughputs (target ≥ 0.5) and the added
latency (target < 1 ms p50).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import threading
from typing import Any

from _common import percentile, private_daemon
from netjail import Client

PY = "/usr/bin/python3"
NAME = "bulk.test"

# Resolves the name `connects` times, connects `connects` times to the address (GET 1 byte:
# connect + request + response), then downloads `size` bytes once and uploads `size` once.
CLIENT = r"""
import json, socket, sys, time
host, port, size, connects = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

lookups = []
for _ in range(connects):
    t = time.perf_counter()
    address = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    lookups.append(time.perf_counter() - t)

def get(n):
    s = socket.create_connection((address, port), timeout=30)
    s.sendall(b"GET /%d HTTP/1.1\r\nHost: %s\r\n\r\n" % (n, host.encode()))
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(4096)
    got = len(head.split(b"\r\n\r\n", 1)[1])
    buf = bytearray(1 << 20)
    while got < n:
        k = s.recv_into(buf)
        if not k:
            raise SystemExit("short read")
        got += k
    s.close()

def put(n):
    s = socket.create_connection((address, port), timeout=30)
    s.sendall(b"PUT /%d HTTP/1.1\r\nHost: %s\r\n\r\n" % (n, host.encode()))
    chunk = b"y" * (1 << 20)
    while n > 0:
        n -= s.send(chunk[: min(n, len(chunk))])
    if not s.recv(4096).startswith(b"HTTP/1.1 200"):
        raise SystemExit("upload not acknowledged")
    s.close()

latencies = []
for _ in range(connects):
    t = time.perf_counter(); get(1); latencies.append(time.perf_counter() - t)
t = time.perf_counter(); get(size); elapsed = time.perf_counter() - t
t = time.perf_counter(); put(size); upload = time.perf_counter() - t
result = {"latencies": latencies, "seconds": elapsed, "upload": upload, "lookups": lookups}
print(json.dumps(result))
"""


def serve(listener: socket.socket) -> None:
    chunk = b"x" * (1 << 20)
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=answer, args=(conn, chunk), daemon=True).start()


def answer(conn: socket.socket, chunk: bytes) -> None:
    with conn:
        head = b""
        while b"\r\n\r\n" not in head:
            data = conn.recv(4096)
            if not data:
                return
            head += data
        method, target, _ = head.split(b" ", 2)
        size = int(target.lstrip(b"/"))
        if method == b"PUT":
            # Count the body (after the head) until `size` bytes arrived, then acknowledge.
            size -= len(head.split(b"\r\n\r\n", 1)[1])
            buf = bytearray(1 << 20)
            while size > 0:
                got = conn.recv_into(buf)
                if not got:
                    return
                size -= got
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            return
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        while size > 0:
            size -= conn.send(chunk[: min(size, len(chunk))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="bulk transfer size per round")
    parser.add_argument("--connects", type=int, default=100, help="connect+GET per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    size = args.mib << 20

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    threading.Thread(target=serve, args=(listener,), daemon=True).start()
    client_args = [str(port), str(size), str(args.connects)]

    direct: list[dict[str, Any]] = []
    proxied: list[dict[str, Any]] = []
    with private_daemon() as sock:
        # Alternate the two, so that drift in the machine's speed touches both alike.
        for _ in range(args.rounds):
            direct.append(
                json.loads(
                    subprocess.run(
                        [PY, "-c", CLIENT, "127.0.0.1", *client_args],
                        capture_output=True,
                        check=True,
                    ).stdout
                )
            )
            result = Client(sock).run(
                [PY, "-c", CLIENT, NAME, *client_args],
                allow=[f"{NAME}:{port}"],
                add_hosts=[f"{NAME}:127.0.0.1"],
                stdio="capture",
                capture_bytes=1 << 22,
                cwd="/",
            )
            if result.exit_code != 0:
                raise SystemExit(f"job failed: {result.stderr!r}")
            assert result.stdout is not None
            proxied.append(json.loads(result.stdout))
    listener.close()

    print(
        f"\n{args.rounds} rounds, alternating; each: {args.mib} MiB down, {args.mib} MiB up and"
        f" {args.connects} connect+GET round trips"
    )
    header = ("down MiB/s", "(min-max)", "up MiB/s", "(min-max)", "conn p50 ms", "conn p95 ms")
    print(f"{'':24}" + "".join(f"{h:>12}" for h in header))
    for name, runs in (("direct (host loopback)", direct), ("through the proxy", proxied)):
        cells = []
        for key in ("seconds", "upload"):
            rates = [args.mib / run[key] for run in runs]
            cells += [f"{statistics.median(rates):.0f}", f"{min(rates):.0f}-{max(rates):.0f}"]
        lat = [x for run in runs for x in run["latencies"]]
        cells += [f"{statistics.median(lat) * 1e3:.3f}", f"{percentile(lat, 0.95) * 1e3:.3f}"]
        print(f"{name:24}" + "".join(f"{c:>12}" for c in cells))
    print()
    for key, direction in (("seconds", "download"), ("upload", "upload")):
        ratios = [d[key] / p[key] for d, p in zip(direct, proxied, strict=True)]
        ratio = statistics.median(d[key] for d in direct) / statistics.median(
            p[key] for p in proxied
        )
        print(
            f"{direction} throughput ratio proxy/direct, medians: {ratio:.2f} (target >= 0.50);"
            f" per round {min(ratios):.2f}-{max(ratios):.2f}"
        )
    added = statistics.median(x for p in proxied for x in p["latencies"]) - statistics.median(
        x for d in direct for x in d["latencies"]
    )
    print(f"added connect+request latency p50: {added * 1e3:.3f} ms (target < 1 ms)")
    with open("/proc/sys/net/ipv4/tcp_congestion_control") as f:
        host_cc = f.read().strip()
    print(
        f"TCP congestion control: {host_cc} on the host (the direct run, the server);"
        " reno in the jail and on the proxy's loopback upstream socket"
    )
    lookups = [x for p in proxied for x in p["lookups"]]
    print(
        "name lookup p50 in the jail (DNS stub; the host run reads no DNS for 127.0.0.1): "
        f"{statistics.median(lookups) * 1e3:.3f} ms"
    )


if __name__ == "__main__":
    main()
