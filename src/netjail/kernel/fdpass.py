"""Talking to the daemon's helper processes: datagrams with fds, and payloads in sealed memfds.

The nftables helper and the fork server are each served over a SOCK_SEQPACKET socketpair: one
message per datagram, fds passed with SCM_RIGHTS. A datagram's size is bounded by the socket's
send buffer, and many in flight at once fill it; so anything that may be large (a ruleset, a
job's plan with its argv and env) travels in a memfd instead, passed as one more fd, and the
datagram itself stays a few bytes. The memfd is sealed before it is sent (no write, grow or
shrink, and no new seal), so what the receiver reads is what the sender wrote, even if the
sender kept a copy of the fd.
"""

from __future__ import annotations

import array
import fcntl
import os
import socket
from collections.abc import Sequence

#: The seals a payload memfd carries once written: its contents can no longer change.
_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
_INT_SIZE = array.array("i").itemsize


def send_with_fds(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    """Send one datagram, with ``fds`` (SCM_RIGHTS) if there are any."""
    if fds:
        rights = array.array("i", fds)
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
    else:
        sock.send(data)


def recv_with_fds(sock: socket.socket, max_bytes: int, max_fds: int) -> tuple[bytes, list[int]]:
    """One datagram and the fds that came with it (the caller owns them); b"" at EOF."""
    fds = array.array("i")
    # Close-on-exec from the start: no fd that comes here may leak into a command spawned later.
    data, ancdata, _flags, _addr = sock.recvmsg(
        max_bytes, socket.CMSG_SPACE(max_fds * _INT_SIZE), socket.MSG_CMSG_CLOEXEC
    )
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % _INT_SIZE
            fds.frombytes(payload[:usable])
    return data, list(fds)


def sealed_payload(name: str, data: bytes) -> int:
    """A close-on-exec memfd holding ``data``, sealed against any change; the caller closes it."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_payload(fd: int, max_bytes: int) -> bytes:
    """The contents of a payload memfd; ValueError if it is not sealed or is over ``max_bytes``.

    Read with pread from offset 0, so the fd's own offset (shared with the sender) is untouched.
    """
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as e:
        raise ValueError(f"the payload is not a memfd: {e.strerror}") from None
    if seals & _SEALS != _SEALS:
        raise ValueError("the payload memfd is not sealed")
    size = os.fstat(fd).st_size
    if size > max_bytes:
        raise ValueError(f"the payload is {size} bytes, over the {max_bytes}-byte bound")
    chunks = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)
