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
def private_daemon(source: str | None = None, config: str = "") -> Iterator[str]:
    """Start netjaild on a temporary socket (root needed); yield the socket path; stop it.

    ``source``: a ``src`` directory to run the daemon from instead of the installed package
    (e.g. a worktree of an older commit, to compare in the same run). ``config``: the text of
    its config file (empty: all defaults).
    """
    base = tempfile.mkdtemp(prefix="netjail-bench-", dir="/run")
    sock = os.path.join(base, "sock", "netjail.sock")
    config_path = os.path.join(base, "netjaild.toml")
    with open(config_path, "w") as f:
        f.write(config)
    env = dict(os.environ)
    if source is not None:
        env["PYTHONPATH"] = source
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "netjail.daemon", "--config", config_path),
            *("--socket", sock, "--state-dir", f"{base}/state"),
        ],
        stderr=subprocess.DEVNULL,
        env=env,
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
