"""Load: many jobs from many clients with nothing lost, then many jobs running at once.

Run as root: ``.venv/bin/python bench/load.py [--jobs 10000] [--clients 16] [--running 1000]``.
Starts its own netjaild on a temporary socket (its log is printed if anything fails) and, in
the same run:

1. **Throughput and correctness.** ``--clients`` threads, each with its own connections, run
   ``--jobs`` jobs in all. Each job echoes a token of its own and looks up ``<token>.example.test``
   (the DNS stub answers NXDOMAIN and reports it), so each client checks that it got exactly
   its own jobs' reports: the job id it was given at start, its own argv and output, and only
   events of its own job and name. A lost exit (an error, a hang-up, a report of another job)
   and every lost or dropped event is counted.
2. **Many running at once.** Job latency (``/bin/true``, sequential, paced) and the daemon's
   RSS and fd count with no job running; then ``--running`` ``sleep`` jobs started (at most
   ``--ramp`` starting at a time) and held; the same latency, RSS and fds again; then every
   sleeper killed and its report awaited. Prints p50/p95 latency and their ratio to the idle
   p50, and the daemon's memory and fds per running job.

Part 1 also prints where the CPU went while it ran (bench/cpuusage.py): the daemon, its fork
server and the jobs it reaped, the nft helper, the clients, the kernel's threads and the rest of
the machine, per job, user and kernel time apart, and the rate the netjail share alone would
allow on these CPUs: a number that other load on the machine moves much less than jobs/s. Its
kernel part alone (namespaces, devices, mounts, cgroups, page faults, exits, the kernel's
threads) gives the rate no user-space work could pass; the same split is printed for
``unshare -n true``.

Targets (issue 12): 0 lost exits; 1,000 running jobs without an error; p50 latency with them
running at most 1.5x the idle p50; at most 200 KB of daemon memory per running job.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from _common import percentile
from cpuusage import busy_share, cpu_by_role, take_snapshot
from netjail import Client
from netjail.errors import NetjailError
from netjail.protocol import Event

PACE_S = 0.05


@dataclass
class Daemon:
    socket: str
    pid: int
    log_path: str

    def log_tail(self, lines: int = 40) -> str:
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])


@contextlib.contextmanager
def private_daemon(nofile: int) -> Iterator[Daemon]:
    """netjaild on a temporary socket with ``nofile`` fds at most, logging to a file."""
    base = tempfile.mkdtemp(prefix="netjail-load-", dir="/run")
    sock = os.path.join(base, "sock", "netjail.sock")
    log_path = os.path.join(base, "netjaild.log")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                *("prlimit", f"--nofile={nofile}:{nofile}", "--"),
                *(sys.executable, "-m", "netjail.daemon"),
                *("--socket", sock, "--state-dir", f"{base}/state"),
            ],
            stdout=log,
            stderr=log,
        )
    daemon = Daemon(sock, 0, log_path)
    try:
        deadline = time.monotonic() + 60
        while "netjaild ready" not in read_text(log_path):
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"netjaild did not start:\n{daemon.log_tail()}")
            time.sleep(0.05)
        daemon.pid = Client(sock).status().pid
        yield daemon
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.returncode != 0:
            print(f"netjaild exited with {process.returncode}:\n{daemon.log_tail()}")
        shutil.rmtree(base, ignore_errors=True)


def read_text(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def mib(size: int) -> str:
    return f"{size / 2**20:.1f}"


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# ---------------------------------------------------------------------- 1. throughput


@dataclass
class Tally:
    """What one client saw."""

    done: int = 0
    lost_exits: int = 0
    wrong_reports: int = 0
    foreign_events: int = 0
    events: int = 0
    lost_events: int = 0
    dropped_events: int = 0
    errors: Counter[str] = field(default_factory=Counter)


def run_own_jobs(sock: str, client_no: int, count: int, tally: Tally) -> None:
    """Run ``count`` jobs one after another; check each report is this job's own."""
    client = Client(sock, timeout=120)
    for n in range(count):
        token = f"c{client_no:02d}n{n:05d}"
        name = f"{token}.example.test"
        argv = ["/bin/sh", "-c", 'echo "$0"; getent hosts "$0.example.test"; exit 0', token]
        started: list[str] = []
        seen: list[Event] = []
        try:
            result = client.run(
                argv,
                cwd="/",
                stdio="capture",
                on_start=lambda job, _pid, started=started: started.append(job),
                on_event=seen.append,
            )
        except NetjailError as e:
            tally.lost_exits += 1
            tally.errors[f"{type(e).__name__}: {e}"] += 1
            continue
        report = result.report
        own = (
            started == [report.job]
            and report.argv == argv
            and report.stdout == f"{token}\n".encode()
            and report.exit_code == 0
        )
        if not own:
            tally.wrong_reports += 1
        events = [*seen, *report.events]
        tally.foreign_events += sum(1 for e in events if e.job != report.job or e.domain != name)
        tally.events += len(report.events)
        tally.lost_events += report.lost_events
        tally.dropped_events += result.dropped_events
        tally.done += 1


