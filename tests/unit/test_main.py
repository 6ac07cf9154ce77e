"""netjaild's entry point (netjail.daemon.main): the socket directory, binding, socket
activation, reloads, the backends check, serving until a signal, and the command line."""

from __future__ import annotations

import asyncio
import grp
import json
import os
import shutil
import signal
import socket
import stat
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import pytest
from click.testing import CliRunner

from netjail import protocol as p
from netjail._version import __version__
from netjail.daemon import main as main_module
from netjail.daemon import sdnotify
from netjail.daemon.config import Config
from netjail.daemon.log import Logger
from netjail.daemon.main import (
    _bind,
    _check_backends,
    _check_socket_dir,
    _listener,
    _reload,
    _serve,
    main,
    write_resolv_conf,
)
from netjail.daemon.metrics import Metrics
from netjail.daemon.server import Server
from netjail.daemon.spec import DEFAULT_PATH
from netjail.errors import ConfigError, NetjailError
from netjail.kernel import kmsg
from netjail.kernel.spawn import ForkServer

from .daemonfakes import (
    ROOT,
    Daemon,
    RecordingLog,
    connect,
    egress_event,
    listening_socket,
    make_daemon,
    run,
    spec_for,
)
from .fakehost import FakeJailHost

NO_GROUP = "netjail-unit-no-such-group"


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def write_file(path: Path, text: str) -> str:
    path.write_text(text)
    path.chmod(0o644)
    return str(path)


@pytest.fixture
def no_such_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every group lookup fails (as for a group that does not exist)."""

    def getgrnam(name: str) -> grp.struct_group:
        raise KeyError(name)

    monkeypatch.setattr(grp, "getgrnam", getgrnam)


# ---------------------------------------------------------------------- the socket


@pytest.mark.parametrize("shared", ["/run", "/tmp", "/", "/var/run", "/dev/shm", "/etc"])
def test_a_socket_in_a_shared_directory_is_refused(shared: str) -> None:
    """Jobs get the socket's directory hidden, so it must not be one they need."""
    with pytest.raises(NetjailError) as caught:
        _check_socket_dir(os.path.join(shared, "netjail.sock"))
    assert str(caught.value) == (
        "the socket must be in a directory of its own (e.g. /run/netjail/netjail.sock), "
        f"not {shared}: netjaild sets that directory's mode"
    )


def test_the_socket_directory_is_the_absolute_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative socket path is taken from the working directory."""
    monkeypatch.chdir(tmp_path)
    assert _check_socket_dir("run/netjail.sock") == str(tmp_path / "run")


def test_bind_makes_a_listening_socket_0660_in_a_directory_0755(
    tmp_path: Path, no_such_group: None
) -> None:
    """The directory is made 0755 (even if it existed tighter), the socket 0660, listening,
    and no staging file is left."""
    parent = tmp_path / "run"
    parent.mkdir(mode=0o700)
    path = parent / "netjail.sock"
    with _bind(str(path), NO_GROUP) as sock:
        assert mode_of(parent) == 0o755
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert mode_of(path) == 0o660
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        assert os.listdir(parent) == ["netjail.sock"]
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(path))


def test_bind_makes_the_missing_directory(tmp_path: Path, no_such_group: None) -> None:
    """A socket directory that does not exist is created, 0755."""
    path = tmp_path / "run" / "netjail" / "netjail.sock"
    with _bind(str(path), NO_GROUP):
        assert mode_of(path.parent) == 0o755
        assert mode_of(path) == 0o660


def test_bind_gives_the_socket_to_the_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The staging socket is chowned to root and the group before it is renamed into place."""
    monkeypatch.setattr(grp, "getgrnam", lambda name: grp.struct_group((name, "x", 4242, [])))
    chowned: list[tuple[str, int, int]] = []
    monkeypatch.setattr(os, "chown", lambda path, uid, gid: chowned.append((path, uid, gid)))
    path = tmp_path / "run" / "netjail.sock"
    with _bind(str(path), "netjail"):
        assert chowned == [(f"{path}.{os.getpid()}.tmp", 0, 4242)]


def test_bind_replaces_a_stale_socket(tmp_path: Path, no_such_group: None) -> None:
    """A socket file nobody listens on (a daemon that is gone) is replaced."""
    path = tmp_path / "run" / "netjail.sock"
    path.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    with _bind(str(path), NO_GROUP), socket.socket(socket.AF_UNIX) as client:
        client.connect(str(path))


