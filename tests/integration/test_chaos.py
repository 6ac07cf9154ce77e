"""Chaos: netjaild SIGKILLed at random points while jails are built and torn down, and its fork
server killed under it. After each crash, the next daemon on the same state directory must leave
nothing of the dead one's jobs: no netns, cgroup, mount, process or uid lease.

The random delays come from one seed, printed in every failure message (``NETJAIL_CHAOS_SEED``
replays a run).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest

from netjail import Client
from netjail.errors import NetjailError

from .conftest import (
    NO_POOL,
    Daemon,
    home_mounts,
    netjail_job_cgroups,
    netjail_netns,
    note_stopped,
    processes_of_jobs,
    start_daemon,
    state_leftovers,
    stop_daemon,
)

ITERATIONS = 20
#: The longest wait, once jobs are coming, before the SIGKILL.
MAX_DELAY_S = 0.4
#: Clients starting short jobs back to back: each job is built, runs and is torn down.
CHURNING_CLIENTS = 4


@pytest.fixture
def chaos_base() -> Iterator[str]:
    base = tempfile.mkdtemp(prefix="netjail-test-chaos-", dir="/run")
    os.chmod(base, 0o755)  # noqa: S103 - clients must reach the socket's directory
    yield base
    shutil.rmtree(base, ignore_errors=True)


def children(pid: int) -> list[int]:
    """The pids of ``pid``'s children (its fork server and nftables helper)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(child) for child in f.read().split()]


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is not: it holds nothing)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def recorded_jobs(daemon: Daemon) -> set[str]:
    """Jobs with a state record: every job whose build began (the record is its first step)."""
    directory = os.path.join(daemon.state_dir, "jobs")
    with contextlib.suppress(FileNotFoundError):
        return {name.removesuffix(".json") for name in os.listdir(directory)}
    return set()


def netns_mounts(jobs: set[str]) -> list[str]:
    """/run/netns mount points of these jobs still in the mount table."""
    with open("/proc/self/mountinfo") as f:
        points = [line.split(" ")[4] for line in f]
    return [p for p in points if p.startswith("/run/netns/netjail-") and p[19:] in jobs]


def clear_leftovers(daemon: Daemon, jobs: set[str]) -> None:
    """Remove what the daemon left of ``jobs`` (it must be stopped): their cgroups, records
    and uid leases. A failing test cleans up too, or the suite's leak check trips on it."""
    for cgroup in [c for c in netjail_job_cgroups() if os.path.basename(c) in jobs]:
        for below, _dirs, _files in sorted(os.walk(cgroup), reverse=True):
            # A cgroup may vanish while this runs (a removal still under way): nothing to do.
            with (
                contextlib.suppress(FileNotFoundError),
                open(os.path.join(below, "cgroup.procs")) as f,
            ):
                for pid in f.read().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
            deadline = time.monotonic() + 5
            while True:
                try:
                    os.rmdir(below)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
    for part, name_of in (
        ("jobs", lambda n: n.removesuffix(".json")),
        ("uids", lambda n: n.partition(".")[2]),
    ):
        directory = os.path.join(daemon.state_dir, part)
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(directory):
                if name_of(name) in jobs:
                    os.unlink(os.path.join(directory, name))
    note_stopped(daemon)


def of_jobs(paths: list[str], jobs: set[str]) -> list[str]:
    """The state paths (HOMEs named <job>, leases <uid>.<job>) of these jobs."""
    return [p for p in paths if os.path.basename(p).rpartition(".")[2] in jobs]


def explain(where: str, daemon: Daemon, leaked: dict[str, set[str]]) -> str:
    """The seed and iteration, and every log line (of every daemon so far) naming a leaked job."""
    names = set().union(*leaked.values())
    with open(daemon.log_path, errors="replace") as f:
        lines = [line for line in f if any(name in line for name in names)]
    return f"{where}; log lines of the leaked jobs:\n" + "".join(lines[-40:])


def churn(sock: str, stop: threading.Event) -> None:
    """Start short jobs back to back until ``stop`` or the daemon goes."""
    client = Client(sock, timeout=10)
    while not stop.is_set():
        try:
            client.run(["true"], cwd="/")
        except NetjailError:
            return


def hold(sock: str) -> socket.socket:
    """A connection with a `sleep` job starting on it (killed with the daemon)."""
    held = socket.socket(socket.AF_UNIX)
    held.connect(sock)
    held.sendall(b'{"op":"hello","version":1}\n{"op":"run","argv":["sleep","100"],"cwd":"/"}\n')
    return held


