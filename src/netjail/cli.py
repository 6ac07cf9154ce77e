"""``netjail``: the command-line client, a thin layer over ``netjail.client``."""

from __future__ import annotations

import contextlib
import functools
import os
import select
import signal
import sys
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, NoReturn, TypeVar

import click
import msgspec

from netjail import console, eventview, ptyrelay, statusview
from netjail import protocol as p
from netjail.client import DEFAULT_SOCKET, Client, EventStream, default_socket
from netjail.console import EXIT_NETJAIL, say
from netjail.errors import ExecError, NetjailError
from netjail.relay import Sink
from netjail.text import sanitize_argv
from netjail.units import parse_cpus, parse_duration, parse_size

F = TypeVar("F", bound=Callable[..., Any])


def _fail(message: str, code: int = EXIT_NETJAIL) -> NoReturn:
    say(message)
    sys.exit(code)


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


class _Commands(click.Group):
    """netjail's commands, none of which ever ends in a traceback."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        # Called with no arguments, as the `netjail` program (not by a test runner that passes
        # its own): the process is ours to end.
        owns_process = not args and "args" not in kwargs
        try:
            try:
                return super().main(*args, **kwargs)
            except Exception as e:  # the last line of defence: one line, never a traceback
                _fail(f"internal error ({type(e).__name__}: {e}); please report it")
        except SystemExit as e:
            if owns_process:
                _exit_now(e.code)
            raise


def _exit_now(code: str | int | None) -> NoReturn:
    """Exit with ``code`` without tearing the interpreter down: freeing every module costs
    netjail about as much as a fifth of its start (7-10 ms here), on every command. Nothing is
    left to run at exit but the flush of stdio, done first (unless coverage is measuring this
    process, whose data is saved at exit)."""
    if "coverage" in sys.modules:
        sys.exit(code)
    if isinstance(code, str):
        say(code)
    status = code if isinstance(code, int) else (0 if code is None else 1)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status & 0xFF)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
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


# Options after COMMAND belong to COMMAND (`netjail run ls -l`), as with sudo or timeout.
@main.command(context_settings={"allow_interspersed_args": False})
@click.option(
    "--uid",
    type=int,
    default=None,
    help="Run the job as this uid (root only; default: for root a uid of the job's own, "
    "for others yourself).",
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
    "--intercept",
    multiple=True,
    metavar="NAME",
    help="Allow NAME (as --allow NAME) and see its HTTP inside TLS: the job trusts a CA of "
    "its own (repeatable).",
)
@click.option(
    "--mock",
    "mocks",
    multiple=True,
    metavar="'METHOD NAME/GLOB=STATUS[:BODY|:@FILE]'",
    help="Answer matching requests without the upstream; intercepts NAME (repeatable).",
)
@click.option(
    "--deny-request",
    "deny_requests",
    multiple=True,
    metavar="'METHOD NAME/GLOB'",
    help="Refuse matching requests with a 403; intercepts NAME (repeatable).",
)
@click.option(
    "--allow-request",
    "allow_requests",
    multiple=True,
    metavar="'METHOD NAME/GLOB'",
    help="Allow matching requests; NAME's other requests get a 403 (repeatable).",
)
@click.option(
    "--redact",
    multiple=True,
    metavar="NAME:REGEX|NAME:@secrets",
    help="Remove matches from NAME's responses (bodies and headers) (repeatable).",
)
@click.option(
    "--inject-header",
    "inject_headers",
    multiple=True,
    metavar="NAME:Header=VALUE",
    help="Add a header to requests to NAME; $VAR is taken from this shell, never seen by the "
    "job (repeatable).",
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
@click.option(
    "--events",
    "events_to",
    metavar="FILE|-|fd:N",
    default=None,
    help="Print events to FILE, stdout ('-') or file descriptor N instead of stderr.",
)
@click.option("--quiet", "-q", is_flag=True, help="Print no events, nor the summary.")
@click.option("--json", "as_json", is_flag=True, help="Print events as JSON lines.")
@click.option(
    "--verbose", "-v", is_flag=True, help="Also print allowed connections and DNS answers."
)
@click.option(
    "--tty/--no-tty",
    "-t/-T",
    "tty",
    default=None,
    help="Give the job a terminal of its own (a pty made in its jail; job control works), "
    "relayed with this one in raw mode [default: when stdin and stdout are terminals].",
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
    intercept: tuple[str, ...],
    mocks: tuple[str, ...],
    deny_requests: tuple[str, ...],
    allow_requests: tuple[str, ...],
    redact: tuple[str, ...],
    inject_headers: tuple[str, ...],
    binds: tuple[str, ...],
    ro_binds: tuple[str, ...],
    hostname: str | None,
    report_path: str | None,
    events_to: str | None,
    quiet: bool,
    as_json: bool,
    verbose: bool,
    tty: bool | None,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND in a jail; its exit status is passed through.

    Events are printed on stderr, each a whole line between the job's own lines; at the end,
    a summary of what was blocked and the --allow that would let each name through.

    With a terminal (-t, the default when stdin and stdout are terminals), the job gets a pty
    of its own, with this terminal's size, and every key goes to it: Ctrl-C is SIGINT for the
    job's foreground process group, as in any shell, and does not end netjail by itself (a
    job that ignores it: `netjail ps`, then `netjail kill -s KILL JOB`). Without one (-T),
    SIGINT, SIGTERM, SIGHUP and SIGQUIT go to every process of the job, and a second Ctrl-C
    within 2 s kills it. Either way, those signals sent to netjail go to the job.

    Exit status: the command's; 128+N if killed by signal N (130 after Ctrl-C); 124 on
    --timeout; 137 when killed for reaching --memory (as for SIGKILL: stderr says which); 143
    when netjaild stopped while the job ran (stderr says so); 125 when netjail itself failed;
    126/127 when the command could not be executed / was not found; 2 for a usage error.
    """
    try:
        # Opened before the job: a bad path fails now, not once the job has run.
        report_out = console.open_report(report_path)
        sink = None if quiet else Sink(console.open_events(events_to))
        mounts = [p.parse_bind(b, "rw") for b in binds] + [p.parse_bind(b, "ro") for b in ro_binds]
        terminal = ptyrelay.wants_tty(tty)
        job_env = _parse_env(env)
        if terminal:
            # What the job's programs need to drive the terminal the user has.
            job_env.setdefault("TERM", os.environ.get("TERM") or "xterm")
        request = p.RunRequest(
            argv=list(command),
            env=job_env,
            cwd=cwd or console.current_directory(),
            cwd_fallback="error" if cwd else "home",
            binds=mounts,
            hostname=hostname,
            uid=uid,
            gid=gid,
            stdio="tty" if terminal else "fds",
            window=ptyrelay.window_size() if terminal else None,
            memory_bytes=memory,
            cpus=cpus,
            pids=pids,
            timeout_s=timeout,
            kill_grace_s=kill_grace,
            allow=list(allow),
            deny=list(deny),
            add_hosts=list(add_hosts),
            intercept=list(intercept),
            mocks=console.expand_mocks(mocks),
            deny_requests=list(deny_requests),
            allow_requests=list(allow_requests),
            redact=list(redact),
            inject_headers=console.expand_headers(inject_headers),
        )
        display = console.Display(
            sink,
            form="json" if as_json else "text",
            choice="all" if verbose else "blocked",
            deny=deny,
        )
        end = console.run_job(_client(ctx), request, console.stdio_fds(), display)
    except ExecError as e:
        _fail(str(e), e.exit_code)
    except NetjailError as e:
        _fail(str(e))
    sys.exit(console.conclude(end, report_out))


