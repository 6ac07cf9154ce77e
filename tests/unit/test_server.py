"""The Unix-socket server (netjail.daemon.server): who may connect, refusals, status, reloaded
configuration, the accept loop on a real socket, and the order of the last messages at stop."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import pytest

from netjail import protocol as p
from netjail._version import __version__
from netjail.daemon import server as server_module
from netjail.daemon.config import Config
from netjail.daemon.connection import Connection
from netjail.kernel.peer import PeerCred
from netjail.kernel.spawn import ForkServerHealth

from .daemonfakes import (
    ALICE,
    BOB,
    ROOT,
    Daemon,
    connect,
    listening_socket,
    make_daemon,
    run,
    spec_for,
)
from .fakehost import FakeJailHost

SOCKET_NAME = "netjail.sock"


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    made = make_daemon(str(tmp_path), listener=listening_socket(str(tmp_path / SOCKET_NAME)))
    yield made
    made.close()


@contextlib.asynccontextmanager
async def accepting(daemon: Daemon) -> AsyncIterator[None]:
    """The server's accept loop, running for the block's duration; on exit, the connections
    it accepted are left to finish their own clean-up."""
    serving = asyncio.ensure_future(daemon.server.serve_forever())
    try:
        yield
    finally:
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving
        # (The server keeps no public handle on them; its own set is the one place they are.)
        connections = set(daemon.server._connection_tasks)
        if connections:
            await asyncio.wait(connections)


def socket_path(daemon: Daemon) -> str:
    name = daemon.server.listener.getsockname()
    assert isinstance(name, str)
    return name


def own_cgroup_first_line() -> str:
    with open("/proc/self/cgroup") as f:
        return f.readline().rstrip("\n")


# ---------------------------------------------------------------------- allowed()


def test_without_allow_lists_everyone_is_allowed(tmp_path: Path) -> None:
    """No allowed_uids and no allowed_groups: every user may connect."""
    daemon = make_daemon(str(tmp_path))
    try:
        assert [daemon.server.allowed(peer) for peer in (ROOT, ALICE, BOB)] == [True] * 3
    finally:
        daemon.close()


def test_allowed_uids_admit_root_and_the_listed_uids_only(tmp_path: Path) -> None:
    """With allowed_uids, root and the listed uids are allowed, nobody else."""
    daemon = make_daemon(str(tmp_path), Config(allowed_uids=(1000,)))
    try:
        assert [daemon.server.allowed(peer) for peer in (ROOT, ALICE, BOB)] == [True, True, False]
    finally:
        daemon.close()


def test_allowed_groups_admit_a_member_of_a_listed_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer in a listed group (primary or supplementary) is allowed; unknown group names
    are skipped; the peer's groups are read by its pid."""
    gids = {"devs": 2000}

    def getgrnam(name: str) -> grp.struct_group:
        if name not in gids:
            raise KeyError(name)
        return grp.struct_group((name, "x", gids[name], []))

    asked: list[tuple[int, int]] = []

    def peer_groups(pid: int, gid: int) -> set[int]:
        asked.append((pid, gid))
        return {gid, 2000} if pid == ALICE.pid else {gid}

    monkeypatch.setattr(grp, "getgrnam", getgrnam)
    monkeypatch.setattr(server_module, "peer_groups", peer_groups)
    daemon = make_daemon(str(tmp_path), Config(allowed_groups=("ghosts", "devs")))
    try:
        assert daemon.server.allowed(ALICE) is True
        assert daemon.server.allowed(BOB) is False
        assert daemon.server.allowed(ROOT) is True
        assert asked == [(ALICE.pid, ALICE.gid), (BOB.pid, BOB.gid)]
    finally:
        daemon.close()


def test_allowed_groups_that_do_not_exist_admit_nobody_but_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A list of group names none of which exists allows root only."""

    def getgrnam(name: str) -> grp.struct_group:
        raise KeyError(name)

    monkeypatch.setattr(grp, "getgrnam", getgrnam)
    monkeypatch.setattr(server_module, "peer_groups", lambda pid, gid: {gid, 2000})
    daemon = make_daemon(str(tmp_path), Config(allowed_groups=("ghosts",)))
    try:
        assert [daemon.server.allowed(peer) for peer in (ROOT, ALICE)] == [True, False]
    finally:
        daemon.close()


# ---------------------------------------------------------------------- jailed()


def test_a_peer_in_the_daemons_own_netns_is_not_jailed(tmp_path: Path) -> None:
    """A client in the daemon's own network namespace is on the host."""
    daemon = make_daemon(str(tmp_path))
    try:
        me = PeerCred(pid=os.getpid(), uid=os.geteuid(), gid=os.getegid())
        assert daemon.server.jailed(me) is False
    finally:
        daemon.close()


