"""``netjail``'s commands other than ``run``: events, ps, kill, status and doctor."""

from __future__ import annotations

import contextlib
import select
import signal
import time
from datetime import datetime

import click
import msgspec

from netjail import console, eventview, statusview
from netjail import protocol as p
from netjail.clicontext import handle_errors, open_client
from netjail.client import EventStream, default_socket
from netjail.text import sanitize_argv


@click.command()
@click.option("--job", default=None, help="Only this job's events.")
@click.option("--follow", "-f", is_flag=True, help="Print new events as they happen, until ^C.")
@click.option(
    "--history", is_flag=True, help="With --follow: first the events seen before it started."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_context
@handle_errors
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

    stream = open_client(ctx).open_events(job, follow=follow)
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


@click.command()
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
@click.pass_context
@handle_errors
def ps(ctx: click.Context, as_json: bool) -> None:
    """List running jobs (yours; root: all)."""
    jobs = open_client(ctx).ps()
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


@click.command()
@click.argument("job")
@click.option("--signal", "-s", "sig", default="TERM", help="Signal name or number [default TERM].")
@click.pass_context
@handle_errors
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
    open_client(ctx).kill(job, number)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
@click.pass_context
@handle_errors
def status(ctx: click.Context, as_json: bool) -> None:
    """Show the daemon's version, uptime, jobs, warm jails and event counters."""
    st = open_client(ctx).status()
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


@click.command()
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
