"""The server's bounds (netjail.daemon.server): an accept loop that survives running out of fds,
and the per-uid connection limit; on a real Unix socket, with the stub JobManager."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from netjail import protocol as p
from netjail.daemon import server as server_module
from netjail.daemon.config import Config
from netjail.daemon.jobs import max_jobs_for
from netjail.kernel.peer import PeerCred

from .daemonfakes import Daemon, WireClient, connect, listening_socket, make_daemon, run

SOCKET_NAME = "netjail.sock"
#: A non-root peer in our own process (so the jail check sees our own netns).
USER = PeerCred(pid=os.getpid(), uid=1000, gid=1000)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    made = make_daemon(str(tmp_path), listener=listening_socket(str(tmp_path / SOCKET_NAME)))
    yield made
    made.close()


@contextlib.asynccontextmanager
async def accepting(daemon: Daemon) -> AsyncIterator[asyncio.Future[None]]:
    """The server's accept loop, running for the block's duration."""
    serving = asyncio.ensure_future(daemon.server.serve_forever())
    try:
        yield serving
    finally:
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving
        connections = set(daemon.server._connection_tasks)
        if connections:
            await asyncio.wait(connections)


def socket_path(daemon: Daemon) -> str:
    name = daemon.server.listener.getsockname()
    assert isinstance(name, str)
    return name


async def until(predicate: object) -> None:
    while not predicate():  # type: ignore[operator]
        await asyncio.sleep(0.005)


# ---------------------------------------------------------------------- out of fds


@contextlib.contextmanager
def fds_exhausted() -> Iterator[list[int]]:
    """Every fd this process may open, taken (a low soft limit keeps it quick); given back on
    exit, with the soft limit as it was."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(name) for name in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, highest + 64), hard))
    held: list[int] = []
    try:
        with contextlib.suppress(OSError):
            while True:
                held.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
        yield held
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_accept_loop_survives_running_out_of_fds(daemon: Daemon) -> None:
    """With no fd left, accept() fails: the loop logs once, turns every waiting client away with
    a busy error (on its reserve fd) instead of leaving it hanging, pauses, and serves clients
    again once fds are free; connections it already had are served throughout."""
    busy = p.ErrorMessage(
        code="busy", message="netjaild is out of file descriptors; try again shortly"
    )

    async def main() -> None:
        async with accepting(daemon) as serving:
            served = await connect(socket_path(daemon))
            await served.hello()
            # Made now, connected once the fds are gone: connect() needs no new fd.
            pending = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(3)]
            with fds_exhausted():
                for sock in pending:
                    sock.connect(socket_path(daemon))
                for sock in pending:
                    assert await WireClient(sock).receive_all() == [busy]
                await asyncio.sleep(0.2)  # several pauses: still one log line
                await served.send(p.PsRequest())
                assert await served.receive() == p.PsReply(jobs=[])
                assert not serving.done()
            fresh = await connect(socket_path(daemon))
            await fresh.hello()
            for client in (served, fresh):
                client.close()
            for sock in pending:
                sock.close()
        errors = [r for r in daemon.log.records if r[0] == "error"]
        assert errors == [
            (
                "error",
                "cannot accept connections (out of fds or memory); pausing until it can",
                {"error": "Too many open files"},
            )
        ]
        assert [r for r in daemon.log.records if r[0] != "error"] == [
            ("info", "accepting connections again", {"turned_away": 3})
        ]

    run(main())


