"""What the deep-jail tests share: job-side scripts, and running the client or CLI as a user."""

from __future__ import annotations

import contextlib
import json
import pwd
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

from netjail import JobResult
from netjail.kernel.fsplan import JOB_HOME

from .conftest import Daemon

PY = "/usr/bin/python3"

# The Python client library run as an unprivileged user: one run per JSON line of options in
# argv[2:], each printed as one JSON line (the error's class, code and message if it raised).
# "{client_pid}" in an argv becomes this client's own pid: a process in the host's netns.
USER_CLIENT = textwrap.dedent(
    """
    import json, os, sys
    from netjail import Client
    from netjail.errors import NetjailError
    from netjail.protocol import BindMount
    client = Client(sys.argv[1], timeout=10)
    for line in sys.argv[2:]:
        options = json.loads(line)
        options["argv"] = [a.replace("{client_pid}", str(os.getpid())) for a in options["argv"]]
        options["binds"] = [BindMount(**b) for b in options.get("binds", [])]
        try:
            r = client.run(cwd="/", stdio="capture", **options)
        except NetjailError as e:
            print(json.dumps({"error": type(e).__name__, "code": e.code, "message": str(e)}))
        else:
            out, err = r.stdout.decode(), r.stderr.decode()
            print(json.dumps({"exit": r.exit_code, "uid": r.report.uid, "out": out, "err": err}))
    """
)

# Job-side Python: outcome(f, *args) is "ok", or the name of the errno that f(*args) raised.
OUTCOME = textwrap.dedent(
    """
    import errno, os, sys
    def outcome(f, *args):
        try:
            f(*args)
        except OSError as e:
            return errno.errorcode[e.errno]
        return "ok"
    """
)


def text(result: JobResult) -> str:
    """A captured job's stdout."""
    assert result.stdout is not None
    return result.stdout.decode()


def as_user(user: pwd.struct_passwd, *argv: str) -> list[str]:
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", *argv]


def run_as_user(
    daemon: Daemon, user: pwd.struct_passwd, *requests: dict[str, object]
) -> list[dict[str, object]]:
    """Each request run by ``user``'s own library client; one result dict per request."""
    out = subprocess.run(
        as_user(user, sys.executable, "-c", USER_CLIENT, daemon.socket)
        + [json.dumps(r) for r in requests],
        capture_output=True,
        timeout=60,
        check=True,
        cwd="/",
    )
    return [json.loads(line) for line in out.stdout.splitlines()]


def cli_run(
    daemon: Daemon, cwd: str, *args: str, user: pwd.struct_passwd | None = None
) -> subprocess.CompletedProcess[bytes]:
    """`netjail run ARGS` started in ``cwd``, by root or by ``user``."""
    argv = [sys.executable, "-m", "netjail.cli", "--socket", daemon.socket, "run", *args]
    if user is not None:
        argv = as_user(user, *argv)
    return subprocess.run(argv, capture_output=True, timeout=60, cwd=cwd, check=False)


def cwd_note(cwd: str | Path) -> str:
    """The CLI's line when its cwd is not in the jail's view."""
    return (
        f"netjail: {cwd} is not in the jail's view, so the job runs in {JOB_HOME} "
        f"(--ro-bind {cwd} or --bind {cwd} to run it there)"
    )


@contextlib.contextmanager
def user_sleeper(user: pwd.struct_passwd, cwd: str | Path = "/", **env: str) -> Iterator[str]:
    """A `sleep 60` of ``user``'s on the host, started in ``cwd`` with ``env``: yields its pid."""
    sleeper = subprocess.Popen(as_user(user, "sleep", "60"), cwd=cwd, env=env)
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{sleeper.pid}/comm").read_text() != "sleep\n":  # setpriv is done
            assert time.monotonic() < deadline, "the sleeper never exec'd"
            time.sleep(0.01)
        yield str(sleeper.pid)
    finally:
        sleeper.kill()
        sleeper.wait()
