"""``netjaild``: the daemon's entry point and start-up order.

Order: fork server first (exec'd; a daemon whose jobs cannot get their seccomp filter does not
start), then configuration, cgroups, recovery of a previous run's leftovers, the socket (bound,
or passed by systemd), and only then READY.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import resource
import shutil
import signal
import socket
import sys
from dataclasses import replace
from typing import Literal

import click

from netjail._version import __version__
from netjail.daemon import sdnotify, statefs
from netjail.daemon.config import DEFAULT_CONFIG_PATH, Config, check_config, load_config
from netjail.daemon.etcfiles import make_etc_dir
from netjail.daemon.intake import EventIntake
from netjail.daemon.jobs import JobManager
from netjail.daemon.log import Logger, loop_error_handler
from netjail.daemon.metrics import Metrics, MetricsServer
from netjail.daemon.pipeline import JailContext
from netjail.daemon.recovery import StateRecords, recover
from netjail.daemon.selftest import run_self_test
from netjail.daemon.server import Server
from netjail.daemon.spec import DEFAULT_PATH
from netjail.daemon.trust import make_trust_dir
from netjail.daemon.uids import UidLeases
from netjail.errors import ConfigError, NetjailError
from netjail.kernel import kmsg
from netjail.kernel.cgroup import CgroupManager, load_cgroup_layout
from netjail.kernel.host import KernelJailHost
from netjail.kernel.spawn import ForkServer

# The daemon makes the socket's directory its own (mode 0755, root's), so it must not be a
# directory others share.
# (S108: these are directories we refuse to take over, not temporary files we use.)
_SHARED_DIRS = {
    "/",
    "/tmp",  # noqa: S108
    "/run",
    "/var/run",
    "/var/tmp",  # noqa: S108
    "/dev/shm",  # noqa: S108
    "/home",
    "/root",
    "/etc",
}


_CONTROL_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def _check_socket_dir(path: str) -> str:
    parent = os.path.dirname(os.path.abspath(path))
    if parent in _SHARED_DIRS:
        raise NetjailError(
            f"the socket must be in a directory of its own (e.g. /run/netjail/netjail.sock), "
            f"not {parent}: netjaild sets that directory's mode"
        )
    return parent


def _bind(path: str, group: str) -> socket.socket:
    """Bind the daemon socket: parent dir 0755, socket 0660, owned by ``group`` if it exists."""
    parent = _check_socket_dir(path)
    os.makedirs(parent, mode=0o755, exist_ok=True)
    os.chmod(parent, 0o755)  # noqa: S103 - clients must traverse it; the socket itself is 0660
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale socket of a daemon that is gone
        else:
            raise NetjailError(f"another netjaild is already serving {path}")
        finally:
            probe.close()
    # Bound under a temporary name, made ready, then renamed into place: the path never
    # names a socket that refuses connections or has the wrong permissions.
    staging = f"{path}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(staging)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o117)
        try:
            sock.bind(staging)
        finally:
            os.umask(old)
        os.chmod(staging, 0o660)
        with contextlib.suppress(KeyError):
            os.chown(staging, 0, grp.getgrnam(group).gr_gid)
        sock.listen(128)
        os.rename(staging, path)
    except BaseException:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging)
        raise
    return sock


def _listener(config: Config) -> tuple[socket.socket, bool]:
    """The listening socket: the one systemd passed (socket activation), else our own."""
    passed = sdnotify.listen_fds()
    if passed:
        _check_socket_dir(config.socket)
        chosen = sdnotify.find_unix_listener(passed, config.socket)
        for sock in passed:
            if sock is not chosen:
                sock.close()
        if chosen is None:
            raise ConfigError(f"systemd passed no listening socket bound to {config.socket}")
        return chosen, True
    return _bind(config.socket, config.group), False


async def _serve(
    server: Server,
    forkserver: ForkServer,
    log: Logger,
    config_path: str | None,
    kmsg_reader: kmsg.KmsgReader | None,
    *,
    metrics: Metrics,
) -> int:
    """Self-test, serve until SIGTERM/SIGINT, stop gracefully; the exit status."""
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(loop_error_handler(log))
    forkserver.attach(loop, log)
    config = server.config
    stop = _Stop()
    if kmsg_reader is not None:

        def kernel_log_lost(reason: str) -> None:
            loop.remove_reader(kmsg_reader.fileno())
            log("error", "cannot read the kernel log any more; stopping", error=reason)
            stop.fail(reason)

        server.intake.attach_kmsg(kmsg_reader, kernel_log_lost)
        loop.add_reader(kmsg_reader.fileno(), server.intake.read_kmsg)
    # Handlers first: a SIGTERM during the self-test must still end in a clean stop.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.event.set)
    loop.add_signal_handler(signal.SIGHUP, _reload, server, config_path, log)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _CONTROL_SIGNALS)
    sdnotify.notify_status("self-test: a probe job's attempts must be rejected and reported")
    problems = await run_self_test(server.jobs, config)
    if problems:
        for problem in problems:
            log("error", "self-test failed", problem=problem)
        click.echo(f"netjaild: self-test failed, not serving: {'; '.join(problems)}", err=True)
        return 1
    log("info", "self-test passed")
    # Counters and history are about clients' jobs; the probe's are not among them.
    server.intake.forget_history()
    server.jobs.use_metrics(metrics)
    if stop.event.is_set():
        return stop.status()  # asked to stop while starting: nothing was served, nothing is left
    # Warm jails from now on: the probe job was built cold, so the path every pool jail's
    # pieces come from is the one it proved.
    server.jobs.start_pool()
    serving = asyncio.ensure_future(server.serve_forever())
    log(
        "info",
        "netjaild ready",
        version=__version__,
        socket=config.socket,
        pid=os.getpid(),
        max_jobs=server.jobs.max_jobs,
    )
    sdnotify.notify_ready(f"serving {config.socket}")
    await stop.event.wait()
    sdnotify.notify_stopping()
    log("info", "stopping: no new connections, ending running jobs", jobs=len(server.jobs.jobs))
    serving.cancel()
    server.listener.close()
    await server.stop("netjaild is stopping")
    return stop.status()


class _Stop:
    """Why the daemon stops: asked to (SIGTERM, SIGINT: exit 0), or a failure (exit 1)."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.failure: str | None = None

    def fail(self, reason: str) -> None:
        self.failure = reason
        self.event.set()

    def status(self) -> int:
        return 0 if self.failure is None else 1


