"""Proxy cost: bulk throughput and connection set-up, through the jail's proxy vs direct.

Run as root: ``.venv/bin/python bench/proxy_throughput.py [--mib 1024] [--connects 100]
[--rounds 5]``.

An HTTP-ish upstream server runs on this host's loopback, in cleartext and over TLS (a
certificate for ``bulk.test`` from a CA made for the run). The same client script (system
Python, sockets only) runs in alternating rounds, five ways:

- *direct*: on the host, cleartext; *proxied*: as a netjail job allowed to reach ``bulk.test``
  (``--add-host bulk.test:127.0.0.1``), so every byte goes job → in-jail listener → proxy →
  upstream (spliced in the kernel);
- *direct TLS*: on the host, TLS to the upstream; *intercepted*: as a job with ``--intercept
  bulk.test``: TLS to the proxy with the job's CA, which the job trusts by netjail's variables,
  every request parsed (h11), and TLS again from the proxy to the upstream, verified against
  the run's CA (``[proxy] upstream_ca``);
- and a fifth, *plain Python TLS relay*: on the host, the client's TLS to ``RELAY``, a relay of
  a few dozen lines in the system Python that terminates TLS as netjaild does (MemoryBIO, one
  thread) and connects to the upstream over TLS, with no HTTP parsing and no policy: the floor
  any such relay in Python has on this machine, against which intercepted is also compared.

Each round downloads and uploads --mib MiB and makes --connects connect+GET round trips
(with TLS, each a new handshake: the time to the first byte of a new connection). Prints the
median MiB/s each way and connect+request latency p50/p95 of each, the ratios of the median
throughputs (targets: proxied ≥ 0.5 of direct, intercepted ≥ 0.5 of direct TLS), the added
latency (targets: < 1 ms p50 proxied, ≤ 2 ms intercepted), and the added latency of each run's
first connection (for a job: a new leaf certificate, a full upstream handshake; later ones
resume the upstream's TLS session).

Last, the CPU seconds each process took per round (the client: the job's cgroup when jailed;
the upstream: this process's threads; the proxy: netjaild, or the plain relay), and the
ceiling they set on the TLS ratio:
intercepted, every byte is decrypted and encrypted twice, once more in netjaild, so when the
direct run already keeps every CPU busy the ratio can be no higher than direct's CPU seconds
over intercepted's.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import resource
import shutil
import socket
import ssl
import statistics
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from _common import percentile, private_daemon
from cpuusage import cpu_seconds
from netjail import Client

PY = "/usr/bin/python3"
NAME = "bulk.test"

# Resolves the name `connects` times, connects `connects` times to the address (GET 1 byte:
# connect + request + response), then downloads `size` bytes once and uploads `size` once.
# With tls=1, every connection is TLS, verified for `name` with the default trust store
# (SSL_CERT_FILE: the run's CA on the host, the job's bundle in a jail).
CLIENT = r"""
import json, socket, ssl, sys, time
host, name, port, size, connects, tls = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
context = ssl.create_default_context() if tls else None

lookups = []
for _ in range(connects):
    t = time.perf_counter()
    address = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    lookups.append(time.perf_counter() - t)

def connect():
    s = socket.create_connection((address, port), timeout=30)
    return context.wrap_socket(s, server_hostname=name) if context else s

def get(n):
    s = connect()
    s.sendall(b"GET /%d HTTP/1.1\r\nHost: %s\r\n\r\n" % (n, name.encode()))
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
    s = connect()
    s.sendall(b"PUT /%d HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n" % (n, name.encode(), n))
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


