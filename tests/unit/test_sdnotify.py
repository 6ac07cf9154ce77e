"""Tests for sd_notify and socket activation without libsystemd (netjail.daemon.sdnotify)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from netjail.daemon import sdnotify
from netjail.errors import ConfigError

SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd's, named by $NOTIFY_SOCKET."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


@pytest.fixture
def no_listen_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start without LISTEN_* variables (monkeypatch restores whatever was there)."""
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        monkeypatch.delenv(name, raising=False)


def received(sock: socket.socket) -> bytes:
    """The next datagram the fake service manager received."""
    return sock.recv(4096)


# --- notify ------------------------------------------------------------------------------------


def test_notify_without_notify_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside systemd (no $NOTIFY_SOCKET) notify sends nothing and returns False."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.notify_ready("up") is False


def test_notify_empty_notify_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty $NOTIFY_SOCKET counts as unset."""
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert sdnotify.notify("READY=1") is False


def test_notify_sends_the_exact_state(notify_socket: socket.socket) -> None:
    """notify sends its argument as one UTF-8 datagram."""
    assert sdnotify.notify("READY=1\nSTATUS=héllo") is True
    assert received(notify_socket) == "READY=1\nSTATUS=héllo".encode()


def test_notify_ready_with_status(notify_socket: socket.socket) -> None:
    """notify_ready sends READY=1 and the status in one datagram."""
    assert sdnotify.notify_ready("serving /run/netjail/netjail.sock") is True
    assert received(notify_socket) == b"READY=1\nSTATUS=serving /run/netjail/netjail.sock"


def test_notify_ready_without_status(notify_socket: socket.socket) -> None:
    """notify_ready() alone sends READY=1."""
    assert sdnotify.notify_ready() is True
    assert received(notify_socket) == b"READY=1"


def test_notify_status_and_stopping(notify_socket: socket.socket) -> None:
    """notify_status sends STATUS=…, notify_stopping sends STOPPING=1."""
    assert sdnotify.notify_status("3 jobs running") is True
    assert sdnotify.notify_stopping() is True
    assert received(notify_socket) == b"STATUS=3 jobs running"
    assert received(notify_socket) == b"STOPPING=1"


def test_status_cannot_inject_assignments(notify_socket: socket.socket) -> None:
    """A newline in a status cannot start another assignment such as READY=1 or MAINPID=."""
    assert sdnotify.notify_status("bad\nMAINPID=1\rREADY=1") is True
    assert received(notify_socket) == b"STATUS=bad MAINPID=1 READY=1"


def test_notify_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    """An '@name' $NOTIFY_SOCKET is the abstract socket '\\0name'."""
    name = f"netjail-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify_stopping() is True
        assert received(sock) == b"STOPPING=1"


def test_notify_to_a_dead_socket_returns_false(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A $NOTIFY_SOCKET nobody listens on makes notify return False, not raise."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert sdnotify.notify("READY=1") is False


@pytest.mark.parametrize(
    ("value", "address"),
    [
        ("/run/systemd/notify", "/run/systemd/notify"),
        ("@abstract", "\0abstract"),
        ("@", None),
        ("vsock:2:1234", None),
        ("relative/path", None),
    ],
)
def test_notify_address(value: str, address: str | None) -> None:
    """Paths and '@' names are Unix addresses; other forms are not supported."""
    assert sdnotify.notify_address(value) == address


def test_unsupported_notify_socket_returns_false(monkeypatch: pytest.MonkeyPatch) -> None:
    """A vsock $NOTIFY_SOCKET is not supported: notify returns False."""
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert sdnotify.notify("READY=1") is False


# --- LISTEN_* parsing --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "count"),
    [
        ({}, 0),
        ({"LISTEN_PID": "42", "LISTEN_FDS": "2"}, 2),
        ({"LISTEN_PID": "43", "LISTEN_FDS": "2"}, 0),
        ({"LISTEN_PID": "42"}, 0),
        ({"LISTEN_FDS": "1"}, 0),
    ],
)
def test_count_listen_fds(environ: dict[str, str], count: int) -> None:
    """Passed fds count only when LISTEN_PID names this process."""
    assert sdnotify.count_listen_fds(environ, 42) == count


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"LISTEN_PID": "x", "LISTEN_FDS": "1"}, "LISTEN_PID='x' is not a process id"),
        ({"LISTEN_PID": "42", "LISTEN_FDS": "0"}, "LISTEN_FDS='0' is not a positive number"),
        ({"LISTEN_PID": "42", "LISTEN_FDS": "-3"}, "LISTEN_FDS='-3' is not a positive number"),
        ({"LISTEN_PID": "42", "LISTEN_FDS": "two"}, "LISTEN_FDS='two' is not a positive number"),
    ],
)
def test_malformed_listen_variables_are_errors(environ: dict[str, str], message: str) -> None:
    """Malformed LISTEN_* variables raise ConfigError saying which."""
    with pytest.raises(ConfigError) as info:
        sdnotify.count_listen_fds(environ, 42)
    assert str(info.value).startswith(message)


# --- listen_fds --------------------------------------------------------------------------------


def listening_unix_socket(path: Path) -> socket.socket:
    """A listening Unix stream socket bound to ``path``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen()
    return sock


def high_fds(*sockets: socket.socket) -> int:
    """Dup ``sockets`` to consecutive free fds, inheritable as systemd passes them; the first."""
    base = 200
    while any(_is_open(fd) for fd in range(base, base + len(sockets))):
        base += len(sockets)
    for offset, sock in enumerate(sockets):
        os.dup2(sock.fileno(), base + offset, inheritable=True)
    return base


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.mark.usefixtures("no_listen_env")
def test_listen_fds_without_variables_is_empty() -> None:
    """Not socket-activated: no sockets."""
    assert sdnotify.listen_fds() == []


