"""Running netjaild for real: self-test, graceful stop, reload, crash recovery, containers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest

from netjail import Client, JobResult
from netjail.mountinfo import parse_mounts

from .conftest import (
    NO_POOL,
    STARTED,
    Daemon,
    home_mounts,
    jail_table,
    launch_daemon,
    netjail_job_cgroups,
    netjail_netns,
    processes_of_jobs,
    start_daemon,
    state_leftovers,
    state_mounts,
    stop_daemon,
)


@pytest.fixture
def own_base() -> Iterator[str]:
    base = tempfile.mkdtemp(prefix="netjail-test-ops-", dir="/run")
    os.chmod(base, 0o755)  # noqa: S103 - clients must reach the socket's directory
    yield base
    here = [d for d in STARTED if d.state_dir.startswith(base + "/")]
    for d in here:
        # Stopped if a failed test left it running; either way its jobs and state leftovers
        # are noted before the directory goes.
        stop_daemon(d)
    shutil.rmtree(base, ignore_errors=True)
    # Checked here, not only at the suite's end, so that a leak fails the test that made it:
    # every daemon on this base stopped (or was killed and its leftovers then removed by the
    # next start), and nothing of any of their jobs is left.
    jobs = set().union(*(d.job_ids() for d in here))
    assert {n.removeprefix("netjail-") for n in netjail_netns()} & jobs == set()
    assert [c for c in netjail_job_cgroups() if os.path.basename(c) in jobs] == []
    assert processes_of_jobs(jobs) == []
    if here:
        assert here[-1].leftovers == []  # no HOME, no uid lease


def wait_for(predicate: object, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def test_self_test_passes_before_the_daemon_is_ready(daemon: Daemon) -> None:
    """The probe job's attempts were rejected and reported before `ready` was logged."""
    log = daemon.log()
    assert "self-test passed" in log
    assert log.index("self-test passed") < log.index("netjaild ready")


def test_sigterm_ends_jobs_tells_clients_and_exits_cleanly(own_base: str) -> None:
    """On SIGTERM: running jobs are ended and reported, followers told, nothing left, exit 0."""
    d = start_daemon(own_base)
    client = Client(d.socket, timeout=10)
    results: list[JobResult] = []

    def run() -> None:
        results.append(client.run(["sleep", "100"], cwd="/"))

    runner = threading.Thread(target=run)
    runner.start()
    wait_for(client.ps)
    follower = socket.socket(socket.AF_UNIX)
    follower.connect(d.socket)
    follower.sendall(b'{"op":"hello","version":1}\n{"op":"events","follow":true}\n')
    time.sleep(0.2)
    jobs = d.job_ids()
    d.process.send_signal(signal.SIGTERM)
    d.process.wait(30)
    runner.join(30)
    assert d.process.returncode == 0, d.log()
    assert results[0].signal == signal.SIGTERM
    received = b""
    follower.settimeout(10)
    while chunk := follower.recv(65536):
        received += chunk
    follower.close()
    last = json.loads(received.splitlines()[-1])
    assert last == {
        "op": "error",
        "code": "shutdown",
        "message": "netjaild is stopping",
        "exit_code": None,
    }
    assert processes_of_jobs(jobs) == []
    assert {n.removeprefix("netjail-") for n in netjail_netns()} & jobs == set()
    # No record left: the state's tmpfs is unmounted only when none is (statefs.release).
    assert state_mounts({d.state_dir}) == []
    assert state_leftovers(d.state_dir) == []
    assert not os.path.exists(d.socket)


