"""libnftables in a helper process of its own, so that nothing the library does ends the daemon.

Why. libnftables 1.0.6 (Debian 12's libnftables1) has two ways of ending the process that
calls it, both reproduced on this host:
- it waits for the kernel's acknowledgements with select() (src/mnl.c, ``mnl_batch_talk``), and
  glibc aborts a process that gives select() an fd of 1024 or more (``*** bit out of range 0 -
  FD_SETSIZE on fd_set ***``): a daemon with about 110 jobs running holds such fds;
- it calls exit() when it cannot open a netlink socket (mnl.c:60 for its own, iface.c:112 for
  its interface cache: "Unable to initialize Netlink socket: Too many open files").
The helper holds a handful of fds and caps its own RLIMIT_NOFILE at FD_SETSIZE, so the first
cannot happen; should the second, only the helper ends: the jail being built fails closed with
a FirewallError, and the next ruleset starts a new helper.

How. The helper is exec'd (``python -s -P -m netjail.kernel.nfthelper``, see
``netjail.kernel.helperproc``), not merely forked: it may have to be (re)started while the
daemon runs threads, and only exec makes that safe. It is
single-threaded and serves one request at a time over a SOCK_SEQPACKET socketpair: a ``_Load``
datagram carrying, as SCM_RIGHTS, the jail's netns fd and a memfd holding the ruleset text (so
a ruleset of any size fits one datagram), answered by one ``_Outcome``. For each, it setns()s
into the jail's netns, loads the text with a fresh libnftables context (whose netlink socket is
then made in that netns), and setns()s back to the daemon's own netns, which it was given at
start: it never stays in a jail's namespace, nor keeps one alive. It exits when the daemon's end
of the socket closes, which also happens when the daemon dies.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence

import msgspec

from netjail.errors import FirewallError, map_os_errors
from netjail.kernel import syscalls
from netjail.kernel.fdpass import read_payload, recv_with_fds, sealed_payload, send_with_fds
from netjail.kernel.helperproc import describe_exit, helper_command, helper_env

#: How long the daemon waits for one ruleset to be loaded (it takes about 1 ms).
ANSWER_TIMEOUT_S = 10.0
#: glibc's FD_SETSIZE: the helper never holds an fd that select() cannot take.
_FD_SETSIZE = 1024
#: The longest error text an outcome carries (the first line of libnftables' message).
_MAX_ERROR = 2000
_MAX_DATAGRAM = 65536
#: The largest ruleset text the helper reads (a jail's is a few KiB; a huge policy, some MiB).
_MAX_RULESET = 64 << 20


class _Load(msgspec.Struct, frozen=True, tag="load"):
    """Load the ruleset in the memfd into the netns (both fds come with the datagram)."""

    seq: int


class _Outcome(msgspec.Struct, frozen=True, tag="outcome"):
    """The answer to ``_Load`` ``seq``: ``error`` is None when the ruleset is in force."""

    seq: int
    error: str | None


_load_decoder = msgspec.msgpack.Decoder(_Load)
_outcome_decoder = msgspec.msgpack.Decoder(_Outcome)
_encode = msgspec.msgpack.encode

#: Loads ruleset text into the netns open at the fd; the error text, or None once loaded.
Loader = Callable[[int, str], str | None]


# --------------------------------------------------------------------------- the library


class Libnftables:
    """The few libnftables calls netjail makes (ctypes over libnftables.so.1)."""

    def __init__(self) -> None:
        with map_os_errors(
            FirewallError, "libnftables not available", "apt-get install libnftables1"
        ):
            lib = ctypes.CDLL("libnftables.so.1", use_errno=True)
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        self.lib = lib

    def run(self, commands: str) -> str | None:
        """Run nft ``commands`` in the calling thread's netns; the first error line, or None.

        A fresh context each time: its netlink socket is opened in the netns the thread is in
        now. (libnftables is not thread-safe, as Debian links it with libxtables; the helper
        has one thread.)
        """
        ctx = self.lib.nft_ctx_new(0)
        if not ctx:
            return "nft_ctx_new failed"
        try:
            self.lib.nft_ctx_buffer_output(ctx)
            self.lib.nft_ctx_buffer_error(ctx)
            rc = self.lib.nft_run_cmd_from_buffer(ctx, commands.encode())
            if rc == 0:
                return None
            err = (self.lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
            return err.strip().splitlines()[0] if err.strip() else f"rc={rc}"
        finally:
            self.lib.nft_ctx_free(ctx)


# --------------------------------------------------------------------------- the helper process


def load_in_netns(lib: Libnftables, home_fd: int) -> Loader:
    """The helper's loader: into the jail's netns, load, and back to ``home_fd``'s netns."""

    def load(netns_fd: int, text: str) -> str | None:
        try:
            syscalls.setns(netns_fd, syscalls.CLONE_NEWNET)
        except OSError as e:
            return f"cannot enter the jail's netns: {e.strerror}"
        try:
            return lib.run(text)
        finally:
            try:
                syscalls.setns(home_fd, syscalls.CLONE_NEWNET)
            except OSError:
                # Still inside a jail: serving another one from here could load its ruleset
                # into the wrong netns. End; the daemon starts a new helper.
                os._exit(70)

    return load


