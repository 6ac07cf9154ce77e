"""`netjail doctor` on this machine, against a real netjaild, as root and as a netjail user.

Also the devcontainer's situation: a netjaild whose own network namespace is not the initial
one (as inside a container) still gets NFLOG events from its jails, and doctor run there says
that only the kmsg log backend is affected.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from netjail import Client
from netjail.cli import doctor

from .conftest import Daemon, launch_daemon, stop_daemon, wait_until_ready

KERNEL_CHECKS = ("netns", "nf_tables", "nfnetlink_log", "ifb")
#: What the rest of the deep jail needs, all ok on this machine.
DEEP_JAIL_CHECKS = (
    "pidns",
    "ipcns",
    "utsns",
    "seccomp",
    "mount API",
    "pivot_root",
    "libseccomp",
)
START_FIX = "  fix: start netjaild: sudo netjaild & (with systemd: sudo systemctl start netjaild)"
# Runs doctor as a script, for other users and other namespaces than the test's own.
DOCTOR = (
    "import sys; from netjail.cli import doctor;"
    " doctor.main(['--json'], obj={'socket': sys.argv[1]})"
)


def run_doctor(socket_path: str, *args: str) -> tuple[int, list[str]]:
    result = CliRunner().invoke(doctor, list(args), obj={"socket": socket_path})
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, result.output.splitlines()


def by_check(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {entry["check"]: entry for entry in entries}


def doctor_json(prefix: list[str], socket_path: str) -> tuple[int, dict[str, dict[str, Any]]]:
    """Doctor's JSON, run in a subprocess started through *prefix* (setpriv, nsenter)."""
    done = subprocess.run(
        [*prefix, sys.executable, "-c", DOCTOR, socket_path],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd="/",
    )
    assert done.stderr == ""
    return done.returncode, by_check(json.loads(done.stdout))


def test_doctor_finds_everything_in_order_with_the_daemon_running(daemon: Daemon) -> None:
    """Against the running daemon: exit 0, the kernel checks and the daemon check are ok."""
    code, lines = run_doctor(daemon.socket)
    assert code == 0, lines
    for check in KERNEL_CHECKS:
        assert any(line.startswith(f"ok    {check}: ") for line in lines), lines
    status = daemon.client().status()
    assert f"ok    daemon: netjaild {status.version} (pid {status.pid}) answers on" in "\n".join(
        lines
    )
    assert any(
        line.startswith(f"ok    socket: {daemon.socket} (srw-rw---- root:")
        and line.endswith("you may connect (root)")
        for line in lines
    ), lines
    assert "ok    libnftables: libnftables.so.1 found" in lines
    for check in DEEP_JAIL_CHECKS:
        assert any(line.startswith(f"ok    {check}: ") for line in lines), lines
    assert not any(line.startswith("FAIL") for line in lines)


def test_doctor_json_has_every_check(daemon: Daemon) -> None:
    """--json lists every check with its status, detail and fix."""
    code, lines = run_doctor(daemon.socket, "--json")
    entries = json.loads("\n".join(lines))
    assert code == 0
    assert [e["check"] for e in entries][:4] == list(KERNEL_CHECKS)
    assert all(set(e) == {"check", "status", "detail", "fix"} for e in entries)
    assert by_check(entries)["daemon"]["status"] == "ok"


def test_doctor_without_a_daemon_fails_with_how_to_start_it(tmp_path: Path) -> None:
    """No socket: exit 1, the daemon FAIL line and the fix that starts netjaild."""
    missing = str(tmp_path / "netjail.sock")
    code, lines = run_doctor(missing)
    assert code == 1
    fail = [line for line in lines if line.startswith("FAIL")]
    assert fail == [
        f"FAIL  daemon: cannot connect to {missing}: No such file or directory"
        " (is netjaild running?)"
    ]
    assert lines[lines.index(fail[0]) + 1] == START_FIX
    assert f"warn  socket: {missing} does not exist (netjaild is not running, or listens" in (
        "\n".join(lines)
    )


def test_doctor_as_a_member_of_the_netjail_group(
    daemon: Daemon, test_user: pwd.struct_passwd
) -> None:
    """An unprivileged user in group netjail: the socket and daemon are ok through the group."""
    as_user = [
        "setpriv",
        f"--reuid={test_user.pw_uid}",
        f"--regid={test_user.pw_gid}",
        "--init-groups",
    ]
    code, checks = doctor_json(as_user, daemon.socket)
    assert code == 0, checks
    assert checks["socket"]["status"] == "ok"
    assert checks["socket"]["detail"].endswith("you may connect (group netjail)")
    assert checks["daemon"]["status"] == "ok"
    assert checks["capabilities"]["detail"].startswith("not root (the client needs none)")
    for check in KERNEL_CHECKS + DEEP_JAIL_CHECKS:
        assert checks[check]["status"] == "ok", checks[check]


def test_doctor_as_a_user_outside_the_group_is_told_to_join_it(daemon: Daemon) -> None:
    """nobody (not in group netjail): the daemon FAILs with the usermod fix."""
    nobody = pwd.getpwnam("nobody")
    as_nobody = [
        "setpriv",
        f"--reuid={nobody.pw_uid}",
        f"--regid={nobody.pw_gid}",
        "--clear-groups",
    ]
    code, checks = doctor_json(as_nobody, daemon.socket)
    assert code == 1
    assert checks["daemon"]["status"] == "FAIL"
    assert "Permission denied" in checks["daemon"]["detail"]
    assert checks["daemon"]["fix"] == (
        "add yourself to the netjail group: sudo usermod -aG netjail $USER, then log in again"
    )
    assert checks["socket"]["status"] == "warn"


