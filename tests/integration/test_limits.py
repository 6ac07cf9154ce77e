"""Resource limits on the real kernel: memory, pids, cpu, timeouts and whole-tree kill."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from netjail import Client, JobResult

from .conftest import Daemon, processes_at_report, processes_of_jobs

pytestmark = pytest.mark.usefixtures("no_leaks")

PY = "/usr/bin/python3"
NETJAIL = [sys.executable, "-m", "netjail.cli"]


def job_processes(job: str) -> list[str]:
    """Processes left in a finished job's cgroup when its report came (there must be none but
    its ending init)."""
    return processes_at_report({job})


def kernel_has_pids_peak() -> bool:
    """Whether the pids cgroups that jobs are made in (``.../netjail``) have pids.peak."""
    parents = [
        root
        for root, _dirs, files in os.walk("/sys/fs/cgroup")
        if os.path.basename(root) == "netjail" and "pids.max" in files
    ]
    assert parents, "no netjail pids cgroup found: the check would prove nothing"
    return any(os.path.exists(os.path.join(parent, "pids.peak")) for parent in parents)


def test_memory_hog_is_oom_killed_and_reported(client: Client) -> None:
    """A job allocating past --memory is killed by the kernel and the report says so."""
    code = "x = []\nwhile True:\n    x.append(bytearray(16 << 20))\n"
    result = client.run([PY, "-c", code], memory_bytes=64 << 20, cwd="/")
    assert result.signal == 9
    assert result.oom_killed is True
    assert result.report.limits is not None
    assert result.report.limits.memory_bytes == 64 << 20
    assert result.report.memory_peak_bytes is not None
    assert result.report.memory_peak_bytes <= 64 << 20


def test_cli_says_which_limit_killed_the_job(daemon: Daemon) -> None:
    """The CLI exits 137 and names the memory limit that was reached."""
    done = subprocess.run(
        [
            *NETJAIL,
            "--socket",
            daemon.socket,
            "run",
            "--memory",
            "64M",
            "--cwd",
            "/",
            "--",
            PY,
            "-c",
            "x = bytearray(512 << 20); x[::4096] = b'x' * len(x[::4096])",
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 137
    assert done.stderr.decode().endswith("killed: memory limit 64M reached\n")


def test_fork_bomb_hits_the_pids_limit_and_the_host_stays_fine(client: Client) -> None:
    """A fork bomb under --pids 32 gets 30 children (32 tasks), the rest refused; nothing leaks."""
    # The 32 tasks of the job's cgroup: its init (PID 1 of the job's PID namespace, which joins
    # the cgroup before it spawns anything), this Python, and 30 children.
    code = (
        "import os, time\n"
        "children = refused = 0\n"
        "for _ in range(500):\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(1000)\n"
        "            os._exit(0)\n"
        "        children += 1\n"
        "    except BlockingIOError:\n"
        "        refused += 1\n"
        "print(children, refused)\n"
    )
    result = client.run([PY, "-c", code], pids=32, stdio="capture", cwd="/")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == b"30 470\n"
    # pids.peak is read where the kernel has it; None is right only where it has not.
    assert result.report.pids_peak == (32 if kernel_has_pids_peak() else None)
    # The host still forks happily, and the 30 sleepers died with the job.
    assert subprocess.run(["true"], check=False).returncode == 0
    assert job_processes(result.job) == []


def test_cpu_quota_limits_a_spinner_to_about_a_fifth(client: Client) -> None:
    """Under --cpus 0.2 a busy loop for 2 s of wall time gets roughly 0.4 s of CPU (loose bound)."""
    result = client.run(
        [PY, "-c", "while True: pass"], cpus=0.2, timeout_s=2, kill_grace_s=0, cwd="/"
    )
    assert result.timed_out is True
    assert result.report.cpu_user_s is not None
    assert result.report.cpu_system_s is not None
    used = result.report.cpu_user_s + result.report.cpu_system_s
    assert 0.1 < used < 1.0, used


def test_timeout_kills_the_job_and_its_orphans(daemon: Daemon, tmp_path: Path) -> None:
    """`sleep 1000` with --timeout 1s ends with exit 124, its background children gone too."""
    report = tmp_path / "report.json"
    done = subprocess.run(
        [
            *NETJAIL,
            "--socket",
            daemon.socket,
            "run",
            "--report",
            str(report),
            "--timeout",
            "1s",
            "--kill-grace",
            "0.5s",
            "--cwd",
            "/",
            "--",
            "sh",
            "-c",
            "(sleep 1001 &); nohup sleep 1002 >/dev/null 2>&1 & sleep 1000",
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 124
    assert done.stderr.decode().endswith("killed: timeout 1s reached\n")
    job = json.loads(report.read_text())["job"]
    assert job_processes(job) == []


def test_job_that_double_forks_a_daemon_leaves_nothing_running(client: Client) -> None:
    """A job that double-forks and setsids a long sleeper, then exits: the sleeper is killed."""
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(1000)\n"
        "    os._exit(0)\n"
        "os.wait()\n"
        "print('parent done')\n"
    )
    result = client.run([PY, "-c", code], stdio="capture", cwd="/")
    assert result.exit_code == 0
    assert result.stdout == b"parent done\n"
    assert job_processes(result.job) == []
    deadline = time.monotonic() + 10
    while client.ps():  # unlisted once its teardown is done: then not even its init is left
        assert time.monotonic() < deadline, client.ps()
        time.sleep(0.02)
    assert processes_of_jobs({result.job}) == []


def test_sigterm_ignoring_job_is_killed_after_the_grace(client: Client) -> None:
    """A job that ignores SIGTERM on timeout is SIGKILLed after --kill-grace."""
    code = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(1000)\n"
    result = client.run([PY, "-c", code], timeout_s=0.5, kill_grace_s=0.3, cwd="/")
    assert result.timed_out is True
    assert result.signal == 9


def test_report_has_resource_usage_and_limits(client: Client) -> None:
    """The report carries cpu, memory and pids figures and the limits that applied."""
    result = client.run(
        ["sh", "-c", "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done"],
        memory_bytes=256 << 20,
        pids=64,
        cwd="/",
    )
    report = result.report
    assert report.exit_code == 0
    assert report.cpu_user_s is not None
    assert report.cpu_user_s > 0
    assert report.memory_peak_bytes is not None
    assert report.memory_peak_bytes > 0
    assert report.limits is not None
    assert (report.limits.memory_bytes, report.limits.pids, report.limits.kill_grace_s) == (
        256 << 20,
        64,
        2.0,
    )


def test_bad_limit_values_are_clear_usage_errors(daemon: Daemon) -> None:
    """`--memory 12Q` is refused with what is accepted."""
    done = subprocess.run(
        [*NETJAIL, "--socket", daemon.socket, "run", "--memory", "12Q", "--", "true"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert b"invalid size '12Q': use a number with an optional K, M, G or T suffix" in done.stderr


def _job_cgroup(pid: int, job: str) -> str | None:
    """A cgroup directory of job ``job``'s process ``pid``: its memory one (cgroup v1), or
    its cgroup2 one."""
    with open(f"/proc/{pid}/cgroup") as f:
        lines = [line.rstrip("\n").split(":", 2) for line in f]
    roots = {"memory": "/sys/fs/cgroup/memory", "": "/sys/fs/cgroup"}
    if not os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        roots[""] = "/sys/fs/cgroup/unified"
    for _, controllers, path in lines:
        for name in controllers.split(","):
            if name in roots and os.path.basename(path) == job:
                return roots[name] + path
    return None


def _wait_for(check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_job_cgroup_still_busy_at_teardown_is_removed_once_it_can_be(
    client: Client, daemon: Daemon, tmp_path: Path
) -> None:
    """A cgroup made below the job's, with a directory mounted on it, cannot be removed
    (EBUSY) and holds no process. So the job ends and is killed as usual, but its teardown
    cannot remove its cgroup. The daemon keeps trying in the background, with the uid still
    leased; once the mount is gone, the cgroup goes, and then the lease."""
    started: list[tuple[str, int]] = []
    results: list[JobResult] = []
    runner = threading.Thread(
        target=lambda: results.append(
            client.run(
                ["/bin/sleep", "0.5"],
                stdio="capture",
                on_start=lambda job, pid: started.append((job, pid)),
            )
        )
    )
    runner.start()
    _wait_for(lambda: bool(started) or not runner.is_alive(), "the job to start")
    assert started, "the job did not start"
    job, pid = started[0]
    cgroup = _job_cgroup(pid, job)
    assert cgroup is not None, Path(f"/proc/{pid}/cgroup").read_text()
    busy = os.path.join(cgroup, "busy")
    os.mkdir(busy)
    subprocess.run(["mount", "--bind", str(tmp_path), busy], check=True)
    leases = os.path.join(daemon.state_dir, "uids")
    try:
        runner.join(30)
        assert [r.exit_code for r in results] == [0]
        retrying = "cannot remove a job's cgroup yet; retrying in the background"
        _wait_for(
            lambda: any(retrying in line and job in line for line in daemon.log().splitlines()),
            "the teardown to hand the cgroup to the background",
        )
        assert os.path.isdir(cgroup)
        assert [n for n in os.listdir(leases) if n.endswith(f".{job}")], "the uid was released"
    finally:
        subprocess.run(["umount", busy], check=True)
    _wait_for(lambda: not os.path.exists(cgroup), "the cgroup to be removed")
    late = [line for line in daemon.log().splitlines() if "removed a job's cgroup late" in line]
    assert [line for line in late if job in line]
    _wait_for(
        lambda: not [n for n in os.listdir(leases) if n.endswith(f".{job}")], "the lease to go"
    )
