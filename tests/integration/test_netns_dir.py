"""/run/netns is made a shared mount point of its own before the first jail's namespace is
mounted in it, so an ``ip netns`` command run beside the daemon cannot hide the jails' mounts.

Run in a child process with a mount namespace of its own and a fresh tmpfs on /run, where
/run/netns is a plain directory as on a new machine: nothing of the host's /run is touched.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import os, subprocess
    from netjail.kernel import netns, syscalls

    syscalls.unshare(syscalls.CLONE_NEWNS)
    syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
    syscalls.mount("tmpfs", "/run", "tmpfs", 0, "size=1m")
    os.mkdir("/run/netns")
    netns.run_in_new_netns("netjail-njtest-dir", lambda: None).result(10)
    with open("/proc/self/mountinfo") as f:
        fields = [line.split() for line in f]
    # The last at that path is the one on top (the host's own, if any, is under the tmpfs).
    own = [line for line in fields if line[4] == "/run/netns"][-1]
    print("shared" if any(x.startswith("shared:") for x in own[6:own.index("-")]) else "private")
    # What an admin's first `ip netns add` does to a /run/netns that is no mount point: binds
    # it over itself. Here it must find the mount point, and the jail's file stays removable.
    subprocess.run(["ip", "netns", "add", "njtest-dir-other"], check=True)
    try:
        netns.delete_netns("netjail-njtest-dir")
        print("removed" if not os.path.exists("/run/netns/netjail-njtest-dir") else "left")
    finally:
        subprocess.run(["ip", "netns", "del", "njtest-dir-other"], check=True)
    """
)


def test_a_jails_netns_file_stays_removable_after_an_ip_netns_command() -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHILD], check=False, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["shared", "removed"]
