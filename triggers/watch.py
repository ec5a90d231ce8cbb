"""A local folder as the intake: a dropped manifest wakes the worker at once (watchfiles),
with a slow poll behind it in case an event is missed (network file systems drop some)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import watchfiles


class FolderWatch:
    def __init__(self, folder: Path, stop: asyncio.Event, fallback: float = 5.0) -> None:
        self.folder = folder
        self._stop = stop
        self._fallback = fallback
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> FolderWatch:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._task = asyncio.create_task(self._watch())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch(self) -> None:
        async for changes in watchfiles.awatch(
            self.folder, stop_event=self._stop, recursive=False, debounce=50, step=20
        ):
            if any(path.endswith(".json") for _, path in changes):
                self._changed.set()

    async def wait(self, found_work: bool) -> None:
        if found_work:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake(), self._fallback)
        self._changed.clear()

    async def _wake(self) -> None:
        stopped = asyncio.ensure_future(self._stop.wait())
        changed = asyncio.ensure_future(self._changed.wait())
        try:
            await asyncio.wait({stopped, changed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            changed.cancel()