# --------------------------------------------------------------------------------------------
# As in a container: netjaild in a network namespace that is not the initial one


@pytest.fixture(scope="module")
def contained_daemon() -> Iterator[Daemon]:
    """A netjaild started in a fresh network namespace of its own, as a container's would be."""
    base = tempfile.mkdtemp(prefix="netjail-test-netns-", dir="/run")
    os.chmod(base, 0o755)  # noqa: S103 - the socket's directory must be reachable
    # unshare execs netjaild (no --fork), so the process is the daemon itself.
    daemon = launch_daemon(base, prefix=["unshare", "--net", "--"])
    wait_until_ready(daemon)
    yield daemon
    stop_daemon(daemon)
    daemon.job_ids()  # read before the log goes with the directory
    assert daemon.process.returncode == 0, daemon.log()
    shutil.rmtree(base, ignore_errors=True)


def test_contained_daemon_is_not_in_the_initial_netns(contained_daemon: Daemon) -> None:
    """The fixture really puts netjaild in another network namespace than the test's."""
    pid = contained_daemon.process.pid
    assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")


def test_nflog_events_arrive_from_a_daemon_outside_the_initial_netns(
    contained_daemon: Daemon,
) -> None:
    """NFLOG is per network namespace: a contained netjaild still blocks and reports."""
    client = Client(contained_daemon.socket, timeout=10)
    result = client.run(
        [
            "/usr/bin/python3",
            "-c",
            "import socket; socket.create_connection(('203.0.113.9', 443), timeout=5)",
        ],
        stdio="capture",
        cwd="/",
        on_event=lambda _event: None,
    )
    assert result.exit_code == 1
    assert b"ConnectionRefusedError" in (result.stderr or b"")
    egress = [(e.verdict, e.proto, e.dst, e.port, e.via) for e in result.events]
    assert ("blocked", "tcp", "203.0.113.9", 443, "nflog") in egress


def test_doctor_in_the_contained_daemons_netns_explains_the_kmsg_limit(
    contained_daemon: Daemon,
) -> None:
    """Doctor run where that netjaild runs: not the initial netns, kmsg up to the host, exit 0."""
    enter = ["nsenter", f"--net=/proc/{contained_daemon.process.pid}/ns/net"]
    code, checks = doctor_json(enter, contained_daemon.socket)
    assert code == 0, checks
    assert checks["initial netns"] == {
        "check": "initial netns",
        "status": "warn",
        "detail": "no: a container or another network namespace; jails and NFLOG events work"
        ' here, log_backend = "kmsg" only if the host allows it',
        "fix": 'nothing for log_backend = "nflog" (the default); for "kmsg", see nf_log_all_netns',
    }
    assert checks["nf_log_all_netns"]["status"] == "warn"
    assert checks["nf_log_all_netns"]["detail"].startswith(
        "absent: only the initial network namespace has it"
    )
    assert checks["daemon"]["status"] == "ok"


# --------------------------------------------------------------------------------------------
# The initial network namespace, told apart on the real kernel

HOSTNS = (
    "import dataclasses, json; from netjail import hostns;"
    " e = hostns.probe_netns_evidence();"
    " print(json.dumps([hostns.detect_initial_netns(e), e.nf_log_sysctls,"
    " hostns.detect_initial_netns(dataclasses.replace(e, kernel_release=''))]))"
)


def hostns_answers(prefix: list[str]) -> list[object]:
    """[detect, nf_log_sysctls, detect as if before 6.18] in a process started via *prefix*."""
    done = subprocess.run(
        [*prefix, sys.executable, "-c", HOSTNS],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd="/",
    )
    answers: list[object] = json.loads(done.stdout)
    return answers


def test_hostns_in_the_initial_netns() -> None:
    """The test's own netns is the initial one, by every rule."""
    assert hostns_answers([]) == [True, "all_netns", True]


def test_hostns_in_a_fresh_netns() -> None:
    """A netns of its own: no nf_log_all_netns, so not the initial one, by every rule."""
    assert hostns_answers(["unshare", "--net", "--"]) == [False, "per_netns_only", False]


def test_hostns_in_a_pid_namespace_of_its_own() -> None:
    """A PID namespace with its own /proc (PID 1 is not init) does not hide the initial netns."""
    prefix = ["unshare", "--pid", "--fork", "--mount-proc", "--"]
    assert hostns_answers(prefix) == [True, "all_netns", True]


def test_doctor_in_pid_and_mount_namespaces_of_its_own(daemon: Daemon) -> None:
    """Doctor as a jail-like process sees (own PID, mount, IPC, UTS namespaces): all ok still."""
    prefix = ["unshare", "--pid", "--fork", "--mount-proc", "--ipc", "--uts", "--"]
    code, checks = doctor_json(prefix, daemon.socket)
    assert code == 0, checks
    for check in (*KERNEL_CHECKS, *DEEP_JAIL_CHECKS, "initial netns", "daemon"):
        assert checks[check]["status"] == "ok", checks[check]
