"""The jail's link against the real kernel: an ifb device, and the veth pair a kernel that
refuses ifb gets instead.

Each test configures a fresh netns the way the daemon does (``configure_jail_interfaces`` on a
thread inside it), named ``njtest-link-*`` so that no daemon's clean-up takes it, and deletes it
after. The refusal is real too: the kernel is asked for a link of a kind it does not know.
"""

from __future__ import annotations

import functools
import os
import secrets
import subprocess
from collections.abc import Iterator

import pytest
from pyroute2 import IPBatch

from netjail.kernel import netns


@pytest.fixture
def name() -> Iterator[str]:
    name = f"njtest-link-{secrets.token_hex(4)}"
    yield name
    netns.delete_netns(name)
    assert not os.path.exists(netns.netns_path(name))


def links(name: str) -> dict[str, str]:
    """Each interface of netns ``name`` and its kind ("" for lo)."""
    out = subprocess.run(
        ["ip", "-n", name, "-d", "-o", "link", "show"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    kinds = {}
    for line in out.splitlines():
        ifname = line.split(": ")[1].split("@")[0]
        words = line.split()
        kinds[ifname] = next((k for k in ("ifb", "veth") if k in words), "")
    return kinds


def addresses(name: str) -> set[str]:
    out = subprocess.run(
        ["ip", "-n", name, "-o", "addr", "show", "dev", netns.JAIL_IF, "scope", "global"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return {line.split()[3] for line in out.splitlines()}


def test_a_jail_gets_one_ifb_link_with_its_addresses(name: str) -> None:
    """lo and nj0, an ifb with the jail's addresses: no second device, no peer."""
    netns.run_in_new_netns(name, netns.configure_jail_interfaces).result(timeout=30)
    assert links(name) == {"lo": "", netns.JAIL_IF: "ifb"}
    assert addresses(name) == {f"{netns.JAIL_ADDR4}/30", f"{netns.JAIL_ADDR6}/64"}
    assert netns.jail_link_kind() == "ifb"


@functools.cache
def _unknown_kind_requests() -> netns._Batch:
    def build(ip: IPBatch) -> None:
        ip.link("set", index=1, state="up")
        ip.link("add", ifname=netns.JAIL_IF, kind="njnosuchkind", state="up")

    return netns._encoded(build, ["lo up", netns._link_step("ifb")])


def test_a_kernel_that_refuses_ifb_gets_the_veth_pair_from_then_on(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An EOPNOTSUPP for the ifb link makes this jail, and the ones after, a veth pair with
    both ends inside, with the same addresses."""
    real = netns._link_requests
    monkeypatch.setattr(netns, "_link_kinds", ["ifb", "veth"])
    monkeypatch.setattr(
        netns,
        "_link_requests",
        lambda kind: _unknown_kind_requests() if kind == "ifb" else real(kind),
    )
    netns.run_in_new_netns(name, netns.configure_jail_interfaces).result(timeout=30)
    assert links(name) == {"lo": "", netns.JAIL_IF: "veth", netns.JAIL_PEER_IF: "veth"}
    assert addresses(name) == {f"{netns.JAIL_ADDR4}/30", f"{netns.JAIL_ADDR6}/64"}
    assert netns.jail_link_kind() == "veth"
