"""One client connection (netjail.daemon.connection): handshake, framing, fds, requests,
the outbox bound, held events and hanging up; served over socketpairs to a stub JobManager."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from netjail import protocol as p
from netjail._version import __version__
from netjail.daemon import connection as connection_module
from netjail.daemon import outbox as outbox_module
from netjail.daemon.connection import HeldEvents
from netjail.daemon.outbox import MAX_QUEUED_EVENTS, Outbox, OutFrame, close_gracefully
from netjail.daemon.spec import CapturedStdio, PassedStdio
from netjail.errors import CgroupError, ExecError, JailError, NetjailError

from .daemonfakes import (
    ALICE,
    BOB,
    ROOT,
    STARTED_TEXT,
    Daemon,
    WireClient,
    egress_event,
    make_daemon,
    open_fds,
    run,
    session,
    spec_for,
)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    made = make_daemon(str(tmp_path))
    yield made
    made.close()


def protocol_error(message: str) -> p.ErrorMessage:
    return p.ErrorMessage(code="protocol", message=message)


# ---------------------------------------------------------------------- handshake


def test_hello_is_answered_with_the_protocol_and_daemon_versions(daemon: Daemon) -> None:
    """hello gets the protocol version and the daemon's version."""

    async def main() -> None:
        async with session(daemon, ALICE) as s:
            await s.client.send(p.Hello(version=p.PROTOCOL_VERSION, client="unit-test"))
            assert await s.client.receive() == p.HelloReply(version=1, daemon=__version__)

    run(main())


def test_a_request_before_hello_is_refused_and_hello_still_works(daemon: Daemon) -> None:
    """Any request before hello gets a protocol error; the connection stays open for hello."""

    async def main() -> None:
        async with session(daemon, ALICE) as s:
            await s.client.send(p.PsRequest())
            assert await s.client.receive() == protocol_error("the first message must be hello")
            await s.client.send(p.Hello(version=1), p.PsRequest())
            assert await s.client.receive() == p.HelloReply(version=1, daemon=__version__)
            assert await s.client.receive() == p.PsReply(jobs=[])

    run(main())


def test_a_wrong_protocol_version_is_refused_and_leaves_the_client_ungreeted(
    daemon: Daemon,
) -> None:
    """hello with another version names both versions; requests after it are still refused."""

    async def main() -> None:
        async with session(daemon, ALICE) as s:
            await s.client.send(p.Hello(version=2), p.StatusRequest())
            assert await s.client.receive() == protocol_error(
                "unsupported protocol version 2; this daemon speaks 1"
            )
            assert await s.client.receive() == protocol_error("the first message must be hello")

    run(main())


def test_a_second_hello_is_refused(daemon: Daemon) -> None:
    """hello after the handshake is a protocol error."""

    async def main() -> None:
        async with session(daemon, ALICE) as s:
            await s.client.hello()
            await s.client.send(p.Hello(version=1))
            assert await s.client.receive() == protocol_error("hello was already sent")

    run(main())


# ---------------------------------------------------------------------- framing


def test_an_oversize_frame_ends_the_connection_and_others_are_still_served(
    daemon: Daemon,
) -> None:
    """A frame over 1 MiB gets a protocol error and a hang-up; another client is unaffected."""

    async def main() -> None:
        async with session(daemon, ALICE) as big, session(daemon, BOB) as other:
            await big.client.hello()
            await big.client.send_bytes(b"x" * (p.MAX_FRAME_BYTES + 1))
            assert await big.client.receive_all() == [
                protocol_error("frame larger than 1048576 bytes")
            ]
            big.client.close()
            await big.serving
            await other.client.hello()
            await other.client.send(p.PsRequest())
            assert await other.client.receive() == p.PsReply(jobs=[])

    run(main())


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (b"{not json", "bad request: JSON is malformed: object keys must be strings (byte 1)"),
        (b'{"op":"nope"}', "bad request: unknown or missing op"),
        (b'{"op":"ps","extra":1}', "bad request: Object contains unknown field `extra`"),
    ],
)
def test_a_bad_frame_is_answered_and_the_connection_goes_on(
    daemon: Daemon, frame: bytes, message: str
) -> None:
    """Bad JSON, an unknown op or an unknown field: a protocol error, then the next frame is
    served (the line framing is intact, so only oversize frames end a connection)."""

    async def main() -> None:
        async with session(daemon, ALICE) as s:
            await s.client.hello()
            await s.client.send_bytes(frame + b"\n")
            assert await s.client.receive() == protocol_error(message)
            await s.client.send(p.PsRequest())
            assert await s.client.receive() == p.PsReply(jobs=[])

    run(main())