def test_sigkill_at_random_points_of_build_and_teardown_leaves_nothing(chaos_base: str) -> None:
    """20 times: jobs are being started, run and torn down; SIGKILL after a random delay; the
    next daemon removes every netns, cgroup, HOME mount, /run/netns mount, process and uid lease
    of the dead one's jobs, its fork server and nftables helper are gone, and it serves."""
    seed = int(os.environ.get("NETJAIL_CHAOS_SEED", time.time_ns() % 2**32))
    rng = random.Random(seed)  # noqa: S311 - delays to kill at, not secrets
    netns_before = set(netjail_netns())
    every_dead: set[str] = set()
    failure = None
    daemon = start_daemon(chaos_base)
    try:
        for iteration in range(ITERATIONS):
            helpers = children(daemon.process.pid)
            stop = threading.Event()
            churners = [
                threading.Thread(target=churn, args=(daemon.socket, stop))
                for _ in range(CHURNING_CLIENTS)
            ]
            for thread in churners:
                thread.start()
            held = [hold(daemon.socket) for _ in range(rng.randint(0, 2))]
            time.sleep(rng.uniform(0, MAX_DELAY_S))
            daemon.process.send_signal(signal.SIGKILL)
            daemon.process.wait(10)
            stop.set()
            for thread in churners:
                thread.join(15)
            for sock in held:
                sock.close()
            dead = (
                recorded_jobs(daemon)
                | daemon.job_ids()
                | {n.removeprefix("netjail-") for n in set(netjail_netns()) - netns_before}
            )
            every_dead |= dead
            daemon = start_daemon(chaos_base)
            leaked = {
                "netns": {n.removeprefix("netjail-") for n in netjail_netns()} & dead,
                "cgroups": {os.path.basename(c) for c in netjail_job_cgroups()} & dead,
                "processes": set(processes_of_jobs(dead)),
                "netns mounts": set(netns_mounts(dead)),
                # The dead one's: the new daemon's pool jails have HOMEs made ahead.
                "homes": set(of_jobs(home_mounts(os.path.join(daemon.state_dir, "homes")), dead)),
                # Only the dead one's: the new daemon's pool has jails (records, leases) of
                # its own by now.
                "state": set(of_jobs(state_leftovers(daemon.state_dir), dead)),
                "records": recorded_jobs(daemon) & dead,
                "helpers": {str(pid) for pid in helpers if running(pid)},
            }
            if any(leaked.values()):
                failure = explain(f"seed {seed}, iteration {iteration}", daemon, leaked)
                break
        else:
            result = Client(daemon.socket, timeout=10).run(
                ["sh", "-c", "echo alive"], stdio="capture"
            )
            assert result.stdout == b"alive\n"
    finally:
        stop_daemon(daemon)
        clear_leftovers(daemon, every_dead)
    assert failure is None, failure


def test_a_crash_with_a_warm_pool_leaves_nothing_of_it_after_the_restart(
    chaos_base: str,
) -> None:
    """SIGKILL with the pool full: its jails (netns, cgroups, standby inits, records, uid
    leases) are not jobs, yet the next start sweeps every one of them, and the new daemon
    fills a pool of its own."""
    daemon = start_daemon(chaos_base, config_extra="[jail]\npool_size = 3\n")
    try:
        client = Client(daemon.socket, timeout=10)
        deadline = time.monotonic() + 10
        while client.status().pool_ready != 3:
            assert time.monotonic() < deadline, "the pool never filled"
            time.sleep(0.02)
        pool = recorded_jobs(daemon) - daemon.job_ids()
        assert len(pool) == 3
        assert {n.removeprefix("netjail-") for n in netjail_netns()} >= pool
        assert len(processes_of_jobs(pool)) == 3  # one standby init in each
        assert client.ps() == []
        daemon.process.send_signal(signal.SIGKILL)
        daemon.process.wait(10)
        daemon = start_daemon(chaos_base, config_extra="[jail]\npool_size = 3\n")
        assert {n.removeprefix("netjail-") for n in netjail_netns()} & pool == set()
        assert {os.path.basename(c) for c in netjail_job_cgroups()} & pool == set()
        assert processes_of_jobs(pool) == []
        assert netns_mounts(pool) == []
        assert recorded_jobs(daemon) & pool == set()
        assert of_jobs(state_leftovers(daemon.state_dir), pool) == []
        result = Client(daemon.socket, timeout=10).run(["sh", "-c", "echo alive"], stdio="capture")
        assert result.stdout == b"alive\n"
    finally:
        stop_daemon(daemon)
    assert recorded_jobs(daemon) == set()