def _reload(server: Server, config_path: str | None, log: Logger) -> None:
    """SIGHUP: read the configuration again; it applies to jobs started from now on.

    Settings that only a restart can change (socket, state dir, backends) keep their running
    values, with a warning. A bad file changes nothing.
    """
    current = server.config
    try:
        new = load_config(config_path)
    except ConfigError as e:
        log("error", "reload failed, keeping the running configuration", error=str(e))
        return
    # Compared with what the file said at start (command-line options override the file, and
    # an overridden value is no change of the file's).
    fixed = ("socket", "state_dir", "firewall", "log_backend", "log_format", "group")
    changed = [name for name in fixed if getattr(new, name) != getattr(server.file_config, name)]
    # The uid leases are opened once, at start, over the range then in force.
    if new.jail.job_uids != server.file_config.jail.job_uids:
        changed.append("jail.job_uids")
    if new.jail.pool_size != server.file_config.jail.pool_size:
        changed.append("jail.pool_size")
    if changed:
        log("warning", "reload: these need a restart and keep their running values", keys=changed)
    kept = replace(new, **{name: getattr(current, name) for name in fixed})
    kept = replace(
        kept,
        jail=replace(kept.jail, job_uids=current.jail.job_uids, pool_size=current.jail.pool_size),
    )
    server.apply(kept, new)
    log("info", "configuration reloaded", path=config_path or DEFAULT_CONFIG_PATH)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    default=None,
    metavar="PATH",
    help=f"Configuration file [default: {DEFAULT_CONFIG_PATH}, if it exists].",
)
@click.option(
    "--check-config",
    "check_path",
    is_flag=False,
    flag_value="",
    default=None,
    metavar="[PATH]",
    help="Check the configuration file (PATH, or --config's, or the default) and exit.",
)
@click.option(
    "--socket",
    "socket_path",
    default=None,
    metavar="PATH",
    help="Unix socket to serve [default: the config's socket, /run/netjail/netjail.sock].",
)
@click.option(
    "--state-dir",
    default=None,
    metavar="DIR",
    help="Where job state is kept for crash recovery [default: /var/lib/netjail].",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default=None,
    help="Log line format on stderr [default: text].",
)
@click.version_option(__version__, prog_name="netjaild")
def main(  # noqa: PLR0915 - the start-up order, step by step, reads best in one place
    config_path: str | None,
    check_path: str | None,
    socket_path: str | None,
    state_dir: str | None,
    log_format: Literal["text", "json"] | None,
) -> None:
    """Run the netjail daemon in the foreground (as root). Command-line options override the
    configuration file."""
    if check_path is not None:
        problems = check_config(check_path or config_path)
        for problem in problems:
            click.echo(problem, err=True)
        if not problems:
            click.echo(f"{check_path or config_path or DEFAULT_CONFIG_PATH}: OK")
        sys.exit(1 if problems else 0)
    if os.geteuid() != 0:
        click.echo(
            "netjaild: must run as root (it builds network namespaces and firewalls)", err=True
        )
        sys.exit(1)
    raise_fd_limit()
    # First: every job is forked from this helper, and it compiles the jobs' seccomp filter, so
    # a host where that fails is refused before anything else is set up.
    try:
        forkserver = ForkServer.start()
    except NetjailError as e:
        click.echo(f"netjaild: {e}", err=True)
        sys.exit(1)
    # Until the loop's handlers exist, a stop or reload request waits (blocked, pending) rather
    # than killing the daemon half-way through recovery or start-up; _serve unblocks them.
    signal.pthread_sigmask(signal.SIG_BLOCK, _CONTROL_SIGNALS)
    log = Logger(log_format or "text")
    config: Config | None = None
    try:
        file_config = load_config(config_path)
        config = replace(
            file_config,
            socket=socket_path or file_config.socket,
            state_dir=state_dir or file_config.state_dir,
            log_format=log_format or file_config.log_format,
        )
        log.format = config.log_format
        kmsg_reader = _check_backends(config)
        cgroups = CgroupManager(load_cgroup_layout())
        cgroups.setup()
        listener, activated = _listener(config)
        host = KernelJailHost(
            forkserver=forkserver,
            cgroups=cgroups,
            firewall_backend=config.firewall,
            log_backend=config.log_backend,
        )
        # Before anything uses it: its per-job files on a tmpfs of its own (statefs).
        statefs.prepare(config.state_dir, log)
        records = StateRecords(config.state_dir)
        ctx = JailContext(
            host=host,
            intake=EventIntake(),
            records=records,
            log=log,
            log_backend=config.log_backend,
            uids=UidLeases.open(config.jail.job_uids, config.state_dir),
            homes_dir=make_homes_dir(config.state_dir),
            resolv_conf=write_resolv_conf(config.state_dir),
            trust_dir=make_trust_dir(config.state_dir),
            etc_dir=make_etc_dir(config.state_dir),
        )
        sdnotify.notify_status("removing leftovers of a previous run")
        for item in recover(host, records, log, ctx.uids, ctx.homes_dir):
            log("warning", "removed a leftover of a previous run", item=item)
        server = Server(
            listener=listener,
            jobs=JobManager(ctx, pool_size=config.jail.pool_size),
            log=log,
            cgroup_mode=cgroups.mode,
            config=config,
        )
        server.apply(config, file_config)
        metrics, endpoint = _start_metrics(config, log)
    except (NetjailError, OSError) as e:
        forkserver.close()
        if config is not None:
            statefs.release(config.state_dir, log)
        log("error", "cannot start", error=str(e))
        click.echo(f"netjaild: {e}", err=True)
        sys.exit(1)
    try:
        status = asyncio.run(
            _serve(server, forkserver, log, config_path, kmsg_reader, metrics=metrics)
        )
    finally:
        if endpoint is not None:
            endpoint.close()
        forkserver.close()
        statefs.release(config.state_dir, log)
        if not activated:
            with contextlib.suppress(OSError):
                os.unlink(config.socket)
    log("info", "netjaild stopped")
    sys.exit(status)


