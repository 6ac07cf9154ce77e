"""The daemon's side of the fork-server channel (netjail.kernel.spawn.ForkServer), driven against
a stand-in server thread on a real socketpair: plans travel in sealed memfds, and spawns that
find the socket full wait their turn instead of failing."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Iterator

import pytest

from netjail.kernel import spawn
from netjail.kernel.fdpass import read_payload, recv_with_fds, send_with_fds
from netjail.kernel.fsplan import HostLayout, PathSource, build_fs_plan
from netjail.kernel.jobplan import JobPlan
from netjail.kernel.spawn import ForkServer

from .daemonfakes import open_fds


def plan_for(n: int, size: int) -> JobPlan:
    return JobPlan(
        argv=["sh", "-c", "exit 0", f"{n:03d}" + "x" * size],
        env={"PATH": "/usr/bin"},
        cwd="/",
        uid=61184,
        gid=61184,
        netns_path="/run/netns/netjail-j-1",
        cgroup_procs=[],
        hostname="netjail-j-1",
        fs=build_fs_plan(host=HostLayout(()), home=PathSource("/var/lib/netjail/home/j-1")),
    )


class StandIn:
    """A fork server that, once ``go`` is set, answers each spawn with its own pidfd."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.go = threading.Event()
        self.plans: list[JobPlan] = []
        self.fd_counts: list[int] = []
        #: Released once per answered spawn, after the stand-in closed its copies of the fds.
        self.answered = threading.Semaphore(0)
        self.thread = threading.Thread(target=self._serve)
        self.thread.start()

    def _serve(self) -> None:
        self.go.wait(10)
        while True:
            data, fds = recv_with_fds(self.sock, 65536, 16)
            if not data:
                return
            request = spawn._to_server.decode(data)
            self.plans.append(spawn._plans.decode(read_payload(fds[0], 1 << 24)))
            self.fd_counts.append(len(fds))
            for fd in fds:
                os.close(fd)
            pidfd = os.pidfd_open(os.getpid())
            reply = spawn._Spawned(id=request.id, pid=1000 + request.id)
            send_with_fds(self.sock, spawn._encode(reply), [pidfd])
            os.close(pidfd)
            self.answered.release()


@pytest.fixture
def channel() -> Iterator[tuple[ForkServer, StandIn]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    # As small as the kernel allows: a few spawns fill it.
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)
    stand_in = StandIn(theirs)
    try:
        yield ForkServer(-1, ours), stand_in
    finally:
        stand_in.go.set()
        ours.close()
        stand_in.thread.join(10)
        theirs.close()


def test_spawns_that_fill_the_socket_wait_their_turn_and_all_start(
    channel: tuple[ForkServer, StandIn],
) -> None:
    """30 spawns with 7 KB command lines, asked for while the server reads nothing, all start,
    in order, each plan read whole from its memfd, and no fd is left open."""
    server, stand_in = channel
    before = open_fds()

    async def main() -> list[spawn.SpawnedJob]:
        server.attach(asyncio.get_running_loop())
        r, w = os.pipe()
        try:
            started = [
                asyncio.ensure_future(server.spawn(plan_for(n, 7000), [r, w, w])) for n in range(30)
            ]
            await asyncio.sleep(0.05)
            queued = len(server._outbox)
            stand_in.go.set()
            jobs = await asyncio.wait_for(asyncio.gather(*started), 10)
        finally:
            os.close(r)
            os.close(w)
        assert queued > 0  # the socket did fill: the outbox was used
        return jobs

    jobs = asyncio.run(main())
    assert [job.pid for job in jobs] == [1001 + n for n in range(30)]
    assert [plan.argv[3][:3] for plan in stand_in.plans] == [f"{n:03d}" for n in range(30)]
    assert stand_in.plans[7] == plan_for(7, 7000)
    assert stand_in.fd_counts == [4] * 30
    for job in jobs:
        job.close()
    for _ in range(30):
        assert stand_in.answered.acquire(timeout=10)
    assert open_fds() == before


def test_a_spawn_cancelled_while_queued_is_never_sent(channel: tuple[ForkServer, StandIn]) -> None:
    """A queued spawn whose caller gave up is dropped from the outbox: the server never sees it,
    and the spawns around it still start."""
    server, stand_in = channel

    async def main() -> list[spawn.SpawnedJob]:
        server.attach(asyncio.get_running_loop())
        r, w = os.pipe()
        try:
            started = [
                asyncio.ensure_future(server.spawn(plan_for(n, 7000), [r, w, w])) for n in range(12)
            ]
            await asyncio.sleep(0.05)
            assert len(server._outbox) > 2
            victim = started.pop(-2)
            victim.cancel()
            stand_in.go.set()
            jobs = await asyncio.wait_for(asyncio.gather(*started), 10)
        finally:
            os.close(r)
            os.close(w)
        return jobs

    jobs = asyncio.run(main())
    assert [plan.argv[3][:3] for plan in stand_in.plans] == [
        f"{n:03d}" for n in range(12) if n != 10
    ]
    for job in jobs:
        job.close()
