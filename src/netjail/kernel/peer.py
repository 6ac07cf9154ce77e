"""Facts about a Unix-socket peer: credentials and namespaces."""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass

_UCRED = struct.Struct("=iII")


@dataclass(frozen=True)
class PeerCred:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCred:
    """SO_PEERCRED of a connected Unix socket: the kernel's word, not the client's."""
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(data)
    return PeerCred(pid=pid, uid=uid, gid=gid)


def namespace_inode(pid: int, kind: str) -> int | None:
    """Inode of /proc/<pid>/ns/<kind>, or None if the process is gone."""
    try:
        return os.stat(f"/proc/{pid}/ns/{kind}").st_ino
    except OSError:
        return None


def pids_in_netns(inode: int) -> list[int]:
    """Every process whose network namespace has this inode (for cleaning up a jail)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and namespace_inode(int(entry), "net") == inode:
            found.append(int(entry))
    return found


def peer_groups(pid: int, gid: int) -> set[int]:
    """The primary and supplementary groups of process ``pid`` (just ``gid`` if it is gone)."""
    groups = {gid}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    groups.update(int(g) for g in line.split()[1:])
    except OSError:
        pass
    return groups
