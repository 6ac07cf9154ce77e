"""The nftables helper process (netjail.kernel.nfthelper): its serve loop over a socketpair, and
the daemon's handle on it driving a stand-in helper whose loader never touches a netns.

The real loader (setns and libnftables) needs root and is tested in
tests/integration/test_nftables_fds.py.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from netjail.errors import FirewallError
from netjail.kernel import nfthelper
from netjail.kernel.fdpass import sealed_payload, send_with_fds
from netjail.kernel.nfthelper import NftHelper

from .daemonfakes import open_fds

#: A helper that serves with a loader answering by the text it is given.
STAND_IN = """\
import os, socket, sys, time
from netjail.kernel import nfthelper

def load(netns_fd, text):
    if text == "refuse":
        return "Error: syntax error, unexpected junk"
    if text == "die":
        os._exit(3)
    if text == "hang":
        time.sleep(60)
    if text == "inode":
        return f"inode {os.fstat(netns_fd).st_ino}"
    if text == "long":
        return "x" * 5000
    return None

sock_fd, home_fd = (int(arg) for arg in sys.argv[1:])
os.close(home_fd)
nfthelper.serve(socket.socket(fileno=sock_fd), load)
"""


@pytest.fixture
def stand_in(tmp_path: Path) -> list[str]:
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    return [sys.executable, "-P", str(script)]


@pytest.fixture
def helper(stand_in: list[str]) -> Iterator[NftHelper]:
    made = NftHelper(stand_in, timeout=10)
    yield made
    made.close()


def own_netns_fd() -> int:
    return os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)


def load(helper: NftHelper, text: str) -> None:
    fd = own_netns_fd()
    try:
        helper.load(text, fd)
    finally:
        os.close(fd)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# ---------------------------------------------------------------------- serve


def send_load(sock: socket.socket, seq: int, fds: list[int]) -> None:
    send_with_fds(sock, nfthelper._encode(nfthelper._Load(seq=seq)), fds)


def text_memfd(text: str) -> int:
    return sealed_payload("ruleset", text.encode())


def test_serve_hands_the_loader_the_netns_fd_and_the_memfd_text_and_closes_both() -> None:
    """serve() gives the loader the netns fd and the whole text from the memfd, answers each
    request by its seq, closes the fds it got, and returns once the daemon's end closes."""
    before = open_fds()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    seen: list[tuple[int, str]] = []

    def loader(netns_fd: int, text: str) -> str | None:
        seen.append((os.fstat(netns_fd).st_ino, text))
        return None if text.startswith("table") else "Error: no"

    server = threading.Thread(target=nfthelper.serve, args=(theirs, loader))
    server.start()
    big = "table inet netjail {}\n" * 20_000  # far more than one datagram could hold
    try:
        for seq, text in [(1, big), (2, "junk")]:
            netns_fd, memfd = own_netns_fd(), text_memfd(text)
            send_load(ours, seq, [netns_fd, memfd])
            os.close(netns_fd)
            os.close(memfd)
            answer = nfthelper._outcome_decoder.decode(ours.recv(65536))
            assert answer == nfthelper._Outcome(seq=seq, error=None if seq == 1 else "Error: no")
    finally:
        ours.close()
        server.join(10)
        theirs.close()
    assert not server.is_alive()
    inode = os.stat("/proc/thread-self/ns/net").st_ino
    assert seen == [(inode, big), (inode, "junk")]
    assert open_fds() == before


def test_serve_refuses_a_request_without_both_fds() -> None:
    """A request with one fd instead of two is answered with an error, not loaded."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server = threading.Thread(target=nfthelper.serve, args=(theirs, lambda fd, text: None))
    server.start()
    try:
        netns_fd = own_netns_fd()
        send_load(ours, 7, [netns_fd])
        os.close(netns_fd)
        assert nfthelper._outcome_decoder.decode(ours.recv(65536)) == nfthelper._Outcome(
            seq=7, error="expected a netns fd and a ruleset memfd, got 1 fds"
        )
    finally:
        ours.close()
        server.join(10)
        theirs.close()


def test_serve_refuses_a_ruleset_memfd_that_is_not_sealed() -> None:
    """A ruleset in a memfd the sender could still change is refused, not loaded."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    loaded: list[str] = []

    def loader(netns_fd: int, text: str) -> None:
        loaded.append(text)

    server = threading.Thread(target=nfthelper.serve, args=(theirs, loader))
    server.start()
    try:
        netns_fd, memfd = own_netns_fd(), os.memfd_create("ruleset", os.MFD_CLOEXEC)
        os.write(memfd, b"table inet netjail {}")
        send_load(ours, 3, [netns_fd, memfd])
        os.close(netns_fd)
        os.close(memfd)
        assert nfthelper._outcome_decoder.decode(ours.recv(65536)) == nfthelper._Outcome(
            seq=3, error="unreadable ruleset: the payload memfd is not sealed"
        )
    finally:
        ours.close()
        server.join(10)
        theirs.close()
    assert loaded == []


# ---------------------------------------------------------------------- NftHelper


def test_a_loaded_ruleset_returns_and_the_helper_stays_for_the_next(helper: NftHelper) -> None:
    """load() returns once the helper loaded the text; the same helper serves the next one."""
    load(helper, "table inet netjail {}")
    first = helper.pid
    load(helper, "table inet netjail {}")
    assert first is not None
    assert helper.pid == first


