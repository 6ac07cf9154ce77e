"""How the sync client opens a run: hello and the request in one write, unless fds go with it."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

from netjail import protocol as p
from netjail.client import Client


def serve_one(path: Path, chunks: list[bytes]) -> threading.Thread:
    """A stand-in daemon: notes each read of one connection until it has a run request, then
    answers hello and started."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn, listener:
            while b'"op":"run"' not in b"".join(chunks):
                data, _anc, _flags, _addr = conn.recvmsg(1 << 16, socket.CMSG_SPACE(64))
                chunks.append(data)
                if len(chunks) == 1 and b'"op":"run"' not in data:
                    conn.sendall(
                        p.encode_message(
                            p.HelloReply(version=p.PROTOCOL_VERSION, daemon="stand-in")
                        )
                    )
            if len(chunks) == 1:
                conn.sendall(
                    p.encode_message(p.HelloReply(version=p.PROTOCOL_VERSION, daemon="stand-in"))
                )
            conn.sendall(p.encode_message(p.Started(job="j-00000001", pid=7)))
            conn.recv(1)  # until the client closes

    thread = threading.Thread(target=serve)
    thread.start()
    return thread


def ops(chunk: bytes) -> list[str]:
    return [type(p.decode_request(line)).__name__ for line in chunk.split(b"\n") if line]


def test_a_run_without_fds_goes_with_the_hello_in_one_write(tmp_path: Path) -> None:
    """One round trip less: the request does not wait for the hello's reply."""
    chunks: list[bytes] = []
    thread = serve_one(tmp_path / "sock", chunks)
    with Client(str(tmp_path / "sock"), timeout=5).start(p.RunRequest(argv=["true"])) as job:
        assert job.job == "j-00000001"
    thread.join(5)
    assert [ops(chunk) for chunk in chunks] == [["Hello", "RunRequest"]]


def test_a_run_with_fds_waits_for_the_hellos_reply(tmp_path: Path) -> None:
    """The fds must reach the daemon with the run frame, not with the hello's: two writes."""
    chunks: list[bytes] = []
    thread = serve_one(tmp_path / "sock", chunks)
    r, w = os.pipe()
    try:
        request = p.RunRequest(argv=["true"], stdio="fds")
        with Client(str(tmp_path / "sock"), timeout=5).start(request, [r, w, w]):
            pass
    finally:
        os.close(r)
        os.close(w)
    thread.join(5)
    assert [ops(chunk) for chunk in chunks] == [["Hello"], ["RunRequest"]]