def test_bind_refuses_to_take_over_a_live_socket(tmp_path: Path, no_such_group: None) -> None:
    """A socket another daemon serves is left alone, and the bind fails saying so."""
    path = tmp_path / "run" / "netjail.sock"
    path.parent.mkdir()
    with listening_socket(str(path)) as live:
        with pytest.raises(NetjailError) as caught:
            _bind(str(path), NO_GROUP)
        assert str(caught.value) == f"another netjaild is already serving {path}"
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))
            accepted, _ = live.accept()
            accepted.close()
        assert os.listdir(path.parent) == ["netjail.sock"]


def test_bind_removes_its_staging_file_when_it_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_such_group: None
) -> None:
    """A failure after the staging bind leaves neither the staging file nor the socket."""
    path = tmp_path / "run" / "netjail.sock"
    path.parent.mkdir()

    def rename(source: str, target: str) -> None:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="cross-device"):
        _bind(str(path), NO_GROUP)
    assert os.listdir(path.parent) == []


def test_bind_replaces_a_leftover_staging_file(tmp_path: Path, no_such_group: None) -> None:
    """A staging name left by an earlier process with our pid is removed first."""
    path = tmp_path / "run" / "netjail.sock"
    path.parent.mkdir()
    (path.parent / f"netjail.sock.{os.getpid()}.tmp").write_text("left over")
    with _bind(str(path), NO_GROUP):
        assert os.listdir(path.parent) == ["netjail.sock"]


def test_listener_binds_its_own_socket_without_socket_activation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_such_group: None
) -> None:
    """No LISTEN_FDS: the daemon binds the configured path itself (not activated)."""
    monkeypatch.setattr(sdnotify, "listen_fds", lambda: [])
    path = tmp_path / "run" / "netjail.sock"
    sock, activated = _listener(Config(socket=str(path), group=NO_GROUP))
    with sock:
        assert activated is False
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))
            accepted, _ = sock.accept()
            accepted.close()


def test_listener_takes_the_socket_systemd_passed_and_closes_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With LISTEN_FDS, the passed socket bound to the configured path is used; every other
    passed socket is closed."""
    path = tmp_path / "run" / "netjail.sock"
    path.parent.mkdir()
    wanted = listening_socket(str(path))
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    monkeypatch.setattr(sdnotify, "listen_fds", lambda: [other, wanted])
    sock, activated = _listener(Config(socket=str(path)))
    with sock:
        assert (sock, activated) == (wanted, True)
        assert other.fileno() == -1


def test_listener_fails_when_systemd_passed_no_socket_for_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Passed sockets none of which is bound to the configured path: ConfigError, and all
    of them closed."""
    path = tmp_path / "run" / "netjail.sock"
    path.parent.mkdir()
    elsewhere = listening_socket(str(tmp_path / "run" / "other.sock"))
    monkeypatch.setattr(sdnotify, "listen_fds", lambda: [elsewhere])
    with pytest.raises(ConfigError) as caught:
        _listener(Config(socket=str(path)))
    assert str(caught.value) == f"systemd passed no listening socket bound to {path}"
    assert elsewhere.fileno() == -1