def test_listen_fds_adopts_passed_sockets_and_unsets_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Passed fds become socket objects, close-on-exec; the LISTEN_* variables are removed."""
    stream = listening_unix_socket(tmp_path / "a.sock")
    datagram = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    first = high_fds(stream, datagram)
    stream.close()
    datagram.close()
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "2")
    monkeypatch.setenv("LISTEN_FDNAMES", "netjaild.socket:other")
    adopted = sdnotify.listen_fds(first_fd=first)
    try:
        assert [sock.fileno() for sock in adopted] == [first, first + 1]
        assert [(sock.family, sock.type) for sock in adopted] == [
            (socket.AF_UNIX, socket.SOCK_STREAM),
            (socket.AF_INET, socket.SOCK_DGRAM),
        ]
        assert not any(os.get_inheritable(sock.fileno()) for sock in adopted)
        assert not {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} & set(os.environ)
        assert sdnotify.find_unix_listener(adopted, str(tmp_path / "a.sock")) is adopted[0]
    finally:
        for sock in adopted:
            sock.close()


def test_listen_fds_for_another_process_is_ignored_but_unset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Variables meant for another pid adopt nothing, and are still removed (as sd_listen_fds)."""
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert sdnotify.listen_fds(first_fd=10_000) == []
    assert "LISTEN_PID" not in os.environ
    assert "LISTEN_FDS" not in os.environ


def test_listen_fds_with_a_closed_fd_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """LISTEN_FDS naming an fd that is not open raises ConfigError, and still unsets the env."""
    free = 10_000
    while _is_open(free):
        free += 1
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "1")
    with pytest.raises(ConfigError, match=f"fd {free} is not an open socket"):
        sdnotify.listen_fds(first_fd=free)
    assert "LISTEN_FDS" not in os.environ


def test_listen_fds_with_malformed_variables_unsets_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """Malformed LISTEN_FDS raises ConfigError and the variables are gone afterwards."""
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "many")
    with pytest.raises(ConfigError, match="LISTEN_FDS='many' is not a positive number"):
        sdnotify.listen_fds(first_fd=10_000)
    assert "LISTEN_PID" not in os.environ


def test_real_activation_at_fd_3(tmp_path: Path) -> None:
    """In a process started like systemd starts it (socket at fd 3, LISTEN_PID=$$), it is found."""
    path = tmp_path / "netjail.sock"
    listener = listening_unix_socket(path)
    # bash puts the socket at fd 3 and execs python in place, so $$ is python's pid, exactly as
    # systemd sets LISTEN_PID to the pid of the process it execs.
    child = textwrap.dedent(
        f"""
        import json, os, sys
        sys.path.insert(0, {SRC!r})
        from netjail.daemon import sdnotify
        fds = sdnotify.listen_fds()
        found = sdnotify.find_unix_listener(fds, {str(path)!r})
        conn, _ = found.accept()
        conn.sendall(b"hello")
        print(json.dumps({{
            "fds": [s.fileno() for s in fds],
            "found": found.fileno(),
            "env": sorted(k for k in os.environ if k.startswith("LISTEN_")),
        }}))
        """
    )
    fd = listener.fileno()
    with listener:
        process = subprocess.Popen(
            [
                "bash",
                "-c",
                f'export LISTEN_PID=$$ LISTEN_FDS=1; exec "$0" -c "$1" 3<&{fd} {fd}<&-',
                sys.executable,
                child,
            ],
            pass_fds=(fd,),
            stdout=subprocess.PIPE,
            text=True,
        )
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(10)
            client.connect(str(path))
            assert client.recv(5) == b"hello"
        out, _ = process.communicate(timeout=30)
    assert process.returncode == 0
    assert json.loads(out) == {"fds": [3], "found": 3, "env": []}


# --- find_unix_listener ------------------------------------------------------------------------


def test_find_unix_listener_picks_the_socket_bound_to_the_path(tmp_path: Path) -> None:
    """Among several sockets, the listening Unix stream socket at the path is chosen."""
    other = listening_unix_socket(tmp_path / "other.sock")
    wanted = listening_unix_socket(tmp_path / "netjail.sock")
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with other, wanted, udp:
        sockets = [udp, other, wanted]
        assert sdnotify.find_unix_listener(sockets, str(tmp_path / "netjail.sock")) is wanted
        assert sdnotify.find_unix_listener(sockets, str(tmp_path / "./netjail.sock")) is wanted
        assert sdnotify.find_unix_listener(sockets, str(tmp_path / "missing.sock")) is None


def test_find_unix_listener_follows_symlinked_directories(tmp_path: Path) -> None:
    """A path through a symlinked directory (/var/run -> /run) names the same socket."""
    real = tmp_path / "run"
    real.mkdir()
    (tmp_path / "var-run").symlink_to(real)
    with listening_unix_socket(real / "netjail.sock") as sock:
        assert sdnotify.find_unix_listener([sock], str(tmp_path / "var-run/netjail.sock")) is sock


def test_find_unix_listener_ignores_non_listening_and_datagram_sockets(tmp_path: Path) -> None:
    """A bound but not listening stream socket, or a datagram socket, is not the listener."""
    bound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    datagram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with bound, datagram:
        bound.bind(str(tmp_path / "s1"))
        datagram.bind(str(tmp_path / "s2"))
        assert sdnotify.find_unix_listener([bound], str(tmp_path / "s1")) is None
        assert sdnotify.find_unix_listener([datagram], str(tmp_path / "s2")) is None
