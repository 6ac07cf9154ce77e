"""The closed error tree: every wire code maps back to its class, OSError maps at one boundary."""

from __future__ import annotations

import errno
import inspect

import pytest

from netjail import errors
from netjail.errors import (
    ExecError,
    FirewallError,
    NetjailError,
    ShutdownError,
    error_for_code,
    map_os_errors,
)


def _all_error_classes() -> list[type[NetjailError]]:
    return [
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, NetjailError)
    ]


@pytest.mark.parametrize("code", sorted({cls.code for cls in _all_error_classes()} - {"error"}))
def test_every_code_the_daemon_sends_rebuilds_its_own_class(code: str) -> None:
    """error_for_code gives back an error of the class that owns the code, message intact."""
    rebuilt = error_for_code(code, "what failed; what to do", 126)
    assert rebuilt.code == code
    assert str(rebuilt) == "what failed; what to do"
    owners = [cls for cls in _all_error_classes() if cls.code == code]
    assert type(rebuilt) in owners


def test_exec_error_keeps_the_shell_exit_status() -> None:
    """An exec error carries 127/126 as sent, and 127 when the daemon sent none."""
    sent = error_for_code("exec", "cannot execute nope: No such file or directory", 126)
    assert isinstance(sent, ExecError)
    assert sent.exit_code == 126
    missing = error_for_code("exec", "cannot execute x", None)
    assert isinstance(missing, ExecError)
    assert missing.exit_code == 127


def test_shutdown_and_connection_codes_are_known() -> None:
    """The codes the daemon sends on stop and the client's own are in the table."""
    assert isinstance(error_for_code("shutdown", "netjaild is stopping"), ShutdownError)
    assert type(error_for_code("connection", "gone")) is errors.DaemonConnectionError


def test_unknown_code_is_a_plain_netjail_error() -> None:
    """A code from a newer daemon is still a NetjailError with its message."""
    rebuilt = error_for_code("from_the_future", "x")
    assert type(rebuilt) is NetjailError
    assert str(rebuilt) == "x"


def test_messages_are_one_line() -> None:
    """Job-supplied newlines cannot split an error message."""
    assert str(NetjailError("a\nb\r\nc\td")) == "a b c d"


def test_map_os_errors_names_the_step_and_the_reason() -> None:
    """An OSError inside the block becomes the given class: 'what: strerror; hint'."""
    mapped = map_os_errors(FirewallError, "cannot apply the ruleset", "is nf_tables loaded?")
    with pytest.raises(FirewallError) as caught, mapped:
        raise OSError(errno.EPERM, "Operation not permitted")
    assert str(caught.value) == (
        "cannot apply the ruleset: Operation not permitted; is nf_tables loaded?"
    )
    cause = caught.value.__cause__
    assert isinstance(cause, OSError)
    assert cause.errno == errno.EPERM


def test_map_os_errors_leaves_other_exceptions_alone() -> None:
    """Only OSError is mapped; a netjail error or a bug passes through unchanged."""
    with pytest.raises(ValueError, match="bug"), map_os_errors(FirewallError, "x"):
        raise ValueError("bug")