# The floor of a TLS-terminating relay in Python, for comparison: one thread, MemoryBIO as
# netjaild uses (an SSLSocket was slower here: it reads each record in two syscalls), no HTTP
# parsing, no asyncio, no policy. Serves one connection at a time (the client's are one after
# another, and never send both ways at once, so blocking writes cannot deadlock).
RELAY = r"""
import select, socket, ssl, sys
upstream_port, ca_file, chain, name = int(sys.argv[1]), *sys.argv[2:5]
as_server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
as_server.load_cert_chain(chain)
as_client = ssl.create_default_context(cafile=ca_file)
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)  # the port: ready

class End:
    def __init__(self, sock, context, hostname):
        self.sock, self.inc, self.out = sock, ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(
            self.inc, self.out, server_side=hostname is None, server_hostname=hostname
        )

    def flush(self):
        data = self.out.read()
        if data:
            self.sock.sendall(data)

    def fill(self):
        data = self.sock.recv(1 << 20)
        if not data:
            raise EOFError
        self.inc.write(data)

    def handshake(self):
        while True:
            try:
                self.tls.do_handshake()
                return self.flush()
            except ssl.SSLWantReadError:
                self.flush()
                self.fill()

    def plaintext(self):
        chunks = []
        while True:
            try:
                chunk = self.tls.read(1 << 20)
            except ssl.SSLWantReadError:
                return b"".join(chunks)
            if not chunk:
                raise EOFError
            chunks.append(chunk)

def relay(job, upstream):
    pairs = {job.sock: (job, upstream), upstream.sock: (upstream, job)}
    pending = job.plaintext()  # a request that came with the handshake's last bytes
    if pending:
        upstream.tls.write(pending)
        upstream.flush()
    while True:
        for sock in select.select(list(pairs), [], [])[0]:
            src, dst = pairs[sock]
            src.fill()
            data = src.plaintext()
            if data:
                dst.tls.write(data)
                dst.flush()

while True:
    conn, _ = listener.accept()
    ends = [End(conn, as_server, None)]
    try:
        ends[0].handshake()
        ends.append(End(socket.create_connection(("127.0.0.1", upstream_port)), as_client, name))
        ends[1].handshake()
        relay(*ends)
    except (OSError, ssl.SSLError, EOFError):
        pass
    finally:
        for end in ends:
            end.sock.close()
"""