def test_sighup_reloads_the_configuration_for_new_jobs(own_base: str) -> None:
    """After SIGHUP, new jobs get the new defaults; a bad file is refused and changes nothing."""
    d = start_daemon(own_base)
    try:
        client = Client(d.socket, timeout=10)
        # The documented default_pids (docs/CONFIG.md): a job that asks for none is capped.
        assert client.run(["true"], cwd="/").report.limits.pids == 4096  # type: ignore[union-attr]
        config = os.path.join(own_base, "netjaild.toml")
        with open(config, "a") as f:
            f.write("\n[limits]\ndefault_pids = 7\n")
        d.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in d.log())
        # --socket/--state-dir were given on the command line: that is no change to warn of.
        assert "need a restart" not in d.log()
        assert client.run(["true"], cwd="/").report.limits.pids == 7  # type: ignore[union-attr]
        with open(config, "a") as f:
            f.write("bogus_key = 1\n")
        d.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload failed" in d.log())
        assert "unknown key 'limits.bogus_key'" in d.log()
        assert client.run(["true"], cwd="/").report.limits.pids == 7  # type: ignore[union-attr]
    finally:
        stop_daemon(d)


def test_restart_after_a_crash_removes_every_leftover(own_base: str) -> None:
    """After a SIGKILL with jobs running, the next start removes their jails and serves again."""
    # Their jails: netns, cgroups, processes, HOME mounts and uid leases; the new daemon's log
    # says it removed each. No pool, so every leftover is a job's (the pool's are swept in
    # test_chaos.py).
    d = start_daemon(own_base, config_extra=NO_POOL)
    holders = []
    for _ in range(3):
        s = socket.socket(socket.AF_UNIX)
        s.connect(d.socket)
        s.sendall(b'{"op":"hello","version":1}\n{"op":"run","argv":["sleep","100"],"cwd":"/"}\n')
        holders.append(s)
    client = Client(d.socket, timeout=10)
    wait_for(lambda: len(client.ps()) == 3)
    jobs = {j.job for j in client.ps()}
    d.process.send_signal(signal.SIGKILL)
    d.process.wait(10)
    for s in holders:
        s.close()
    os.unlink(d.socket)  # a stale socket, as a crash leaves it
    homes = os.path.join(d.state_dir, "homes")
    leases = os.path.join(d.state_dir, "uids")
    try:
        # The crash left the jails behind, processes included: each job's init (PID 1 of its
        # PID namespace, in the job's cgroup) and its sleep.
        assert {n.removeprefix("netjail-") for n in netjail_netns()} >= jobs
        assert len(processes_of_jobs(jobs)) == 2 * 3
        # Each job's HOME, mounted, and its uid lease (a file "<uid>.<job>").
        assert sorted(home_mounts(homes)) == sorted(os.path.join(homes, j) for j in jobs)
        leased = {job: int(uid) for uid, _, job in (n.partition(".") for n in os.listdir(leases))}
        assert set(leased) == jobs
        assert all(uid in d.job_uids for uid in leased.values())
        # All of it on the daemon's own tmpfs (statefs), which outlives the daemon.
        assert state_mounts({d.state_dir}) == [os.path.realpath(d.state_dir)]
    finally:
        # Whatever failed above, the restart is what removes the crashed daemon's jails.
        again = start_daemon(own_base, config_extra=NO_POOL)
    try:
        removed = [
            line.partition("item=")[2].strip('"')
            for line in again.log().splitlines()
            if "removed a leftover of a previous run" in line
        ]
        assert sorted(removed) == sorted(
            item
            for job in jobs
            for item in (
                f"cgroup of {job}",
                f"netns netjail-{job}",
                f"home of {job}",
                f"uid {leased[job]} of {job}",
            )
        )
        assert processes_of_jobs(jobs) == []
        assert {n.removeprefix("netjail-") for n in netjail_netns()} & jobs == set()
        assert [c for c in netjail_job_cgroups() if os.path.basename(c) in jobs] == []
        # No HOME mount, no HOME directory, no uid lease is left.
        assert home_mounts(homes) == []
        assert state_leftovers(again.state_dir) == []
        result = Client(again.socket, timeout=10).run(
            ["sh", "-c", "echo alive"], stdio="capture", cwd="/"
        )
        assert result.stdout == b"alive\n"
        # The new daemon took the tmpfs as it found it: no second one stacked on it.
        assert _mounts_on(again.state_dir) == ["netjail-state"]
    finally:
        stop_daemon(again)
    # Stopped cleanly with nothing left in it: unmounted.
    assert state_mounts({again.state_dir}) == []


