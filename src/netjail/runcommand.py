"""``netjail run``: its options, parsed and bounded as the protocol bounds them, and the request
they make."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from netjail import console, ptyrelay, runfiles
from netjail import protocol as p
from netjail.clicontext import fail, open_client
from netjail.errors import ExecError, NetjailError
from netjail.relay import Sink
from netjail.units import parse_cpus, parse_duration, parse_size

if TYPE_CHECKING:
    from netjail import decisionprompt


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
@click.command(context_settings={"allow_interspersed_args": False})
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
    "--ask",
    is_flag=True,
    help="Ask on this terminal (/dev/tty) about each name no rule covers, and each request to "
    "an intercepted name that its --allow-request rules miss, while the job waits: y allows "
    "the name as --allow NAME, or that method and path for the rest of the job; any other "
    f"key, or none within the daemon's timeout ({p.DECISION_TIMEOUT_S:g}s by default), "
    "denies it.",
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
    ask: bool,
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

    With --ask, each name no rule covers, and each request to an intercepted name that its
    --allow-request rules miss ("allow GET pypi.org/simple/foo?"), is a question on this
    terminal (/dev/tty, even with stdin or stdout redirected), one key for the answer, while
    the job's query or request waits; with no terminal, --ask fails before the job starts.

    Exit status: the command's; 128+N if killed by signal N (130 after Ctrl-C); 124 on
    --timeout; 137 when killed for reaching --memory (as for SIGKILL: stderr says which); 143
    when netjaild stopped while the job ran (stderr says so); 125 when netjail itself failed;
    126/127 when the command could not be executed / was not found; 2 for a usage error.
    """
    try:
        # Opened before the job: a bad path fails now, not once the job has run.
        report_out = runfiles.open_report(report_path)
        sink = None if quiet else Sink(runfiles.open_events(events_to))
        mounts = [p.parse_bind(b, "rw") for b in binds] + [p.parse_bind(b, "ro") for b in ro_binds]
        prompt = _open_prompt() if ask else None
        terminal = ptyrelay.wants_tty(tty)
        job_env = _parse_env(env)
        if terminal:
            # What the job's programs need to drive the terminal the user has.
            job_env.setdefault("TERM", os.environ.get("TERM") or "xterm")
        request = p.RunRequest(
            argv=list(command),
            env=job_env,
            cwd=cwd or runfiles.current_directory(),
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
            mocks=runfiles.expand_mocks(mocks),
            deny_requests=list(deny_requests),
            allow_requests=list(allow_requests),
            redact=list(redact),
            inject_headers=runfiles.expand_headers(inject_headers),
            decide=ask,
        )
        display = console.Display(
            sink,
            form="json" if as_json else "text",
            choice="all" if verbose else "blocked",
            deny=deny,
        )
        decide = None if prompt is None else prompt.ask
        end = console.run_job(open_client(ctx), request, runfiles.stdio_fds(), display, decide)
    except ExecError as e:
        fail(str(e), e.exit_code)
    except NetjailError as e:
        fail(str(e))
    sys.exit(console.conclude(end, report_out))


def _open_prompt() -> decisionprompt.DecisionPrompt:
    # Imported here: only --ask needs it, and every command pays for what this module imports.
    from netjail import decisionprompt as prompts  # noqa: PLC0415

    return prompts.open_prompt()