def test_a_crash_between_removing_a_jobs_cgroups_is_recovered(chaos_base: str) -> None:
    """The state a SIGKILL leaves half-way through a job's cgroup removal (its processes gone,
    its cgroup2 directory removed, its v1 ones not) is cleaned up by the next start: cgroups,
    record and uid lease. (The random test above reaches it within 20 kills most runs.)"""
    daemon = start_daemon(chaos_base, config_extra=NO_POOL)
    holder = hold(daemon.socket)
    client = Client(daemon.socket, timeout=10)
    deadline = time.monotonic() + 10
    while not client.ps():
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.02)
    (job,) = {j.job for j in client.ps()}
    daemon.process.send_signal(signal.SIGKILL)
    daemon.process.wait(10)
    holder.close()
    cgroups = [c for c in netjail_job_cgroups() if os.path.basename(c) == job]
    (unified,) = [c for c in cgroups if "/unified/" in c]
    with open(os.path.join(unified, "cgroup.kill"), "w") as f:
        f.write("1")
    while processes_of_jobs({job}):
        time.sleep(0.01)
    os.rmdir(unified)
    again = start_daemon(chaos_base, config_extra=NO_POOL)
    try:
        leftovers = (
            [c for c in netjail_job_cgroups() if os.path.basename(c) == job],
            recorded_jobs(again),
            state_leftovers(again.state_dir),
        )
    finally:
        stop_daemon(again)
        clear_leftovers(again, {job})
    assert leftovers == ([], set(), [])


def fork_server_of(daemon: Daemon) -> int:
    """The daemon's fork server: its child exec'd on netjail.kernel.forkserver."""
    for child in children(daemon.process.pid):
        with open(f"/proc/{child}/cmdline", "rb") as f:
            if b"netjail.kernel.forkserver" in f.read().split(b"\0"):
                return child
    raise AssertionError("no fork server among the daemon's children")


def test_a_killed_fork_server_fails_jobs_closed_says_so_and_is_replaced(chaos_base: str) -> None:
    """With its fork server SIGKILLed, the running job's client gets an error naming the fork
    server instead of a report, and no jail is left; the daemon logs it once, status says so,
    and a new fork server runs the jobs that follow."""
    daemon = start_daemon(chaos_base)
    try:
        client = Client(daemon.socket, timeout=10)
        outcome: list[BaseException] = []

        def run_sleeper() -> None:
            try:
                client.run(["sleep", "100"], cwd="/")
            except NetjailError as e:
                outcome.append(e)

        sleeper = threading.Thread(target=run_sleeper)
        sleeper.start()
        deadline = time.monotonic() + 10
        while not client.ps():
            assert time.monotonic() < deadline, daemon.log()
            time.sleep(0.02)
        (job,) = {j.job for j in client.ps()}
        killed = fork_server_of(daemon)
        os.kill(killed, signal.SIGKILL)
        sleeper.join(15)
        assert [str(e) for e in outcome] == [
            f"job {job} failed: the fork server was killed by SIGKILL, and with it the job's "
            "exit status"
        ]
        while (status := client.status()).fork_server != "up":
            assert time.monotonic() < deadline + 10, daemon.log()
            time.sleep(0.02)
        assert (status.fork_server_restarts, status.fork_server_last_exit) == (
            1,
            "was killed by SIGKILL",
        )
        assert fork_server_of(daemon) != killed
        for _ in range(2):
            assert client.run(["true"], cwd="/").exit_code == 0
        while client.ps():
            assert time.monotonic() < deadline + 20, daemon.log()
            time.sleep(0.02)
        jobs = daemon.job_ids() | recorded_jobs(daemon) | {job}
        # The pool's warm jails go too, once their standbys' ends are seen (a rebuild that
        # fails at its prefork undoes itself).
        deadline = time.monotonic() + 5
        while {n.removeprefix("netjail-") for n in netjail_netns()} & jobs:
            assert time.monotonic() < deadline, daemon.log()
            time.sleep(0.02)
            jobs |= recorded_jobs(daemon)
        assert processes_of_jobs(jobs) == []
        assert daemon.log().count("the fork server was killed by SIGKILL; the jobs in flight") == 1
    finally:
        stop_daemon(daemon)
    assert daemon.process.returncode == 0, daemon.log()