def test_listener_checks_the_socket_directory_even_when_activated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A passed socket in a shared directory is refused like a bound one."""
    passed = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    monkeypatch.setattr(sdnotify, "listen_fds", lambda: [passed])
    try:
        with pytest.raises(NetjailError, match="not /run: netjaild sets that directory's mode"):
            _listener(Config(socket="/run/netjail.sock"))
    finally:
        passed.close()


def test_write_resolv_conf_points_jobs_at_the_stub(tmp_path: Path) -> None:
    """resolv.conf names the stub on both loopbacks, world-readable."""
    path = write_resolv_conf(str(tmp_path))
    assert path == str(tmp_path / "resolv.conf")
    assert Path(path).read_text() == (
        "nameserver 127.0.0.1\nnameserver ::1\noptions edns0 timeout:2 attempts:2\n"
    )
    assert mode_of(Path(path)) == 0o644


# ---------------------------------------------------------------------- the backends


def test_iptables_without_its_tools_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """firewall = "iptables" needs iptables-restore and ip6tables-restore on the fixed PATH."""
    looked_up: list[tuple[str, str | None]] = []

    def which(tool: str, path: str | None = None) -> str | None:
        looked_up.append((tool, path))
        return "/usr/sbin/iptables-restore" if tool == "iptables-restore" else None

    monkeypatch.setattr(shutil, "which", which)
    with pytest.raises(ConfigError) as caught:
        _check_backends(Config(firewall="iptables"))
    assert str(caught.value) == (
        'firewall = "iptables" needs ip6tables-restore: apt-get install iptables'
    )
    assert looked_up == [("iptables-restore", DEFAULT_PATH), ("ip6tables-restore", DEFAULT_PATH)]


def test_iptables_with_its_tools_and_nflog_needs_no_kmsg_reader(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With both tools present and the NFLOG backend there is no kernel-log reader."""
    monkeypatch.setattr(shutil, "which", lambda tool, path=None: f"/usr/sbin/{tool}")
    assert _check_backends(Config(firewall="iptables", log_backend="nflog")) is None


