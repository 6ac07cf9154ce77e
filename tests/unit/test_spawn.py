"""The daemon's handle on its fork server (netjail.kernel.spawn.ForkServer), driven against a
stand-in server process: plans travel in sealed memfds, spawns that find the socket full wait
their turn, and a server that ends fails what is in flight, is logged, and is replaced.

The real server (namespaces, the job's init) needs root and is tested in tests/integration.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from netjail.errors import SpawnError
from netjail.kernel import forkserver, serverproc, spawn
from netjail.kernel.helperproc import helper_env
from netjail.kernel.jobplan import JobExit, JobPlan
from netjail.kernel.serverproc import restart_delay
from netjail.kernel.spawn import ForkServer, ForkServerHealth

from .daemonfakes import RecordingLog, job_plan, open_fds

#: A fork server that reads each plan, notes its argv's marker in a file, and answers with its
#: own pidfd. Modes: serve; held (serves only after SIGUSR1); first (answers only the first
#: spawn); refuse (StartFailed); die (exits before Ready); ends (each job then ends: Ended at
#: once, its Exited after SIGUSR1); killed (each job's Exited at once, with no Ended); handed
#: and handed-killed (as a ready standby's answer: a channel, a set-up pipe and a status pipe
#: come with the pidfd; the status pipe gets exit 3's record, or none, and Exited tells the
#: init's own end, exit 0 or SIGKILL, after SIGUSR1).
STAND_IN = """\
import os, signal, socket, sys
from netjail.kernel import forkserver as fs
from netjail.kernel.fdpass import read_payload, recv_with_fds, send_with_fds
from netjail.kernel.jobplan import encode_job_status

mode, notes = sys.argv[1], sys.argv[2]
sock = fs._take_socket()
if mode == "die":
    os._exit(3)
if mode == "refuse":
    sock.send(fs.encode(fs.StartFailed(detail="no seccomp filter here")))
    os._exit(1)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
sock.send(fs.encode(fs.Ready()))
if mode == "held":
    signal.sigwait({signal.SIGUSR1})
answered = 0
while True:
    data, fds = recv_with_fds(sock, fs.MAX_MESSAGE, fs.MAX_FDS)
    if not data:
        os._exit(0)
    request = fs.to_server.decode(data)
    plan = fs.plan_decoder.decode(read_payload(fds[0], 1 << 24))
    with open(notes, "a") as f:
        f.write(f"{plan.argv[3][:3]} {len(fds)}\\n")
    for fd in fds:
        os.close(fd)
    if mode == "first" and answered:
        continue
    answered += 1
    pidfd = os.pidfd_open(os.getpid())
    reply = fs.Spawned(id=request.id, pid=1000 + request.id)
    if mode.startswith("handed"):
        channel, _ = socket.socketpair()
        report_r, report_w = os.pipe()
        status_r, status_w = os.pipe()
        send_with_fds(sock, fs.encode(reply), [pidfd, channel.fileno(), report_r, status_r])
        for fd in (pidfd, report_r, report_w, status_r):
            os.close(fd)
        channel.close()
        if mode == "handed":
            os.write(status_w, encode_job_status(3 << 8))
        os.close(status_w)
        signal.sigwait({signal.SIGUSR1})
        code, sig = (0, None) if mode == "handed" else (None, 9)
        usage = fs.ExitStatus(
            exit_code=code, signal=sig, cpu_user_s=0.5, cpu_system_s=0.25, max_rss_bytes=1
        )
        sock.send(fs.encode(fs.Exited(pid=reply.pid, status=usage)))
        continue
    send_with_fds(sock, fs.encode(reply), [pidfd])
    os.close(pidfd)
    if mode == "ends":
        sock.send(fs.encode(fs.Ended(pid=reply.pid, exit_code=3, signal=None)))
        signal.sigwait({signal.SIGUSR1})
    if mode in ("ends", "killed"):
        code, sig = (3, None) if mode == "ends" else (None, 9)
        usage = fs.ExitStatus(
            exit_code=code, signal=sig, cpu_user_s=0.5, cpu_system_s=0.25, max_rss_bytes=1
        )
        sock.send(fs.encode(fs.Exited(pid=reply.pid, status=usage)))