def throughput(daemon: Daemon, jobs: int, clients: int) -> None:
    tallies = [Tally() for _ in range(clients)]
    per_client = [jobs // clients + (1 if i < jobs % clients else 0) for i in range(clients)]
    threads = [
        threading.Thread(target=run_own_jobs, args=(daemon.socket, i, per_client[i], tallies[i]))
        for i in range(clients)
    ]
    rss_before = rss_bytes(daemon.pid)
    roles = daemon_roles(daemon.pid)
    cpu_before = take_snapshot()
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    cpu_after = take_snapshot()
    total = Tally()
    for tally in tallies:
        for name in ("done", "lost_exits", "wrong_reports", "foreign_events", "events"):
            setattr(total, name, getattr(total, name) + getattr(tally, name))
        total.lost_events += tally.lost_events
        total.dropped_events += tally.dropped_events
        total.errors.update(tally.errors)
    print(f"\n1. {jobs} jobs from {clients} concurrent clients, {os.cpu_count()} CPUs")
    print(f"   wall {wall:.1f} s, {total.done / wall:.1f} jobs/s")
    serial, serial_cpu = serial_unshare_rate(200)
    print(
        f"   unshare -n true, serially, in the same run: {serial:.1f} /s"
        f" (netjail at {total.done / wall / serial:.2f}x of it; target >= 0.5, and >= 250 jobs/s)"
    )
    print(
        f"     its CPU: {serial_cpu['all'] * 1000:.2f} ms a run, the kernel's part"
        f" {serial_cpu['system'] * 1000:.2f} ms (kernel threads included)"
    )
    print(f"   reports received      {total.done}")
    print(f"   lost exits            {total.lost_exits}")
    print(f"   reports not their own {total.wrong_reports}")
    print(f"   foreign events        {total.foreign_events}")
    print(f"   events in reports     {total.events}")
    print(f"   lost events           {total.lost_events} in reports")
    print(f"   events not streamed   {total.dropped_events}")
    rss_after = rss_bytes(daemon.pid)
    print(f"   daemon RSS            {mib(rss_before)} MiB before, {mib(rss_after)} MiB after")
    for error, n in total.errors.most_common(5):
        print(f"   error x{n}: {error}")
    used = {part: cpu_by_role(cpu_before, cpu_after, roles, part) for part in ("user", "system")}
    print_cpu(used, busy_share(cpu_before, cpu_after), total.done)


def daemon_roles(pid: int) -> dict[int, str]:
    """The daemon, its helpers (by their module), and this process (the clients)."""
    roles = {pid: "daemon", os.getpid(): "clients (this process)"}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if ppid == pid:
            module = next((a.decode() for a in argv if a.startswith(b"netjail.")), "helper")
            roles[int(entry)] = module.rsplit(".", 1)[-1]
    return roles


def print_cpu(used: dict[str, Counter[str]], machine: tuple[float, float], jobs: int) -> None:
    """CPU by role over the run, per job, user and kernel apart, and the rates the netjail
    share would allow: as it is, and if its user space took no CPU at all."""
    had, busy = machine
    print(f"   CPU over the run: {had:.1f} CPU-s on {os.cpu_count()} CPUs, {busy:.0%} busy")
    print(f"     {'':28} {'CPU-s':>7}  {'ms/job':>6}  {'user':>6}  {'kernel':>6}")
    every = used["user"] + used["system"]
    ours = kernel = 0.0
    for role, seconds in every.most_common():
        if seconds < 0.005:
            continue
        if role != "other":
            ours += seconds
            kernel += used["system"][role]
        user_ms, system_ms = (used[part][role] / max(1, jobs) * 1000 for part in ("user", "system"))
        print(
            f"     {role:28} {seconds:7.2f}  {seconds / max(1, jobs) * 1000:6.2f}"
            f"  {user_ms:6.2f}  {system_ms:6.2f}"
        )
    per_job, kernel_per_job = ours / max(1, jobs), kernel / max(1, jobs)
    cpus = os.cpu_count() or 1
    print(
        f"   netjail and the kernel threads: {per_job * 1000:.2f} ms CPU a job, so at most"
        f" {cpus / per_job if per_job else 0:.0f} jobs/s on these CPUs"
        ' if nothing else ran ("other" is the rest of the machine)'
    )
    print(
        f"   the kernel's part of it: {kernel_per_job * 1000:.2f} ms a job, so at most"
        f" {cpus / kernel_per_job if kernel_per_job else 0:.0f} jobs/s even if netjail's user"
        " space took no CPU"
    )


# ---------------------------------------------------------------------- 2. many running


def latencies(client: Client, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        time.sleep(PACE_S)
        start = time.perf_counter()
        result = client.run(["/bin/true"], cwd="/")
        samples.append(time.perf_counter() - start)
        assert result.exit_code == 0, result.report
    return samples


@dataclass
class Sleepers:
    """The held jobs: started ids, failures, and the reports once they end."""

    started: list[str] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)
    reports: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def hold_sleeper(sock: str, sleepers: Sleepers, ramp: threading.Semaphore) -> None:
    released = False

    def on_start(job: str, pid: int) -> None:
        nonlocal released
        with sleepers.lock:
            sleepers.started.append(job)
        released = True
        ramp.release()

    try:
        Client(sock, timeout=300).run(["sleep", "3600"], cwd="/", on_start=on_start)
    except NetjailError as e:
        with sleepers.lock:
            sleepers.failures[f"{type(e).__name__}: {e}"] += 1
    else:
        with sleepers.lock:
            sleepers.reports += 1
    finally:
        if not released:
            ramp.release()


def many_running(daemon: Daemon, running: int, ramp_width: int, samples: int) -> None:
    client = Client(daemon.socket, timeout=300)
    latencies(client, 5)  # warm-up
    idle = latencies(client, samples)
    idle_rss, idle_fds = rss_bytes(daemon.pid), fd_count(daemon.pid)

    sleepers = Sleepers()
    ramp = threading.Semaphore(ramp_width)
    threads = []
    start = time.perf_counter()
    for _ in range(running):
        ramp.acquire()
        thread = threading.Thread(target=hold_sleeper, args=(daemon.socket, sleepers, ramp))
        thread.start()
        threads.append(thread)
    for _ in range(ramp_width):
        ramp.acquire()  # every start has answered
    ramp_s = time.perf_counter() - start
    listed = len(client.ps())
    busy_rss, busy_fds = rss_bytes(daemon.pid), fd_count(daemon.pid)
    busy = latencies(client, samples) if listed else []

    for job in list(sleepers.started):
        with contextlib.suppress(NetjailError):
            client.kill(job, signal.SIGKILL)
    for thread in threads:
        thread.join(300)
    deadline = time.monotonic() + 120
    while client.ps() and time.monotonic() < deadline:
        time.sleep(0.2)

    print(f"\n2. {running} sleep jobs held at once (at most {ramp_width} starting at a time)")
    print(f"   started {len(sleepers.started)} in {ramp_s:.1f} s; listed by ps {listed}")
    for error, n in sleepers.failures.most_common(5):
        print(f"   failed to start x{n}: {error}")
    print(f"   reports after SIGKILL {sleepers.reports} of {len(sleepers.started)}")
    print(f"   {'':30} {'p50 ms':>8} {'p95 ms':>8} {'p50 / idle':>11}")
    idle_p50 = statistics.median(idle)
    for name, values in (("/bin/true, none running", idle), (f"/bin/true, {listed} running", busy)):
        if values:
            p50 = statistics.median(values)
            p95 = percentile(values, 0.95)
            print(f"   {name:30} {p50 * 1000:8.2f} {p95 * 1000:8.2f} {p50 / idle_p50:11.2f}")
    per_job = (busy_rss - idle_rss) / max(1, listed)
    print(f"   daemon RSS {mib(idle_rss)} MiB idle, {mib(busy_rss)} MiB with {listed}")
    print(f"   daemon memory per running job {per_job / 1024:.0f} KiB")
    fds_per_job = (busy_fds - idle_fds) / max(1, listed)
    print(f"   daemon fds {idle_fds} idle, {busy_fds} with {listed} ({fds_per_job:.1f} per job)")
    print(f"   ps after the kills: {len(client.ps())} jobs left")


def serial_unshare_rate(n: int) -> tuple[float, dict[str, float]]:
    """How many ``unshare -n true`` run per second one after another (the issue's baseline),
    and the CPU seconds each took ("all" and "system"), the kernel threads' included (they
    destroy the namespaces)."""
    before = take_snapshot()
    start = time.perf_counter()
    for _ in range(n):
        subprocess.run(["unshare", "-n", "/bin/true"], check=True)
    rate = n / (time.perf_counter() - start)
    after = take_snapshot()
    roles = {os.getpid(): "bench"}
    cpu = {}
    for part in ("all", "system"):
        used = cpu_by_role(before, after, roles, part)
        cpu[part] = (used["bench children"] + used["kernel threads"]) / n
    return rate, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--running", type=int, default=1000)
    parser.add_argument("--ramp", type=int, default=32, help="jobs starting at once [32]")
    parser.add_argument("--samples", type=int, default=50, help="latency samples [50]")
    parser.add_argument(
        "--nofile",
        type=int,
        default=resource.getrlimit(resource.RLIMIT_NOFILE)[1],
        help="the daemon's fd limit [this process's hard limit]",
    )
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-running", action="store_true", help="skip part 2")
    args = parser.parse_args()
    # One thread and one connection per held job, in this process.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * args.running)), hard))
    with private_daemon(args.nofile) as daemon:
        if not args.skip_throughput:
            throughput(daemon, args.jobs, args.clients)
        if not args.skip_running:
            many_running(daemon, args.running, args.ramp, args.samples)
        errors = [line for line in read_text(daemon.log_path).splitlines() if " ERROR " in line]
        print(f"\ndaemon log: {len(errors)} error lines")
        for line in errors[:10]:
            print("   " + line)


if __name__ == "__main__":
    main()