@main.command()
@click.option("--job", default=None, help="Only this job's events.")
@click.option("--follow", "-f", is_flag=True, help="Print new events as they happen, until ^C.")
@click.option(
    "--history", is_flag=True, help="With --follow: first the events seen before it started."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_context
@_handle_errors
def events(ctx: click.Context, job: str | None, follow: bool, history: bool, as_json: bool) -> None:
    """Show events of your jobs (root: all jobs): those seen so far, or with --follow the new
    ones as they happen, one line per destination and its count, kept up to date."""
    # The daemon sends its history first, then new events: those first seen before we asked
    # are that history (the wall clock is the daemon's, on this same machine).
    since = time.time() if follow and not history else None
    board = eventview.EventBoard()
    refreshed = 0.0

    def show(event: p.Event) -> None:
        if as_json:
            click.echo(msgspec.json.encode(event).decode())
            return
        if not follow:
            click.echo(f"{event.time} {event.job} {eventview.format_event(event)}")
            return
        line = board.add(event)
        if line is not None:
            click.echo(f"{event.time} {event.job} {line.text()}")
            line.shown = line.count

    def refresh() -> None:
        for line in board.grown():
            click.echo(f"{line.latest.time} {line.latest.job} {line.text()}")
            line.shown = line.count

    stream = _client(ctx).open_events(job, follow=follow)
    # ^C ends a --follow quietly (exit 0): it is the only way to end one.
    with stream, contextlib.suppress(KeyboardInterrupt):
        while True:
            now = time.monotonic()
            wait = None if not board.grown() else max(0.0, refreshed + console.REFRESH_S - now)
            if not stream.buffered and not _readable(stream, wait):
                refresh()
                refreshed = time.monotonic()
                continue
            for message in stream.receive():
                if isinstance(message, p.EventsEnd):
                    return
                if since is None or _seen_at(message.event) >= since:
                    show(message.event)
            if time.monotonic() - refreshed >= console.REFRESH_S:
                refresh()
                refreshed = time.monotonic()


def _seen_at(event: p.Event) -> float:
    """When the daemon first saw ``event`` (its ``time``; ms precision, so rounded up)."""
    try:
        return datetime.fromisoformat(event.time).timestamp() + 0.001
    except ValueError:
        return time.time()  # no time to tell by: shown, as new


def _readable(stream: EventStream, timeout: float | None) -> bool:
    ready, _, _ = select.select([stream], [], [], timeout)
    return bool(ready)


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
    except (KeyError, ValueError):
        raise click.BadParameter(f"unknown signal {sig!r}", param_hint="--signal") from None
    if not 1 <= number <= 64:
        raise click.BadParameter(f"{sig!r} is not a signal (1-64)", param_hint="--signal")
    _client(ctx).kill(job, number)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
@click.pass_context
@_handle_errors
def status(ctx: click.Context, as_json: bool) -> None:
    """Show the daemon's version, uptime, jobs, warm jails and event counters."""
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
    fork_server = statusview.describe_fork_server(st)
    if fork_server is not None:
        click.echo(f"fork server: {fork_server}")
    if st.pool_size is not None:
        pool = "off" if st.pool_size == 0 else f"{st.pool_ready or 0} of {st.pool_size} ready"
        click.echo(f"warm jails: {pool}")


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