"""


def plan_for(n: int, size: int = 10) -> JobPlan:
    return job_plan(argv=["sh", "-c", "exit 0", f"{n:03d}" + "x" * size])


@pytest.fixture
def stand_in(tmp_path: Path) -> tuple[list[str], Path]:
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    notes = tmp_path / "notes"
    notes.touch()
    return [sys.executable, "-s", "-P", str(script)], notes


def noted(notes: Path) -> list[str]:
    return notes.read_text().split("\n")[:-1]


@pytest.fixture
def pipe() -> Iterator[list[int]]:
    r, w = os.pipe()
    yield [r, w, w]
    os.close(r)
    os.close(w)


def held_server(command: list[str], notes: Path) -> ForkServer:
    """A server that serves only after SIGUSR1, its socket's send buffer as small as can be."""
    server = ForkServer.start([*command, "held", str(notes)])
    assert server._server is not None
    server._server.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)
    return server


def test_spawns_that_fill_the_socket_wait_their_turn_and_all_start(
    stand_in: tuple[list[str], Path], pipe: list[int]
) -> None:
    """30 spawns with 7 KB command lines, asked for while the server reads nothing, all start,
    in order, each plan read whole from its memfd; nothing is left open."""
    command, notes = stand_in
    before = open_fds()
    server = held_server(command, notes)

    async def main() -> list[spawn.SpawnedJob]:
        server.attach(asyncio.get_running_loop(), RecordingLog())
        started = [asyncio.ensure_future(server.spawn(plan_for(n, 7000), pipe)) for n in range(30)]
        await asyncio.sleep(0.05)
        queued = sum(len(s.outbox) for s in [server._server] if s is not None)
        assert server.pid is not None
        os.kill(server.pid, signal.SIGUSR1)
        jobs = await asyncio.wait_for(asyncio.gather(*started), 10)
        assert queued > 0  # the socket did fill: the outbox was used
        return jobs

    try:
        jobs = asyncio.run(main())
    finally:
        server.close()
    assert [job.pid for job in jobs] == [1001 + n for n in range(30)]
    assert noted(notes) == [f"{n:03d} 4" for n in range(30)]
    for job in jobs:
        job.close()
    assert open_fds() == before


def test_a_spawn_cancelled_while_queued_is_never_sent(
    stand_in: tuple[list[str], Path], pipe: list[int]
) -> None:
    """A queued spawn whose caller gave up is dropped from the outbox: the server never sees it,
    and the spawns around it still start."""
    command, notes = stand_in
    server = held_server(command, notes)

    async def main() -> list[spawn.SpawnedJob]:
        server.attach(asyncio.get_running_loop(), RecordingLog())
        started = [asyncio.ensure_future(server.spawn(plan_for(n, 7000), pipe)) for n in range(12)]
        await asyncio.sleep(0.05)
        assert server._server is not None
        assert len(server._server.outbox) > 2
        victim = started.pop(-2)
        victim.cancel()
        assert server.pid is not None
        os.kill(server.pid, signal.SIGUSR1)
        return await asyncio.wait_for(asyncio.gather(*started), 10)

    try:
        jobs = asyncio.run(main())
    finally:
        server.close()
    assert [line.split()[0] for line in noted(notes)] == [f"{n:03d}" for n in range(12) if n != 10]
    for job in jobs:
        job.close()


def test_a_server_that_cannot_serve_fails_the_start_with_its_reason(
    stand_in: tuple[list[str], Path],
) -> None:
    """start() raises SpawnError with the server's own reason, or how it ended, and reaps it."""
    command, notes = stand_in
    with pytest.raises(SpawnError) as refused:
        ForkServer.start([*command, "refuse", str(notes)])
    assert str(refused.value) == "no seccomp filter here"
    with pytest.raises(SpawnError) as died:
        ForkServer.start([*command, "die", str(notes)])
    assert str(died.value) == "the fork server exited with status 3 at start"


