"""``netjail doctor``: its output, its exit status, and the wiring of probes to checks."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
from click.testing import CliRunner

from netjail import cli, hostns
from netjail import doctor as d
from netjail.doctor import probe
from netjail.doctor.access import SocketInfo
from netjail.doctor.features import KernelInfo
from netjail.doctor.result import Check, checks_to_json, format_checks, has_blocker
from netjail.doctor.tools import IptablesInfo, LibseccompInfo
from netjail.errors import DaemonConnectionError
from netjail.hostns import NetnsEvidence
from netjail.mountinfo import CgroupMount

SOCK = "/run/netjail/netjail.sock"


# --------------------------------------------------------------------------------------------
# Output


def test_format_checks_prints_status_check_detail_and_fix() -> None:
    """Each check is one line, statuses padded to one width, and a fix line after warn/FAIL."""
    checks = [
        Check("netns", "ok", "built in (CONFIG_NET_NS=y)"),
        Check("iptables", "warn", "iptables-restore not found", "apt-get install iptables"),
        Check("daemon", "FAIL", "cannot connect", "start netjaild"),
    ]
    assert format_checks(checks) == [
        "ok    netns: built in (CONFIG_NET_NS=y)",
        "warn  iptables: iptables-restore not found",
        "  fix: apt-get install iptables",
        "FAIL  daemon: cannot connect",
        "  fix: start netjaild",
    ]


def test_format_checks_sanitizes_outside_text() -> None:
    """A socket path or daemon message with control characters cannot forge lines."""
    check = Check("socket", "warn", "/tmp/a\nok    daemon: fine\x1b[2J", "fix\rit")
    assert format_checks([check]) == [
        "warn  socket: /tmp/a?ok    daemon: fine?[2J",
        "  fix: fix?it",
    ]


def test_checks_to_json_lists_check_status_detail_fix() -> None:
    """--json output is a list of {check, status, detail, fix}, fix null when ok."""
    checks = [Check("netns", "ok", "yes"), Check("daemon", "FAIL", "down", "start it")]
    assert json.loads(checks_to_json(checks)) == [
        {"check": "netns", "status": "ok", "detail": "yes", "fix": None},
        {"check": "daemon", "status": "FAIL", "detail": "down", "fix": "start it"},
    ]


def test_only_fail_is_a_blocker() -> None:
    """Warnings do not make doctor fail; a FAIL does."""
    assert not has_blocker([Check("a", "ok", "x"), Check("b", "warn", "y", "z")])
    assert has_blocker([Check("a", "ok", "x"), Check("b", "FAIL", "y", "z")])


# --------------------------------------------------------------------------------------------
# The command


@dataclass
class FakeProbes:
    checks: list[Check]
    sockets: list[str] = field(default_factory=list)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeProbes:
    """run_checks replaced by a scripted list; records the socket it was asked about."""
    probes = FakeProbes(
        [
            Check("netns", "ok", "built in (CONFIG_NET_NS=y)"),
            Check("iptables", "warn", "missing", "apt-get install iptables"),
        ]
    )

    def run_checks(socket_path: str) -> list[Check]:
        probes.sockets.append(socket_path)
        return list(probes.checks)

    monkeypatch.setattr(d, "run_checks", run_checks)
    return probes


def test_command_prints_lines_and_exits_0_on_warnings(fake: FakeProbes) -> None:
    """Warnings only: exit 0; the socket comes from the group's context object."""
    result = CliRunner().invoke(cli.doctor, [], obj={"socket": "/tmp/x.sock"})
    assert result.exit_code == 0
    assert result.output.splitlines() == [
        "ok    netns: built in (CONFIG_NET_NS=y)",
        "warn  iptables: missing",
        "  fix: apt-get install iptables",
    ]
    assert fake.sockets == ["/tmp/x.sock"]


def test_command_exits_1_on_a_blocker_and_prints_json(fake: FakeProbes) -> None:
    """A FAIL: exit 1; --json prints the list."""
    fake.checks.append(Check("daemon", "FAIL", "down", "start it"))
    result = CliRunner().invoke(cli.doctor, ["--json"], obj={"socket": SOCK})
    assert result.exit_code == 1
    assert [c["status"] for c in json.loads(result.output)] == ["ok", "warn", "FAIL"]