def serve(sock: socket.socket, load: Loader) -> None:
    """Answer ``_Load`` requests until the other end closes (then return)."""
    while True:
        try:
            data, fds = recv_with_fds(sock, _MAX_DATAGRAM, 4)
        except InterruptedError:
            continue
        if not data:
            for fd in fds:
                os.close(fd)
            return
        try:
            request = _load_decoder.decode(data)
            if len(fds) != 2:
                error: str | None = f"expected a netns fd and a ruleset memfd, got {len(fds)} fds"
            else:
                netns_fd, text_fd = fds
                try:
                    text = read_payload(text_fd, _MAX_RULESET).decode()
                except (ValueError, UnicodeDecodeError) as e:
                    error = f"unreadable ruleset: {e}"
                else:
                    error = load(netns_fd, text)
        finally:
            for fd in fds:
                os.close(fd)
        sock.send(_encode(_Outcome(seq=request.seq, error=error[:_MAX_ERROR] if error else None)))


def main(argv: Sequence[str]) -> None:
    """The helper's entry point: ``SOCKET_FD HOME_NETNS_FD``."""
    sock_fd, home_fd = (int(arg) for arg in argv)
    # A Ctrl-C meant for a daemon in the foreground reaches its whole process group: the
    # daemon stops gracefully, and the helper ends when the daemon closes its socket.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    cap = _FD_SETSIZE if hard == resource.RLIM_INFINITY else min(_FD_SETSIZE, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (cap, hard))
    # Started from one of the daemon's netns threads, this process began in that jail's netns.
    syscalls.setns(home_fd, syscalls.CLONE_NEWNET)
    sock = socket.socket(fileno=sock_fd)
    serve(sock, load_in_netns(Libnftables(), home_fd))


# --------------------------------------------------------------------------- the daemon's side