def test_a_killed_server_fails_jobs_in_flight_is_logged_and_replaced(
    stand_in: tuple[list[str], Path], pipe: list[int]
) -> None:
    """SIGKILL the server with one job running and one spawn unanswered: both fail with errors
    naming the fork server, one error line is logged, a job asked for before the new server is
    up is refused, and once it is, jobs start again and health counts the restart."""
    command, notes = stand_in
    log = RecordingLog()
    server = ForkServer.start([*command, "first", str(notes)])
    healths: list[ForkServerHealth] = [server.health()]

    async def main() -> tuple[BaseException | None, BaseException | None, str, spawn.SpawnedJob]:
        server.attach(asyncio.get_running_loop(), log)
        running = await server.spawn(plan_for(1), pipe)
        waiting = asyncio.ensure_future(server.wait(running.pid))
        unanswered = asyncio.ensure_future(server.spawn(plan_for(2), pipe))
        while len(noted(notes)) < 2:
            await asyncio.sleep(0.01)
        assert server.pid is not None
        os.kill(server.pid, signal.SIGKILL)
        await asyncio.wait([waiting, unanswered], timeout=10)
        healths.append(server.health())
        with pytest.raises(SpawnError) as down:
            await server.spawn(plan_for(3), pipe)
        while server.health().state != "up":
            await asyncio.sleep(0.01)
        healths.append(server.health())
        again = await asyncio.wait_for(server.spawn(plan_for(4), pipe), 10)
        running.close()
        return waiting.exception(), unanswered.exception(), str(down.value), again

    try:
        lost, refused, down, again = asyncio.run(main())
    finally:
        server.close()
    again.close()
    assert str(lost) == "the fork server was killed by SIGKILL, and with it the job's exit status"
    assert str(refused) == "the fork server was killed by SIGKILL; the job was not started"
    assert down == (
        "the fork server was killed by SIGKILL and a new one is starting; the job was not "
        "started, try again shortly"
    )
    assert healths == [
        ForkServerHealth(state="up", restarts=0, last_exit=None),
        ForkServerHealth(state="down", restarts=0, last_exit="was killed by SIGKILL"),
        ForkServerHealth(state="up", restarts=1, last_exit="was killed by SIGKILL"),
    ]
    errors = [r for r in log.records if r[0] == "error"]
    assert [(level, message) for level, message, _ in errors] == [
        (
            "error",
            "the fork server was killed by SIGKILL; the jobs in flight failed, a new one starts "
            "shortly",
        )
    ]
    assert {k: errors[0][2][k] for k in ("spawning", "running", "restart_in_s")} == {
        "spawning": 1,
        "running": 1,
        "restart_in_s": serverproc.RESTART_FIRST_S,
    }


def test_a_jobs_end_comes_with_its_inits_record_before_its_reaping(
    stand_in: tuple[list[str], Path], pipe: list[int]
) -> None:
    """wait_end returns at the init's record (Ended) while its reaping is still to come; wait
    then returns the reaping with the rusage, and nothing of the job is kept after."""
    command, notes = stand_in
    server = ForkServer.start([*command, "ends", str(notes)])

    async def main() -> tuple[JobExit, bool, forkserver.ExitStatus]:
        server.attach(asyncio.get_running_loop(), RecordingLog())
        job = await server.spawn(plan_for(1), pipe)
        reaped = asyncio.ensure_future(server.wait(job.pid))
        ended = await asyncio.wait_for(server.wait_end(job.pid), 10)
        await asyncio.sleep(0.05)
        early = not reaped.done()
        assert server.pid is not None
        os.kill(server.pid, signal.SIGUSR1)
        status = await asyncio.wait_for(reaped, 10)
        job.close()
        assert server._server is not None
        assert (server._server.ends, server._owners) == ({}, {})
        return ended, early, status

    try:
        ended, early, status = asyncio.run(main())
    finally:
        server.close()
    assert ended == JobExit(exit_code=3, signal=None)
    assert early
    assert (status.exit_code, status.cpu_user_s) == (3, 0.5)


