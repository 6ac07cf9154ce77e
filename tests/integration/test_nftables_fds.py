"""libnftables through its helper on the real kernel, in a process that holds many fds.

In-process, libnftables 1.0.6 aborted a process whose fds passed 1023 (its select()) and exited
one that ran out of fds. Each test runs a throwaway Python process (so that exhausting fds
cannot hurt pytest) which builds a netns of its own on a thread, as the daemon does, and loads
the real jail ruleset into it through netjail.kernel.nftables.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from .conftest import netjail_netns

#: Builds netns ``nftfds-<pid>``, runs WORK (a function body of ``work()``, inside the netns, on
#: the netns thread) and prints the JSON it returns; the netns is deleted after.
SCRIPT = """\
import json, os, resource, subprocess, sys
from netjail.errors import FirewallError
from netjail.kernel import firewall, netns, nfthelper, nftables
from netjail.kernel.rules import Nflog, build_jail_ruleset

TEXT = nftables.render_nftables(
    build_jail_ruleset(firewall.JailRules("j-0000f00d", dns_stub=True)), Nflog()
)
resource.setrlimit(resource.RLIMIT_NOFILE, (4096, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

def listed():
    return subprocess.run(
        ["nft", "list", "table", "inet", "netjail"], capture_output=True, text=True
    ).stdout

def helper_facts():
    pid = nfthelper._helper.pid
    with open(f"/proc/{pid}/limits") as f:
        soft = next(line.split()[3] for line in f if line.startswith("Max open files"))
    return {
        "helper_pid": pid,
        "helper_netns": os.stat(f"/proc/{pid}/ns/net").st_ino,
        "helper_fds": len(os.listdir(f"/proc/{pid}/fd")),
        "helper_soft_nofile": int(soft),
    }

def work():
%s

name = f"nftfds-{os.getpid()}"
try:
    result = netns.run_in_new_netns(name, work).result()
finally:
    netns.delete_netns(name)
result["own_netns"] = os.stat("/proc/self/ns/net").st_ino
print(json.dumps(result))
"""


def run_script(work: str) -> dict[str, object]:
    """Run SCRIPT with ``work`` as the body of ``work()``; its JSON result."""
    body = textwrap.indent(textwrap.dedent(work), "    ")
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT % body],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert not [n for n in netjail_netns() if n.startswith("nftfds-")]
    loaded: dict[str, object] = json.loads(result.stdout)
    return loaded


def test_a_ruleset_loads_while_the_process_holds_fds_above_1023() -> None:
    """With 1,100 fds open (the select() abort before), the jail's table is loaded in its
    netns; the helper lives in the daemon's netns with a soft fd limit of 1024, and is gone
    once the process exits."""
    result = run_script(
        """
        held = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]
        nftables.apply_nftables(TEXT)
        facts = helper_facts()
        for fd in held:
            os.close(fd)
        return {"highest": max(held), "listed": listed(), **facts}
        """
    )
    assert isinstance(result["highest"], int)
    assert result["highest"] > 1100
    assert "table inet netjail {" in str(result["listed"])
    assert 'log prefix "netjail j-0000f00d " group 1 snaplen 128' in str(result["listed"])
    assert result["helper_netns"] == result["own_netns"]
    assert result["helper_soft_nofile"] == 1024
    assert isinstance(result["helper_fds"], int)
    assert result["helper_fds"] < 16
    # Stopped and reaped when the process exits (no zombie left for an init that may not reap).
    assert not os.path.exists(f"/proc/{result['helper_pid']}")


def test_running_out_of_fds_fails_the_load_and_the_process_lives_on() -> None:
    """With no fd left, loading is a FirewallError (libnftables exited the process before), and
    once fds are free again the next load works."""
    result = run_script(
        """
        nftables.apply_nftables(TEXT)  # the library is checked and the helper started
        held = []
        try:
            while True:
                held.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        try:
            nftables.apply_nftables(TEXT)
            error = None
        except FirewallError as e:
            error = str(e)
        for fd in held:
            os.close(fd)
        nftables.apply_nftables(TEXT)
        return {"error": error, "listed": listed()}
        """
    )
    assert result["error"] == (
        "cannot open the jail's netns for the nftables helper: Too many open files"
    )
    assert "table inet netjail {" in str(result["listed"])


@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGTERM"])
def test_a_killed_helper_is_replaced_by_the_next_load(signal_name: str) -> None:
    """The helper killed between loads is started again: the next load succeeds."""
    result = run_script(
        f"""
        import signal
        nftables.apply_nftables(TEXT)
        first = nfthelper._helper.pid
        os.kill(first, signal.{signal_name})
        # Until it is a zombie (its socket closed): a helper dying *during* a load fails
        # that job instead, which the unit tests cover.
        while open(f"/proc/{{first}}/stat").read().split(") ")[1][0] != "Z":
            pass
        nftables.apply_nftables(TEXT.replace("table inet netjail", "table inet netjail2"))
        second = nfthelper._helper.pid
        out = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
        return {{"first": first, "second": second, "tables": out}}
        """
    )
    assert result["first"] != result["second"]
    assert "table inet netjail2" in str(result["tables"])
