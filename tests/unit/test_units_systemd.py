"""Tests for the systemd units, the sysusers.d/tmpfiles.d snippets and scripts/install.

``systemd-analyze verify`` (Debian package ``systemd``; it works without systemd as PID 1) checks
the units as systemd would load them. It refuses a unit whose ExecStart= binary does not exist,
and /usr/local/bin/netjaild exists only after scripts/install, so the test verifies copies of
both units in a temporary directory whose ExecStart= points at a stub executable there; every
other line is verified as shipped.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from netjail.daemon.config import DEFAULT_SOCKET, Config

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "systemd"
SERVICE = SYSTEMD / "netjaild.service"
SOCKET = SYSTEMD / "netjaild.socket"
INSTALL = ROOT / "scripts" / "install"

Unit = dict[str, dict[str, list[str]]]


def parse_unit(path: Path) -> Unit:
    """Sections -> key -> every value assigned, in order (systemd keys may repeat)."""
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = unit.setdefault(line.strip("[]"), {})
            continue
        assert section is not None, f"{path.name}: assignment before any section: {line}"
        assert not line.endswith("\\"), "keep unit lines unbroken so this parser stays exact"
        key, _, value = line.partition("=")
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


def one(unit: Unit, section: str, key: str) -> str:
    """The single value of ``key`` in ``section``."""
    (value,) = unit[section][key]
    return value


# --- systemd-analyze verify --------------------------------------------------------------------


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd-analyze verify accepts both units without a warning."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not found: apt-get install systemd")
    stub = tmp_path / "netjaild"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    service = SERVICE.read_text()
    assert service.count("ExecStart=/usr/local/bin/netjaild\n") == 1
    (tmp_path / SERVICE.name).write_text(
        service.replace("ExecStart=/usr/local/bin/netjaild\n", f"ExecStart={stub}\n")
    )
    shutil.copy(SOCKET, tmp_path / SOCKET.name)
    result = subprocess.run(
        [analyze, "verify", str(tmp_path / SERVICE.name), str(tmp_path / SOCKET.name)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, output
    # Unknown keys and unparsable values are only warnings to systemd: fail on any about us.
    ours = [line for line in output.splitlines() if "netjaild." in line]
    assert ours == []


# --- netjaild.service --------------------------------------------------------------------------


def test_service_is_type_notify_for_the_main_process_only() -> None:
    """The daemon reports readiness itself (sdnotify), and only it may."""
    unit = parse_unit(SERVICE)
    assert one(unit, "Service", "Type") == "notify"
    assert one(unit, "Service", "NotifyAccess") == "main"


def test_service_delegates_cgroups_and_lets_the_daemon_end_its_jobs() -> None:
    """Delegate=yes for job cgroups; KillMode=mixed so SIGTERM reaches only the daemon first."""
    unit = parse_unit(SERVICE)
    assert one(unit, "Service", "Delegate") == "yes"
    assert one(unit, "Service", "KillMode") == "mixed"
    assert one(unit, "Service", "OOMPolicy") == "continue"
    assert one(unit, "Service", "TasksMax") == "infinity"
    assert one(unit, "Service", "Restart") == "on-failure"


def test_service_raises_the_fd_limit_and_sets_no_task_limit() -> None:
    """LimitNOFILE is one number (soft = hard) far above systemd's default soft 1024, at which
    the daemon stopped at about 110 jobs; TasksMax=infinity leaves pids to per-job limits; a
    comment says why for each."""
    service = parse_unit(SERVICE)["Service"]
    (nofile,) = service["LimitNOFILE"]
    assert nofile.isdigit()
    assert int(nofile) == 65536
    assert service["TasksMax"] == ["infinity"]
    lines = SERVICE.read_text().splitlines()
    for key in ("LimitNOFILE", "TasksMax"):
        index = next(i for i, line in enumerate(lines) if line.startswith(f"{key}="))
        assert lines[index - 1].startswith("#"), f"{key} has no comment saying why"


def test_service_sets_no_limit_that_would_cap_all_jobs_together() -> None:
    """No unit-wide memory, CPU, IO or pids cap: limits are per job, set by netjaild."""
    service = parse_unit(SERVICE)["Service"]
    for key in ("MemoryMax", "MemoryHigh", "CPUQuota", "IOWeight", "LimitNPROC"):
        assert key not in service


def test_stop_timeout_leaves_room_for_the_kill_grace() -> None:
    """TimeoutStopSec is well above the default kill_grace, so jobs are ended by the daemon."""
    timeout = one(parse_unit(SERVICE), "Service", "TimeoutStopSec")
    assert timeout.endswith("s")
    assert float(timeout[:-1]) >= 5 * Config().limits.kill_grace


def test_service_keeps_the_socket_directory_and_owns_its_state_directory() -> None:
    """/run/netjail survives a service stop (the socket unit's socket is in it)."""
    unit = parse_unit(SERVICE)
    assert one(unit, "Service", "RuntimeDirectory") == "netjail"
    assert one(unit, "Service", "RuntimeDirectoryPreserve") == "yes"
    assert one(unit, "Service", "StateDirectory") == "netjail"
    assert one(unit, "Service", "StateDirectoryMode") == "0700"
    assert Path(DEFAULT_SOCKET).parent == Path("/run") / one(unit, "Service", "RuntimeDirectory")
    assert Path(Config().state_dir) == Path("/var/lib") / one(unit, "Service", "StateDirectory")


def test_service_needs_its_socket() -> None:
    """The service requires and is ordered after netjaild.socket; enabling it enables both."""
    unit = parse_unit(SERVICE)
    assert "netjaild.socket" in unit["Unit"]["Requires"]
    assert "netjaild.socket" in unit["Unit"]["After"]
    assert one(unit, "Install", "Also") == "netjaild.socket"


EXPECTED_CAPABILITIES = {
    "CAP_SYS_ADMIN",
    "CAP_NET_ADMIN",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_RAW",
    "CAP_SETUID",
    "CAP_SETGID",
    "CAP_SETPCAP",
    "CAP_KILL",
    "CAP_SYS_PTRACE",
    "CAP_DAC_OVERRIDE",
    "CAP_CHOWN",
    "CAP_SYSLOG",
}


def test_capability_bounding_set_is_the_justified_list() -> None:
    """The bounding set is exactly the reviewed list, and a comment justifies each capability."""
    unit = parse_unit(SERVICE)
    capabilities = {
        cap for line in unit["Service"]["CapabilityBoundingSet"] for cap in line.split()
    }
    assert capabilities == EXPECTED_CAPABILITIES
    comments = "\n".join(line for line in SERVICE.read_text().splitlines() if line.startswith("#"))
    for cap in capabilities:
        assert re.search(rf"^#\s+(\S+ )?{cap}\s", comments, re.MULTILINE), f"{cap} not justified"


def test_service_hardening_that_jobs_can_live_with() -> None:
    """no_new_privs and the socket family filter are on; JIT-breaking filters are not."""
    service = parse_unit(SERVICE)["Service"]
    assert service["NoNewPrivileges"] == ["yes"]
    assert set(service["RestrictAddressFamilies"][0].split()) == {
        "AF_UNIX",
        "AF_INET",
        "AF_INET6",
        "AF_NETLINK",
    }
    for key in ("MemoryDenyWriteExecute", "SystemCallArchitectures", "RestrictNamespaces"):
        assert key not in service


@pytest.mark.parametrize(
    "key",
    [
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "PrivateMounts",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "ProtectProc",
        "ReadOnlyPaths",
        "ReadWritePaths",
        "InaccessiblePaths",
        "TemporaryFileSystem",
        "BindPaths",
        "UMask",
        "User",
        "DynamicUser",
    ],
)
def test_service_has_no_option_that_changes_what_jobs_see(key: str) -> None:
    """No private mount namespace (jobs inherit it; /run/netns must stay the host's), no User=."""
    assert key not in parse_unit(SERVICE)["Service"]


# --- netjaild.socket ---------------------------------------------------------------------------


def test_socket_unit_matches_the_config_defaults() -> None:
    """The socket unit listens where the daemon's config says, for root and group netjail."""
    socket_section = parse_unit(SOCKET)["Socket"]
    assert socket_section["ListenStream"] == [DEFAULT_SOCKET]
    assert socket_section["SocketMode"] == ["0660"]
    assert socket_section["SocketUser"] == ["root"]
    assert socket_section["SocketGroup"] == [Config().group]
    assert socket_section["Service"] == ["netjaild.service"]
    assert parse_unit(SOCKET)["Install"]["WantedBy"] == ["sockets.target"]


# --- sysusers.d and tmpfiles.d -----------------------------------------------------------------


def entries(path: Path) -> list[list[str]]:
    """The non-comment lines of a sysusers.d/tmpfiles.d file, split into fields."""
    return [
        line.split()
        for line in path.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]


def test_sysusers_creates_the_socket_group() -> None:
    """sysusers.d creates the system group the socket belongs to."""
    assert entries(SYSTEMD / "sysusers.d" / "netjail.conf") == [["g", Config().group, "-"]]


def test_tmpfiles_create_the_directories_with_the_units_modes() -> None:
    """tmpfiles.d makes /run/netjail 0755 and the state directory 0700, as the service does."""
    service = parse_unit(SERVICE)["Service"]
    assert entries(SYSTEMD / "tmpfiles.d" / "netjail.conf") == [
        [
            "d",
            str(Path(DEFAULT_SOCKET).parent),
            service["RuntimeDirectoryMode"][0],
            "root",
            "root",
            "-",
        ],
        ["d", Config().state_dir, service["StateDirectoryMode"][0], "root", "root", "-"],
    ]


# --- scripts/install ---------------------------------------------------------------------------


def test_install_script_is_executable_bash() -> None:
    """scripts/install is executable and parses as bash."""
    assert os.access(INSTALL, os.X_OK)
    subprocess.run(["bash", "-n", str(INSTALL)], check=True)


def test_install_script_passes_shellcheck() -> None:
    """shellcheck finds nothing in scripts/install."""
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not found: apt-get install shellcheck")
    result = subprocess.run([shellcheck, str(INSTALL)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout


def test_install_dry_run_changes_nothing_and_matches_the_units() -> None:
    """--dry-run prints the steps; it links the ExecStart= path and installs every shipped file."""
    result = subprocess.run(
        [str(INSTALL), "--dry-run"], capture_output=True, text=True, check=True, timeout=60
    )
    out = result.stdout
    exec_start = one(parse_unit(SERVICE), "Service", "ExecStart")
    assert re.search(rf"^\+ ln -sfn /opt/netjail/bin/netjaild {re.escape(exec_start)}$", out, re.M)
    for shipped, installed in [
        ("systemd/netjaild.service", "/etc/systemd/system/netjaild.service"),
        ("systemd/netjaild.socket", "/etc/systemd/system/netjaild.socket"),
        ("systemd/sysusers.d/netjail.conf", "/etc/sysusers.d/netjail.conf"),
        ("systemd/tmpfiles.d/netjail.conf", "/etc/tmpfiles.d/netjail.conf"),
    ]:
        assert f"{ROOT / shipped} {installed}\n" in out
    packages = "nftables libnftables1 libseccomp2 iproute2"
    assert f"apt-get install -y --no-install-recommends {packages}" in out
    assert f"pip install --quiet --upgrade {ROOT}\n" in out


def test_install_rejects_unknown_arguments() -> None:
    """An unknown option is an error, not a real install."""
    result = subprocess.run(
        [str(INSTALL), "--dryrun"], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 1
    assert "unknown argument '--dryrun'" in result.stderr
