"""The deep jail's file system and limits end to end: binds, cwd, common tools, /tmp and pids."""

from __future__ import annotations

import ipaddress
import os
import pwd
import shutil
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from netjail import Client
from netjail.kernel.fsplan import JOB_HOME
from netjail.protocol import BindMount

from .conftest import Daemon, processes_at_report, processes_of_jobs
from .jailtools import OUTCOME, PY, cli_run, cwd_note, run_as_user, text
from .test_limits import kernel_has_pids_peak

pytestmark = pytest.mark.usefixtures("no_leaks")

#: The shipped `[limits] default_pids` and `[jail] tmp_size` (docs/CONFIG.md).
DEFAULT_PIDS = 4096
TMP_SIZE = 256 << 20


@pytest.mark.parametrize("parent", ["/tmp", "/var/tmp", "/run", "/dev/shm", "/var/lib"])
def test_cli_runs_from_any_host_directory(daemon: Daemon, parent: str) -> None:
    """From a host directory the jail does not show, `netjail run` starts in HOME with a note."""
    # Below /tmp, /var/tmp, /run and /dev/shm the job has mounts of its own: empty ones.
    cwd = tempfile.mkdtemp(prefix="netjail-test-cwd-", dir=parent)
    try:
        done = cli_run(daemon, cwd, "--", "pwd")
    finally:
        os.rmdir(cwd)
    assert (done.returncode, done.stdout, done.stderr) == (
        0,
        f"{JOB_HOME}\n".encode(),
        f"{cwd_note(cwd)}\n".encode(),
    )


def test_non_root_client_cannot_bind_root_or_another_users_file(
    daemon: Daemon, test_user: pwd.struct_passwd
) -> None:
    """Binding /root or another user's 0600 file is refused with the daemon's exact message."""
    base = tempfile.mkdtemp(prefix="netjail-test-binds-", dir="/run")
    try:
        os.chmod(base, 0o755)  # noqa: S103 - the test user must reach the files in it
        theirs, own = f"{base}/theirs", f"{base}/own"
        for path, owner in ((theirs, 65534), (own, test_user.pw_uid)):
            Path(path).write_text("secret\n")
            os.chmod(path, 0o600)
            os.chown(path, owner, owner)
        results = run_as_user(
            daemon,
            test_user,
            {"argv": ["true"], "binds": [{"source": "/root", "access": "rw"}]},
            {"argv": ["true"], "binds": [{"source": "/root", "target": "/r", "access": "ro"}]},
            {"argv": ["true"], "binds": [{"source": theirs, "target": "/f", "access": "ro"}]},
            {"argv": ["cat", "/f"], "binds": [{"source": own, "target": "/f", "access": "ro"}]},
        )
    finally:
        shutil.rmtree(base)
    denied = [
        f"--bind /root: permission denied for uid {test_user.pw_uid}",
        f"--ro-bind /root: permission denied for uid {test_user.pw_uid}",
        f"--ro-bind {theirs}: permission denied for uid {test_user.pw_uid}",
    ]
    # BindSourceError on the daemon's side, wire code "request": a RequestError for the client.
    assert results[:3] == [
        {"error": "RequestError", "code": "request", "message": m} for m in denied
    ]
    assert results[3] == {"exit": 0, "uid": test_user.pw_uid, "out": "secret\n", "err": ""}


def test_bind_is_read_write_and_ro_bind_read_only(client: Client, tmp_path: Path) -> None:
    """--bind writes reach the host (as the job's uid); a write under --ro-bind is EROFS."""
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    for d in (rw, ro):
        d.mkdir()
        os.chmod(d, 0o777)  # noqa: S103 - the job's leased uid writes here
    (ro / "in").write_text("given\n")
    code = OUTCOME + textwrap.dedent(
        """
        open("/mnt/rw/out", "w").write("written\\n")
        print(open("/mnt/ro/in").read(), end="")
        print(outcome(open, "/mnt/ro/out", "w"))
        """
    )
    result = client.run(
        [PY, "-c", code],
        binds=[
            BindMount(source=str(rw), target="/mnt/rw", access="rw"),
            BindMount(source=str(ro), target="/mnt/ro", access="ro"),
        ],
        stdio="capture",
    )
    assert (result.exit_code, result.stdout) == (0, b"given\nEROFS\n"), result.stderr
    assert (rw / "out").read_text() == "written\n"
    assert (rw / "out").stat().st_uid == result.report.uid  # the leased uid owns it
    assert sorted(os.listdir(ro)) == ["in"]