def test_the_helper_gets_the_callers_netns(helper: NftHelper) -> None:
    """The netns fd the helper receives is the calling thread's network namespace."""
    with pytest.raises(FirewallError) as caught:
        load(helper, "inode")
    inode = os.stat("/proc/thread-self/ns/net").st_ino
    assert str(caught.value) == f"nftables refused the jail ruleset: inode {inode}"


def test_a_refused_ruleset_is_a_firewall_error_with_nftables_message(helper: NftHelper) -> None:
    """nftables' first error line reaches the caller; the helper goes on serving."""
    with pytest.raises(FirewallError) as caught:
        load(helper, "refuse")
    assert str(caught.value) == (
        "nftables refused the jail ruleset: Error: syntax error, unexpected junk"
    )
    pid = helper.pid
    load(helper, "table inet netjail {}")
    assert helper.pid == pid


def test_an_error_text_is_bounded(helper: NftHelper) -> None:
    """A very long error text is cut to the outcome's bound."""
    with pytest.raises(FirewallError) as caught:
        load(helper, "long")
    assert str(caught.value) == "nftables refused the jail ruleset: " + "x" * nfthelper._MAX_ERROR


def test_a_helper_that_dies_while_loading_fails_the_job_and_is_replaced(
    helper: NftHelper,
) -> None:
    """The helper exiting mid-load is a FirewallError naming its exit status; it is reaped, and
    the next load starts a new helper."""
    load(helper, "table inet netjail {}")
    dead = helper.pid
    assert dead is not None
    with pytest.raises(FirewallError) as caught:
        load(helper, "die")
    assert str(caught.value) == (
        "the nftables helper exited with status 3 while loading the jail's ruleset (its last "
        "words, if any, are in the daemon's log); the job was not started, and a new helper "
        "starts with the next job"
    )
    assert helper.pid is None
    with pytest.raises(ChildProcessError):
        os.waitpid(dead, os.WNOHANG)  # already reaped
    load(helper, "table inet netjail {}")
    assert helper.pid not in (None, dead)


def test_a_helper_killed_between_jobs_is_replaced_without_failing_the_next(
    helper: NftHelper,
) -> None:
    """A helper gone while idle is noticed on send: a new one loads the ruleset."""
    load(helper, "table inet netjail {}")
    killed = helper.pid
    assert killed is not None
    os.kill(killed, signal.SIGKILL)
    os.waitpid(killed, 0)  # gone for sure (the handle then finds it already reaped)
    load(helper, "table inet netjail {}")
    assert helper.pid not in (None, killed)


def test_a_helper_that_does_not_answer_is_killed_and_the_job_fails(stand_in: list[str]) -> None:
    """Past the timeout the helper is killed and the caller gets a FirewallError."""
    helper = NftHelper(stand_in, timeout=0.5)
    try:
        load(helper, "table inet netjail {}")
        hung = helper.pid
        assert hung is not None
        with pytest.raises(FirewallError) as caught:
            load(helper, "hang")
        assert str(caught.value) == (
            "the nftables helper did not answer within 0.5 s and was killed; the job was not "
            "started (a new helper starts with the next job)"
        )
        assert not alive(hung)
        assert helper.pid is None
    finally:
        helper.close()


def test_a_helper_that_cannot_start_is_a_firewall_error(tmp_path: Path) -> None:
    """A helper command that cannot be executed fails the load with a FirewallError."""
    helper = NftHelper([str(tmp_path / "no-such-helper")])
    try:
        with pytest.raises(FirewallError) as caught:
            load(helper, "table inet netjail {}")
        assert str(caught.value) == ("cannot start the nftables helper: No such file or directory")
    finally:
        helper.close()


def test_loads_from_many_threads_are_served_one_at_a_time(helper: NftHelper) -> None:
    """Concurrent loads from several threads all succeed, over the one helper."""
    errors: list[BaseException] = []

    def loads() -> None:
        try:
            for _ in range(20):
                load(helper, "table inet netjail {}")
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=loads) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []


def test_close_stops_and_reaps_the_helper_and_leaks_no_fd(stand_in: list[str]) -> None:
    """After close() the helper process is gone and the daemon holds no fd of it."""
    before = open_fds()
    helper = NftHelper(stand_in)
    helper.start()
    pid = helper.pid
    assert pid is not None
    load(helper, "table inet netjail {}")
    helper.close()
    assert helper.pid is None
    assert not alive(pid)
    assert open_fds() == before


def test_load_in_calling_netns_goes_through_the_modules_helper(
    stand_in: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """load_in_calling_netns() hands the calling thread's netns to the daemon's one helper."""
    helper = NftHelper(stand_in)
    monkeypatch.setattr(nfthelper, "_helper", helper)
    try:
        with pytest.raises(FirewallError) as caught:
            nfthelper.load_in_calling_netns("inode")
        inode = os.stat("/proc/thread-self/ns/net").st_ino
        assert str(caught.value) == f"nftables refused the jail ruleset: inode {inode}"
    finally:
        helper.close()


def test_the_real_helper_command_runs_this_package_isolated() -> None:
    """The daemon execs its own interpreter on this module, without the working directory (-P)
    or the user's site-packages (-s)."""
    assert NftHelper()._command == [sys.executable, "-s", "-P", "-m", "netjail.kernel.nfthelper"]