def test_an_unexpected_accept_error_is_logged_and_the_loop_goes_on(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An accept() error that is not about fds is logged once and the loop keeps serving."""
    loop_errors = [OSError(22, "Invalid argument"), OSError(22, "Invalid argument")]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        real_accept = loop.sock_accept

        async def flaky_accept(sock: object) -> object:
            if loop_errors:
                raise loop_errors.pop()
            return await real_accept(sock)  # type: ignore[arg-type]

        monkeypatch.setattr(loop, "sock_accept", flaky_accept)
        async with accepting(daemon):
            client = await connect(socket_path(daemon))
            await client.hello()
            client.close()

    run(main())
    assert [r for r in daemon.log.records if r[0] == "error"] == [
        (
            "error",
            "cannot accept connections (accept failed); pausing until it can",
            {"error": "Invalid argument"},
        )
    ]


def test_a_connection_gone_before_it_was_accepted_is_skipped_silently(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ECONNABORTED from accept() is one client's problem: no log line, no pause."""
    aborted = [OSError(103, "Software caused connection abort")]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        real_accept = loop.sock_accept

        async def accept(sock: object) -> object:
            if aborted:
                raise aborted.pop()
            return await real_accept(sock)  # type: ignore[arg-type]

        monkeypatch.setattr(loop, "sock_accept", accept)
        async with accepting(daemon):
            client = await connect(socket_path(daemon))
            await client.hello()
            client.close()

    run(main())
    assert daemon.log.records == []


def test_the_reserve_fd_is_given_back_when_the_loop_ends(daemon: Daemon) -> None:
    """Cancelling the accept loop closes its reserve fd."""

    async def main() -> None:
        before = set(os.listdir("/proc/self/fd"))
        async with accepting(daemon):
            await asyncio.sleep(0)
            assert len(set(os.listdir("/proc/self/fd")) - before) == 1
        assert set(os.listdir("/proc/self/fd")) == before

    run(main())


def test_the_pauses_double_up_to_the_longest() -> None:
    """A starved loop pauses 50 ms, then twice as long each time, up to 1 s."""
    starved = server_module._Starvation()
    assert [starved.next_pause() for _ in range(8)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]


# ---------------------------------------------------------------------- per-uid limit


def test_a_uid_over_its_connection_limit_is_told_busy_and_logged_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past max_connections_per_uid, a uid's new connections get a busy error; the refusal is
    logged once until its count drops, and a closed connection makes room again."""
    daemon = make_daemon(str(tmp_path), listener=listening_socket(str(tmp_path / SOCKET_NAME)))
    daemon.server.max_connections_per_uid = 2
    monkeypatch.setattr(server_module, "peer_credentials", lambda sock: USER)
    busy = p.ErrorMessage(
        code="busy",
        message="uid 1000 already has 2 connections to netjaild, the most one user may have; "
        "close some and try again",
    )

    async def main() -> None:
        async with accepting(daemon):
            first, second = await connect(socket_path(daemon)), await connect(socket_path(daemon))
            await first.hello()
            await second.hello()
            for _ in range(2):
                refused = await connect(socket_path(daemon))
                assert await refused.receive_all() == [busy]
                refused.close()
            first.close()
            await until(lambda: len(daemon.server.connections) == 1)
            third = await connect(socket_path(daemon))
            await third.hello()
            refused = await connect(socket_path(daemon))
            assert await refused.receive_all() == [busy]
            for client in (second, third, refused):
                client.close()

    try:
        run(main())
    finally:
        daemon.close()
    assert daemon.log.records == [
        ("warning", "refused a connection over the per-uid limit", {"uid": 1000, "limit": 2}),
        ("warning", "refused a connection over the per-uid limit", {"uid": 1000, "limit": 2}),
    ]


def test_roots_connections_are_not_limited(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Root may hold more connections than the per-uid limit."""
    daemon = make_daemon(str(tmp_path), listener=listening_socket(str(tmp_path / SOCKET_NAME)))
    daemon.server.max_connections_per_uid = 1
    monkeypatch.setattr(
        server_module, "peer_credentials", lambda sock: PeerCred(pid=os.getpid(), uid=0, gid=0)
    )

    async def main() -> None:
        async with accepting(daemon):
            clients = [await connect(socket_path(daemon)) for _ in range(3)]
            for client in clients:
                await client.hello()
                client.close()

    try:
        run(main())
    finally:
        daemon.close()
    assert daemon.log.records == []


def test_the_default_limit_is_64_connections_per_uid(daemon: Daemon) -> None:
    """A server whose configuration names no limit allows 64 connections per non-root uid."""
    assert Config().max_connections_per_uid == 64
    assert daemon.server.max_connections_per_uid == 64


def test_the_configured_limits_apply_and_follow_a_reload(daemon: Daemon) -> None:
    """max_connections_per_uid and max_jobs from the configuration are what the server and the
    job manager enforce, and a reload's values replace them; an absent max_jobs is sized to the
    fd limit."""
    configured = Config(max_connections_per_uid=3, max_jobs=7)
    daemon.server.apply(configured, configured)
    assert (daemon.server.max_connections_per_uid, daemon.jobs.max_jobs) == (3, 7)
    daemon.server.apply(Config(), Config())
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert (daemon.server.max_connections_per_uid, daemon.jobs.max_jobs) == (
        64,
        max_jobs_for(soft),
    )