# ---------------------------------------------------------------------- fds with frames


def test_more_than_three_fds_end_the_connection_and_are_closed(daemon: Daemon) -> None:
    """fds accumulate across reads; past three, a protocol error and a hang-up, and the
    daemon's copies are closed."""

    async def main() -> None:
        before = open_fds()
        read_end, write_end = os.pipe()
        try:
            async with session(daemon, ALICE) as s:
                s.client.send_with_fds(b'{"op":', [read_end, write_end])
                s.client.send_with_fds(b'"ps"}\n', [read_end, write_end])
                assert await s.client.receive_all() == [
                    protocol_error("more than 3 file descriptors sent")
                ]
        finally:
            os.close(read_end)
            os.close(write_end)
        assert open_fds() == before

    run(main())


def test_stdio_fds_needs_exactly_three_fds(daemon: Daemon) -> None:
    """stdio "fds" with two fds is refused before any job starts; the fds are closed."""

    async def main() -> None:
        before = open_fds()
        read_end, write_end = os.pipe()
        try:
            async with session(daemon, ALICE) as s:
                await s.client.hello()
                frame = p.encode_message(p.RunRequest(argv=["true"], stdio="fds"))
                s.client.send_with_fds(frame, [read_end, write_end])
                assert await s.client.receive() == protocol_error(
                    'stdio "fds" needs exactly 3 file descriptors with the frame, got 2'
                )
                await s.client.send(p.PsRequest())
                assert await s.client.receive() == p.PsReply(jobs=[])
        finally:
            os.close(read_end)
            os.close(write_end)
        assert daemon.jobs.starts == []
        assert open_fds() == before

    run(main())


def test_stdio_fds_passes_the_clients_three_fds_to_the_job(daemon: Daemon) -> None:
    """The three fds sent with the run frame are the job's stdio; the daemon closes its copies."""

    async def main() -> None:
        before = open_fds()
        read_end, write_end = os.pipe()
        null = os.open(os.devnull, os.O_RDWR)
        sent = [read_end, write_end, null]
        try:
            async with session(daemon, ALICE) as s:
                await s.client.hello()
                frame = p.encode_message(p.RunRequest(argv=["true"], stdio="fds"))
                s.client.send_with_fds(frame, sent)
                started = await s.client.receive()
                assert isinstance(started, p.Started)
                daemon.jobs.finish(daemon.jobs.jobs[started.job])
                assert isinstance(await s.client.receive(), p.Exit)
        finally:
            identities = [(os.fstat(fd).st_dev, os.fstat(fd).st_ino) for fd in sent]
            for fd in sent:
                os.close(fd)
        [call] = daemon.jobs.starts
        assert call.spec.stdio == PassedStdio()
        assert [(st.st_dev, st.st_ino) for st in call.stdio] == identities
        assert open_fds() == before

    run(main())


def test_stdio_null_gives_the_job_dev_null_three_times(daemon: Daemon) -> None:
    """stdio "null": fds 0-2 are one /dev/null, closed by the daemon after the start."""

    async def main() -> None:
        before = open_fds()
        async with session(daemon, ALICE) as s:
            await s.client.hello()
            await s.client.send(p.RunRequest(argv=["true"], stdio="null"))
            assert isinstance(await s.client.receive(), p.Started)
        [call] = daemon.jobs.starts
        null = os.stat(os.devnull)
        assert call.spec.stdio == PassedStdio()
        assert [(st.st_rdev, st.st_ino) for st in call.stdio] == [(null.st_rdev, null.st_ino)] * 3
        assert open_fds() == before

    run(main())


def test_stdio_capture_passes_no_fds_and_the_capture_limit(daemon: Daemon) -> None:
    """stdio "capture": no fds, and the spec captures up to capture_bytes."""

    async def main() -> None:
        async with session(daemon, ALICE) as s:
            await s.client.hello()
            await s.client.send(p.RunRequest(argv=["true"], stdio="capture", capture_bytes=1234))
            assert isinstance(await s.client.receive(), p.Started)
        [call] = daemon.jobs.starts
        assert call.spec.stdio == CapturedStdio(limit=1234)
        assert call.stdio == []

    run(main())