def test_a_peer_whose_netns_cannot_be_read_counts_as_jailed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unknown is jailed: a peer whose netns inode cannot be read is refused."""
    daemon = make_daemon(str(tmp_path))
    monkeypatch.setattr(server_module, "namespace_inode", lambda pid, kind: None)
    try:
        assert daemon.server.jailed(PeerCred(pid=os.getpid(), uid=0, gid=0)) is True
    finally:
        daemon.close()


def test_a_peer_in_a_jobs_netns_is_jailed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer whose netns is a running job's is jailed."""

    async def main() -> None:
        daemon = make_daemon(str(tmp_path))
        try:
            job = daemon.jobs.add_job(spec_for(ALICE))
            monkeypatch.setattr(server_module, "namespace_inode", lambda pid, kind: job.netns_inode)
            assert daemon.server.jailed(PeerCred(pid=os.getpid(), uid=1000, gid=1000)) is True
        finally:
            daemon.close()

    run(main())


def test_a_peer_in_another_netns_is_jailed_by_its_cgroup_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a netns that is neither ours nor a job's, the peer is jailed when its cgroup file
    holds the job cgroup marker, and not otherwise."""
    daemon = make_daemon(str(tmp_path))
    monkeypatch.setattr(server_module, "namespace_inode", lambda pid, kind: 1)
    me = PeerCred(pid=os.getpid(), uid=0, gid=0)
    try:
        monkeypatch.setattr(daemon.host, "in_job_cgroup", lambda text: False)
        assert daemon.server.jailed(me) is False
        monkeypatch.setattr(
            daemon.host, "in_job_cgroup", lambda text: own_cgroup_first_line() in text
        )
        assert daemon.server.jailed(me) is True
    finally:
        daemon.close()


def test_a_peer_whose_cgroup_cannot_be_read_is_jailed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer in another netns whose /proc/PID/cgroup is unreadable (gone) is jailed."""
    daemon = make_daemon(str(tmp_path))
    monkeypatch.setattr(server_module, "namespace_inode", lambda pid, kind: 1)
    monkeypatch.setattr(daemon.host, "in_job_cgroup", lambda text: False)
    try:
        # Above the kernel's PID_MAX_LIMIT: no such process can exist.
        assert daemon.server.jailed(PeerCred(pid=(1 << 22) + 1, uid=0, gid=0)) is True
    finally:
        daemon.close()


# ---------------------------------------------------------------------- refusals


def test_a_user_not_on_the_allow_lists_is_told_and_disconnected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refused user gets one permission error and end of file; the refusal is logged."""
    daemon = make_daemon(
        str(tmp_path),
        Config(allowed_uids=(1000,)),
        listener=listening_socket(str(tmp_path / SOCKET_NAME)),
    )
    monkeypatch.setattr(
        server_module, "peer_credentials", lambda sock: PeerCred(pid=os.getpid(), uid=1001, gid=1)
    )

    async def main() -> None:
        async with accepting(daemon):
            client = await connect(socket_path(daemon))
            try:
                assert await client.receive_all() == [
                    p.ErrorMessage(
                        code="permission",
                        message="this user may not use netjail (allowed_uids/allowed_groups)",
                    )
                ]
            finally:
                client.close()

    try:
        run(main())
        assert daemon.log.records == [
            ("warning", "refused a client not in allowed_uids/allowed_groups", {"uid": 1001})
        ]
        assert daemon.server.connections == set()
    finally:
        daemon.close()


def test_a_client_inside_a_jail_is_told_and_disconnected(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A jailed client gets one permission error and end of file; the refusal is logged."""
    monkeypatch.setattr(server_module, "namespace_inode", lambda pid, kind: None)

    async def main() -> None:
        async with accepting(daemon):
            client = await connect(socket_path(daemon))
            try:
                assert await client.receive_all() == [
                    p.ErrorMessage(
                        code="permission", message="connections from inside a jail are refused"
                    )
                ]
            finally:
                client.close()

    run(main())
    assert daemon.log.records == [
        (
            "warning",
            "refused a connection from inside a jail",
            {"pid": os.getpid(), "uid": os.geteuid()},
        )
    ]