def test_the_kmsg_backend_turns_on_nf_log_all_netns_and_opens_a_reader(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """log_backend = "kmsg" sets the host-wide sysctl, then opens the kernel-log reader."""
    steps: list[str] = []

    class Reader:
        def __init__(self) -> None:
            steps.append("reader")

    monkeypatch.setattr(kmsg, "enable_nf_log_all_netns", lambda: steps.append("sysctl"))
    monkeypatch.setattr(kmsg, "KmsgReader", Reader)
    assert isinstance(_check_backends(Config(log_backend="kmsg")), Reader)
    assert steps == ["sysctl", "reader"]


# ---------------------------------------------------------------------- reload


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    made = make_daemon(str(tmp_path))
    yield made
    made.close()


def reload(daemon: Daemon, path: str, log: RecordingLog) -> None:
    """_reload, logging to ``log`` (a recording stand-in for the daemon's Logger)."""
    _reload(daemon.server, path, cast(Logger, log))


def test_reload_with_a_bad_file_keeps_the_running_configuration(
    daemon: Daemon, tmp_path: Path
) -> None:
    """A file that does not parse changes nothing; the error is logged."""
    running = daemon.server.config
    path = write_file(tmp_path / "netjaild.toml", "socket = 'relative.sock'\n")
    log = RecordingLog()
    reload(daemon, path, log)
    assert daemon.server.config is running
    assert log.records == [
        (
            "error",
            "reload failed, keeping the running configuration",
            {"error": f"{path}: socket: expected an absolute path, got 'relative.sock'"},
        )
    ]


def test_reload_applies_a_good_file(daemon: Daemon, tmp_path: Path) -> None:
    """A valid file is applied through Server.apply, and the reload is logged."""
    path = write_file(tmp_path / "netjaild.toml", "allowed_uids = [1000]\n")
    log = RecordingLog()
    reload(daemon, path, log)
    assert daemon.server.config == Config(allowed_uids=(1000,))
    assert daemon.server.file_config == Config(allowed_uids=(1000,))
    assert log.records == [("info", "configuration reloaded", {"path": path})]


def test_reload_keeps_the_running_value_of_restart_only_keys_with_a_warning(
    daemon: Daemon, tmp_path: Path
) -> None:
    """socket, state_dir, firewall, log_backend, log_format and group keep their running
    values; changing them in the file is warned about; other keys apply."""
    path = write_file(
        tmp_path / "netjaild.toml",
        'socket = "/run/other/netjail.sock"\nfirewall = "iptables"\nallowed_uids = [1000]\n',
    )
    log = RecordingLog()
    reload(daemon, path, log)
    assert daemon.server.config == Config(allowed_uids=(1000,))
    assert daemon.server.file_config == Config(
        socket="/run/other/netjail.sock", firewall="iptables", allowed_uids=(1000,)
    )
    assert log.records == [
        (
            "warning",
            "reload: these need a restart and keep their running values",
            {"keys": ["socket", "firewall"]},
        ),
        ("info", "configuration reloaded", {"path": path}),
    ]


def test_reload_keeps_the_running_uid_range_and_applies_the_other_jail_keys(
    daemon: Daemon, tmp_path: Path
) -> None:
    """jail.job_uids needs a restart (the leases are opened at start); jail.tmp_size applies."""
    path = write_file(
        tmp_path / "netjaild.toml", '[jail]\njob_uids = "70000-70099"\ntmp_size = "64M"\n'
    )
    log = RecordingLog()
    running_uids = daemon.server.config.jail.job_uids
    reload(daemon, path, log)
    assert daemon.server.config.jail.job_uids == running_uids
    assert daemon.server.config.jail.tmp_size == 64 << 20
    assert log.records[0] == (
        "warning",
        "reload: these need a restart and keep their running values",
        {"keys": ["jail.job_uids"]},
    )


def test_reload_compares_with_the_file_not_the_command_line(daemon: Daemon, tmp_path: Path) -> None:
    """A --socket override is no change of the file's: no warning, the override stays."""
    override = replace(Config(), socket="/run/override/netjail.sock")
    daemon.server.apply(override, Config())
    path = write_file(tmp_path / "netjaild.toml", "allowed_uids = [7]\n")
    log = RecordingLog()
    reload(daemon, path, log)
    assert daemon.server.config == replace(override, allowed_uids=(7,))
    assert log.messages() == ["configuration reloaded"]


# ---------------------------------------------------------------------- serving


@dataclass
class FakeForkServer:
    """The fork server's lifecycle, recorded."""

    attached: list[asyncio.AbstractEventLoop] = field(default_factory=list)
    closed: int = 0
    started: int = 0

    def attach(self, loop: asyncio.AbstractEventLoop, log: object) -> None:
        self.attached.append(loop)

    def close(self) -> None:
        self.closed += 1


def serve(
    daemon: Daemon,
    forkserver: FakeForkServer,
    log: RecordingLog,
    config_path: str | None = None,
    reader: kmsg.KmsgReader | None = None,
) -> Coroutine[Any, Any, int]:
    """_serve over the stand-ins for the fork server and the Logger."""
    return _serve(
        daemon.server,
        cast(ForkServer, forkserver),
        cast(Logger, log),
        config_path,
        reader,
        metrics=Metrics(),
    )


@pytest.fixture
def notes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What the daemon tells the service manager, in order (nothing is sent anywhere)."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    told: list[str] = []
    monkeypatch.setattr(sdnotify, "notify_status", lambda text: told.append(f"STATUS={text}"))
    monkeypatch.setattr(
        sdnotify, "notify_ready", lambda status=None: told.append(f"READY=1 {status}")
    )
    monkeypatch.setattr(sdnotify, "notify_stopping", lambda: told.append("STOPPING=1"))
    return told


@pytest.fixture
def serving_daemon(tmp_path: Path) -> Iterator[Daemon]:
    path = tmp_path / "run" / "netjail.sock"
    path.parent.mkdir()
    made = make_daemon(str(tmp_path), Config(socket=str(path)), listening_socket(str(path)))
    yield made
    made.close()


async def wait_for_note(notes: list[str], prefix: str) -> None:
    while not any(note.startswith(prefix) for note in notes):
        await asyncio.sleep(0.01)


def test_serve_refuses_to_serve_when_the_self_test_fails(
    serving_daemon: Daemon,
    notes: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Each self-test problem is logged and printed; the exit status is 1; no READY."""

    async def self_test(jobs: object, config: Config) -> list[str]:
        return ["first problem", "second problem"]

    monkeypatch.setattr(main_module, "run_self_test", self_test)
    forkserver = FakeForkServer()
    log = RecordingLog()
    status = run(serve(serving_daemon, forkserver, log))
    assert status == 1
    assert log.records == [
        ("error", "self-test failed", {"problem": "first problem"}),
        ("error", "self-test failed", {"problem": "second problem"}),
    ]
    assert capsys.readouterr().err == (
        "netjaild: self-test failed, not serving: first problem; second problem\n"
    )
    assert notes == ["STATUS=self-test: a probe job's attempts must be rejected and reported"]
    assert len(forkserver.attached) == 1


def test_serve_serves_until_sigterm_then_stops_jobs_and_clients(
    serving_daemon: Daemon, notes: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the self-test (whose events are forgotten) it serves; SIGTERM stops it: jobs
    are shut down, clients told, status 0."""
    daemon = serving_daemon

    async def self_test(jobs: object, config: Config) -> list[str]:
        job = daemon.jobs.add_job(spec_for(ROOT))
        daemon.intake.record(job.feed, egress_event(9, job.id))
        daemon.jobs.finish(job)
        return []

    monkeypatch.setattr(main_module, "run_self_test", self_test)
    forkserver = FakeForkServer()
    log = RecordingLog()

    async def main() -> int:
        serving = asyncio.ensure_future(serve(daemon, forkserver, log))
        await wait_for_note(notes, "READY=1")
        assert list(daemon.intake.history) == []
        assert daemon.intake.events_seen == 0
        client = await connect(daemon.server.config.socket)
        try:
            await client.hello()
            os.kill(os.getpid(), signal.SIGTERM)
            assert await client.receive_all() == [
                p.ErrorMessage(code="shutdown", message="netjaild is stopping")
            ]
        finally:
            client.close()
        return await serving

    assert run(main()) == 0
    assert daemon.jobs.shutdowns == 1
    assert daemon.server.listener.fileno() == -1
    socket_path = daemon.server.config.socket
    assert notes == [
        "STATUS=self-test: a probe job's attempts must be rejected and reported",
        f"READY=1 serving {socket_path}",
        "STOPPING=1",
    ]
    assert log.records == [
        ("info", "self-test passed", {}),
        (
            "info",
            "netjaild ready",
            {
                "version": __version__,
                "socket": socket_path,
                "pid": os.getpid(),
                "max_jobs": serving_daemon.jobs.max_jobs,
            },
        ),
        ("info", "stopping: no new connections, ending running jobs", {"jobs": 0}),
    ]


def test_serve_stopped_during_the_self_test_ends_without_serving(
    serving_daemon: Daemon, notes: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGTERM during the self-test is handled (not fatal): status 0, never READY."""

    async def self_test(jobs: object, config: Config) -> list[str]:
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(0.01)
        return []

    monkeypatch.setattr(main_module, "run_self_test", self_test)
    log = RecordingLog()
    status = run(serve(serving_daemon, FakeForkServer(), log))
    assert status == 0
    assert log.messages() == ["self-test passed"]
    assert not any(note.startswith("READY") for note in notes)


def test_serve_reloads_on_sighup_and_reads_the_kernel_log(
    serving_daemon: Daemon, notes: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """SIGHUP rereads the configuration file; a kmsg reader is attached and read when its
    fd is readable."""
    daemon = serving_daemon

    async def self_test(jobs: object, config: Config) -> list[str]:
        return []

    monkeypatch.setattr(main_module, "run_self_test", self_test)
    read_end, write_end = os.pipe()

    class Reader:
        reads = 0

        def fileno(self) -> int:
            return read_end

        def read_records(self) -> tuple[list[Any], int]:
            Reader.reads += 1
            os.read(read_end, 100)
            return [], 0

    reader = cast("kmsg.KmsgReader", Reader())
    config_path = write_file(
        tmp_path / "netjaild.toml", f'socket = "{daemon.server.config.socket}"\n'
    )

    async def main() -> int:
        serving = asyncio.ensure_future(serve(daemon, FakeForkServer(), log, config_path, reader))
        await wait_for_note(notes, "READY=1")
        assert daemon.intake.kmsg_reader is reader
        os.write(write_end, b"x")
        while Reader.reads == 0:
            await asyncio.sleep(0.01)
        write_file(
            tmp_path / "netjaild.toml",
            f'socket = "{daemon.server.config.socket}"\nallowed_uids = [4321]\n',
        )
        os.kill(os.getpid(), signal.SIGHUP)
        while daemon.server.config.allowed_uids != (4321,):
            await asyncio.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)
        return await serving

    log = RecordingLog()
    try:
        assert run(main()) == 0
    finally:
        os.close(read_end)
        os.close(write_end)
    assert ("info", "configuration reloaded", {"path": config_path}) in log.records


# ---------------------------------------------------------------------- the command line


def test_version_names_the_daemon() -> None:
    """--version prints the daemon's name and version."""
    result = CliRunner().invoke(main, ["--version"])
    assert (result.exit_code, result.stdout) == (0, f"netjaild, version {__version__}\n")


def test_check_config_accepts_a_good_file(tmp_path: Path) -> None:
    """--check-config PATH prints PATH: OK and exits 0."""
    path = write_file(tmp_path / "netjaild.toml", "allowed_uids = [1000]\n")
    result = CliRunner().invoke(main, ["--check-config", path])
    assert (result.exit_code, result.stdout, result.stderr) == (0, f"{path}: OK\n", "")


def test_check_config_lists_every_problem_of_a_bad_file(tmp_path: Path) -> None:
    """--check-config prints each problem on stderr and exits 1."""
    path = write_file(tmp_path / "netjaild.toml", 'limits.max_memry = 1\nallowed_uids = "x"\n')
    result = CliRunner().invoke(main, ["--check-config", path])
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == (
        f"{path}: allowed_uids: expected an array, got a string 'x'\n"
        f"{path}: unknown key 'limits.max_memry' (did you mean 'limits.max_memory'?)\n"
    )


def test_check_config_without_a_path_checks_the_config_option(tmp_path: Path) -> None:
    """A bare --check-config checks the file --config names."""
    path = write_file(tmp_path / "netjaild.toml", "")
    result = CliRunner().invoke(main, ["--config", path, "--check-config"])
    assert (result.exit_code, result.stdout) == (0, f"{path}: OK\n")


def test_the_daemon_refuses_to_run_unprivileged(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not root: one line on stderr, exit 1, and nothing is started."""

    class ForkServer:
        @staticmethod
        def start() -> None:
            raise AssertionError("the fork server must not start")

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(main_module, "ForkServer", ForkServer)
    result = CliRunner().invoke(main, [])
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == (
        "netjaild: must run as root (it builds network namespaces and firewalls)\n"
    )


@dataclass
class StartUp:
    """What main() was given by the stubs below, and what it handed on."""

    forkserver: FakeForkServer = field(default_factory=FakeForkServer)
    config: Config = field(default_factory=lambda: Config(group=NO_GROUP))
    config_paths: list[str | None] = field(default_factory=list)
    host_arguments: list[dict[str, object]] = field(default_factory=list)
    served: list[Server] = field(default_factory=list)
    masks: list[int] = field(default_factory=list)
    cgroups: list[object] = field(default_factory=list)
    #: statefs calls, in order: ("prepare" or "release", the state directory).
    state_calls: list[tuple[str, str]] = field(default_factory=list)


@pytest.fixture
def start_up(monkeypatch: pytest.MonkeyPatch) -> StartUp:
    """main() as root, with the kernel-facing parts (fork server, cgroups, host, recovery,
    the state's tmpfs, the loop) replaced; the socket, state directory and server are real."""
    made = StartUp()

    def prepare(state_dir: str, log: object) -> str:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        made.state_calls.append(("prepare", state_dir))
        return "disk"

    class ForkServer:
        @staticmethod
        def start() -> FakeForkServer:
            made.forkserver.started += 1
            return made.forkserver

    class CgroupManager:
        mode = "hybrid"

        def __init__(self, layout: object) -> None:
            assert layout == "layout"
            made.cgroups.append(self)

        def setup(self) -> None:
            pass

    def load_config(path: str | None) -> Config:
        made.config_paths.append(path)
        return made.config

    def kernel_host(**arguments: object) -> FakeJailHost:
        made.host_arguments.append(arguments)
        return FakeJailHost()

    async def serve(
        server: Server,
        forkserver: object,
        log: object,
        config_path: object,
        reader: object,
        *,
        metrics: object,
    ) -> int:
        made.served.append(server)
        return 0

    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(signal, "pthread_sigmask", lambda how, mask: made.masks.append(how))
    monkeypatch.delenv("LISTEN_PID", raising=False)
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setattr(main_module, "ForkServer", ForkServer)
    monkeypatch.setattr(main_module, "load_config", load_config)
    monkeypatch.setattr(main_module, "load_cgroup_layout", lambda: "layout")
    monkeypatch.setattr(main_module, "CgroupManager", CgroupManager)
    monkeypatch.setattr(main_module, "KernelJailHost", kernel_host)
    monkeypatch.setattr(
        main_module, "recover", lambda host, records, log, uids, homes: ["netns netjail-j-0000dead"]
    )
    monkeypatch.setattr(main_module, "_serve", serve)
    monkeypatch.setattr(main_module.statefs, "prepare", prepare)
    monkeypatch.setattr(
        main_module.statefs,
        "release",
        lambda state_dir, log: made.state_calls.append(("release", state_dir)),
    )
    return made


def json_log(stderr: str) -> list[dict[str, object]]:
    """The JSON log lines of ``stderr`` without their timestamps; other lines as text."""
    lines: list[dict[str, object]] = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            del record["time"]
            lines.append(record)
        else:
            lines.append({"text": line})
    return lines


def test_main_starts_in_order_serves_and_removes_its_socket(
    tmp_path: Path, start_up: StartUp
) -> None:
    """Command-line options override the file; leftovers are logged; the server gets the
    configuration, the job context and a bound socket, which is removed at exit."""
    socket_path = tmp_path / "run" / "netjail.sock"
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    arguments = ["--config", str(tmp_path / "netjaild.toml"), "--socket", str(socket_path)]
    arguments += ["--state-dir", str(state_dir), "--log-format", "json"]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.stderr
    assert json_log(result.stderr) == [
        {
            "level": "warning",
            "msg": "removed a leftover of a previous run",
            "item": "netns netjail-j-0000dead",
        },
        {"level": "info", "msg": "netjaild stopped"},
    ]
    assert start_up.config_paths == [str(tmp_path / "netjaild.toml")]
    assert start_up.masks == [signal.SIG_BLOCK]
    assert (start_up.forkserver.started, start_up.forkserver.closed) == (1, 1)
    [server] = start_up.served
    assert server.file_config == start_up.config
    assert server.config == replace(
        start_up.config, socket=str(socket_path), state_dir=str(state_dir), log_format="json"
    )
    assert server.cgroup_mode == "hybrid"
    assert start_up.host_arguments == [
        {
            "forkserver": start_up.forkserver,
            "cgroups": start_up.cgroups[0],
            "firewall_backend": "nftables",
            "log_backend": "nflog",
        }
    ]
    ctx = server.jobs.ctx
    assert ctx.homes_dir == str(state_dir / "homes")
    assert oct(os.stat(state_dir / "homes").st_mode & 0o777) == "0o700"
    assert ctx.resolv_conf == str(state_dir / "resolv.conf")
    assert os.path.isdir(state_dir / "jobs")
    # The state's tmpfs: put in place before anything used the directory, released at exit.
    assert start_up.state_calls == [("prepare", str(state_dir)), ("release", str(state_dir))]
    assert not socket_path.exists()


def test_main_that_cannot_start_says_why_and_exits_1(tmp_path: Path, start_up: StartUp) -> None:
    """A start-up error (here: another daemon on the socket) is logged and printed as one
    line; the fork server is closed; the live socket is left alone."""
    socket_path = tmp_path / "run" / "netjail.sock"
    socket_path.parent.mkdir()
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    with listening_socket(str(socket_path)):
        arguments = ["--socket", str(socket_path), "--state-dir", str(state_dir)]
        result = CliRunner().invoke(main, [*arguments, "--log-format", "json"])
        assert socket_path.exists()
    message = f"another netjaild is already serving {socket_path}"
    assert result.exit_code == 1
    assert json_log(result.stderr) == [
        {"level": "error", "msg": "cannot start", "error": message},
        {"text": f"netjaild: {message}"},
    ]
    assert start_up.config_paths == [None]
    assert start_up.forkserver.closed == 1
    assert start_up.served == []
    # Failed before the state directory was used; its release is a no-op then, and harmless.
    assert start_up.state_calls == [("release", str(state_dir))]


def test_the_fd_limit_is_raised_to_the_hard_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The soft RLIMIT_NOFILE becomes the hard one; an already raised limit is left alone."""
    calls: list[tuple[int, tuple[int, int]]] = []
    limits = {"now": (1024, 65536)}
    monkeypatch.setattr(main_module.resource, "getrlimit", lambda kind: limits["now"])
    monkeypatch.setattr(
        main_module.resource, "setrlimit", lambda kind, value: calls.append((kind, value))
    )
    main_module.raise_fd_limit()
    assert calls == [(main_module.resource.RLIMIT_NOFILE, (65536, 65536))]
    limits["now"] = (65536, 65536)
    main_module.raise_fd_limit()
    assert len(calls) == 1