# ---------------------------------------------------------------------- run


def test_run_sends_started_first_then_the_held_events_then_live_ones_then_exit(
    daemon: Daemon,
) -> None:
    """Events recorded while the job starts wait for `started`, then go out in order, then
    live events, then the report."""
    daemon.jobs.early_events = [egress_event(1), egress_event(2)]

    async def main() -> None:
        async with session(daemon, ALICE) as s:
            await s.client.hello()
            await s.client.send(p.RunRequest(argv=["true"], stdio="capture"))
            started = await s.client.receive()
            [job] = daemon.jobs.jobs.values()
            assert started == p.Started(job=job.id, pid=job.process.pid)
            early = [msgspec.structs.replace(e, job=job.id) for e in daemon.jobs.early_events]
            assert await s.client.receive() == p.EventMessage(event=early[0])
            assert await s.client.receive() == p.EventMessage(event=early[1])
            live = egress_event(3, job.id)
            daemon.intake.record(job.feed, live)
            assert await s.client.receive() == p.EventMessage(event=live)
            report = daemon.jobs.finish(job)
            assert await s.client.receive() == p.Exit(report=report, dropped_events=0)
            assert s.connection.outbox.dropped == 0
        assert daemon.jobs.starts[0].streamed is True
        assert daemon.jobs.kills == []

    run(main())


def test_run_without_events_streams_none(daemon: Daemon) -> None:
    """events: false gives the job no sink: `started`, then the report, nothing between."""
    daemon.jobs.early_events = [egress_event(1)]

    async def main() -> None:
        async with session(daemon, ALICE) as s:
            await s.client.hello()
            await s.client.send(p.RunRequest(argv=["true"], events=False))
            started = await s.client.receive()
            [job] = daemon.jobs.jobs.values()
            assert started == p.Started(job=job.id, pid=job.process.pid)
            report = daemon.jobs.finish(job)
            assert await s.client.receive() == p.Exit(report=report, dropped_events=0)
        assert daemon.jobs.starts[0].streamed is False

    run(main())


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            JailError("cannot build the jail: injected"),
            p.ErrorMessage(code="jail", message="cannot build the jail: injected"),
        ),
        (
            ExecError("cannot execute nope: No such file or directory", 127),
            p.ErrorMessage(
                code="exec",
                message="cannot execute nope: No such file or directory",
                exit_code=127,
            ),
        ),
    ],
)
def test_a_job_that_cannot_start_is_an_error_reply(
    daemon: Daemon, error: NetjailError, expected: p.ErrorMessage
) -> None:
    """The start's error reaches the client with its code (and an exec error's exit code)."""
    daemon.jobs.start_error = error

    async def main() -> None:
        async with session(daemon, ALICE) as s:
            await s.client.hello()
            await s.client.send(p.RunRequest(argv=["nope"]))
            assert await s.client.receive() == expected
            await s.client.send(p.PsRequest())
            assert await s.client.receive() == p.PsReply(jobs=[])

    run(main())


def test_a_job_whose_supervision_failed_gets_an_error_instead_of_a_report(
    daemon: Daemon,
) -> None:
    """A job whose report could not be made gets its error, and is not killed at hang-up."""

    async def main() -> None:
        async with session(daemon, ALICE) as s:
            await s.client.hello()
            await s.client.send(p.RunRequest(argv=["true"], events=False))
            assert isinstance(await s.client.receive(), p.Started)
            [job] = daemon.jobs.jobs.values()
            job.finished.set_exception(JailError(f"job {job.id} failed: boom"))
            assert await s.client.receive() == p.ErrorMessage(
                code="jail", message=f"job {job.id} failed: boom"
            )
        assert daemon.jobs.kills == []

    run(main())


def test_a_run_request_the_spec_refuses_starts_nothing(daemon: Daemon) -> None:
    """A non-root client asking for another uid gets a permission error; no job starts."""

    async def main() -> None:
        async with session(daemon, ALICE) as s:
            await s.client.hello()
            await s.client.send(p.RunRequest(argv=["true"], uid=0))
            assert await s.client.receive() == p.ErrorMessage(
                code="permission", message="only root may choose the job's uid or gid"
            )
        assert daemon.jobs.starts == []

    run(main())


