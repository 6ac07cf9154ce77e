"""The job pipeline and lifecycle over a fake JailHost: build, fail closed, supervise, report."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

import pytest

from netjail.daemon import jailbuild, pipeline
from netjail.daemon.config import Config
from netjail.daemon.etcfiles import make_etc_dir
from netjail.daemon.intake import EventIntake
from netjail.daemon.jobs import JobManager, may_see
from netjail.daemon.pipeline import JailContext, Job
from netjail.daemon.recovery import StateRecords
from netjail.daemon.spec import (
    CapturedStdio,
    FixedUser,
    JobSpec,
    LeasedUser,
    PassedStdio,
    applied_limits,
)
from netjail.daemon.uids import UidLeases, UidRange
from netjail.errors import JailError, NotFoundError
from netjail.kernel.fsplan import Bind, FdSource, PathSource
from netjail.kernel.peer import PeerCred
from netjail.policy import Policy
from netjail.protocol import BindMount, Event, Report
from tests.unit.fakehost import BUILD_OPERATIONS, FakeJailHost, exited

T = TypeVar("T")
ROOT = PeerCred(pid=1, uid=0, gid=0)
PASSED = PassedStdio()
NOBODY_USER = FixedUser(65534, 65534)
ALICE = PeerCred(pid=2, uid=1000, gid=1000)
NFLOG_CAPTURE = Path(__file__).parent / "data" / "nflog_capture.json"


class Logged:
    """A logger that keeps (level, message, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __call__(self, level: str, message: str, **fields: Any) -> None:
        self.lines.append((level, message, fields))

    def messages(self) -> list[str]:
        return [message for _, message, _ in self.lines]


@pytest.fixture
def host() -> Iterator[FakeJailHost]:
    fake = FakeJailHost()
    yield fake
    fake.close_all()


@pytest.fixture
def ctx(host: FakeJailHost, tmp_path: Path) -> JailContext:
    return fake_context(host, tmp_path)


def fake_context(host: FakeJailHost, directory: Path) -> JailContext:
    """A JailContext over ``host``, its records and leases in ``directory``, a Logged log."""
    return JailContext(
        host=host,
        intake=EventIntake(),
        records=StateRecords(str(directory)),
        log=Logged(),
        log_backend="nflog",
        uids=UidLeases(UidRange(70000, 70009), str(directory), frozenset()),
        homes_dir="/var/lib/netjail/homes",
        resolv_conf="/var/lib/netjail/resolv.conf",
        trust_dir=str(directory / "trust"),
        etc_dir=make_etc_dir(str(directory)),
    )


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


def spec(
    *,
    owner: PeerCred = ROOT,
    timeout: float | None = None,
    grace: float = 0.01,
    stdio: PassedStdio | CapturedStdio = PASSED,
    policy: Policy | None = None,
    user: FixedUser | LeasedUser = NOBODY_USER,
) -> JobSpec:
    limits = applied_limits(
        Config().limits, memory=None, cpus=None, pids=None, timeout=timeout, kill_grace=grace
    )
    return JobSpec(
        argv=["/bin/true"],
        env={"PATH": "/usr/bin"},
        cwd="/",
        user=user,
        owner=owner,
        limits=limits,
        stdio=stdio,
        policy=policy or Policy([]),
        client_binds=(BindMount(source="/srv/data", target="/data", access="ro"),),
    )


async def finish(manager: JobManager, job: Job) -> Report:
    report = await asyncio.wait_for(job.finished, 5)
    await asyncio.wait_for(job.removed.wait(), 5)
    return report


def assert_undone_in_reverse(host: FakeJailHost) -> None:
    """What the failed build made is undone in reverse; the bind sources, released either way
    once the fork server has them (always_cleanup), go last."""

    def steps(items: list[str]) -> list[str]:
        return [item for item in items if not item.startswith("bind source ")]

    assert steps(host.undone_order) == list(reversed(steps(host.made)))
    assert sorted(host.undone_order) == sorted(host.made)


def assert_nothing_left(host: FakeJailHost, ctx: JailContext) -> None:
    assert host.live() == []
    assert host.open_sockets() == []
    assert os.listdir(ctx.records.directory) == []
    assert ctx.intake.open_feed_ids() == []


# ---------------------------------------------------------------------- a whole job


def test_a_job_is_built_in_order_runs_and_is_torn_down_in_reverse(
    host: FakeJailHost, ctx: JailContext
) -> None:
    """The steps run in the documented order; after the report every one is undone, reversed."""
    host.exit_at_once = exited(3)

    async def scenario() -> tuple[Job, Report]:
        manager = JobManager(ctx)
        job = await manager.start(spec(), [], None)
        assert manager.jobs == {job.id: job}
        report = await finish(manager, job)
        assert manager.jobs == {}
        return job, report

    job, report = run(scenario())
    assert host.journal[: len(BUILD_OPERATIONS)] == list(BUILD_OPERATIONS)
    assert host.made == [
        f"cgroup {job.id}",
        f"netns {job.netns_name}",
        f"home /var/lib/netjail/homes/{job.id}",
        "bind source /srv/data",
        f"process {job.id}",
    ]
    # The bind source is closed once the fork server has it; the rest after the report.
    assert host.undone_order == [
        "bind source /srv/data",
        f"process {job.id}",
        f"home /var/lib/netjail/homes/{job.id}",
        f"netns {job.netns_name}",
        f"cgroup {job.id}",
    ]
    assert report.exit_code == 3
    assert report.signal is None
    assert report.seccomp_profile == "netjail-default-1"
    assert (report.cpu_user_s, report.cpu_system_s, report.pids_peak) == (0.5, 0.25, 3)
    assert report.memory_peak_bytes == 1 << 20
    assert_nothing_left(host, ctx)


def test_the_spawn_request_carries_the_jail(host: FakeJailHost, ctx: JailContext) -> None:
    """The child is told the job's netns, cgroup, uid, hidden paths and its /etc files."""
    host.exit_at_once = exited(0)

    async def scenario() -> Job:
        manager = JobManager(ctx)
        job = await manager.start(spec(), [], None)
        await finish(manager, job)
        return job

    job = run(scenario())
    (plan,) = host.requests
    assert plan.netns_path == f"/run/netns/{job.netns_name}"
    assert plan.cgroup_procs == [f"/fake/cgroup/{job.id}/cgroup.procs"]
    assert (plan.uid, plan.gid, plan.argv, plan.cwd) == (65534, 65534, ["/bin/true"], "/")
    assert plan.hostname == f"netjail-{job.id}"
    binds = [step for step in plan.fs.steps if isinstance(step, Bind)]
    etc = ctx.etc_dir
    assert [(b.source, b.target, b.access) for b in binds[-5:]] == [
        (PathSource(f"/var/lib/netjail/homes/{job.id}"), "/home/job", "rw"),
        (FdSource(0), "/data", "ro"),
        (PathSource("/var/lib/netjail/resolv.conf"), "/etc/resolv.conf", "ro"),
        (PathSource(f"{etc}/{job.id}.hosts"), "/etc/hosts", "ro"),
        (PathSource(f"{etc}/{job.id}.hostname"), "/etc/hostname", "ro"),
    ]
    assert os.listdir(etc) == []  # the job's files are removed with its jail
    assert len(host.source_fds[0]) == 1
    ((path, creds, access),) = host.bind_opens
    assert (path, creds.uid, access) == ("/srv/data", 0, "ro")
    (rules,) = host.rules
    assert rules.job_id == job.id
    assert str(rules.proxied[0].network) == "198.18.0.0/15"


@pytest.mark.parametrize("operation", BUILD_OPERATIONS)
def test_a_failure_at_any_kernel_step_undoes_the_earlier_ones_in_reverse(
    host: FakeJailHost, ctx: JailContext, operation: str
) -> None:
    """Fail closed: the client gets a JailError naming the failure and nothing is left."""
    host.fail_at = operation

    async def scenario() -> None:
        manager = JobManager(ctx)
        with pytest.raises(JailError, match=f"injected failure at {operation}"):
            await manager.start(spec(), [], None)
        assert manager.jobs == {}
        assert manager.jobs_total == 0

    run(scenario())
    assert [op for op in host.journal if op in BUILD_OPERATIONS][-1] == operation
    assert_undone_in_reverse(host)
    assert_nothing_left(host, ctx)


@pytest.mark.parametrize(
    ("module", "step"),
    [
        (jailbuild, "write_record"),
        (pipeline, "open_feed"),
        (pipeline, "start_dns_stub"),
        (pipeline, "start_proxy"),
        (pipeline, "wire_stdio"),
    ],
)
def test_a_failure_at_any_daemon_step_undoes_the_earlier_ones_in_reverse(
    host: FakeJailHost, ctx: JailContext, module: Any, step: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon's own steps fail closed too, with everything made before them undone."""
    original = getattr(module, step)

    def failing(*args: Any, **kwargs: Any) -> Any:
        raise OSError(28, f"no space left for {step}")

    monkeypatch.setattr(module, step, failing)
    assert original is not failing

    async def scenario() -> None:
        with pytest.raises(JailError, match=f"cannot build the jail: .*{step}"):
            await JobManager(ctx).start(spec(stdio=CapturedStdio(100)), [], None)

    run(scenario())
    assert_undone_in_reverse(host)
    assert_nothing_left(host, ctx)


def test_an_undo_that_fails_is_logged_and_the_others_still_run(
    host: FakeJailHost, ctx: JailContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One undo failing neither hides the build's error nor skips the remaining undos."""
    host.fail_at = "spawn"

    def broken_delete(name: str) -> None:
        raise OSError(16, "Device or resource busy")

    monkeypatch.setattr(host, "delete_netns", broken_delete)

    async def scenario() -> None:
        with pytest.raises(JailError, match="injected failure at spawn"):
            await JobManager(ctx).start(spec(), [], None)

    run(scenario())
    log = ctx.log
    assert isinstance(log, Logged)
    assert ("error", "cannot remove a job's resource") in [(lv, m) for lv, m, _ in log.lines]
    assert [f for _, m, f in log.lines if m == "cannot remove a job's resource"] == [
        {"resource": "netns", "error": "[Errno 16] Device or resource busy"}
    ]
    assert [u for u in host.undone_order if not u.startswith("bind")][-1].startswith("cgroup ")
    assert os.listdir(ctx.records.directory) == []


def test_a_record_exists_while_the_job_runs(host: FakeJailHost, ctx: JailContext) -> None:
    """The crash-recovery record names the job and its netns until the job is gone."""

    async def scenario() -> tuple[Job, list[str], dict[str, Any]]:
        manager = JobManager(ctx)
        job = await manager.start(spec(), [], None)
        names = os.listdir(ctx.records.directory)
        with open(os.path.join(ctx.records.directory, names[0])) as f:
            record = json.load(f)
        host.end(job.process.pid, exited(0))
        await finish(manager, job)
        return job, names, record

    job, names, record = run(scenario())
    assert names == [f"{job.id}.json"]
    assert (record["job"], record["netns"]) == (job.id, job.netns_name)
    assert os.listdir(ctx.records.directory) == []


# ---------------------------------------------------------------------- supervision


def test_a_job_past_its_timeout_is_terminated_then_killed(
    host: FakeJailHost, ctx: JailContext
) -> None:
    """Timeout: SIGTERM to the job's init (it forwards), the grace, then SIGKILL the cgroup."""

    async def scenario() -> tuple[Job, Report]:
        manager = JobManager(ctx)
        job = await manager.start(spec(timeout=0.05, grace=0.01), [], None)
        return job, await finish(manager, job)

    job, report = run(scenario())
    assert report.timed_out is True
    assert report.signal == signal.SIGKILL
    assert host.processes[job.process.pid].signals == [signal.SIGTERM]
    assert f"kill_all {job.id}" in host.journal
    log = ctx.log
    assert isinstance(log, Logged)
    assert "job timed out" in log.messages()
    assert_nothing_left(host, ctx)


def test_kill_signals_the_main_process_and_sigkill_the_whole_cgroup(
    host: FakeJailHost, ctx: JailContext
) -> None:
    """kill(SIGUSR1) reaches the main process only; SIGKILL also empties the cgroup."""

    async def scenario() -> tuple[Job, Report]:
        manager = JobManager(ctx)
        job = await manager.start(spec(), [], None)
        await manager.kill(job, signal.SIGUSR1)
        assert not job.finished.done()
        await manager.kill(job, signal.SIGKILL)
        return job, await finish(manager, job)

    job, report = run(scenario())
    process = host.processes[job.process.pid]
    assert process.signals == [signal.SIGUSR1, signal.SIGKILL]
    assert report.signal == signal.SIGKILL
    assert process.closed is True


def test_graceful_stop_ends_every_job_and_waits_for_their_reports(
    host: FakeJailHost, ctx: JailContext
) -> None:
    """shutdown(): each job gets SIGTERM and its report is ready before shutdown returns."""
    host.fatal_signals.add(signal.SIGTERM)

    async def scenario() -> list[Job]:
        manager = JobManager(ctx)
        jobs = [await manager.start(spec(), [], None) for _ in range(2)]
        await manager.shutdown()
        assert all(job.finished.done() for job in jobs)
        for job in jobs:
            await asyncio.wait_for(job.removed.wait(), 5)
        return jobs

    jobs = run(scenario())
    assert [host.processes[job.process.pid].signals for job in jobs] == [[signal.SIGTERM]] * 2
    assert [job.finished.result().signal for job in jobs] == [signal.SIGTERM] * 2
    assert_nothing_left(host, ctx)


def test_a_supervision_failure_fails_the_job_and_still_tears_down(
    host: FakeJailHost, ctx: JailContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the report cannot be made, the client gets a JailError and the jail still goes."""
    host.exit_at_once = exited(0)

    def broken(*args: Any, **kwargs: Any) -> Report:
        raise RuntimeError("report assembly broke")

    monkeypatch.setattr("netjail.daemon.jobs.build_report", broken)

    async def scenario() -> None:
        manager = JobManager(ctx)
        job = await manager.start(spec(), [], None)
        with pytest.raises(JailError, match="report assembly broke"):
            await asyncio.wait_for(job.finished, 5)
        await asyncio.wait_for(job.removed.wait(), 5)

    run(scenario())
    assert_nothing_left(host, ctx)


def test_the_end_kills_only_what_the_job_left_behind(host: FakeJailHost, ctx: JailContext) -> None:
    """A job's init kills the rest of its PID namespace before it says the job ended: a job
    whose cgroup holds only its (exiting) init then gets no kill before its figures are read;
    one whose cgroup still lists another process has it killed (and waited for) first."""

    async def scenario() -> tuple[Job, Job]:
        manager = JobManager(ctx)
        quiet = await manager.start(spec(), [], None)
        host.cgroups[quiet.id].members.append(quiet.process.pid)
        host.end(quiet.process.pid, exited(0))
        await finish(manager, quiet)
        left = await manager.start(spec(), [], None)
        host.cgroups[left.id].members.append(4242)
        host.end(left.process.pid, exited(0))
        await finish(manager, left)
        await manager.shutdown()
        return quiet, left

    quiet, left = run(scenario())
    journal = host.journal
    # The teardown's removal kills (nothing) in every case; the question is what came first.
    assert journal.index(f"usage {quiet.id}") < journal.index(f"kill_all {quiet.id}")
    assert journal.index(f"kill_all {left.id}") < journal.index(f"usage {left.id}")
    assert host.cgroups[left.id].members == []
    assert_nothing_left(host, ctx)


def test_unreadable_resource_usage_is_logged_and_reported_as_unknown(
    host: FakeJailHost, ctx: JailContext
) -> None:
    """No made-up numbers: without the cgroup's figures the report has nulls (CPU from rusage)."""
    host.exit_at_once = exited(0)

    async def scenario() -> Report:
        manager = JobManager(ctx)
        job = await manager.start(spec(), [], None)
        host.cgroups[job.id].usage_result = OSError(2, "No such file or directory")
        return await finish(manager, job)

    report = run(scenario())
    assert (report.memory_peak_bytes, report.pids_peak) == (None, None)
    assert (report.cpu_user_s, report.cpu_system_s) == (0.01, 0.02)
    assert report.oom_killed is False


def test_captured_output_is_in_the_report_and_truncated_at_the_limit(
    host: FakeJailHost, ctx: JailContext
) -> None:
    """Capture mode: stdout and stderr up to the limit each, with the truncation flagged."""
    host.output = (b"hello world", b"err")

    async def scenario() -> Report:
        manager = JobManager(ctx)
        job = await manager.start(spec(stdio=CapturedStdio(5)), [], None)
        await asyncio.sleep(0.01)
        host.end(job.process.pid, exited(0))
        return await finish(manager, job)

    report = run(scenario())
    assert (report.stdout, report.stdout_truncated) == (b"hello", True)
    assert (report.stderr, report.stderr_truncated) == (b"err", False)
    assert_nothing_left(host, ctx)


def test_events_from_the_jail_reach_the_report_and_the_sink(
    host: FakeJailHost, ctx: JailContext
) -> None:
    """NFLOG datagrams read from the jail's socket become events, streamed and reported."""
    streamed: list[Event] = []
    datagrams = [bytes.fromhex(h) for h in json.loads(NFLOG_CAPTURE.read_text())]

    async def scenario() -> Report:
        manager = JobManager(ctx)
        job = await manager.start(spec(), [], streamed.append)
        peer = host.nflog_peers[job.netns_name]
        peer.send(datagrams[0])
        peer.send(datagrams[3])  # seq 3 after seq 0: two messages lost on the way
        host.end(job.process.pid, exited(0))
        return await finish(manager, job)

    report = run(scenario())
    assert [(e.proto, e.dst, e.port, e.verdict, e.via) for e in report.events] == [
        ("tcp", "203.0.113.9", 443, "blocked", "nflog"),
        ("udp", "8.8.8.8", 53, "blocked", "nflog"),
    ]
    assert streamed == report.events
    assert report.lost_events == 2
    assert ctx.intake.events_lost == 2
    assert [seen.owner_uid for seen in ctx.intake.history] == [0, 0]


# ---------------------------------------------------------------------- lookup


def test_may_see_is_root_or_the_owner() -> None:
    """Root sees every job; a user sees their own; an unknown owner is seen by root only."""
    assert may_see(ROOT, 1000)
    assert may_see(ALICE, 1000)
    assert not may_see(ALICE, 1001)
    assert not may_see(ALICE, None)
    assert may_see(ROOT, None)


def test_find_and_visible_jobs_hide_other_users_jobs(host: FakeJailHost, ctx: JailContext) -> None:
    """Another user's job is 'no such job', exactly like one that does not exist."""

    async def scenario() -> None:
        manager = JobManager(ctx)
        roots = await manager.start(spec(owner=ROOT), [], None)
        alices = await manager.start(spec(owner=ALICE), [], None)
        assert manager.visible_jobs(ROOT) == [roots, alices]
        assert manager.visible_jobs(ALICE) == [alices]
        assert manager.find(alices.id, ALICE) is alices
        with pytest.raises(NotFoundError, match=f"no such job: {roots.id}"):
            manager.find(roots.id, ALICE)
        with pytest.raises(NotFoundError, match="no such job: j-nothere"):
            manager.find("j-nothere", ROOT)
        for job in (roots, alices):
            await manager.kill(job, signal.SIGKILL)
            await finish(manager, job)

    run(scenario())


def test_is_jailed_by_netns_by_cgroup_or_when_unknown(host: FakeJailHost, ctx: JailContext) -> None:
    """A peer in a job's netns, or in a job cgroup, or one we cannot inspect, is jailed."""

    async def scenario() -> None:
        manager = JobManager(ctx)
        job = await manager.start(spec(), [], None)
        assert manager.is_jailed("0::/user.slice\n", job.netns_inode)
        assert manager.is_jailed("12:pids:/netjail/j-0a1b2c3d\n", 1)
        assert manager.is_jailed(None, 1)
        assert manager.is_jailed("0::/\n", None)
        assert not manager.is_jailed("0::/user.slice\n", 1)
        await manager.kill(job, signal.SIGKILL)
        await finish(manager, job)

    run(scenario())


def test_phases_are_logged_when_a_job_starts(host: FakeJailHost, ctx: JailContext) -> None:
    """'job started' carries the job, its pid and the three start-up phase timings; 'job ended'
    the time from the exit to the report."""
    host.exit_at_once = exited(0)

    async def scenario() -> Job:
        manager = JobManager(ctx)
        job = await manager.start(spec(), [], None)
        await finish(manager, job)
        return job

    job = run(scenario())
    log = ctx.log
    assert isinstance(log, Logged)
    (fields,) = [f for _, m, f in log.lines if m == "job started"]
    assert fields["job"] == job.id
    assert fields["pid"] == job.process.pid
    assert set(fields) >= {"cgroup_ms", "jail_ms", "spawn_ms"}
    assert all(isinstance(fields[k], float) for k in ("cgroup_ms", "jail_ms", "spawn_ms"))
    (ended,) = [f for _, m, f in log.lines if m == "job ended"]
    assert isinstance(ended["finish_ms"], float)
    assert ended["finish_ms"] >= 0


def test_roots_job_leases_a_uid_and_returns_it_after_the_cgroup_is_gone(
    host: FakeJailHost, ctx: JailContext
) -> None:
    """A LeasedUser job runs as a uid of the range; the lease goes back only at the very end."""
    host.exit_at_once = exited(0)

    async def scenario() -> tuple[Job, Report, list[int]]:
        manager = JobManager(ctx)
        job = await manager.start(spec(user=LeasedUser()), [], None)
        held = [lease.uid for lease in ctx.uids.held]
        return job, await finish(manager, job), held

    job, report, held = run(scenario())
    assert held == [job.uid] == [report.uid]
    assert 70000 <= job.uid <= 70009
    assert (report.uid, report.gid) == (job.uid, job.uid)
    assert host.requests[0].uid == job.uid
    assert ctx.uids.held == []


def test_a_hidden_cwd_falls_back_to_home_only_when_asked(
    host: FakeJailHost, ctx: JailContext
) -> None:
    """cwd_fallback 'home': a cwd outside the jail's view becomes /home/job; 'error' keeps it."""
    host.exit_at_once = exited(0)

    async def scenario(fallback: Literal["error", "home"], cwd: str) -> Job:
        manager = JobManager(ctx)
        job = await manager.start(
            dataclasses.replace(spec(), cwd=cwd, cwd_fallback=fallback), [], None
        )
        await finish(manager, job)
        return job

    assert run(scenario("home", "/work/main")).cwd == "/home/job"
    assert run(scenario("home", "/usr/share")).cwd == "/usr/share"
    assert run(scenario("home", "/data/x")).cwd == "/data/x"  # under the client's bind
    assert run(scenario("error", "/work/main")).cwd == "/work/main"