def test_a_job_whose_init_was_killed_ends_at_its_reaping(
    stand_in: tuple[list[str], Path], pipe: list[int]
) -> None:
    """No record came (the init was killed from outside): its reaping is the job's end."""
    command, notes = stand_in
    server = ForkServer.start([*command, "killed", str(notes)])

    async def main() -> JobExit:
        server.attach(asyncio.get_running_loop(), RecordingLog())
        job = await server.spawn(plan_for(1), pipe)
        ended = await asyncio.wait_for(server.wait_end(job.pid), 10)
        await asyncio.wait_for(server.wait(job.pid), 10)
        job.close()
        return ended

    try:
        assert asyncio.run(main()) == JobExit(exit_code=None, signal=9)
    finally:
        server.close()


@pytest.mark.parametrize(
    ("mode", "end", "code"),
    [("handed", JobExit(exit_code=3, signal=None), 3), ("handed-killed", JobExit(None, 9), None)],
)
def test_a_standbys_end_is_read_from_its_status_pipe_here(
    stand_in: tuple[list[str], Path], pipe: list[int], mode: str, end: JobExit, code: int | None
) -> None:
    """A ready standby's status pipe comes with its answer and is read on the daemon's loop:
    its record is the job's end before the reaping, and the reaping's status carries the
    record's exit code with the rusage (not the init's own exit 0). With no record (the init
    killed), the reaping is the end. The pipe is closed after; nothing is left open."""
    command, notes = stand_in
    before = open_fds()
    server = ForkServer.start([*command, mode, str(notes)])

    async def main() -> tuple[JobExit, forkserver.ExitStatus]:
        server.attach(asyncio.get_running_loop(), RecordingLog())
        job = await server.spawn(plan_for(1), pipe)
        assert job.link is not None
        job.link.close()
        reaped = asyncio.ensure_future(server.wait(job.pid))
        end_task = asyncio.ensure_future(server.wait_end(job.pid))
        if mode == "handed":
            await asyncio.wait_for(asyncio.shield(end_task), 10)
            assert not reaped.done()
        assert server.pid is not None
        os.kill(server.pid, signal.SIGUSR1)
        status = await asyncio.wait_for(reaped, 10)
        ended = await asyncio.wait_for(end_task, 10)
        job.close()
        assert server._server is not None
        assert (server._server.status_fds, server._server.ends, server._owners) == ({}, {}, {})
        return ended, status

    try:
        ended, status = asyncio.run(main())
    finally:
        server.close()
    assert ended == end
    assert (status.exit_code, status.signal, status.cpu_user_s) == (code, end.signal, 0.5)
    assert open_fds() == before


def test_the_restart_back_off_doubles_while_servers_die_young() -> None:
    """The first end, or one after a long run, waits the first delay; each quick end doubles
    it, up to the bound."""
    assert restart_delay(None, 0.0) == serverproc.RESTART_FIRST_S
    assert restart_delay(0.4, 1.0) == 0.8
    assert restart_delay(serverproc.RESTART_MAX_S, 0.0) == serverproc.RESTART_MAX_S
    assert restart_delay(8.0, serverproc.STABLE_S) == serverproc.RESTART_FIRST_S


def test_the_real_server_command_runs_the_daemons_own_package() -> None:
    """The daemon execs its own interpreter on the server module, without the working directory
    or the user's site-packages, its only variable the path to the daemon's netjail package."""
    assert spawn.helper_command(spawn._SERVER_MODULE) == [
        sys.executable,
        "-s",
        "-P",
        "-m",
        "netjail.kernel.forkserver",
    ]
    (path,) = helper_env().values()
    assert list(helper_env()) == ["PYTHONPATH"]
    assert os.path.join(path, "netjail", "kernel", "forkserver.py") == forkserver.__file__