def _mounts_on(path: str) -> list[str]:
    """The sources of the mounts on ``path`` itself, in order."""
    with open("/proc/self/mountinfo") as f:
        return [m.source for m in parse_mounts(f.read()) if m.mount_point == os.path.realpath(path)]


def test_state_left_on_disk_is_recovered_there_and_the_next_start_moves_it_to_a_tmpfs(
    own_base: str,
) -> None:
    """A record on disk (a daemon that kept its state there crashed) is recovered from the
    disk, which no tmpfs hides for that run; a later start, with nothing left on the disk,
    puts the state on a tmpfs of the daemon's own, and a clean stop unmounts it."""
    state = os.path.join(own_base, "state")
    os.makedirs(os.path.join(state, "jobs"), mode=0o700)
    # A job recorded before anything of it was built: nothing else of it exists.
    job = "j-0badcafe"
    with open(os.path.join(state, "jobs", f"{job}.json"), "w") as f:
        json.dump({"job": job, "netns": f"netjail-{job}", "started": 0}, f)
    d = start_daemon(own_base, config_extra=NO_POOL)
    try:
        assert _mounts_on(state) == []
        assert "stays on disk for this run" in d.log()
        assert os.listdir(os.path.join(state, "jobs")) == []  # recovered, from the disk
        assert Client(d.socket, timeout=10).run(["true"], cwd="/").exit_code == 0
    finally:
        stop_daemon(d)
    again = start_daemon(own_base, config_extra=NO_POOL)
    try:
        assert _mounts_on(state) == ["netjail-state"]
        result = Client(again.socket, timeout=10).run(["sh", "-c", "echo ok"], stdio="capture")
        assert result.stdout == b"ok\n"
    finally:
        stop_daemon(again)
    assert _mounts_on(state) == []


