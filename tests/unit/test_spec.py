"""Request → spec (pure): uid rules, strings, environment, limits and maxima, policy, hosts."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest

from netjail import protocol as p
from netjail.daemon.config import Config, Limits
from netjail.daemon.config import Policy as PolicySettings
from netjail.daemon.spec import (
    DEFAULT_PATH,
    JOB_HOME,
    NOBODY,
    CapturedStdio,
    FixedUser,
    LeasedUser,
    PassedStdio,
    TerminalStdio,
    applied_limits,
    job_spec,
)
from netjail.errors import PermissionDeniedError, RequestError
from netjail.kernel.peer import PeerCred
from netjail.policy import CidrRule

ROOT = PeerCred(pid=1, uid=0, gid=0)
ALICE = PeerCred(pid=2, uid=1000, gid=1001)


def request(**fields: object) -> p.RunRequest:
    return p.RunRequest(argv=["/bin/true"], **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("peer", "uid", "gid", "expected"),
    [
        (ROOT, None, None, LeasedUser()),
        (ROOT, 0, None, FixedUser(0, 0)),
        (ROOT, 1234, None, FixedUser(1234, 1234)),
        (ROOT, 1234, 99, FixedUser(1234, 99)),
        (ROOT, None, 99, FixedUser(NOBODY, 99)),
        (ALICE, None, None, FixedUser(1000, 1001)),
        (ALICE, 1000, 1001, FixedUser(1000, 1001)),
    ],
)
def test_who_the_job_runs_as(
    peer: PeerCred, uid: int | None, gid: int | None, expected: FixedUser | LeasedUser
) -> None:
    """Root chooses (default: a leased uid; --uid alone sets the gid too); others run as
    themselves."""
    spec = job_spec(request(uid=uid, gid=gid), peer, Config())
    assert spec.user == expected
    assert spec.owner == peer


@pytest.mark.parametrize(("uid", "gid"), [(0, None), (None, 0), (1001, None), (None, 1000)])
def test_only_root_may_choose_the_uid_or_gid(uid: int | None, gid: int | None) -> None:
    """A non-root client asking for any other uid or gid is refused."""
    with pytest.raises(PermissionDeniedError, match="only root may choose the job's uid or gid"):
        job_spec(request(uid=uid, gid=gid), ALICE, Config())


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"argv": ["a\0b"]}, "must not contain NUL bytes"),
        ({"env": {"A": "x\0"}}, "must not contain NUL bytes"),
        ({"cwd": "/tmp\0"}, "must not contain NUL bytes"),
        ({"env": {"A=B": "x"}}, "invalid environment variable name 'A=B'"),
        ({"cwd": "relative"}, "cwd must be an absolute path"),
        ({"add_hosts": ["nocolon"]}, "invalid --add-host 'nocolon'"),
        ({"add_hosts": ["name:not-an-ip"]}, "invalid --add-host 'name:not-an-ip'"),
        ({"allow": ["bad rule!"]}, "invalid allow rule 'bad rule!'"),
    ],
)
def test_bad_requests_are_refused_with_what_is_wrong(
    fields: dict[str, object], message: str
) -> None:
    """Each malformed field is a RequestError that names it."""
    argv = fields.pop("argv", ["/bin/true"])
    with pytest.raises(RequestError, match=message):
        job_spec(p.RunRequest(argv=argv, **fields), ROOT, Config())  # type: ignore[arg-type]


def test_environment_defaults_are_overridden_by_the_request() -> None:
    """PATH, HOME and LANG have safe defaults; the client's values win."""
    spec = job_spec(request(env={"HOME": "/tmp", "X": "1"}), ROOT, Config())
    assert spec.env == {"PATH": DEFAULT_PATH, "HOME": "/tmp", "LANG": "C.UTF-8", "X": "1"}
    assert spec.cwd == JOB_HOME == "/home/job"
    assert job_spec(request(), ROOT, Config()).env["HOME"] == JOB_HOME


def test_stdio_modes() -> None:
    """'capture' keeps its byte limit; 'fds' and 'null' are both passed fds."""
    assert job_spec(request(stdio="capture", capture_bytes=7), ROOT, Config()).stdio == (
        CapturedStdio(7)
    )
    assert job_spec(request(stdio="fds"), ROOT, Config()).stdio == PassedStdio()
    assert job_spec(request(stdio="null"), ROOT, Config()).stdio == PassedStdio()