def make_certificates(directory: str) -> tuple[str, str, ssl.SSLContext]:
    """The run's CA file; a certificate for NAME it signed, with its key (a PEM file); and a
    server context with that certificate."""
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "netjail bench CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, NAME)]))
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(NAME)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    ca_file, chain = os.path.join(directory, "ca.pem"), os.path.join(directory, "leaf.pem")
    with open(ca_file, "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(chain, "wb") as f:
        f.write(leaf.public_bytes(serialization.Encoding.PEM))
        f.write(
            leaf_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(chain)
    return ca_file, chain, context


@dataclass(frozen=True)
class Relay:
    pid: int
    port: int


@contextlib.contextmanager
def plain_relay(upstream_port: int, ca_file: str, chain: str) -> Iterator[Relay]:
    """RELAY, run with the system Python on a port of the host's loopback it picks and
    prints, to the TLS upstream; stopped at the end."""
    args = [str(upstream_port), ca_file, chain, NAME]
    process = subprocess.Popen([PY, "-c", RELAY, *args], stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        port = process.stdout.readline().strip()
        if not port.isdigit():
            raise SystemExit("the plain relay did not start")
        yield Relay(process.pid, int(port))
    finally:
        process.kill()
        process.wait()


def serve(listener: socket.socket, context: ssl.SSLContext | None) -> None:
    chunk = b"x" * (1 << 20)
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=answer, args=(conn, chunk, context), daemon=True).start()


def answer(raw: socket.socket, chunk: bytes, context: ssl.SSLContext | None) -> None:
    try:
        conn = context.wrap_socket(raw, server_side=True) if context else raw
    except (ssl.SSLError, OSError):
        raw.close()
        return
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


def own_cpu_s() -> float:
    """CPU seconds of this process so far: the upstream's threads, mostly."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


#: Through what a way's client reaches the upstream: nothing, a netjail job's proxy, or RELAY.
Via = Literal["host", "netjail", "relay"]
#: The ways, in the order of each round: (label, TLS, via).
WAYS: tuple[tuple[str, bool, Via], ...] = (
    ("direct (host loopback)", False, "host"),
    ("through the proxy", False, "netjail"),
    ("direct TLS", True, "host"),
    ("intercepted (TLS, h11)", True, "netjail"),
    ("plain Python TLS relay", True, "relay"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="bulk transfer size per round")
    parser.add_argument("--connects", type=int, default=100, help="connect+GET per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    size = args.mib << 20

    directory = tempfile.mkdtemp(prefix="netjail-bench-tls-", dir="/run")
    ca_file, chain, server_context = make_certificates(directory)
    ports = {}
    listeners = []
    for tls in (False, True):
        listener = socket.create_server(("127.0.0.1", 0))
        listeners.append(listener)
        ports[tls] = listener.getsockname()[1]
        context = server_context if tls else None
        threading.Thread(target=serve, args=(listener, context), daemon=True).start()

    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in WAYS}
    config = f'[proxy]\nupstream_ca = "{ca_file}"\n'
    with private_daemon(config=config) as sock, plain_relay(ports[True], ca_file, chain) as relay:
        daemon = Client(sock).status().pid
        # Alternate the ways, so that drift in the machine's speed touches all alike.
        for _ in range(args.rounds):
            for label, tls, via in WAYS:
                port = relay.port if via == "relay" else ports[tls]
                client_args = [str(port), str(size), str(args.connects), str(int(tls))]
                proxy = relay.pid if via == "relay" else daemon
                upstream_cpu, proxy_cpu = own_cpu_s(), cpu_seconds(proxy)
                if via != "netjail":
                    client_cpu = children_cpu_s()
                    done = subprocess.run(
                        [PY, "-c", CLIENT, "127.0.0.1", NAME, *client_args],
                        capture_output=True,
                        check=True,
                        env={**os.environ, "SSL_CERT_FILE": ca_file},
                    )
                    runs[label].append(json.loads(done.stdout))
                    runs[label][-1]["cpu"] = {
                        "client": children_cpu_s() - client_cpu,
                        "upstream": own_cpu_s() - upstream_cpu,
                        "proxy": cpu_seconds(proxy) - proxy_cpu,
                    }
                    continue
                # --intercept alone would allow ports 80 and 443: the upstream's is another.
                policy = {"allow": [f"{NAME}:{ports[tls]}"], "intercept": [NAME] if tls else []}
                result = Client(sock).run(
                    [PY, "-c", CLIENT, NAME, NAME, *client_args],
                    add_hosts=[f"{NAME}:127.0.0.1"],
                    stdio="capture",
                    capture_bytes=1 << 22,
                    cwd="/",
                    **policy,  # type: ignore[arg-type]
                )
                if result.exit_code != 0:
                    raise SystemExit(f"job failed: {result.stderr!r}")
                assert result.stdout is not None
                runs[label].append(json.loads(result.stdout))
                runs[label][-1]["cpu"] = {
                    # The job's own, from its cgroup (the report's figures).
                    "client": (result.report.cpu_user_s or 0.0)
                    + (result.report.cpu_system_s or 0.0),
                    "upstream": own_cpu_s() - upstream_cpu,
                    "proxy": cpu_seconds(proxy) - proxy_cpu,
                }
    for listener in listeners:
        listener.close()
    shutil.rmtree(directory, ignore_errors=True)
    report(args, runs)


def report(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]]) -> None:
    print(
        f"\n{args.rounds} rounds, alternating; each: {args.mib} MiB down, {args.mib} MiB up and"
        f" {args.connects} connect+GET round trips"
    )
    header = ("down MiB/s", "(min-max)", "up MiB/s", "(min-max)", "conn p50 ms", "conn p95 ms")
    print(f"{'':24}" + "".join(f"{h:>12}" for h in header))
    for name, ways in runs.items():
        cells = []
        for key in ("seconds", "upload"):
            rates = [args.mib / run[key] for run in ways]
            cells += [f"{statistics.median(rates):.0f}", f"{min(rates):.0f}-{max(rates):.0f}"]
        lat = [x for run in ways for x in run["latencies"]]
        cells += [f"{statistics.median(lat) * 1e3:.3f}", f"{percentile(lat, 0.95) * 1e3:.3f}"]
        print(f"{name:24}" + "".join(f"{c:>12}" for c in cells))
    print()
    labels = [label for label, _, _ in WAYS]
    for base, way, target in ((labels[0], labels[1], 1.0), (labels[2], labels[3], 2.0)):
        direct, proxied = runs[base], runs[way]
        for key, direction in (("seconds", "download"), ("upload", "upload")):
            ratio, low, high = throughput_ratio(direct, proxied, key)
            print(
                f"{way} / {base}, {direction} throughput, medians: {ratio:.2f}"
                f" (target >= 0.50); per round {low:.2f}-{high:.2f}"
            )
        added = statistics.median(x for p in proxied for x in p["latencies"]) - statistics.median(
            x for d in direct for x in d["latencies"]
        )
        print(f"{way}: added connect+request latency p50 {added * 1e3:.3f} ms", end="")
        print(f" (target < {target:g} ms)")
        # A job's first connection (a new leaf, a full upstream handshake) against the direct
        # client's first: both include that client's own first-connection costs.
        firsts = statistics.median(p["latencies"][0] for p in proxied) - statistics.median(
            d["latencies"][0] for d in direct
        )
        print(
            f"{way}: added latency of the first connection of a run, median {firsts * 1e3:.3f} ms"
        )
    # No target: what any one-thread Python relay that terminates TLS reaches here.
    for base, way in ((labels[2], labels[4]), (labels[4], labels[3])):
        down, up = (
            throughput_ratio(runs[base], runs[way], key)[0] for key in ("seconds", "upload")
        )
        print(f"{way} / {base}, throughput medians: download {down:.2f}, upload {up:.2f}")
    print_cpu(runs, labels)
    with open("/proc/sys/net/ipv4/tcp_congestion_control") as f:
        host_cc = f.read().strip()
    print(
        f"TCP congestion control: {host_cc} on the host (the direct run, the server);"
        " reno in the jail and on the proxy's loopback upstream socket"
    )
    lookups = [x for p in runs[labels[1]] for x in p["lookups"]]
    print(
        "name lookup p50 in the jail (DNS stub; the host run reads no DNS for 127.0.0.1): "
        f"{statistics.median(lookups) * 1e3:.3f} ms"
    )


def throughput_ratio(
    direct: list[dict[str, Any]], proxied: list[dict[str, Any]], key: str
) -> tuple[float, float, float]:
    """The ratio of the median throughputs of ``proxied`` to ``direct`` (``key``: download
    or upload seconds), and the lowest and highest of the rounds' own ratios."""
    ratios = [d[key] / p[key] for d, p in zip(direct, proxied, strict=True)]
    median = statistics.median(d[key] for d in direct) / statistics.median(p[key] for p in proxied)
    return median, min(ratios), max(ratios)


def print_cpu(runs: dict[str, list[dict[str, Any]]], labels: list[str]) -> None:
    """CPU seconds a round took, by process, and what they bound the TLS ratio to.

    Each round moves the same bytes either way. When the direct run already keeps every CPU
    busy, the intercepted run can go no faster than its CPU seconds spread over all CPUs, so
    the ratio of throughputs can be no higher than direct's CPU seconds over intercepted's.
    """
    cpus = os.cpu_count() or 1
    print(f"\nCPU seconds per round, medians ({cpus} CPUs; client: the job's cgroup when jailed)")
    totals = {}
    for label in labels:
        parts = {k: statistics.median(run["cpu"][k] for run in runs[label]) for k in CPU_PARTS}
        totals[label] = sum(parts.values())
        walls = statistics.median(run["seconds"] + run["upload"] for run in runs[label])
        cells = "  ".join(f"{k} {v:6.2f}" for k, v in parts.items())
        print(
            f"{label:24} {cells}  all {totals[label]:6.2f}"
            f"  (bulk wall {walls:5.2f} s, {totals[label] / walls:.2f} CPUs busy)"
        )
    for way in (labels[3], labels[4]):
        print(
            f"{way} / {labels[2]}, CPU-bound ceiling of the throughput ratio: "
            f"{totals[labels[2]] / totals[way]:.2f} (direct's CPU seconds over this way's; it"
            f" binds when direct keeps all {cpus} CPUs busy)"
        )


#: The processes whose CPU a round counts (the proxy: netjaild, or RELAY's process).
CPU_PARTS = ("client", "upstream", "proxy")


if __name__ == "__main__":
    main()
