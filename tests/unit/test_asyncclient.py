"""Tests for netjail.asyncclient that need no daemon: parity with the sync client, errors."""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path

import pytest

from netjail import AsyncClient, Client
from netjail.errors import DaemonConnectionError


def test_async_run_takes_exactly_the_sync_runs_parameters() -> None:
    """AsyncClient.run has Client.run's parameters (names, kinds, defaults, types), so an
    option added to one and not the other fails here."""

    def shape(function: object) -> list[tuple[str, object, object, object]]:
        return [
            (name, param.kind, param.default, param.annotation)
            for name, param in inspect.signature(function).parameters.items()  # type: ignore[arg-type]
        ]

    assert shape(AsyncClient.run) == shape(Client.run)
    assert inspect.signature(AsyncClient.run).return_annotation == "JobResult"


def test_no_daemon_is_a_connection_error_naming_the_socket(tmp_path: Path) -> None:
    """Connecting to a socket nobody serves says which one, and what to check."""
    path = str(tmp_path / "none.sock")
    with pytest.raises(DaemonConnectionError, match=f"cannot connect to {path}: .*netjaild"):
        asyncio.run(AsyncClient(path).status())


def test_a_silent_daemon_is_a_timeout(tmp_path: Path) -> None:
    """A daemon that never answers hello ends the wait after ``timeout`` seconds."""
    path = str(tmp_path / "silent.sock")

    async def scenario() -> None:
        server = await asyncio.start_unix_server(lambda _r, _w: None, path)
        async with server:
            await AsyncClient(path, timeout=0.05).ps()

    with pytest.raises(DaemonConnectionError, match="timed out waiting for netjaild"):
        asyncio.run(scenario())