def test_a_client_that_disconnects_has_its_running_jobs_killed(daemon: Daemon) -> None:
    """Hanging up SIGKILLs the client's jobs still running, not those already reported."""

    async def main() -> None:
        async with session(daemon, ALICE) as s:
            await s.client.hello()
            await s.client.send(p.RunRequest(argv=["a"], events=False))
            done = await s.client.receive()
            await s.client.send(p.RunRequest(argv=["b"], events=False))
            running = await s.client.receive()
            assert isinstance(done, p.Started)
            assert isinstance(running, p.Started)
            daemon.jobs.finish(daemon.jobs.jobs[done.job])
            assert isinstance(await s.client.receive(), p.Exit)
        assert daemon.jobs.kills == [(running.job, 9)]
        assert ("info", "client gone, killing its job", {"job": running.job}) in (
            daemon.log.records
        )

    run(main())


def test_a_failing_kill_at_hang_up_still_cleans_the_connection_up(daemon: Daemon) -> None:
    """A kill that fails when the client is gone must not leave the connection half-closed:
    its socket is closed, its follower removed, and serve returns."""
    daemon.jobs.kill_error = CgroupError("cannot kill job: processes left after SIGKILL")

    async def main() -> None:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        connection = connection_module.Connection(daemon.server, ours, ALICE)
        serving = asyncio.ensure_future(connection.serve())
        client = WireClient(theirs)
        try:
            await client.hello()
            await client.send(p.EventsRequest(follow=True))
            await client.send(p.RunRequest(argv=["true"], events=False))
            assert isinstance(await client.receive(), p.Started)
            client.close()
            await serving
            assert ours.fileno() == -1
            assert daemon.intake.followers == []
        finally:
            client.close()
            ours.close()

    run(main())


# ---------------------------------------------------------------------- ps, kill, status


def test_ps_lists_the_jobs_the_peer_may_see(daemon: Daemon) -> None:
    """A user sees only their own jobs, with every field; root sees all."""

    async def main() -> None:
        alice_job = daemon.jobs.add_job(spec_for(ALICE, ["sleep", "9"]))
        bob_job = daemon.jobs.add_job(spec_for(BOB))
        daemon.intake.record(alice_job.feed, egress_event(1, alice_job.id))
        alice_info = p.JobInfo(
            job=alice_job.id,
            argv=["sleep", "9"],
            uid=1000,
            gid=1000,
            pid=alice_job.process.pid,
            owner_uid=1000,
            started=STARTED_TEXT,
            events=1,
        )
        bob_info = p.JobInfo(
            job=bob_job.id,
            argv=["true"],
            uid=1001,
            gid=1001,
            pid=bob_job.process.pid,
            owner_uid=1001,
            started=STARTED_TEXT,
            events=0,
        )
        async with session(daemon, ALICE) as alice, session(daemon, ROOT) as root:
            await alice.client.hello()
            await alice.client.send(p.PsRequest())
            assert await alice.client.receive() == p.PsReply(jobs=[alice_info])
            await root.client.hello()
            await root.client.send(p.PsRequest())
            assert await root.client.receive() == p.PsReply(jobs=[alice_info, bob_info])

    run(main())


def test_kill_signals_the_peers_own_job(daemon: Daemon) -> None:
    """kill sends the asked signal to a job the peer may see, and replies killed."""

    async def main() -> None:
        job = daemon.jobs.add_job(spec_for(ALICE))
        async with session(daemon, ALICE) as s:
            await s.client.hello()
            await s.client.send(p.KillRequest(job=job.id, signal=2))
            assert await s.client.receive() == p.Killed(job=job.id)
        assert daemon.jobs.kills == [(job.id, 2)]

    run(main())


def test_kill_of_another_users_job_or_an_unknown_one_is_not_found(daemon: Daemon) -> None:
    """Another user's job and a job that does not exist get the same not_found answer."""

    async def main() -> None:
        bob_job = daemon.jobs.add_job(spec_for(BOB))
        async with session(daemon, ALICE) as s:
            await s.client.hello()
            await s.client.send(p.KillRequest(job=bob_job.id), p.KillRequest(job="j-99999999"))
            assert await s.client.receive() == p.ErrorMessage(
                code="not_found", message=f"no such job: {bob_job.id}"
            )
            assert await s.client.receive() == p.ErrorMessage(
                code="not_found", message="no such job: j-99999999"
            )
        assert daemon.jobs.kills == []

    run(main())