def test_a_client_whose_credentials_cannot_be_read_is_dropped_silently(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If SO_PEERCRED fails the socket is closed at once, without a message."""

    def peer_credentials(sock: object) -> PeerCred:
        raise OSError(107, "Transport endpoint is not connected")

    monkeypatch.setattr(server_module, "peer_credentials", peer_credentials)

    async def main() -> None:
        async with accepting(daemon):
            client = await connect(socket_path(daemon))
            try:
                assert await client.receive_all() == []
            finally:
                client.close()

    run(main())
    assert daemon.log.records == []


def test_a_connection_that_fails_is_logged_and_forgotten(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected error out of a connection is logged with the peer's pid, and the
    connection is no longer listed."""

    class FailingConnection(Connection):
        async def serve(self) -> None:
            self.sock.close()
            raise RuntimeError("connection bug")

    monkeypatch.setattr(server_module, "Connection", FailingConnection)

    async def main() -> None:
        async with accepting(daemon):
            client = await connect(socket_path(daemon))
            try:
                assert await client.receive_all() == []
            finally:
                client.close()

    run(main())
    assert daemon.log.records == [
        (
            "error",
            "connection failed",
            {"pid": os.getpid(), "error": "RuntimeError('connection bug')"},
        )
    ]
    assert daemon.server.connections == set()


# ---------------------------------------------------------------------- status, apply


def test_status_carries_the_servers_counters(daemon: Daemon) -> None:
    """status(): version, pid, running and total jobs, event counters, cgroup mode, and the
    fork server's health as the host tells it."""

    async def main() -> None:
        host = daemon.jobs.ctx.host
        assert isinstance(host, FakeJailHost)
        host.fork_server = ForkServerHealth(
            state="starting", restarts=3, last_exit="exited with status 1"
        )
        daemon.jobs.add_job(spec_for(ALICE))
        done = daemon.jobs.add_job(spec_for(BOB))
        daemon.jobs.finish(done)
        daemon.intake.events_seen = 7
        daemon.intake.events_lost = 2
        status = daemon.server.status()
        assert status.uptime_s >= 0
        assert msgspec.structs.replace(status, uptime_s=0.0) == p.StatusReply(
            version=__version__,
            pid=os.getpid(),
            uptime_s=0.0,
            jobs_running=1,
            jobs_total=2,
            events_seen=7,
            events_lost=2,
            cgroup_mode="hybrid",
            seccomp_profile="netjail-default-1",
            fork_server="starting",
            fork_server_restarts=3,
            fork_server_last_exit="exited with status 1",
            pool_size=0,
            pool_ready=0,
        )

    run(main())


def test_apply_swaps_in_a_reloaded_configuration(tmp_path: Path) -> None:
    """apply() sets the configuration in force and the file's own values; the allow-list
    check uses the new one at once."""
    daemon = make_daemon(str(tmp_path), Config(allowed_uids=(1000,)))
    try:
        assert daemon.server.allowed(BOB) is False
        new = Config(allowed_uids=(1001,), socket=str(tmp_path / "override.sock"))
        file_config = Config(allowed_uids=(1001,))
        daemon.server.apply(new, file_config)
        assert daemon.server.config is new
        assert daemon.server.file_config is file_config
        assert [daemon.server.allowed(peer) for peer in (ALICE, BOB)] == [False, True]
    finally:
        daemon.close()


# ---------------------------------------------------------------------- accept loop, stop


def test_serve_forever_serves_clients_side_by_side(daemon: Daemon) -> None:
    """Clients connecting to the listening socket are each served, at the same time."""

    async def main() -> None:
        async with accepting(daemon):
            first = await connect(socket_path(daemon))
            second = await connect(socket_path(daemon))
            try:
                await first.hello()
                await second.hello()
                assert len(daemon.server.connections) == 2
                await second.send(p.PsRequest())
                await first.send(p.StatusRequest())
                assert await second.receive() == p.PsReply(jobs=[])
                assert isinstance(await first.receive(), p.StatusReply)
            finally:
                first.close()
                second.close()

    run(main())


def test_close_connections_sends_every_owed_report_before_the_shutdown_error(
    daemon: Daemon,
) -> None:
    """At stop, a client with a job gets the job's report, then `shutdown`, then end of
    file; a client without jobs gets `shutdown` alone."""

    async def main() -> None:
        async with accepting(daemon):
            busy = await connect(socket_path(daemon))
            idle = await connect(socket_path(daemon))
            try:
                await busy.hello()
                await idle.hello()
                await busy.send(p.RunRequest(argv=["true"], events=False))
                started = await busy.receive()
                assert isinstance(started, p.Started)
                closing = asyncio.ensure_future(
                    daemon.server.close_connections("netjaild is stopping")
                )
                for _ in range(5):
                    await asyncio.sleep(0)
                assert not closing.done()
                report = daemon.jobs.finish(daemon.jobs.jobs[started.job])
                shutdown = p.ErrorMessage(code="shutdown", message="netjaild is stopping")
                assert await busy.receive_all() == [p.Exit(report=report), shutdown]
                assert await idle.receive_all() == [shutdown]
            finally:
                busy.close()
                idle.close()
            await closing
        assert daemon.server.connections == set()
        assert daemon.jobs.kills == []

    run(main())