def _start_metrics(config: Config, log: Logger) -> tuple[Metrics, MetricsServer | None]:
    """The daemon's metrics, and their endpoint when ``metrics_listen`` is set: bound before the
    self-test, so that a port in use stops the start with a clear error."""
    metrics = Metrics()
    if config.metrics_listen is None:
        return metrics, None
    endpoint = MetricsServer.start(metrics, config.metrics_listen)
    log("info", "serving metrics", address=str(config.metrics_listen))
    return metrics, endpoint


def _check_backends(config: Config) -> kmsg.KmsgReader | None:
    """Fail closed if the configured backends cannot work here; the kmsg reader if used."""
    if config.firewall == "iptables":
        for tool in ("iptables-restore", "ip6tables-restore"):
            if shutil.which(tool, path=DEFAULT_PATH) is None:
                raise ConfigError(f'firewall = "iptables" needs {tool}: apt-get install iptables')
    if config.log_backend != "kmsg":
        return None
    # LOG inside a jail's netns prints nothing unless this host-wide switch is on; it can only
    # be set from the initial network namespace (not from a container).
    kmsg.enable_nf_log_all_netns()
    return kmsg.KmsgReader()


def raise_fd_limit() -> None:
    """Take the hard RLIMIT_NOFILE as the soft one: every running job holds ~9 fds and every
    connection one, and the default soft limit (1024) would end the daemon's service at about
    a hundred jobs. (The helpers it starts set their own, lower limits.)"""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def make_homes_dir(state_dir: str) -> str:
    """Where jobs' HOMEs are made: root only (each job's is a tmpfs owned by the job, bound
    into the jail by its init while that is still root)."""
    path = os.path.join(state_dir, "homes")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def write_resolv_conf(state_dir: str) -> str:
    """Every job's /etc/resolv.conf: the stub, on both loopbacks (bind-mounted read-only)."""
    path = os.path.join(state_dir, "resolv.conf")
    with open(path, "w") as f:
        f.write("nameserver 127.0.0.1\nnameserver ::1\noptions edns0 timeout:2 attempts:2\n")
    os.chmod(path, 0o644)
    return path