def test_status_reports_the_servers_counters(daemon: Daemon) -> None:
    """status carries the daemon's version, pid, job and event counters and cgroup mode."""

    async def main() -> None:
        job = daemon.jobs.add_job(spec_for(ALICE))
        daemon.intake.record(job.feed, egress_event(1, job.id))
        daemon.intake.events_lost = 3
        async with session(daemon, ALICE) as s:
            await s.client.hello()
            await s.client.send(p.StatusRequest())
            reply = await s.client.receive()
        assert isinstance(reply, p.StatusReply)
        assert reply.uptime_s >= 0
        assert msgspec.structs.replace(reply, uptime_s=0.0) == p.StatusReply(
            version=__version__,
            pid=os.getpid(),
            uptime_s=0.0,
            jobs_running=1,
            jobs_total=1,
            events_seen=1,
            events_lost=3,
            cgroup_mode="hybrid",
            seccomp_profile="netjail-default-1",
            fork_server="up",
            fork_server_restarts=0,
            fork_server_last_exit=None,
            pool_size=0,
            pool_ready=0,
        )

    run(main())


# ---------------------------------------------------------------------- events


def test_events_history_root_sees_all_and_a_user_only_their_own(daemon: Daemon) -> None:
    """The history replay: a user gets their jobs' events, root everyone's, in order."""

    async def main() -> None:
        alice_job = daemon.jobs.add_job(spec_for(ALICE))
        bob_job = daemon.jobs.add_job(spec_for(BOB))
        a1, b1, a2 = (
            egress_event(1, alice_job.id),
            egress_event(2, bob_job.id),
            egress_event(3, alice_job.id),
        )
        daemon.intake.record(alice_job.feed, a1)
        daemon.intake.record(bob_job.feed, b1)
        daemon.intake.record(alice_job.feed, a2)
        async with session(daemon, ALICE) as alice, session(daemon, ROOT) as root:
            await alice.client.hello()
            await alice.client.send(p.EventsRequest())
            assert [await alice.client.receive() for _ in range(3)] == [
                p.EventMessage(event=a1),
                p.EventMessage(event=a2),
                p.EventsEnd(lost_events=0),
            ]
            await root.client.hello()
            await root.client.send(p.EventsRequest())
            assert [await root.client.receive() for _ in range(4)] == [
                p.EventMessage(event=a1),
                p.EventMessage(event=b1),
                p.EventMessage(event=a2),
                p.EventsEnd(lost_events=0),
            ]
            await root.client.send(p.EventsRequest(job=bob_job.id))
            assert [await root.client.receive() for _ in range(2)] == [
                p.EventMessage(event=b1),
                p.EventsEnd(lost_events=0),
            ]

    run(main())


def test_events_of_an_ended_job_stay_visible_to_its_owner_only(daemon: Daemon) -> None:
    """Once a job is over its owner is known from the history: its owner still sees its
    events by id, another user gets not_found."""

    async def main() -> None:
        job = daemon.jobs.add_job(spec_for(ALICE))
        event = egress_event(1, job.id)
        daemon.intake.record(job.feed, event)
        daemon.jobs.finish(job)
        async with session(daemon, ALICE) as alice, session(daemon, BOB) as bob:
            await alice.client.hello()
            await alice.client.send(p.EventsRequest(job=job.id))
            assert [await alice.client.receive() for _ in range(2)] == [
                p.EventMessage(event=event),
                p.EventsEnd(lost_events=0),
            ]
            await bob.client.hello()
            await bob.client.send(p.EventsRequest(job=job.id))
            assert await bob.client.receive() == p.ErrorMessage(
                code="not_found", message=f"no such job: {job.id}"
            )

    run(main())


def test_events_of_another_users_job_or_an_unknown_one_is_not_found(daemon: Daemon) -> None:
    """Asking for another user's job's events is answered as for a job that never existed."""

    async def main() -> None:
        bob_job = daemon.jobs.add_job(spec_for(BOB))
        daemon.intake.record(bob_job.feed, egress_event(1, bob_job.id))
        async with session(daemon, ALICE) as s:
            await s.client.hello()
            await s.client.send(
                p.EventsRequest(job=bob_job.id, follow=True), p.EventsRequest(job="j-99999999")
            )
            assert await s.client.receive() == p.ErrorMessage(
                code="not_found", message=f"no such job: {bob_job.id}"
            )
            assert await s.client.receive() == p.ErrorMessage(
                code="not_found", message="no such job: j-99999999"
            )
        assert daemon.intake.followers == []

    run(main())