class NftHelper:
    """The daemon's handle on the helper: started on first use, started again after it ends.

    Safe to call from any thread; requests are served one at a time, as libnftables needs.
    """

    def __init__(
        self, command: Sequence[str] | None = None, timeout: float = ANSWER_TIMEOUT_S
    ) -> None:
        default = helper_command("netjail.kernel.nfthelper")
        self._command = list(command) if command is not None else default
        self._timeout = timeout
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._seq = 0

    @property
    def pid(self) -> int | None:
        """The running helper's pid, if one runs."""
        return self._process.pid if self._process is not None else None

    def load(self, text: str, netns_fd: int) -> None:
        """Load ruleset ``text`` into the netns open at ``netns_fd``; FirewallError if it is not
        in force (refused by nftables, or the helper ended or hung: then a new one starts)."""
        with self._lock:
            with map_os_errors(FirewallError, "cannot hand the ruleset to the nftables helper"):
                memfd = sealed_payload("netjail-ruleset", text.encode())
            try:
                self._seq += 1
                sock = self._send(_Load(seq=self._seq), [netns_fd, memfd])
            finally:
                os.close(memfd)
            outcome = self._answer(sock, self._seq)
        if outcome.error is not None:
            raise FirewallError(f"nftables refused the jail ruleset: {outcome.error}")

    def _send(self, request: _Load, fds: list[int]) -> socket.socket:
        """Send to the running helper; if it has ended since the last ruleset (nothing of this
        one reached it), start a new one and send once more."""
        data = _encode(request)
        for attempt in range(2):
            sock = self._running()
            try:
                send_with_fds(sock, data, fds)
            except OSError as e:
                self._stop()
                if attempt:
                    raise FirewallError(
                        f"cannot reach the nftables helper: {e.strerror}; the job was not started"
                    ) from None
                continue
            return sock
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def _answer(self, sock: socket.socket, seq: int) -> _Outcome:
        try:
            data = sock.recv(_MAX_DATAGRAM)
        except TimeoutError:
            if self._process is not None:
                self._process.kill()
            self._stop()
            raise FirewallError(
                f"the nftables helper did not answer within {self._timeout:g} s and was killed; "
                "the job was not started (a new helper starts with the next job)"
            ) from None
        except OSError:
            data = b""
        if not data:
            ended = describe_exit(self._stop())
            raise FirewallError(
                f"the nftables helper {ended} while loading the jail's ruleset (its last words, "
                "if any, are in the daemon's log); the job was not started, and a new helper "
                "starts with the next job"
            )
        try:
            outcome = _outcome_decoder.decode(data)
        except msgspec.DecodeError:
            outcome = None
        if outcome is None or outcome.seq != seq:
            self._stop()
            raise FirewallError("the nftables helper answered out of turn; it was restarted")
        return outcome

    def _running(self) -> socket.socket:
        if self._sock is not None and self._process is not None:
            return self._sock
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # /proc/self is the main thread's: the daemon's own netns, even when this runs on
            # a thread that is inside a jail.
            home = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                with map_os_errors(FirewallError, "cannot start the nftables helper"):
                    process = subprocess.Popen(
                        [*self._command, str(theirs.fileno()), str(home)],
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        pass_fds=(theirs.fileno(), home),
                        env=helper_env(),
                    )
            finally:
                os.close(home)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.settimeout(self._timeout)
        self._process, self._sock = process, ours
        return ours

    def _stop(self) -> int | None:
        """Close our end, make sure the helper is gone, reap it; its exit status."""
        process, sock = self._process, self._sock
        self._process = self._sock = None
        if sock is not None:
            sock.close()
        if process is None:
            return None
        try:
            return process.wait(1)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()

    def start(self) -> None:
        """Start the helper now, if none runs (else the first ruleset starts it)."""
        with self._lock:
            self._running()

    def close(self) -> None:
        """Stop the helper (it ends once its socket closes)."""
        with self._lock:
            self._stop()


_helper = NftHelper()
# Reaped at exit: its parent is gone after that, and not every init reaps orphans.
atexit.register(_helper.close)


def load_in_calling_netns(text: str) -> None:
    """Load ruleset ``text`` into the calling thread's netns, through the helper."""
    with map_os_errors(FirewallError, "cannot open the jail's netns for the nftables helper"):
        netns_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _helper.load(text, netns_fd)
    finally:
        os.close(netns_fd)


def start_helper() -> None:
    """Start the helper now (at daemon start-up), rather than with the first jail."""
    _helper.start()


def stop_helper() -> None:
    """Stop the helper (at daemon exit)."""
    _helper.close()


if __name__ == "__main__":
    main(sys.argv[1:])