def test_common_tools_keep_working(client: Client) -> None:
    """python3, node, npm, pip, bash and git run, with their caches in the job's HOME."""
    missing = [t for t in ("node", "npm") if shutil.which(t) is None]
    pip = subprocess.run([PY, "-m", "pip", "--version"], capture_output=True, check=False)
    if missing or pip.returncode:
        pytest.skip(f"not installed on this host: {missing or ['python3-pip']}")
    script = textwrap.dedent(
        """
        set -e
        /usr/bin/python3 -c 'print("python", 6 * 7)'
        node -e 'console.log("node", 6 * 7)'
        npm config get cache
        /usr/bin/python3 -m pip --version | cut -d' ' -f1,4-
        /usr/bin/python3 -m pip cache dir
        bash -c 'echo bash $((6 * 7))'
        cd ~ && git init -q repo && git -C repo rev-parse --absolute-git-dir
        """
    )
    result = client.run(["bash", "-c", script], stdio="capture", timeout_s=60)
    assert text(result).splitlines() == [
        "python 42",
        "node 42",
        f"{JOB_HOME}/.npm",
        "pip /usr/lib/python3/dist-packages/pip (python 3.11)",
        f"{JOB_HOME}/.cache/pip",
        "bash 42",
        f"{JOB_HOME}/repo/.git",
    ], result.stderr
    assert result.exit_code == 0


def test_curl_and_ping_are_refused_and_reported(client: Client) -> None:
    """curl (exit 7) and ping (its ping socket) to a blocked address fail, each with one event."""
    curl = client.run(["curl", "-sS", "http://203.0.113.9/"], stdio="capture")
    ping = client.run(["ping", "-c1", "-W2", "203.0.113.9"], stdio="capture")
    assert curl.exit_code == 7
    assert ping.exit_code == 1
    assert ping.stderr == b"ping: sendmsg: Operation not permitted\n"
    events = [(e.verdict, e.proto, e.dst, e.port, e.uid) for e in curl.events + ping.events]
    assert events == [
        ("blocked", "tcp", "203.0.113.9", 80, curl.report.uid),
        ("blocked", "icmp", "203.0.113.9", None, ping.report.uid),
    ]


def test_fork_bomb_without_options_stops_at_the_shipped_pids_limit(client: Client) -> None:
    """A job that forks until refused gets EAGAIN at 4096 tasks, far below pid_max; all die."""
    code = OUTCOME + textwrap.dedent(
        """
        import time
        children = []
        def bomb():
            while True:
                if os.fork() == 0:
                    time.sleep(1000)
                children.append(1)
        refused = outcome(bomb)
        print(len(children), refused)
        """
    )
    result = client.run([PY, "-c", code], stdio="capture", timeout_s=60)
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    # The init and the command count as two of the 4096.
    assert (result.exit_code, text(result)) == (0, f"{DEFAULT_PIDS - 2} EAGAIN\n")
    assert result.report.limits is not None
    assert result.report.limits.pids == DEFAULT_PIDS < pid_max // 4
    assert result.report.pids_peak == (DEFAULT_PIDS if kernel_has_pids_peak() else None)
    assert processes_at_report({result.job}) == []
    deadline = time.monotonic() + 10
    while client.ps():  # unlisted once its teardown is done: then not even its init is left
        assert time.monotonic() < deadline, client.ps()
        time.sleep(0.02)
    assert processes_of_jobs({result.job}) == []


def shmem_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Shmem:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no Shmem line in /proc/meminfo")


def test_filling_tmp_gets_enospc_and_the_space_is_freed(client: Client) -> None:
    """/tmp fills at the shipped 256 MiB (ENOSPC), charged to the job; the host gets it back."""
    code = OUTCOME + textwrap.dedent(
        """
        def fill():
            with open("/tmp/fill", "wb", buffering=0) as f:
                while True:
                    f.write(bytes(1 << 20))
        print(outcome(fill), os.stat("/tmp/fill").st_size)
        """
    )
    before = shmem_bytes()
    result = client.run([PY, "-c", code], stdio="capture")
    assert (result.exit_code, text(result)) == (0, f"ENOSPC {TMP_SIZE}\n"), result.stderr
    assert result.report.memory_peak_bytes is not None
    assert result.report.memory_peak_bytes >= TMP_SIZE
    deadline = time.monotonic() + 10
    while client.ps() or shmem_bytes() - before > TMP_SIZE // 4:
        assert time.monotonic() < deadline, f"still {shmem_bytes() - before} bytes more shmem"
        time.sleep(0.05)


def test_the_job_resolves_its_own_hostname_without_asking_the_stub(client: Client) -> None:
    """/etc/hostname and /etc/hosts name the job's host name, so resolving it is no event."""
    resolve = "import socket; print(socket.gethostbyname(socket.gethostname()))"
    shell = f"hostname; cat /etc/hostname; getent hosts $(hostname); {PY} -c '{resolve}'"
    default = client.run(["sh", "-c", shell], stdio="capture")
    name = f"netjail-{default.job}"
    *lines, address = text(default).splitlines()
    assert lines == [
        name,
        name,
        f"::1             localhost ip6-localhost ip6-loopback {name}",
    ], default.stderr
    assert ipaddress.ip_address(address).is_loopback  # glibc may give 127.0.0.1 for the ::1 line
    named = client.run(["cat", "/etc/hostname"], stdio="capture", hostname="build-box")
    assert text(named) == "build-box\n"
    assert default.events == named.events == []