def test_events_follow_streams_visible_events_until_the_connection_closes(
    daemon: Daemon,
) -> None:
    """A follower gets the history, then each new event it may see (not others'), and is
    removed from the intake when its connection closes."""

    async def main() -> None:
        alice_job = daemon.jobs.add_job(spec_for(ALICE))
        bob_job = daemon.jobs.add_job(spec_for(BOB))
        old = egress_event(1, alice_job.id)
        daemon.intake.record(alice_job.feed, old)
        async with session(daemon, ALICE) as alice, session(daemon, ROOT) as root:
            await alice.client.hello()
            await root.client.hello()
            await alice.client.send(p.EventsRequest(follow=True))
            await root.client.send(p.EventsRequest(job=bob_job.id, follow=True))
            assert await alice.client.receive() == p.EventMessage(event=old)
            await alice.client.send(p.PsRequest())
            assert isinstance(await alice.client.receive(), p.PsReply)
            assert len(daemon.intake.followers) == 2
            new_alice, new_bob = egress_event(2, alice_job.id), egress_event(3, bob_job.id)
            daemon.intake.record(alice_job.feed, new_alice)
            daemon.intake.record(bob_job.feed, new_bob)
            await alice.client.send(p.PsRequest())
            await root.client.send(p.PsRequest())
            assert await alice.client.receive() == p.EventMessage(event=new_alice)
            assert isinstance(await alice.client.receive(), p.PsReply)
            assert await root.client.receive() == p.EventMessage(event=new_bob)
            assert isinstance(await root.client.receive(), p.PsReply)
            alice.client.close()
            await alice.serving
            assert len(daemon.intake.followers) == 1
        assert daemon.intake.followers == []

    run(main())


# ---------------------------------------------------------------------- the outbox bound


def test_events_beyond_the_outbox_bound_are_dropped_and_counted_replies_are_not(
    daemon: Daemon,
) -> None:
    """A history replay larger than the bound queues MAX_QUEUED_EVENTS events, drops the rest
    and says so in the end reply, which is never dropped."""

    async def main() -> None:
        job = daemon.jobs.add_job(spec_for(ALICE))
        events = [egress_event(port, job.id) for port in range(MAX_QUEUED_EVENTS + 5)]
        for event in events:
            daemon.intake.record(job.feed, event)
        async with session(daemon, ALICE) as s:
            await s.client.hello()
            await s.client.send(p.EventsRequest())
            received = [await s.client.receive() for _ in range(MAX_QUEUED_EVENTS + 1)]
        assert received == [
            *(p.EventMessage(event=e) for e in events[:MAX_QUEUED_EVENTS]),
            p.EventsEnd(lost_events=5),
        ]

    run(main())


def test_a_report_says_how_many_events_this_client_did_not_get(daemon: Daemon) -> None:
    """Held events beyond the bound are dropped; the exit reply counts them."""

    async def main() -> None:
        daemon.jobs.early_events = [egress_event(port) for port in range(MAX_QUEUED_EVENTS + 2)]
        async with session(daemon, ALICE) as s:
            await s.client.hello()
            await s.client.send(p.RunRequest(argv=["true"]))
            started = await s.client.receive()
            [job] = daemon.jobs.jobs.values()
            assert started == p.Started(job=job.id, pid=job.process.pid)
            for _ in range(MAX_QUEUED_EVENTS):
                assert isinstance(await s.client.receive(), p.EventMessage)
            report = daemon.jobs.finish(job)
            assert await s.client.receive() == p.Exit(report=report, dropped_events=2)

    run(main())


def test_outbox_drops_only_droppable_frames_past_the_bound() -> None:
    """Past MAX_QUEUED_EVENTS droppable frames, more are counted and dropped; other frames
    are always queued, and everything kept comes out in order."""

    async def main() -> None:
        outbox = Outbox()
        for i in range(MAX_QUEUED_EVENTS):
            outbox.put(b"e%d" % i, droppable=True)
        outbox.put(b"reply-1")
        outbox.put(b"lost", droppable=True)
        outbox.put(b"lost", droppable=True)
        outbox.put(b"reply-2")
        assert outbox.dropped == 2
        assert await outbox.get() == OutFrame(b"e0")
        outbox.put(b"room again", droppable=True)
        assert outbox.dropped == 2
        rest = [await outbox.get() for _ in range(MAX_QUEUED_EVENTS + 2)]
        assert [frame.data for frame in rest if frame is not None] == [
            *(b"e%d" % i for i in range(1, MAX_QUEUED_EVENTS)),
            b"reply-1",
            b"reply-2",
            b"room again",
        ]

    run(main())


