"""Datagrams with fds and sealed payload memfds (netjail.kernel.fdpass), over real socketpairs."""

from __future__ import annotations

import fcntl
import os
import socket

import pytest

from netjail.kernel.fdpass import read_payload, recv_with_fds, sealed_payload, send_with_fds

from .daemonfakes import open_fds


def test_a_datagram_carries_its_fds_and_its_bytes() -> None:
    """send_with_fds/recv_with_fds move the bytes and working copies of the fds, in order."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    try:
        send_with_fds(ours, b"hello", [w, r])
        data, fds = recv_with_fds(theirs, 100, 4)
        assert data == b"hello"
        assert len(fds) == 2
        os.write(fds[0], b"x")
        assert os.read(fds[1], 1) == b"x"
        for fd in fds:
            os.close(fd)
        send_with_fds(ours, b"bare")
        assert recv_with_fds(theirs, 100, 4) == (b"bare", [])
    finally:
        for fd in (r, w):
            os.close(fd)
        ours.close()
        theirs.close()


def test_end_of_stream_is_empty_bytes() -> None:
    """recv_with_fds gives b"" and no fds once the other end closed."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.close()
    try:
        assert recv_with_fds(theirs, 100, 4) == (b"", [])
    finally:
        theirs.close()


def test_a_payload_is_sealed_and_read_back_whole() -> None:
    """A payload of several MiB reads back exactly; its memfd can no longer be written."""
    before = open_fds()
    data = os.urandom(3 << 20)
    fd = sealed_payload("test", data)
    try:
        assert read_payload(fd, len(data)) == data
        with pytest.raises(PermissionError):
            os.write(fd, b"changed")
        with pytest.raises(PermissionError):
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, 0)
    finally:
        os.close(fd)
    assert open_fds() == before


def test_an_unsealed_or_oversized_payload_or_a_plain_fd_is_refused() -> None:
    """read_payload refuses a memfd without the seals, one over the bound, and a pipe."""
    unsealed = os.memfd_create("test", os.MFD_CLOEXEC)
    sealed = sealed_payload("test", b"x" * 100)
    r, w = os.pipe()
    try:
        os.write(unsealed, b"x")
        with pytest.raises(ValueError, match="not sealed"):
            read_payload(unsealed, 100)
        with pytest.raises(ValueError, match="100 bytes, over the 99-byte bound"):
            read_payload(sealed, 99)
        with pytest.raises(ValueError, match="not a memfd"):
            read_payload(r, 100)
    finally:
        for fd in (unsealed, sealed, r, w):
            os.close(fd)
