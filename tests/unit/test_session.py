"""Tests for netjail.session: the clients' shared, I/O-free side of a daemon connection."""

from __future__ import annotations

import pytest

from netjail import protocol as p
from netjail import session
from netjail.errors import (
    BusyError,
    DaemonConnectionError,
    ExecError,
    ProtocolError,
)

STARTED = b'{"op":"started","job":"j-00000001","pid":7}\n'
EVENT = (
    b'{"op":"event","event":{"job":"j-00000001","time":"t","kind":"egress","verdict":"blocked",'
    b'"proto":"tcp","family":4,"dst":"192.0.2.1","port":443,"uid":1,"count":1,"via":"nflog"}}\n'
)
BUSY = b'{"op":"error","code":"busy","message":"too many"}\n'


def test_replies_split_across_reads_come_out_whole_and_in_order() -> None:
    """Frames cut anywhere by reads become the same messages, in order."""
    reader = session.ReplyReader()
    data = STARTED + EVENT
    for i in range(0, len(data), 7):
        reader.feed(data[i : i + 7])
    assert [type(m) for m in reader.take_replies()] == [p.Started, p.EventMessage]
    assert not reader.buffered


def test_a_daemon_error_is_raised_after_the_messages_before_it() -> None:
    """An error frame is raised in its turn: what came before it is returned first."""
    reader = session.ReplyReader()
    reader.feed(STARTED + EVENT + BUSY)
    assert len(reader.take_replies()) == 2
    with pytest.raises(BusyError, match="too many"):
        reader.take_replies()


def test_an_exec_error_keeps_its_exit_status() -> None:
    """The daemon's exec error becomes ExecError with the shell's status."""
    reader = session.ReplyReader()
    reader.feed(b'{"op":"error","code":"exec","message":"no such file","exit_code":127}\n')
    with pytest.raises(ExecError) as caught:
        reader.next_reply()
    assert caught.value.exit_code == 127


def test_end_of_file_is_a_connection_error() -> None:
    """An empty read (the daemon hung up) is DaemonConnectionError."""
    with pytest.raises(DaemonConnectionError, match="closed the connection"):
        session.ReplyReader().feed(b"")


def test_expect_refuses_the_wrong_reply() -> None:
    """A reply of another kind than the request expects is a ProtocolError naming both."""
    reply = p.decode_reply(STARTED[:-1])
    assert session.expect(reply, p.Started, "started") is reply
    with pytest.raises(ProtocolError, match="expected ps from the daemon, got Started"):
        session.expect(reply, p.PsReply, "ps")


def test_connect_error_names_the_socket_and_the_fix() -> None:
    """A refused connect says which socket and what to check."""
    error = session.connect_error("/run/x.sock", PermissionError(13, "Permission denied"))
    assert str(error) == (
        "cannot connect to /run/x.sock: Permission denied (are you root or in the netjail group?)"
    )
