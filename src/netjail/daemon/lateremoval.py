"""Job cgroups that could not be removed at their teardown, removed later.

A job's cgroup goes at its teardown, after its processes are killed; the kernel refuses the
rmdir (EBUSY) while a killed process is still exiting, and the teardown retries for a second
only. A cgroup still there then is not given up on: it is handed here, and retried in the
background with a growing pause while the daemon runs. Its uid stays leased until it is gone
(a process of the job may still hold the uid). At a graceful stop, each one left gets a last,
longer try; one that still fails is logged as an error, with its name: the next start's
recovery removes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

Log = Callable[..., None]

#: The first pause before a retry; it doubles after each failure, up to RETRY_MAX_S.
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 30.0
#: How long the last try at a graceful stop lasts, for all of them together.
FINAL_S = 10.0
_FINAL_PAUSE_S = 0.1


@dataclass
class _Pending:
    what: str
    remove: Callable[[], None]
    then: Callable[[], None]
    error: str
    since: float = field(default_factory=time.monotonic)
    task: asyncio.Task[None] | None = None


class LateRemovals:
    """The cgroups still to remove; ``add`` one, ``close`` at a graceful stop."""

    def __init__(
        self,
        *,
        first_s: float = RETRY_FIRST_S,
        max_s: float = RETRY_MAX_S,
        final_s: float = FINAL_S,
    ) -> None:
        self._first_s = first_s
        self._max_s = max_s
        self._final_s = final_s
        self._pending: list[_Pending] = []

    @property
    def pending(self) -> list[str]:
        """What is still to remove."""
        return [p.what for p in self._pending]

    def add(
        self,
        what: str,
        remove: Callable[[], None],
        then: Callable[[], None],
        log: Log,
        *,
        error: str,
    ) -> None:
        """Retry ``remove`` (blocking; it runs on a worker thread) until it succeeds, then call
        ``then`` on the loop. ``what`` names it in the log; ``error`` is why it failed first."""
        entry = _Pending(what, remove, then, error=error)
        self._pending.append(entry)
        entry.task = asyncio.get_running_loop().create_task(self._retry(entry, log))
        log(
            "warning",
            "cannot remove a job's cgroup yet; retrying in the background",
            cgroup=what,
            error=error,
        )

    async def _retry(self, entry: _Pending, log: Log) -> None:
        pause = self._first_s
        while True:
            await asyncio.sleep(pause)
            if await self._try(entry):
                self._done(entry, log)
                return
            pause = min(pause * 2, self._max_s)

    async def _try(self, entry: _Pending) -> bool:
        try:
            await asyncio.to_thread(entry.remove)
        except Exception as e:
            entry.error = str(e)
            return False
        return True

    def _done(self, entry: _Pending, log: Log) -> None:
        self._pending.remove(entry)
        log(
            "info",
            "removed a job's cgroup late",
            cgroup=entry.what,
            after_s=round(time.monotonic() - entry.since, 3),
        )
        try:
            entry.then()
        except Exception as e:  # the cgroup is gone; what follows must not end the daemon
            log("error", "after a job's cgroup was removed", cgroup=entry.what, error=str(e))

    async def close(self, log: Log) -> list[str]:
        """The last try, at a graceful stop: what is still left (each logged as an error)."""
        for entry in self._pending:
            if entry.task is not None:
                entry.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await entry.task
        deadline = time.monotonic() + self._final_s
        while self._pending:
            for entry in list(self._pending):
                if await self._try(entry):
                    self._done(entry, log)
            if not self._pending or time.monotonic() >= deadline:
                break
            await asyncio.sleep(_FINAL_PAUSE_S)
        for entry in self._pending:
            log(
                "error",
                "a job's cgroup is left behind; the next start removes it",
                cgroup=entry.what,
                error=entry.error,
            )
        return self.pending