def test_kmsg_backend_in_a_container_refuses_to_start_with_the_reason(own_base: str) -> None:
    """Outside the initial netns (a container), log_backend = "kmsg" cannot work: said at once."""
    config = os.path.join(own_base, "kmsg.toml")
    with open(config, "w") as f:
        f.write('log_backend = "kmsg"\n' + jail_table(own_base))
    os.chmod(config, 0o644)
    done = subprocess.run(
        [
            "unshare",
            "--net",
            "--",
            sys.executable,
            "-m",
            "netjail.daemon",
            "--config",
            config,
            "--socket",
            os.path.join(own_base, "sock", "netjail.sock"),
            "--state-dir",
            os.path.join(own_base, "state"),
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    message = done.stderr.decode().splitlines()[-1]
    assert message.startswith("netjaild: ")
    assert "nf_log_all_netns" in message
    assert "initial network namespace" in message


def test_check_config_reports_every_problem(own_base: str) -> None:
    """`netjaild --check-config PATH` lists each bad key and exits 1; a good file says OK."""
    bad = os.path.join(own_base, "bad.toml")
    with open(bad, "w") as f:
        f.write('log_format = "xml"\n[limits]\nmax_memry = "1G"\n')
    os.chmod(bad, 0o644)
    done = subprocess.run(
        [sys.executable, "-m", "netjail.daemon", "--check-config", bad],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr.decode().splitlines() == [
        f"{bad}: log_format: expected one of 'text', 'json', got 'xml'",
        f"{bad}: unknown key 'limits.max_memry' (did you mean 'limits.max_memory'?)",
    ]
    good = os.path.join(own_base, "good.toml")
    with open(good, "w") as f:
        f.write('[limits]\nmax_memory = "1G"\n')
    os.chmod(good, 0o644)
    ok = subprocess.run(
        [sys.executable, "-m", "netjail.daemon", "--check-config", good],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert (ok.returncode, ok.stdout.decode()) == (0, f"{good}: OK\n")


def test_a_second_daemon_on_the_same_socket_is_refused(daemon: Daemon, own_base: str) -> None:
    """Starting netjaild on a socket another one serves fails with a clear message."""
    config = os.path.join(own_base, "netjaild.toml")
    with open(config, "w") as f:
        f.write(jail_table(own_base))  # as every daemon of the suite: a uid block of its own
    os.chmod(config, 0o644)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "netjail.daemon",
            "--config",
            config,
            "--socket",
            daemon.socket,
            "--state-dir",
            os.path.join(own_base, "state"),
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert f"another netjaild is already serving {daemon.socket}" in done.stderr.decode()
    # The refused one took nothing over: the socket still leads to the daemon that served it.
    assert daemon.client().status().pid == daemon.process.pid


def test_socket_activation_and_readiness_notification(own_base: str) -> None:
    """Socket-activated, netjaild serves on fd 3, notifies READY after its self-test, STOPPING."""
    # Started as systemd would: the listening socket as fd 3, NOTIFY_SOCKET set. The socket file
    # is systemd's, so it is left in place at the stop.
    path = os.path.join(own_base, "sock", "netjail.sock")
    os.makedirs(os.path.dirname(path), mode=0o755)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    notify_path = os.path.join(own_base, "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(30)
    fd = listener.fileno()
    # Put it at fd 3 (unless it is there already: `3<&3 3<&-` would close it).
    move = "" if fd == 3 else f"exec 3<&{fd} {fd}<&-; "
    # As systemd does: the socket at fd 3, LISTEN_PID naming the daemon's own pid.
    d = launch_daemon(
        own_base,
        # bash: dash cannot redirect file descriptors above 9.
        prefix=["bash", "-c", move + 'LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"', "sh"],
        env={**os.environ, "NOTIFY_SOCKET": notify_path},
        pass_fds=[fd],
    )
    process, log_path = d.process, d.log_path
    listener.close()
    try:
        messages = []
        while not any(m.startswith(b"READY=1") for m in messages):
            messages.append(notify.recv(4096))
        with open(log_path) as f:
            assert "self-test passed" in f.read()  # READY came after the self-test
        assert any(m.startswith(b"STATUS=self-test") for m in messages)
        assert Client(path, timeout=10).status().jobs_running == 0
        process.send_signal(signal.SIGTERM)
        assert notify.recv(4096).startswith(b"STOPPING=1")
        process.wait(30)
        assert process.returncode == 0, d.log()
        assert os.path.exists(path)  # the socket is systemd's, not ours to remove
    finally:
        if process.poll() is None:
            process.kill()
        notify.close()


def test_sigterm_during_start_up_is_a_clean_stop(own_base: str) -> None:
    """SIGTERM during the self-test waits for it, then exits 0 with nothing of the probe left."""
    # Start-up is never cut in half: the probe's jail is torn down before the stop. The
    # signal goes when the daemon says the self-test starts (its sd_notify status), so it
    # lands while the probe's jail is built or runs, however loaded the machine is.
    notify_path = os.path.join(own_base, "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(30)
    d = launch_daemon(own_base, env={**os.environ, "NOTIFY_SOCKET": notify_path})
    process = d.process
    try:
        while not notify.recv(4096).startswith(b"STATUS=self-test"):
            pass
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, d.log()
        assert "netjaild ready" not in d.log()
        assert "netjaild stopped" in d.log()
        jobs = d.job_ids()
        assert jobs  # the probe ran
        assert processes_of_jobs(jobs) == []
        assert {n.removeprefix("netjail-") for n in netjail_netns()} & jobs == set()
        assert state_mounts({d.state_dir}) == []  # unmounted: no record was left in it
        assert state_leftovers(d.state_dir) == []
    finally:
        if process.poll() is None:
            process.kill()
        notify.close()
