"""``netjaild``: the daemon's entry point and start-up order."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import signal
import socket
import sys
from typing import Literal

import click

from netjail._version import __version__
from netjail.daemon.jobs import JobManager, LimitSettings
from netjail.daemon.log import Logger
from netjail.daemon.server import Server
from netjail.errors import NetjailError
from netjail.kernel.cgroup import CgroupManager, detect_cgroup_layout
from netjail.kernel.spawn import ForkServer

DEFAULT_SOCKET = "/run/netjail/netjail.sock"
DEFAULT_STATE_DIR = "/var/lib/netjail"
SOCKET_GROUP = "netjail"
# Jobs get the socket's directory hidden (an empty tmpfs over it), so it must not be a directory
# jobs need.
_SHARED_DIRS = {"/", "/tmp", "/run", "/var/run", "/var/tmp", "/dev/shm", "/home", "/root", "/etc"}


def _listen(path: str) -> socket.socket:
    """Bind the daemon socket: parent dir 0755, socket 0660, group netjail if it exists."""
    parent = os.path.dirname(os.path.abspath(path))
    if parent in _SHARED_DIRS:
        raise NetjailError(
            f"the socket must be in a directory of its own (e.g. {DEFAULT_SOCKET}), "
            f"not {parent}: jobs get that directory hidden"
        )
    os.makedirs(parent, mode=0o755, exist_ok=True)
    os.chmod(parent, 0o755)
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
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o117)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o660)
    with contextlib.suppress(KeyError):
        os.chown(path, 0, grp.getgrnam(SOCKET_GROUP).gr_gid)
    sock.listen(128)
    return sock


async def _serve(server: Server, forkserver: ForkServer, log: Logger) -> None:
    loop = asyncio.get_running_loop()
    forkserver.attach(loop)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    serving = asyncio.ensure_future(server.serve_forever())
    log("info", "netjaild ready", version=__version__, socket=server.listener.getsockname(), pid=os.getpid())
    await stop.wait()
    log("info", "stopping: ending running jobs", jobs=len(server.jobs.jobs))
    serving.cancel()
    server.listener.close()
    await server.jobs.shutdown()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--socket", "socket_path", default=DEFAULT_SOCKET, show_default=True, help="Unix socket to serve.")
@click.option("--state-dir", default=DEFAULT_STATE_DIR, show_default=True, help="Where job state is kept for crash recovery.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True, help="Log line format on stderr.")
@click.version_option(__version__, prog_name="netjaild")
def main(socket_path: str, state_dir: str, log_format: Literal["text", "json"]) -> None:
    """Run the netjail daemon in the foreground (as root)."""
    log = Logger(log_format)
    if os.geteuid() != 0:
        click.echo("netjaild: must run as root (it builds network namespaces and firewalls)", err=True)
        sys.exit(1)
    # First, while this process has one thread: every job is forked from this helper.
    forkserver = ForkServer.start()
    try:
        with open("/proc/self/mountinfo") as mi, open("/proc/self/cgroup") as cg:
            layout = detect_cgroup_layout(mi.read(), cg.read())
        cgroups = CgroupManager(layout)
        cgroups.setup()
        listener = _listen(socket_path)
        jobs = JobManager(
            forkserver=forkserver,
            cgroups=cgroups,
            state_dir=state_dir,
            hide_paths=[os.path.dirname(os.path.abspath(socket_path)), os.path.abspath(state_dir)],
            limits=LimitSettings(),
            log=log,
        )
        for item in jobs.recover():
            log("warning", "removed a leftover of a previous run", item=item)
        server = Server(listener=listener, jobs=jobs, log=log, cgroup_mode=cgroups.mode)
    except (NetjailError, OSError) as e:
        forkserver.close()
        log("error", "cannot start", error=str(e))
        click.echo(f"netjaild: {e}", err=True)
        sys.exit(1)
    try:
        asyncio.run(_serve(server, forkserver, log))
    finally:
        forkserver.close()
        with contextlib.suppress(OSError):
            os.unlink(socket_path)
    log("info", "netjaild stopped")
