"""Wall time of a batch of `/bin/true` jobs through each client, against the sync client's.

Run as root: ``.venv/bin/python bench/clients.py [--jobs 50] [--rounds 5]``. Starts its own
netjaild on a temporary socket and, in rounds, runs the batch: one after another with
``Client.run`` (the baseline), from one thread per job with ``Client.run``, gathered on one
event loop with ``AsyncClient.run``, and (when node is installed) with the Node client's
``Promise.all``. Prints the median batch time of each and its ratio to the baseline; the
rounds alternate the ways, so machine noise spreads over all of them.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import private_daemon
from netjail import AsyncClient, Client

NODE_CLIENT = Path(__file__).resolve().parents[1] / "clients" / "node"
NODE_BATCH = """
const { Client } = require(process.argv[1]);
const client = new Client({ socket: process.argv[2] });
const n = Number(process.argv[3]);
const start = process.hrtime.bigint();
Promise.all(Array.from({ length: n }, () => client.run(['/bin/true'], { cwd: '/' }))).then((rs) => {
  if (!rs.every((r) => r.exitCode === 0)) throw new Error('a job failed');
  console.log(Number(process.hrtime.bigint() - start) / 1e9);
});
"""


def sequential(socket: str, n: int) -> float:
    client = Client(socket)
    start = time.perf_counter()
    for _ in range(n):
        assert client.run(["/bin/true"], cwd="/").exit_code == 0
    return time.perf_counter() - start


def threaded(socket: str, n: int) -> float:
    client = Client(socket)
    start = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda _: client.run(["/bin/true"], cwd="/"), range(n)))
    assert all(r.exit_code == 0 for r in results)
    return time.perf_counter() - start


def gathered(socket: str, n: int) -> float:
    async def batch() -> float:
        client = AsyncClient(socket)
        start = time.perf_counter()
        results = await asyncio.gather(*(client.run(["/bin/true"], cwd="/") for _ in range(n)))
        assert all(r.exit_code == 0 for r in results)
        return time.perf_counter() - start

    return asyncio.run(batch())


def node_batch(socket: str, n: int) -> float:
    """The batch timed inside node (its start-up is not the client's cost)."""
    node = shutil.which("node")
    assert node is not None
    argv = [node, "-e", NODE_BATCH, str(NODE_CLIENT), socket, str(n)]
    return float(subprocess.run(argv, check=True, capture_output=True, text=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    ways: dict[str, Callable[[str, int], float]] = {
        "Client, one after another": sequential,
        "Client, a thread per job": threaded,
        "AsyncClient, gathered": gathered,
    }
    if shutil.which("node"):
        ways["Node client, Promise.all"] = node_batch
    samples: dict[str, list[float]] = {name: [] for name in ways}
    with private_daemon() as socket:
        gathered(socket, 5)  # warm the daemon (fork server, first cgroups) before timing
        for _ in range(args.rounds):
            for name, way in ways.items():
                samples[name].append(way(socket, args.jobs))
    baseline = statistics.median(samples["Client, one after another"])
    print(f"{args.jobs} jobs of /bin/true, median of {args.rounds} rounds")
    for name, times in samples.items():
        median = statistics.median(times)
        print(
            f"  {name:28} {median * 1000:8.1f} ms  ({median / args.jobs * 1000:5.1f} ms/job)  "
            f"x{median / baseline:.2f} of one after another; range "
            f"{min(times) * 1000:.0f}-{max(times) * 1000:.0f} ms"
        )


if __name__ == "__main__":
    main()