def test_a_closed_outbox_takes_nothing_and_ends_after_what_it_holds() -> None:
    """After close, puts are ignored; get returns what was queued, then None."""

    async def main() -> None:
        outbox = Outbox()
        outbox.put(b"kept")
        outbox.close()
        outbox.put(b"ignored")
        assert outbox.closed is True
        assert [await outbox.get(), await outbox.get()] == [OutFrame(b"kept"), None]

    run(main())


def test_outbox_get_waits_for_a_frame() -> None:
    """get blocks until a frame is put, or the outbox is closed."""

    async def main() -> None:
        outbox = Outbox()
        waiting = asyncio.ensure_future(outbox.get())
        await asyncio.sleep(0)
        assert not waiting.done()
        outbox.put(b"frame")
        assert await waiting == OutFrame(b"frame")
        ending = asyncio.ensure_future(outbox.get())
        await asyncio.sleep(0)
        outbox.close()
        assert await ending is None

    run(main())


# ---------------------------------------------------------------------- held events


def test_held_events_wait_for_release_then_flow_in_order() -> None:
    """Events before release are held; release sends them in order; later ones go at once."""
    sent: list[p.Event] = []
    stream = HeldEvents(sent.append)
    first, second, third = egress_event(1), egress_event(2), egress_event(3)
    stream(first)
    stream(second)
    assert sent == []
    stream.release()
    assert sent == [first, second]
    stream(third)
    assert sent == [first, second, third]


# ---------------------------------------------------------------------- reports, hang-up


def test_wait_for_reports_returns_once_every_owed_report_is_queued(daemon: Daemon) -> None:
    """wait_for_reports waits for each running job's report; then they are all on the wire."""

    async def main() -> None:
        async with session(daemon, ALICE) as s:
            await s.client.hello()
            await s.client.send(p.RunRequest(argv=["a"], events=False))
            await s.client.send(p.RunRequest(argv=["b"], events=False))
            first, second = await s.client.receive(), await s.client.receive()
            assert isinstance(first, p.Started)
            assert isinstance(second, p.Started)
            waiting = asyncio.ensure_future(s.connection.wait_for_reports())
            for _ in range(5):
                await asyncio.sleep(0)
            assert not waiting.done()
            report_a = daemon.jobs.finish(daemon.jobs.jobs[first.job])
            for _ in range(5):
                await asyncio.sleep(0)
            assert not waiting.done()
            report_b = daemon.jobs.finish(daemon.jobs.jobs[second.job])
            await waiting
            assert await s.client.receive() == p.Exit(report=report_a)
            assert await s.client.receive() == p.Exit(report=report_b)
        assert daemon.jobs.kills == []

    run(main())


def test_close_gracefully_lets_the_peer_read_the_last_message_despite_unread_input() -> None:
    """Unread input is discarded, not answered with a reset: the peer reads the last
    message, then end of file."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        theirs.setblocking(False)
        theirs.sendall(b"never read by the daemon\n")
        ours.sendall(b"last words\n")
        closing = asyncio.ensure_future(close_gracefully(ours))
        assert await loop.sock_recv(theirs, 100) == b"last words\n"
        assert await loop.sock_recv(theirs, 100) == b""
        theirs.close()
        await closing
        assert ours.fileno() == -1

    run(main())


def test_close_gracefully_gives_up_after_the_linger_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer that neither sends nor closes does not keep the socket open past the linger."""
    monkeypatch.setattr(outbox_module, "_LINGER_S", 0.01)

    async def main() -> None:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        try:
            await close_gracefully(ours)
            assert ours.fileno() == -1
        finally:
            theirs.close()

    run(main())


def test_close_gracefully_stops_discarding_after_the_byte_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A peer that keeps sending is cut off once the byte budget is spent."""
    monkeypatch.setattr(outbox_module, "_LINGER_S", 3600.0)
    monkeypatch.setattr(outbox_module, "_LINGER_BYTES", 10)

    async def main() -> None:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        try:
            theirs.sendall(b"x" * 100)
            await close_gracefully(ours)
            assert ours.fileno() == -1
        finally:
            theirs.close()

    run(main())
