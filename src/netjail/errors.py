"""netjail's error tree.

Every error netjail raises on purpose derives from ``NetjailError`` and carries a message that
is one line, says what failed and, where there is one, what to do::

    NetjailError
    ├── ProtocolError          a frame or message broke the wire protocol (peer's fault)
    ├── RequestError           a well-formed request that cannot be honoured (bad argv, cwd, uid…)
    │   └── PermissionDeniedError   the caller may not do this (other user's job, --uid as non-root)
    ├── DaemonConnectionError  the daemon could not be reached or went away (client side)
    ├── JailError              the jail could not be built; the job did not start (fail closed)
    │   ├── NetnsError              network namespace, interfaces, routes
    │   ├── FirewallError           nftables ruleset
    │   ├── CgroupError             cgroup creation or limits
    │   └── SpawnError              the job process could not be set up or exec'd
    ├── ConfigError            the daemon's configuration is invalid
    └── NotFoundError          no such job (or not one of the caller's)

Foreign exceptions (OSError from a syscall, msgspec errors) are mapped to these at one boundary
per facility, so callers catch netjail errors only.
"""

from __future__ import annotations


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


class DaemonConnectionError(NetjailError):
    """The daemon could not be reached, or the connection broke."""

    code = "connection"


class JailError(NetjailError):
    """The jail could not be built, so the job was not started."""

    code = "jail"


class NetnsError(JailError):
    """Creating or configuring the job's network namespace failed."""


class FirewallError(JailError):
    """Applying the job's nftables ruleset failed."""


class CgroupError(JailError):
    """Creating or configuring the job's cgroup failed."""


class SpawnError(JailError):
    """Setting up or executing the job's process failed."""


class ConfigError(NetjailError):
    """The daemon configuration is invalid."""

    code = "config"


class NotFoundError(RequestError):
    """No such job, or not one the caller may see."""

    code = "not_found"


def error_for_code(code: str, message: str) -> NetjailError:
    """Rebuild the error a daemon reported, for the client side."""
    for cls in (
        ProtocolError,
        PermissionDeniedError,
        NotFoundError,
        RequestError,
        JailError,
        ConfigError,
    ):
        if cls.code == code:
            return cls(message)
    return NetjailError(message)
