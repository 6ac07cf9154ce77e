"""netjail's error tree: every error class netjail defines lives here, and nowhere else.

Every error netjail raises on purpose derives from ``NetjailError`` and carries a message that
is one line, says what failed and, where there is one, what to do::

    NetjailError
    ├── ProtocolError          a frame or message broke the wire protocol (peer's fault)
    ├── RequestError           a well-formed request that cannot be honoured (bad argv, cwd, uid…)
    │   ├── PermissionDeniedError   the caller may not do this (other user's job, --uid as non-root)
    │   ├── NotFoundError           no such job (or not one of the caller's)
    │   ├── BusyError               the daemon is at a limit (jobs, connections, uids); retry later
    │   └── BindSourceError         a --bind/--ro-bind source the client may not, or cannot, use
    ├── DaemonConnectionError  the daemon could not be reached or went away (client side)
    ├── ShutdownError          the daemon is stopping; what was running was ended
    ├── JailError              the jail could not be built; the job did not start (fail closed)
    │   ├── NetnsError              network namespace, interfaces, routes
    │   ├── FirewallError           nftables / iptables ruleset
    │   ├── CgroupError             cgroup creation or limits
    │   ├── KmsgError               the kernel-log backend cannot work here
    │   └── SpawnError              the job process could not be set up
    │       └── ExecError               the job's command could not be executed (127/126)
    ├── PoolExhaustedError     a job resolved more names than its synthetic pool holds
    └── ConfigError            the daemon's configuration is invalid

Each error has a wire ``code`` (``ErrorMessage.code``); ``error_for_code`` rebuilds the error a
daemon sent. Foreign exceptions (OSError from a syscall, msgspec errors) are mapped to these at
one boundary per facility with ``map_os_errors``, so callers catch netjail errors only.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator


class NetjailError(Exception):
    """Base of every error netjail raises on purpose; ``str()`` is one line for the user."""

    code = "error"

    def __init__(self, message: str) -> None:
        # One line, always: messages can embed job-supplied text.
        super().__init__(" ".join(message.split()))

    @property
    def message(self) -> str:
        return str(self)


class ProtocolError(NetjailError):
    """A frame or message violated the wire protocol."""

    code = "protocol"


class RequestError(NetjailError):
    """A well-formed request that cannot be honoured."""

    code = "request"


class PermissionDeniedError(RequestError):
    """The caller is not allowed to do this."""

    code = "permission"


class NotFoundError(RequestError):
    """No such job, or not one the caller may see."""

    code = "not_found"


class BusyError(RequestError):
    """The daemon is at one of its limits (running jobs, connections, job uids); retry later."""

    code = "busy"


class BindSourceError(RequestError):
    """A bind source is missing, not the client's to open, or reached through a symlink that
    someone other than root or the client controls."""


class DaemonConnectionError(NetjailError):
    """The daemon could not be reached, or the connection broke."""

    code = "connection"


class ShutdownError(NetjailError):
    """The daemon is stopping: it ended what was running and closes the connection."""

    code = "shutdown"


class JailError(NetjailError):
    """The jail could not be built, so the job was not started."""

    code = "jail"


class NetnsError(JailError):
    """Creating or configuring the job's network namespace failed."""


class FirewallError(JailError):
    """Applying the job's ruleset failed."""


class CgroupError(JailError):
    """Creating or configuring the job's cgroup failed."""


class KmsgError(JailError):
    """The kernel-log backend cannot work here (sysctl not settable, /dev/kmsg unreadable)."""


class SpawnError(JailError):
    """Setting up the job's process failed."""


class ExecError(SpawnError):
    """The job's command could not be executed; ``exit_code`` is the shell's for it (127/126)."""

    code = "exec"

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class PoolExhaustedError(NetjailError):
    """The job resolved more distinct names than its synthetic pool holds."""

    code = "pool_exhausted"


class ConfigError(NetjailError):
    """The daemon configuration is invalid."""

    code = "config"


#: Every code a daemon sends, and the class it stands for.
_BY_CODE: dict[str, type[NetjailError]] = {
    cls.code: cls
    for cls in (
        ProtocolError,
        RequestError,
        PermissionDeniedError,
        NotFoundError,
        BusyError,
        DaemonConnectionError,
        ShutdownError,
        JailError,
        PoolExhaustedError,
        ConfigError,
    )
}


def error_for_code(code: str, message: str, exit_code: int | None = None) -> NetjailError:
    """Rebuild the error a daemon reported (``ErrorMessage``), for the client side.

    An ``exec`` error carries the exit status a shell would give (127 when ``exit_code`` is
    missing); an unknown code is a plain ``NetjailError``.
    """
    if code == ExecError.code:
        return ExecError(message, exit_code if exit_code is not None else 127)
    cls = _BY_CODE.get(code, NetjailError)
    return cls(message)


@contextlib.contextmanager
def map_os_errors(error: type[NetjailError], what: str, hint: str = "") -> Iterator[None]:
    """Turn an ``OSError`` raised inside the block into ``error``: "<what>: <strerror>[; hint]".

    The one boundary each kernel facility uses, in the spirit of httpcore's ``map_exceptions``:
    the caller sees a netjail error that says which step failed, never a bare OSError.
    """
    try:
        yield
    except OSError as e:
        reason = e.strerror or (errno.errorcode.get(e.errno, "") if e.errno else "") or str(e)
        message = f"{what}: {reason}"
        raise error(f"{message}; {hint}" if hint else message) from e