def test_capture_mode_carries_the_stdin_payload() -> None:
    """A stdin payload reaches the spec with capture mode; without one, stdin stays None."""
    asked = request(stdio="capture", capture_bytes=7, stdin=b"in\x00put")
    assert job_spec(asked, ROOT, Config()).stdio == CapturedStdio(7, b"in\x00put")
    assert job_spec(request(stdio="capture"), ROOT, Config()).stdio == CapturedStdio(1 << 20)


def test_a_terminal_takes_the_window_size_and_only_a_terminal_does() -> None:
    """'tty' keeps the window size asked for (0x0, unknown, without one); a window size with
    any other stdio is refused."""
    window = p.WindowSize(rows=40, cols=120)
    assert job_spec(request(stdio="tty", window=window), ROOT, Config()).stdio == (
        TerminalStdio(rows=40, cols=120)
    )
    assert job_spec(request(stdio="tty"), ROOT, Config()).stdio == TerminalStdio(0, 0)
    with pytest.raises(RequestError, match='needs stdio "tty"'):
        job_spec(request(stdio="fds", window=window), ROOT, Config())


def test_limits_take_defaults_and_maxima() -> None:
    """Unset limits take the defaults, or the maximum when there is no default."""
    settings = Limits(default_memory=1 << 30, default_pids=None, max_pids=64, kill_grace=2.0)
    applied = applied_limits(
        settings, memory=None, cpus=None, pids=None, timeout=None, kill_grace=None
    )
    assert applied == p.AppliedLimits(
        memory_bytes=1 << 30, cpus=None, pids=64, timeout_s=None, kill_grace_s=2.0
    )


@pytest.mark.parametrize(
    ("asked", "message"),
    [
        ({"memory": 2 << 30}, "--memory above the daemon's maximum of 1G"),
        ({"cpus": 3.0}, "--cpus above the daemon's maximum of 2"),
        ({"pids": 65}, "--pids above the daemon's maximum of 64"),
        ({"timeout": 61.0}, "--timeout above the daemon's maximum of 60"),
    ],
)
def test_limits_above_a_maximum_are_refused(asked: dict[str, float], message: str) -> None:
    """Asking for more than the operator allows is an error, never silently capped."""
    settings = Limits(
        max_memory=1 << 30, max_cpus=2.0, default_pids=None, max_pids=64, max_timeout=60.0
    )
    values: dict[str, float | None] = dict.fromkeys(("memory", "cpus", "pids", "timeout"))
    values.update(asked)
    with pytest.raises(RequestError, match=message):
        applied_limits(settings, kill_grace=None, **values)  # type: ignore[arg-type]


def test_policy_is_the_jobs_allow_list_else_the_default_and_every_deny() -> None:
    """The operator's default_deny always applies; default_allow only without the job's own."""
    config = replace(
        Config(),
        policy=PolicySettings(default_allow=("pypi.org",), default_deny=("evil.example",)),
    )
    own = job_spec(request(allow=["10.0.0.0/8:5432"], deny=["x.example"]), ROOT, config)
    assert [type(rule) for rule in own.policy.allow] == [CidrRule]
    assert not own.policy.allows("pypi.org", 443)
    assert not own.policy.allows("evil.example", 443)
    default = job_spec(request(), ROOT, config)
    assert default.policy.allows("pypi.org", 443)


def test_hosts_tables_are_taken_from_the_request_and_the_config() -> None:
    """--add-host entries are canonical names to addresses; the daemon's table is carried."""
    config = replace(Config(), hosts={"mirror.internal": ipaddress.ip_address("192.0.2.7")})
    spec = job_spec(
        request(add_hosts=["api.example.test:192.0.2.44", "v6.example.test:[2001:db8::1]"]),
        ROOT,
        config,
    )
    assert dict(spec.job_hosts) == {
        "api.example.test": ipaddress.ip_address("192.0.2.44"),
        "v6.example.test": ipaddress.ip_address("2001:db8::1"),
    }
    assert dict(spec.daemon_hosts) == {"mirror.internal": ipaddress.ip_address("192.0.2.7")}


def test_the_decision_timeout_is_the_config_s_when_the_job_is_asked_for() -> None:
    """A job waits for live decisions as long as the config said when it was asked for; the
    connection, not the request, decides whether it asks at all."""
    config = replace(Config(), policy=PolicySettings(decision_timeout=3.0))
    spec = job_spec(request(decide=True), ROOT, config)
    assert spec.decision_timeout_s == 3.0
    assert spec.ask is None
    assert job_spec(request(), ROOT, Config()).decision_timeout_s == p.DECISION_TIMEOUT_S
