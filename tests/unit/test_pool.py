"""The warm pool over a fake JailHost: built ahead, claimed once, fitted, failing closed."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest

from netjail.daemon import pool as pool_module
from netjail.daemon.config import Config, Jail
from netjail.daemon.jobs import JobManager
from netjail.daemon.pipeline import JailContext, Job
from netjail.daemon.spec import FixedUser, LeasedUser
from netjail.errors import JailError
from netjail.kernel import cgroup as cgroups
from netjail.kernel.fsplan import Bind, PathSource, Tmpfs
from netjail.kernel.host import JobProcess
from netjail.kernel.jobplan import JobPlan
from netjail.policy import Policy, parse_rule
from netjail.protocol import Report
from tests.unit.fakehost import (
    CLAIM_OPERATIONS,
    POOL_BUILD_OPERATIONS,
    FakeJailHost,
    exited,
)
from tests.unit.test_pipeline import Logged, fake_context, run, spec

SIZE = 2


@pytest.fixture
def host() -> Iterator[FakeJailHost]:
    fake = FakeJailHost()
    yield fake
    fake.close_all()


@pytest.fixture
def ctx(host: FakeJailHost, tmp_path: Path) -> JailContext:
    return fake_context(host, tmp_path)


async def until(condition: Callable[[], bool]) -> None:
    """Let the loop (and the fake's worker threads) run until ``condition`` holds."""
    for _ in range(2000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("the condition never held")


async def warm(manager: JobManager, ready: int = SIZE) -> None:
    """Start the pool and wait until ``ready`` jails are warm."""
    manager.start_pool()
    await until(lambda: manager.pool.ready >= ready)


async def finish(job: Job) -> Report:
    report = await asyncio.wait_for(job.finished, 5)
    await asyncio.wait_for(job.removed.wait(), 5)
    return report


def pool_jails(host: FakeJailHost) -> list[str]:
    """The standby inits made, one per pool jail built."""
    return [what for what in host.made if what.startswith("standby ")]


def test_a_job_claims_a_warm_jail_and_its_jail_goes_with_it(
    host: FakeJailHost, ctx: JailContext
) -> None:
    """The job runs in a pool jail's standby, without building a jail; after the report the
    jail is destroyed whole, in reverse, and the pool is refilled."""
    host.exit_at_once = exited(7)

    async def scenario() -> tuple[Job, Report]:
        manager = JobManager(ctx, pool_size=SIZE)
        await warm(manager)
        host.journal.clear()
        job = await manager.start(spec(user=LeasedUser()), [], None)
        report = await finish(job)
        await warm(manager)
        await manager.shutdown()
        return job, report

    job, report = run(scenario())
    assert report.exit_code == 7
    # No netns, cgroup, process, HOME or /etc file was made for the job itself: only what is
    # per job. (The refill's builds, under way meanwhile, make HOMEs of their own.)
    claim = [op for op in host.journal if op in CLAIM_OPERATIONS and op != "make_home"]
    assert claim == ["apply_limits", "open_bind_source", "start_standby"]
    home = f"/var/lib/netjail/homes/{job.id}"
    assert host.made.count(f"home {home}") == 1
    assert host.made.index(f"home {home}") < host.made.index(f"standby {job.id}")
    assert host.homes_made[home] == (job.uid, job.gid, Jail().home_size)
    assert host.journal.index("start_standby") < host.journal.index(f"kill_all {job.id}")
    assert f"standby {job.id}" in host.made
    (plan,) = host.requests
    assert plan.netns_path == f"/run/netns/{job.netns_name}"
    assert host.cgroups[job.id].limits == cgroups.Limits(pids=4096)
    # The job's own undos, then its pool jail's (standby, netns, cgroup), as a cold job's.
    ours = [u for u in host.undone_order if job.id in u]
    assert ours == [
        f"standby {job.id}",
        f"home /var/lib/netjail/homes/{job.id}",
        f"netns netjail-{job.id}",
        f"cgroup {job.id}",
    ]
    # SIZE warm, one claimed, one more built, and all of them gone after the stop.
    assert len(pool_jails(host)) == SIZE + 1
    assert host.live() == []
    assert os.listdir(ctx.records.directory) == []
    assert ctx.uids.held == []


def test_a_lone_job_s_jail_is_replaced_after_its_report(
    host: FakeJailHost, ctx: JailContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no other job about, the claimed jail's replacement is not built beside the job
    (it would slow its start): it is built once the job's report is out."""
    monkeypatch.setattr(pool_module, "REFILL_AFTER_CLAIM_S", 30.0)

    async def scenario() -> tuple[list[str], list[str]]:
        manager = JobManager(ctx, pool_size=SIZE)
        await warm(manager)
        host.journal.clear()
        job = await manager.start(spec(user=LeasedUser()), [], None)
        await asyncio.sleep(0.05)
        while_running = list(host.journal)
        host.end(job.process.pid, exited(0))
        await finish(job)
        await warm(manager)
        after = list(host.journal)
        await manager.shutdown()
        return while_running, after

    while_running, after = run(scenario())
    assert "start_standby" in while_running
    assert "create_cgroup" not in while_running
    assert "create_cgroup" in after
    assert host.live() == []


def test_a_lone_job_that_runs_on_has_its_jail_replaced_after_a_while(
    host: FakeJailHost, ctx: JailContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job that runs longer than ``REFILL_AFTER_CLAIM_S`` does not hold up the refill."""
    monkeypatch.setattr(pool_module, "REFILL_AFTER_CLAIM_S", 0.05)

    async def scenario() -> int:
        manager = JobManager(ctx, pool_size=SIZE)
        await warm(manager)
        job = await manager.start(spec(user=LeasedUser()), [], None)
        await warm(manager)  # while the job still runs
        ready = manager.pool.ready
        host.end(job.process.pid, exited(0))
        await finish(job)
        await manager.shutdown()
        return ready

    assert run(scenario()) == SIZE
    assert host.live() == []


def test_under_load_a_claimed_jail_is_replaced_at_once(
    host: FakeJailHost, ctx: JailContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While another job runs, the pool refills at the claim: it serves a load."""
    monkeypatch.setattr(pool_module, "REFILL_AFTER_CLAIM_S", 30.0)

    async def scenario() -> bool:
        manager = JobManager(ctx, pool_size=SIZE)
        await warm(manager)
        first = await manager.start(spec(user=LeasedUser()), [], None)
        await asyncio.sleep(0.05)  # a lone job's: deferred
        host.journal.clear()
        second = await manager.start(spec(user=LeasedUser()), [], None)
        await until(lambda: "create_cgroup" in host.journal)
        running = not first.finished.done() and not second.finished.done()
        for job in (first, second):
            host.end(job.process.pid, exited(0))
            await finish(job)
        await manager.shutdown()
        return running

    assert run(scenario()) is True
    assert host.live() == []


def test_pool_jails_are_not_jobs(host: FakeJailHost, ctx: JailContext) -> None:
    """Warm jails are in neither the job table nor the job count; the pool counts them."""

    async def scenario() -> tuple[int, int, int]:
        manager = JobManager(ctx, pool_size=SIZE)
        await warm(manager)
        seen = (len(manager.jobs), manager.jobs_total, manager.pool.ready)
        await manager.shutdown()
        return seen

    assert run(scenario()) == (0, 0, SIZE)
    assert host.live() == []


@pytest.mark.parametrize("operation", POOL_BUILD_OPERATIONS)
def test_a_pool_build_that_fails_leaves_nothing_and_is_retried(
    host: FakeJailHost, ctx: JailContext, operation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure at any step of a pool jail's build undoes its earlier steps, is logged, and
    the pool tries again (after a pause) until it is full."""
    monkeypatch.setattr("netjail.daemon.pool.RETRY_MIN_S", 0.05)
    host.fail_at = operation
    log = ctx.log
    assert isinstance(log, Logged)

    async def scenario() -> None:
        manager = JobManager(ctx, pool_size=1)
        manager.start_pool()
        await until(lambda: "cannot build a pool jail" in log.messages())
        assert manager.pool.ready == 0
        assert host.live() == []
        host.fail_at = None
        await warm(manager, 1)
        await manager.shutdown()

    run(scenario())
    assert host.live() == []
    assert os.listdir(ctx.records.directory) == []
    assert ctx.uids.held == []


@pytest.mark.parametrize("operation", ["apply_limits", "in_netns", "replace_rules"])
def test_a_jail_that_cannot_be_fitted_is_destroyed_and_the_job_built_cold(
    host: FakeJailHost, ctx: JailContext, operation: str
) -> None:
    """Fail closed on claim: a pool jail whose limits or rules cannot be put in is destroyed,
    never used half-fitted; the job gets a jail built for it instead."""
    host.exit_at_once = exited(0)
    cidr = Policy([parse_rule("192.0.2.0/24:443")])

    async def scenario() -> Job:
        manager = JobManager(ctx, pool_size=1)
        await warm(manager, 1)
        host.fail_at = operation
        job = await manager.start(spec(policy=cidr), [], None)
        host.fail_at = None
        await finish(job)
        await manager.shutdown()
        return job

    job = run(scenario())
    (jail,) = pool_jails(host)[:1]
    assert f"process {job.id}" in host.made  # spawned cold
    assert jail != f"standby {job.id}"
    assert jail in host.undone_order
    log = ctx.log
    assert isinstance(log, Logged)
    assert "cannot fit a pool jail to a job; it is destroyed and the job built cold" in (
        log.messages()
    )
    assert host.live() == []


@pytest.mark.parametrize("operation", ["open_bind_source", "start_standby"])
def test_a_claimed_job_that_fails_to_start_undoes_its_steps_and_its_jail(
    host: FakeJailHost, ctx: JailContext, operation: str
) -> None:
    """After the claim the pool jail is the job's: a later failure undoes the job's steps and
    destroys the jail, and the client gets the error."""

    async def scenario() -> None:
        manager = JobManager(ctx, pool_size=1)
        await warm(manager, 1)
        host.fail_at = operation
        with pytest.raises(JailError, match=f"injected failure at {operation}"):
            await manager.start(spec(), [], None)
        host.fail_at = None
        assert manager.jobs == {}
        await manager.shutdown()

    run(scenario())
    assert host.live() == []
    assert os.listdir(ctx.records.directory) == []
    assert ctx.uids.held == []


def test_a_job_that_wants_other_files_gets_them_remade_in_its_pool_jail(
    host: FakeJailHost, ctx: JailContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pool jail's HOME is made for its leased uid and its /etc files for netjail-<job>: a
    job that runs as another uid, or asks for a hostname, gets those remade, at the same paths,
    removed once with the jail."""
    host.exit_at_once = exited(0)
    other = FixedUser(uid=1234, gid=1234)
    shown: dict[str, str] = {}
    start_standby = host.start_standby

    async def reading_etc(
        standby: JobProcess, plan: JobPlan, stdio: list[int], fds: list[int]
    ) -> None:
        for step in plan.fs.steps:
            if (
                isinstance(step, Bind)
                and isinstance(step.source, PathSource)
                and step.target.startswith("/etc/host")
            ):
                shown[step.target] = Path(step.source.path).read_text()
        await start_standby(standby, plan, stdio, fds)

    monkeypatch.setattr(host, "start_standby", reading_etc)

    async def scenario() -> Job:
        manager = JobManager(ctx, pool_size=1)
        await warm(manager, 1)
        named = dataclasses.replace(spec(user=other), hostname="box")
        job = await manager.start(named, [], None)
        await finish(job)
        await manager.shutdown()
        return job

    job = run(scenario())
    home = f"/var/lib/netjail/homes/{job.id}"
    assert f"standby {job.id}" in host.made  # warm
    assert host.made.count(f"home {home}") == 2
    assert host.homes_made[home] == (1234, 1234, Jail().home_size)
    assert "127.0.1.1\tbox\n" in shown["/etc/hosts"]
    assert shown["/etc/hostname"] == "box\n"
    assert host.live() == []
    assert os.listdir(ctx.etc_dir) == []


def test_a_pool_jail_whose_files_cannot_be_remade_is_destroyed_with_the_job(
    host: FakeJailHost, ctx: JailContext
) -> None:
    """A remade HOME that fails fails the job closed, with the error; nothing is left."""

    async def scenario() -> None:
        manager = JobManager(ctx, pool_size=1)
        await warm(manager, 1)
        host.fail_at = "make_home"
        with pytest.raises(JailError, match="injected failure at make_home"):
            await manager.start(spec(user=FixedUser(uid=1234, gid=1234)), [], None)
        host.fail_at = None
        await manager.shutdown()

    run(scenario())
    assert host.live() == []
    assert os.listdir(ctx.records.directory) == []
    assert ctx.uids.held == []


def test_a_job_with_the_default_limits_writes_none_at_its_claim(
    host: FakeJailHost, ctx: JailContext
) -> None:
    """Pool cgroups are made with the config's default limits: a job that asks for no limit
    of its own writes none when it claims one; a job with a limit of its own writes it."""
    host.exit_at_once = exited(0)

    async def scenario() -> None:
        manager = JobManager(ctx, pool_size=1)
        manager.pool.use_config(Config())
        await warm(manager, 1)
        await finish(await manager.start(spec(), [], None))
        assert "apply_limits" not in host.journal
        plain = spec()
        fewer = dataclasses.replace(plain, limits=msgspec.structs.replace(plain.limits, pids=64))
        await warm(manager, 1)
        await finish(await manager.start(fewer, [], None))
        await manager.shutdown()

    run(scenario())
    assert host.journal.count("apply_limits") == 1
    assert cgroups.Limits(pids=64) in [c.limits for c in host.cgroups.values()]
    assert host.live() == []


def test_a_pool_jail_keeps_only_limits_the_job_replaces(
    host: FakeJailHost, ctx: JailContext
) -> None:
    """A limit a pool cgroup was made with that the job would not set (a reload dropped the
    default) could not be taken back by writing the job's: such a jail is not claimed."""
    host.exit_at_once = exited(0)

    async def scenario() -> Job:
        manager = JobManager(ctx, pool_size=1)
        manager.pool.use_config(Config())
        await warm(manager, 1)
        plain = spec()
        unlimited = dataclasses.replace(
            plain, limits=msgspec.structs.replace(plain.limits, pids=None)
        )
        job = await manager.start(unlimited, [], None)
        await finish(job)
        await manager.shutdown()
        return job

    job = run(scenario())
    assert f"process {job.id}" in host.made  # built cold
    assert host.cgroups[job.id].limits == cgroups.Limits()
    assert host.live() == []


def test_a_policy_with_cidr_rules_replaces_the_base_ruleset(
    host: FakeJailHost, ctx: JailContext
) -> None:
    """The base ruleset proxies the synthetic pool only; a CIDR rule's range is added by one
    replacement inside the jail, and a policy without one changes nothing."""
    host.exit_at_once = exited(0)
    cidr = Policy([parse_rule("192.0.2.0/24:443")])

    async def scenario() -> None:
        manager = JobManager(ctx, pool_size=2)
        await warm(manager)
        await finish(await manager.start(spec(), [], None))
        assert "replace_rules" not in host.journal
        await finish(await manager.start(spec(policy=cidr), [], None))
        await manager.shutdown()

    run(scenario())
    assert host.journal.count("replace_rules") == 1
    (replaced,) = [rules for rules in host.rules if len(rules.proxied) > 1]
    assert [str(r.network) for r in replaced.proxied] == ["198.18.0.0/15", "192.0.2.0/24"]
    assert replaced.proxied[1].ports == frozenset({443})


def test_a_job_whose_limits_do_not_fit_a_pool_jail_is_built_cold(
    host: FakeJailHost, ctx: JailContext
) -> None:
    """A CPU limit needs a hierarchy a pool jail's cgroup is not in: the job is built cold and
    the warm jail stays for the next job."""
    host.exit_at_once = exited(0)

    async def scenario() -> tuple[Job, int]:
        manager = JobManager(ctx, pool_size=1)
        await warm(manager, 1)
        plain = spec()
        limited = dataclasses.replace(plain, limits=msgspec.structs.replace(plain.limits, cpus=0.5))
        job = await manager.start(limited, [], None)
        await finish(job)
        ready = manager.pool.ready
        await manager.shutdown()
        return job, ready

    job, ready = run(scenario())
    assert f"process {job.id}" in host.made
    assert host.cgroups[job.id].limits.cpus == 0.5
    assert ready == 1
    assert host.live() == []


def test_without_a_pool_every_job_is_built_cold(host: FakeJailHost, ctx: JailContext) -> None:
    """pool_size 0: nothing is built ahead, and jobs run as before."""
    host.exit_at_once = exited(0)

    async def scenario() -> Job:
        manager = JobManager(ctx, pool_size=0)
        manager.start_pool()
        job = await manager.start(spec(), [], None)
        await finish(job)
        await manager.shutdown()
        return job

    job = run(scenario())
    assert pool_jails(host) == []
    assert f"process {job.id}" in host.made
    assert host.live() == []


def test_a_stop_waits_for_builds_under_way_and_destroys_them(
    host: FakeJailHost, ctx: JailContext
) -> None:
    """A graceful stop during a build lets it finish, then destroys it: nothing is left."""

    async def scenario() -> None:
        manager = JobManager(ctx, pool_size=SIZE)
        manager.start_pool()
        await asyncio.sleep(0)
        await manager.shutdown()

    run(scenario())
    assert host.live() == []
    assert os.listdir(ctx.records.directory) == []
    assert ctx.uids.held == []


def test_a_standby_that_dies_while_waiting_takes_its_jail_out(
    host: FakeJailHost, ctx: JailContext
) -> None:
    """A warm jail whose standby init ended (killed, or its fork server gone) is never given
    to a job: it is destroyed, logged, and replaced."""

    async def scenario() -> str:
        manager = JobManager(ctx, pool_size=1)
        await warm(manager, 1)
        (standby,) = [p for p in host.processes.values() if p.what.startswith("standby ")]
        host.end(standby.pid, exited(None, 9))
        await until(lambda: standby.what in host.undone_order)
        await warm(manager, 1)
        await manager.shutdown()
        return standby.what

    dead = run(scenario())
    log = ctx.log
    assert isinstance(log, Logged)
    assert "a pool jail's standby init ended before any job; the jail is destroyed" in (
        log.messages()
    )
    assert dead != pool_jails(host)[1]
    assert host.live() == []


def test_new_tmpfs_sizes_rebuild_the_warm_jails(host: FakeJailHost, ctx: JailContext) -> None:
    """A standby mounts the jobs' tmpfs ahead: once the sizes change (a reload), the warm jails
    fit no new job, so they are destroyed and built again with the new sizes."""
    host.exit_at_once = exited(0)

    async def scenario() -> None:
        manager = JobManager(ctx, pool_size=1)
        await warm(manager, 1)
        (old,) = pool_jails(host)
        manager.pool.use_config(Config(jail=Jail(tmp_size=1 << 20)))
        await until(lambda: old in host.undone_order and manager.pool.ready == 1)
        bigger = dataclasses.replace(spec(), jail=Jail(tmp_size=1 << 20))
        await finish(await manager.start(bigger, [], None))
        await manager.shutdown()

    run(scenario())
    first, second = host.standby_bases[:2]
    assert first != second
    assert [s.size_bytes for s in second.steps if isinstance(s, Tmpfs) and s.target == "/tmp"] == [
        1 << 20
    ]
    assert len(host.requests) == 1  # the job ran in the rebuilt jail: no cold spawn
    assert [what for what in host.made if what.startswith("process ")] == []
    assert host.live() == []
