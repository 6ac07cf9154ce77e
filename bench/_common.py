"""What the benchmarks share: a private netjaild on a temporary socket, percentiles."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@contextlib.contextmanager
def private_daemon() -> Iterator[str]:
    """Start netjaild on a temporary socket (root needed); yield the socket path; stop it."""
    base = tempfile.mkdtemp(prefix="netjail-bench-", dir="/run")
    sock = os.path.join(base, "sock", "netjail.sock")
    process = subprocess.Popen(
        [sys.executable, "-m", "netjail.daemon", "--socket", sock, "--state-dir", f"{base}/state"],
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while not os.path.exists(sock):
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("netjaild did not start")
            time.sleep(0.02)
        yield sock
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
        shutil.rmtree(base, ignore_errors=True)