def test_command_without_a_context_uses_the_default_socket(
    fake: FakeProbes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run on its own (no netjail group around it), doctor asks about NETJAIL_SOCKET."""
    monkeypatch.setenv("NETJAIL_SOCKET", "/tmp/env.sock")
    assert CliRunner().invoke(cli.doctor, []).exit_code == 0
    assert fake.sockets == ["/tmp/env.sock"]


ALL_CHECKS = [
    "netns",
    "nf_tables",
    "nfnetlink_log",
    "ifb",
    "pidns",
    "ipcns",
    "utsns",
    "seccomp",
    "cgroups",
    "capabilities",
    "initial netns",
    "nf_log_all_netns",
    "mount API",
    "pivot_root",
    "libnftables",
    "libseccomp",
    "iptables",
    "socket",
    "daemon",
]


def test_command_is_netjails_doctor_subcommand(fake: FakeProbes) -> None:
    """netjail --socket PATH doctor runs the checks against PATH."""
    result = CliRunner().invoke(cli.main, ["--socket", "/tmp/main.sock", "doctor"])
    assert result.exit_code == 0
    assert fake.sockets == ["/tmp/main.sock"]


def test_importing_the_cli_leaves_doctor_unloaded() -> None:
    """Only the doctor command imports netjail.doctor and its probes' libraries."""
    result = subprocess.run(
        [sys.executable, "-c", "import sys, netjail.cli; print('\\n'.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    loaded = result.stdout.split()
    assert "netjail.cli" in loaded
    assert [name for name in loaded if name.startswith("netjail.doctor")] == []


def test_run_checks_on_this_machine_covers_every_check() -> None:
    """The real probes never raise and give every check in order, each with a fix unless ok."""
    checks = d.run_checks("/nonexistent/netjail.sock")
    assert [c.check for c in checks] == ALL_CHECKS
    assert all((c.fix is None) == (c.status == "ok") for c in checks)
    assert checks[-1].status == "FAIL"


# --------------------------------------------------------------------------------------------
# The wiring, over fake probes: a root in an unprivileged container on a 6.1 kernel

CONTAINER_RELEASE = "6.1.0-18-amd64"
CONTAINER_MOUNTINFO = (
    "600 500 0:50 / / rw,relatime - overlay overlay rw,lowerdir=/l,upperdir=/u,workdir=/w\n"
    "610 600 0:26 / /sys/fs/cgroup ro,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
)
# Docker's default capabilities and seccomp profile.
CONTAINER_STATUS = (
    "Name:\tnetjail\nCapEff:\t00000000a80425fb\nCapBnd:\t00000000a80425fb\n"
    "NoNewPrivs:\t0\nSeccomp:\t2\nSeccomp_filters:\t1\n"
)


@pytest.fixture
def container(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every probe replaced by what it would see there; returns what the probes were asked."""
    asked: list[object] = []

    def unified_controllers(mounts: list[CgroupMount]) -> str:
        asked.append(mounts)
        return "cpuset cpu io memory pids\n"

    def socket(path: str) -> SocketInfo:
        asked.append(path)
        return SocketInfo(path, "missing", euid=0, user="root")

    def daemon(path: str) -> DaemonConnectionError:
        asked.append(path)
        return DaemonConnectionError(f"cannot connect to {path}: No such file or directory")

    fakes = {
        "probe_kernel": lambda: KernelInfo(
            CONTAINER_RELEASE, None, frozenset({"ifb"}), None, frozenset({"nf_tables"})
        ),
        "probe_kernel_evidence": lambda: {
            "netns": "/proc/self/ns/net exists",
            "pidns": "/proc/self/ns/pid exists",
            "ipcns": "/proc/self/ns/ipc exists",
            "nfnetlink_log": "registered in /proc/net/netfilter/nf_log",
        },
        "probe_status": lambda: CONTAINER_STATUS,
        "probe_euid": lambda: 0,
        "probe_seccomp_filter": lambda: errno.EFAULT,
        "probe_mountinfo": lambda: CONTAINER_MOUNTINFO,
        "probe_open_tree": lambda: errno.EPERM,
        "probe_unified_controllers": unified_controllers,
        "probe_nf_log_all_netns": lambda: None,
        "probe_libnftables": lambda: None,
        "probe_libseccomp": lambda: LibseccompInfo("libseccomp.so.2", version="2.5.4"),
        "probe_iptables": lambda: IptablesInfo("/usr/sbin/iptables-restore", None, None),
        "probe_socket": socket,
        "probe_daemon": daemon,
    }
    for name, fake_probe in fakes.items():
        monkeypatch.setattr(probe, name, fake_probe)
    monkeypatch.setattr(
        hostns,
        "probe_netns_evidence",
        lambda: NetnsEvidence(
            "net:[4026532500]", "pid:[4026532301]", None, "per_netns_only", CONTAINER_RELEASE
        ),
    )
    return asked


def test_run_checks_hands_each_check_its_evidence(container: list[object]) -> None:
    """Every probe's finding reaches its check: exact lines for a root in a container."""
    sock = "/run/netjail/netjail.sock"
    assert format_checks(d.run_checks(sock)) == [
        "ok    netns: present (/proc/self/ns/net exists)",
        "ok    nf_tables: module nf_tables, loaded on first use",
        "ok    nfnetlink_log: present (registered in /proc/net/netfilter/nf_log)",
        "ok    ifb: present (/sys/module/ifb)",
        "ok    pidns: present (/proc/self/ns/pid exists)",
        "ok    ipcns: present (/proc/self/ns/ipc exists)",
        "warn  utsns: cannot tell: no kernel config (/proc/config.gz,"
        f" /boot/config-{CONTAINER_RELEASE}) and no other sign of it",
        "  fix: nothing, if jobs start; otherwise check that the kernel has CONFIG_UTS_NS",
        "ok    seccomp: present (this process runs under a filter: Seccomp: 2 in"
        " /proc/self/status)",
        "ok    cgroups: v2 (/sys/fs/cgroup): memory, cpu, pids controllers",
        "warn  capabilities: root, but without CAP_NET_ADMIN, CAP_SYS_PTRACE, CAP_SYS_ADMIN:"
        " netjaild cannot build jails here",
        "  fix: run netjaild where root has every capability: on the host, or in a privileged"
        ' container (docker run --privileged; devcontainer.json "privileged": true)',
        "warn  initial netns: no: a container or another network namespace; jails and NFLOG"
        ' events work here, log_backend = "kmsg" only if the host allows it',
        '  fix: nothing for log_backend = "nflog" (the default); for "kmsg", see nf_log_all_netns',
        "warn  nf_log_all_netns: absent: only the initial network namespace has it; it cannot"
        " be read or set here",
        '  fix: use log_backend = "nflog" (the default); "kmsg" needs it set to 1 on the host:'
        " sysctl -w net.netfilter.nf_log_all_netns=1",
        "warn  mount API: open_tree is refused here (a seccomp filter over this process?)",
        "  fix: nothing, if netjaild runs elsewhere; where it runs, open_tree and move_mount must"
        " not be filtered (docker run --security-opt seccomp=unconfined)",
        "ok    pivot_root: / is on overlay, not the initial ramfs: jails can pivot_root from it",
        "FAIL  libnftables: libnftables.so.1 not found",
        "  fix: apt-get install libnftables1",
        "ok    libseccomp: libseccomp.so.2 2.5.4 loads (through pyseccomp)",
        'warn  iptables: ip6tables-restore not found (only firewall = "iptables" needs them)',
        "  fix: apt-get install iptables",
        f"warn  socket: {sock} does not exist (netjaild is not running, or listens elsewhere)",
        "  fix: if netjaild listens elsewhere: --socket PATH or NETJAIL_SOCKET=PATH; otherwise"
        " start it (see the daemon check)",
        f"FAIL  daemon: cannot connect to {sock}: No such file or directory",
        "  fix: start netjaild: sudo netjaild & (with systemd: sudo systemctl start netjaild)",
    ]
    assert container == [
        [CgroupMount("cgroup2", "/", "/sys/fs/cgroup", frozenset())],
        sock,
        sock,
    ]


def test_importing_doctor_loads_no_kernel_or_daemon_code() -> None:
    """Doctor is part of the light CLI: no pyroute2, netjail.kernel or netjail.daemon."""
    result = subprocess.run(
        [sys.executable, "-c", "import sys, netjail.doctor; print('\\n'.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    loaded = result.stdout.split()
    assert "netjail.doctor" in loaded
    assert [
        name
        for name in loaded
        if name.split(".")[0] == "pyroute2" or name.startswith(("netjail.kernel", "netjail.daemon"))
    ] == []
