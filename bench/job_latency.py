"""Submit→exit latency of `/bin/true` in a full jail, against other ways to run it isolated.

Run as root: ``.venv/bin/python bench/job_latency.py [--jobs 200]``. Starts its own netjaild on
a temporary socket (or uses $NETJAIL_SOCKET with --use-running), runs the jobs one after
another through the Python client, and in the same run times the baselines that are installed:
``unshare -n true``, ``bwrap --unshare-net --ro-bind / / true``, bwrap's all-namespace sandbox
(``--unshare-all --ro-bind / / --proc /proc --dev /dev --tmpfs /tmp``), ``firejail --noprofile
--net=none true``, and plain ``true``. Prints p50/p95 and the ratio of each to netjail's p50.
netjail's jobs run back to back (each job's teardown and the pool's refill of its jail then
overlap the next job), and, in the same rounds, ``PACE_S`` apart, as an interactive user's
come.

``--compare-ref REF`` also runs a daemon from git revision REF (a temporary worktree), in the
same run, alternating with this tree's in rounds, so a change can be shown to be no slower.

Then the CLI's own start, against a bare ``python3 -I -c pass`` timed in the same rounds: the
interpreter with no import; the same with only ``socket`` and ``json`` (the floor of any
Python client of netjaild's protocol); with click and msgspec alone (the floor the CLI's two
dependencies set); ``import netjail.cli``; ``netjail ps`` against a socket that does not exist
(the whole start up to a one-line error); and ``netjail run -- /bin/true`` through the private
daemon (the CLI's whole job). Each is printed with its ratio to ``python3 -I -c pass``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

from _common import percentile, private_daemon
from netjail import Client
from netjail.kernel.cgroup import CgroupManager, Limits, load_cgroup_layout

PACE_S = 0.05
#: The same daemon without warm jails: every job built cold, for comparison in the same run.
NO_POOL = "[jail]\npool_size = 0\n"
COLD = "  same, cold (no pool)"
#: The same jobs PACE_S apart, not back to back.
PACED = f"  same, {PACE_S * 1000:.0f} ms apart"


def time_command(argv: list[str], n: int) -> list[float]:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        samples.append(time.perf_counter() - start)
    return samples


def time_netjail(client: Client, n: int, pace_s: float = 0.0) -> list[float]:
    """``n`` jobs one after another; with ``pace_s``, that long apart (as an interactive
    user's jobs come: the last one's teardown and the pool's refill are over by then)."""
    samples = []
    for _ in range(n):
        if pace_s:
            time.sleep(pace_s)
        start = time.perf_counter()
        result = client.run(["/bin/true"], cwd="/")
        samples.append(time.perf_counter() - start)
        assert result.exit_code == 0
    return samples


def time_cli_start(n: int, sock: str | None) -> dict[str, list[float]]:
    """The CLI's start against a bare interpreter's, in alternating rounds (see the docstring)."""
    netjail = os.path.join(os.path.dirname(sys.executable), "netjail")
    cases = {
        # The system's python3 (a PATH lookup may find a version manager's slow shim).
        "python3 -I -c pass": ["/usr/bin/python3", "-I", "-c", "pass"],
        "  this venv's python": [sys.executable, "-I", "-c", "pass"],
        # The least any Python client of a Unix socket and JSON lines imports.
        "  import socket, json": [sys.executable, "-I", "-c", "import socket, json"],
        "  import click, msgspec": [sys.executable, "-I", "-c", "import click, msgspec"],
        # As netjail ends: without tearing the interpreter down (cli._exit_now).
        "    ..., then os._exit": [
            sys.executable,
            "-I",
            "-c",
            "import click, msgspec, os; os._exit(0)",
        ],
        "  import netjail.cli": [sys.executable, "-I", "-c", "import netjail.cli"],
        "  netjail ps (no daemon)": [netjail, "--socket", "/nonexistent/netjail.sock", "ps"],
    }
    if sock is not None:
        cases["  netjail run -- /bin/true"] = [netjail, "--socket", sock, "run", "-q", "/bin/true"]
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(n):
        for name, argv in cases.items():
            start = time.perf_counter()
            subprocess.run(argv, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            samples[name].append(time.perf_counter() - start)
    return samples


def print_cli_start(samples: dict[str, list[float]]) -> None:
    bare = statistics.median(samples["python3 -I -c pass"])
    print(f"\nCLI start, {len(samples['python3 -I -c pass'])} rounds")
    print(f"{'':26} {'p50 ms':>8} {'p95 ms':>8} {'p50 / bare':>14}")
    for name, each in samples.items():
        p50 = statistics.median(each)
        print(
            f"{name:26} {p50 * 1000:8.2f} {percentile(each, 0.95) * 1000:8.2f} {p50 / bare:14.2f}"
        )


def _run_true(client: Client) -> None:
    client.run(["/bin/true"], cwd="/")


def time_after_burst(client: Client, rounds: int) -> list[float]:
    """The first job after a burst that emptied the warm pool: per round, wait until the pool
    is full again, start more jobs at once than it holds, and time the next job alone."""
    size = client.status().pool_size or 0
    if size == 0:
        return []
    samples = []
    for _ in range(rounds):
        deadline = time.monotonic() + 10
        while (client.status().pool_ready or 0) < size and time.monotonic() < deadline:
            time.sleep(0.01)
        burst = [
            threading.Thread(target=_run_true, args=(Client(client.socket),))
            for _ in range(size + 2)
        ]
        for thread in burst:
            thread.start()
        for thread in burst:
            thread.join()
        start = time.perf_counter()
        client.run(["/bin/true"], cwd="/")
        samples.append(time.perf_counter() - start)
    return samples


def time_cgroup_cost(n: int) -> tuple[list[float], list[float]]:
    """fork+exec /bin/true, without and with a fresh job cgroup (create, join, kill, remove).

    The difference is what a cgroup adds to every job on this host; most of it is the kernel
    moving the first task into a new cgroup: that takes a global rwsem for writing, which waits
    for an RCU grace period unless another migration happened within the last one. So the
    iterations are paced (PACE_S apart) like jobs are, or the loop would measure a warm state
    the daemon rarely sees.
    """
    manager = CgroupManager(load_cgroup_layout(), parent_name="netjail-bench")
    manager.setup()
    plain, with_cgroup = [], []
    try:
        for i in range(n):
            time.sleep(PACE_S)
            start = time.perf_counter()
            subprocess.run(["/bin/true"], check=True)
            plain.append(time.perf_counter() - start)

            time.sleep(PACE_S)
            start = time.perf_counter()
            cgroup = manager.create_job(f"j-bench{i}", Limits(memory_bytes=256 << 20, pids=64))
            script = "".join(f"echo 0 > {p}; " for p in cgroup.procs_files)
            subprocess.run(["/bin/sh", "-c", script + "exec /bin/true"], check=True)
            cgroup.kill_all()
            cgroup.remove()
            with_cgroup.append(time.perf_counter() - start)
        # The shell itself costs something: time it alone so it is not charged to the cgroup.
        shell = []
        for _ in range(n):
            time.sleep(PACE_S)
            start = time.perf_counter()
            subprocess.run(["/bin/sh", "-c", "exec /bin/true"], check=True)
            shell.append(time.perf_counter() - start)
        offset = statistics.median(shell) - statistics.median(plain)
        with_cgroup = [t - offset for t in with_cgroup]
    finally:
        manager.teardown()
    return plain, with_cgroup


@contextlib.contextmanager
def worktree(ref: str) -> Iterator[str]:
    """A temporary git worktree of ``ref``; yields its ``src`` directory."""
    path = tempfile.mkdtemp(prefix="netjail-bench-ref-")
    subprocess.run(["git", "worktree", "add", "--detach", "-q", path, ref], check=True)
    try:
        yield os.path.join(path, "src")
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", path], check=False)


def time_baselines(jobs: int) -> dict[str, list[float]]:
    """The other ways to run /bin/true isolated (those installed), ``jobs`` times each."""
    results: dict[str, list[float]] = {}
    baselines = {
        "true (no isolation)": ["/bin/true"],
        "unshare -n true": ["unshare", "-n", "/bin/true"],
        "bwrap --unshare-net": ["bwrap", "--unshare-net", "--ro-bind", "/", "/", "/bin/true"],
        "bwrap --unshare-all": [
            "bwrap",
            "--unshare-all",
            "--ro-bind",
            "/",
            "/",
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--tmpfs",
            "/tmp",
            "/bin/true",
        ],
        "firejail --net=none": [
            "firejail",
            "--quiet",
            "--noprofile",
            "--net=none",
            "/bin/true",
        ],
    }
    for name, argv in baselines.items():
        if shutil.which(argv[0]) is None:
            print(f"{name}: not installed, skipped")
            continue
        try:
            time_command(argv, 3)
            results[name] = time_command(argv, jobs)
        except subprocess.CalledProcessError as e:
            print(f"{name}: failed here (exit {e.returncode}), skipped")
    return results


def print_results(results: dict[str, list[float]], jobs: int) -> None:
    """p50, p95 and ratios to netjail's p50 and to unshare -n's, one line each."""
    with_cgroup, plain = results["  + fresh job cgroup"], results["fork+exec true"]
    ours = statistics.median(results["netjail run /bin/true"])
    unshare = results.get("unshare -n true")
    base = statistics.median(unshare) if unshare else None
    print(f"\n{jobs} runs each, sequential, {os.cpu_count()} CPUs")
    print(f"{'':26} {'p50 ms':>8} {'p95 ms':>8} {'p50 / netjail':>14} {'/ unshare -n':>13}")
    for name, samples in results.items():
        p50 = statistics.median(samples)
        p95 = percentile(samples, 0.95)
        vs = f"{p50 / base:13.2f}" if base else ""
        print(f"{name:26} {p50 * 1000:8.2f} {p95 * 1000:8.2f} {p50 / ours:14.2f} {vs}")
    if base:
        print()
        for name, label in (("netjail run /bin/true", "back to back"), (PACED, "paced")):
            if name not in results:
                continue
            p50 = statistics.median(results[name])
            p95 = percentile(results[name], 0.95)
            print(
                f"netjail (warm pool, {label}) vs unshare -n true: p50 {p50 / base:.2f}x"
                f" (target <= 2), p95 {p95 / base:.2f}x of its p50 (target <= 4)"
            )
    added = statistics.median(with_cgroup) - statistics.median(plain)
    print(f"\ncgroup cost per job: {added * 1000:.2f} ms p50 ({added / ours:.0%} of netjail's p50)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--use-running", action="store_true", help="use $NETJAIL_SOCKET's daemon")
    parser.add_argument("--compare-ref", metavar="REF", help="also time a daemon from git REF")
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:
        if args.use_running:
            sock = os.environ.get("NETJAIL_SOCKET", "/run/netjail/netjail.sock")
        else:
            sock = stack.enter_context(private_daemon())
        client = Client(sock)
        time_netjail(client, args.warmup)
        results: dict[str, list[float]] = {"netjail run /bin/true": []}
        clients = {"netjail run /bin/true": client}
        if not args.use_running:
            cold = Client(stack.enter_context(private_daemon(config=NO_POOL)))
            time_netjail(cold, args.warmup)
            results[COLD] = []
            clients[COLD] = cold
        if args.compare_ref:
            old_src = stack.enter_context(worktree(args.compare_ref))
            old = Client(stack.enter_context(private_daemon(old_src)))
            time_netjail(old, args.warmup)
            name = f"  same, at {args.compare_ref}"
            results[name] = []
            clients[name] = old
        results[PACED] = []
        # Rounds alternate between daemons, so drift on the host affects both alike.
        rounds = 10
        for _ in range(rounds):
            for name, each in clients.items():
                results[name] += time_netjail(each, max(1, args.jobs // rounds))
            results[PACED] += time_netjail(client, max(1, args.jobs // rounds), PACE_S)
        after_burst = time_after_burst(client, max(5, args.jobs // 20))
        if after_burst:
            results["  first after a burst"] = after_burst
        cli_start = time_cli_start(max(10, args.jobs // 4), None if args.use_running else sock)
        results.update(time_baselines(args.jobs))

    plain, with_cgroup = time_cgroup_cost(min(args.jobs, 100))
    results["fork+exec true"] = plain
    results["  + fresh job cgroup"] = with_cgroup

    print_results(results, args.jobs)
    print_cli_start(cli_start)


if __name__ == "__main__":
    main()
