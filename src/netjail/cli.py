"""``netjail``: the command-line client, a thin layer over ``netjail.client``."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, BinaryIO, NoReturn, TypeVar

import click
import msgspec

from netjail import protocol as p
from netjail.client import DEFAULT_SOCKET, Client, default_socket
from netjail.errors import ExecError, NetjailError
from netjail.text import sanitize, sanitize_argv
from netjail.units import format_size, parse_cpus, parse_duration, parse_size

#: Exit status for netjail's own failures (daemon unreachable, bad request), as docker run.
EXIT_NETJAIL = 125
EXIT_TIMEOUT = 124
EXIT_OOM = 137

F = TypeVar("F", bound=Callable[..., Any])


def _fail(message: str, code: int = EXIT_NETJAIL) -> NoReturn:
    click.echo(f"netjail: {sanitize(message, 1000)}", err=True)
    sys.exit(code)


def format_event(event: p.Event) -> str:
    """One human line for an event.

    ``blocked tcp 203.0.113.9:443 uid=65534``, ``blocked tcp api.stripe.com (198.18.0.3):443
    uid=65534``, ``blocked dns api.stripe.com A``, ``allowed tcp pypi.org (198.18.0.2):443
    uid=65534 out=517 in=6120``, ``redirected udp 8.8.8.8:53 uid=65534 (foreign_resolver)``,
    ``blocked dns query (short_header)``.
    """
    if event.kind == "dns" and event.via == "dns":
        # A query too broken to have a name (or a type) reads "blocked dns query (malformed)".
        text = f"{event.verdict} dns {sanitize(event.domain) if event.domain else 'query'}"
        if event.qtype:
            text += f" {sanitize(event.qtype)}"
        if event.reason and event.reason != "not_allowed" and event.verdict == "blocked":
            text += f" ({event.reason})"
        return text + (f" x{event.count}" if event.count > 1 else "")
    dst = event.dst or "?"
    port = f":{event.port}" if event.port is not None else ""
    if event.domain:
        where = f"{sanitize(event.domain)} ({dst}){port}"
    elif event.family == 6 and port:
        where = f"[{dst}]{port}"
    else:
        where = f"{dst}{port}"
    text = f"{event.verdict} {event.proto} {where}"
    if event.uid is not None:
        text += f" uid={event.uid}"
    if event.verdict == "allowed" and event.bytes_out is not None:
        text += f" out={event.bytes_out} in={event.bytes_in}"
    if event.reason:
        # An allowed event's reason says how it was let through ("unverified": raw TCP by a
        # tcp:// rule, the name not checked).
        text += f" ({sanitize(event.reason)})"
    if event.count > 1:
        text += f" x{event.count}"
    if event.detail and event.verdict != "allowed":
        text += f": {sanitize(event.detail)}"
    return text


def _open_report(path: str | None) -> BinaryIO | None:
    """Where --report goes, opened now: a path that cannot be written fails before the job
    runs (exit 125), not after it, when the report would be lost."""
    if path is None:
        return None
    if path == "-":
        return os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    try:
        return open(path, "wb")
    except OSError as e:
        _fail(f"--report {sanitize(path)}: {e.strerror}")


class _StartedJob:
    """The job ``netjail run`` started, once the daemon said so (for forwarding signals)."""

    def __init__(self) -> None:
        self.job: str | None = None

    def record(self, job: str, _pid: int) -> None:
        self.job = job


def _client(ctx: click.Context) -> Client:
    return Client(ctx.obj["socket"])


def _handle_errors(func: F) -> F:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ExecError as e:
            _fail(str(e), e.exit_code)
        except NetjailError as e:
            _fail(str(e))

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--socket",
    default=None,
    metavar="PATH",
    help=f"netjaild's socket [env NETJAIL_SOCKET; default {DEFAULT_SOCKET}]",
)
@click.version_option(package_name="netjail", prog_name="netjail")
@click.pass_context
def main(ctx: click.Context, socket: str | None) -> None:
    """Run commands in a network jail that blocks and reports every egress attempt."""
    ctx.obj = {"socket": socket or default_socket()}


def _parse_env(values: tuple[str, ...]) -> dict[str, str]:
    env = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected K=V, got {item!r}", param_hint="--env")
        env[key] = value
    return env


def _parsed(
    parse: Callable[[str], float], *, minimum: float = 0, maximum: float, bounds: str
) -> Callable[[click.Context, click.Parameter, str | None], Any]:
    """A click callback: ``parse`` the text, then hold it to the protocol's bounds."""

    def callback(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
        if value is None:
            return None
        try:
            parsed = parse(value)
        except NetjailError as e:
            raise click.BadParameter(str(e)) from None
        if not minimum <= parsed <= maximum:
            raise click.BadParameter(f"{value!r} is out of range: {bounds}")
        return parsed

    return callback


_memory = _parsed(parse_size, minimum=p.MIN_MEMORY_BYTES, maximum=2**62, bounds="at least 1M")
_cpus = _parsed(parse_cpus, maximum=p.MAX_CPUS, bounds=f"at most {p.MAX_CPUS:g}")
_timeout = _parsed(parse_duration, maximum=p.MAX_TIMEOUT_S, bounds="at most 30 days (720h)")
_kill_grace = _parsed(parse_duration, maximum=p.MAX_KILL_GRACE_S, bounds="at most 1h")


def _stdio_fds() -> list[int]:
    fds = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:
            # A closed stdio fd: the job gets /dev/null there instead.
            fds.append(os.open(os.devnull, os.O_RDWR))
    return fds


# Options after COMMAND belong to COMMAND (`netjail run ls -l`), as with sudo or timeout.
@main.command(context_settings={"allow_interspersed_args": False})
@click.option(
    "--uid",
    type=int,
    default=None,
    help="Run the job as this uid (root only; default 65534, non-root: yourself).",
)
@click.option("--gid", type=int, default=None, help="Run the job with this gid (root only).")
@click.option(
    "--env",
    "env",
    multiple=True,
    metavar="K=V",
    help="Set an environment variable for the job (repeatable).",
)
@click.option(
    "--cwd",
    default=None,
    metavar="DIR",
    help="Working directory of the job [default: the current one].",
)
@click.option(
    "--memory",
    callback=_memory,
    default=None,
    metavar="SIZE",
    help="Memory limit, swap included, e.g. 512M, 2G.",
)
@click.option(
    "--cpus", callback=_cpus, default=None, metavar="N", help="CPU limit in CPUs, e.g. 0.5."
)
@click.option(
    "--pids",
    type=click.IntRange(1, p.MAX_PIDS),
    default=None,
    metavar="N",
    help="Most processes/threads at once.",
)
@click.option(
    "--timeout",
    callback=_timeout,
    default=None,
    metavar="DURATION",
    help="Kill the job after this long, e.g. 30s, 5m (exit 124).",
)
@click.option(
    "--kill-grace",
    callback=_kill_grace,
    default=None,
    metavar="DURATION",
    help="Time between SIGTERM and SIGKILL on timeout [default 2s].",
)
@click.option(
    "--allow",
    multiple=True,
    metavar="RULE",
    help="Allow a destination: NAME, *.NAME, NAME:PORT[,PORT], CIDR:PORT (repeatable).",
)
@click.option(
    "--deny", multiple=True, metavar="RULE", help="Deny a destination; beats --allow (repeatable)."
)
@click.option(
    "--add-host",
    "add_hosts",
    multiple=True,
    metavar="NAME:IP",
    help="Connect NAME to IP instead of resolving it (may be private) (repeatable).",
)
@click.option(
    "--bind",
    "binds",
    multiple=True,
    metavar="SRC[:DST]",
    help="Show host path SRC at DST (default: the same path), read-write (repeatable).",
)
@click.option(
    "--ro-bind",
    "ro_binds",
    multiple=True,
    metavar="SRC[:DST]",
    help="Show host path SRC at DST (default: the same path), read-only (repeatable).",
)
@click.option("--hostname", default=None, help="The jail's host name [default: netjail-JOB].")
@click.option(
    "--report",
    "report_path",
    metavar="FILE",
    default=None,
    help="Write the job report as JSON to FILE ('-': stdout); checked before the job starts.",
)
@click.option("--quiet", "-q", is_flag=True, help="Do not print events on stderr.")
@click.option(
    "--verbose", "-v", is_flag=True, help="Also print allowed connections and DNS answers."
)
@click.argument("command", nargs=-1, required=True)
@click.pass_context
def run(
    ctx: click.Context,
    *,
    uid: int | None,
    gid: int | None,
    env: tuple[str, ...],
    cwd: str | None,
    memory: int | None,
    cpus: float | None,
    pids: int | None,
    timeout: float | None,
    kill_grace: float | None,
    allow: tuple[str, ...],
    deny: tuple[str, ...],
    add_hosts: tuple[str, ...],
    binds: tuple[str, ...],
    ro_binds: tuple[str, ...],
    hostname: str | None,
    report_path: str | None,
    quiet: bool,
    verbose: bool,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND in a jail; its exit status is passed through.

    Exit status: the command's; 128+N if killed by signal N; 124 on --timeout; 137 when killed
    for reaching --memory (as for SIGKILL: stderr says which); 125 when netjail itself failed;
    126/127 when the command could not be executed / was not found; 2 for a usage error.
    """
    client = _client(ctx)
    report_out = _open_report(report_path)
    started = _StartedJob()

    def forward(signum: int, _frame: object) -> None:
        # The job is in its own session, so the terminal's ^C reaches only us: pass it on.
        if started.job is not None:
            with contextlib.suppress(NetjailError):
                client.kill(started.job, signum)

    def on_event(event: p.Event) -> None:
        if quiet or (event.verdict == "allowed" and not verbose):
            return
        click.echo(f"netjail: {format_event(event)}", err=True)

    def note_cwd(started_in: str) -> None:
        here = sanitize(os.getcwd())
        click.echo(
            f"netjail: {here} is not in the jail's view, so the job runs in {started_in} "
            f"(--ro-bind {here} or --bind {here} to run it there)",
            err=True,
        )

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    try:
        mounts = [p.parse_bind(b, "rw") for b in binds] + [p.parse_bind(b, "ro") for b in ro_binds]
        result = client.run(
            list(command),
            env=_parse_env(env),
            cwd=cwd or os.getcwd(),
            cwd_fallback="error" if cwd else "home",
            binds=mounts,
            hostname=hostname,
            on_cwd=note_cwd,
            uid=uid,
            gid=gid,
            stdio="fds",
            fds=_stdio_fds(),
            memory_bytes=memory,
            cpus=cpus,
            pids=pids,
            timeout_s=timeout,
            kill_grace_s=kill_grace,
            allow=list(allow),
            deny=list(deny),
            add_hosts=list(add_hosts),
            on_event=on_event,
            on_start=started.record,
        )
    except ExecError as e:
        _fail(str(e), e.exit_code)
    except NetjailError as e:
        _fail(str(e))
    report = result.report
    if report_out is not None:
        data = msgspec.json.format(msgspec.json.encode(report), indent=2)
        with report_out:
            report_out.write(data + b"\n")
    if result.lost_events:
        click.echo(f"netjail: {result.lost_events} events lost (see the report)", err=True)
    if result.timed_out:
        click.echo(
            f"netjail: job {report.job} killed: timeout {_seconds(report)} reached", err=True
        )
        sys.exit(EXIT_TIMEOUT)
    if result.oom_killed:
        limit = report.limits.memory_bytes if report.limits else None
        shown = format_size(limit) if limit else "?"
        click.echo(f"netjail: job {report.job} killed: memory limit {shown} reached", err=True)
        sys.exit(EXIT_OOM)
    if result.signal is not None:
        sys.exit(128 + result.signal)
    sys.exit(result.exit_code if result.exit_code is not None else EXIT_NETJAIL)


def _seconds(report: p.Report) -> str:
    value = report.limits.timeout_s if report.limits else None
    return f"{value:g}s" if value is not None else "?"


@main.command()
@click.option("--job", default=None, help="Only this job's events.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events as they happen.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_context
@_handle_errors
def events(ctx: click.Context, job: str | None, follow: bool, as_json: bool) -> None:
    """Show events of your jobs (root: all jobs)."""
    try:
        for event in _client(ctx).events(job, follow=follow):
            if as_json:
                click.echo(msgspec.json.encode(event).decode())
            else:
                click.echo(f"{event.time} {event.job} {format_event(event)}")
    except KeyboardInterrupt:
        pass


@main.command()
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
@click.pass_context
@_handle_errors
def ps(ctx: click.Context, as_json: bool) -> None:
    """List running jobs (yours; root: all)."""
    jobs = _client(ctx).ps()
    if as_json:
        click.echo(msgspec.json.encode(jobs).decode())
        return
    click.echo(
        f"{'JOB':<12} {'PID':>7} {'UID':>6} {'EVENTS':>6}  STARTED                   COMMAND"
    )
    for j in jobs:
        command = sanitize_argv(j.argv, 60)
        click.echo(
            f"{j.job:<12} {j.pid or '-':>7} {j.uid:>6} {j.events:>6}  {j.started:<24}  {command}"
        )


@main.command()
@click.argument("job")
@click.option("--signal", "-s", "sig", default="TERM", help="Signal name or number [default TERM].")
@click.pass_context
@_handle_errors
def kill(ctx: click.Context, job: str, sig: str) -> None:
    """Send a signal to a running job (KILL: every process of the job)."""
    try:
        number = (
            int(sig)
            if sig.isdigit()
            else int(signal.Signals["SIG" + sig.upper().removeprefix("SIG")])
        )
    except KeyError:
        raise click.BadParameter(f"unknown signal {sig!r}", param_hint="--signal") from None
    _client(ctx).kill(job, number)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
@click.pass_context
@_handle_errors
def status(ctx: click.Context, as_json: bool) -> None:
    """Show the daemon's version, uptime, jobs and event counters."""
    st = _client(ctx).status()
    if as_json:
        fields = msgspec.to_builtins(st)
        fields.pop("op", None)  # the wire tag, not a status field
        click.echo(msgspec.json.encode(fields).decode())
        return
    click.echo(f"netjaild {st.version} (pid {st.pid}), up {st.uptime_s:.0f}s")
    click.echo(f"jobs: {st.jobs_running} running, {st.jobs_total} run in all")
    click.echo(f"events: {st.events_seen} seen, {st.events_lost} lost")
    click.echo(f"cgroups: {st.cgroup_mode or 'unknown'}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the checks as a JSON list.")
@click.pass_context
def doctor(ctx: click.Context, as_json: bool) -> None:
    """Check this machine for what netjail needs, and say how to fix what is missing.

    Exit status: 1 when a blocker FAILs (no job can run here), else 0; warnings do not count.
    """
    # Imported here: doctor's probes pull in ctypes, gzip and subprocess, which no other
    # command needs, and every command pays for what this module imports.
    from netjail import doctor as checkup  # noqa: PLC0415

    socket_path = ctx.obj["socket"] if isinstance(ctx.obj, dict) else default_socket()
    checks = checkup.run_checks(socket_path)
    if as_json:
        click.echo(checkup.checks_to_json(checks))
    else:
        for line in checkup.format_checks(checks):
            click.echo(line)
    if checkup.has_blocker(checks):
        ctx.exit(checkup.EXIT_BLOCKER)


if __name__ == "__main__":
    main()
