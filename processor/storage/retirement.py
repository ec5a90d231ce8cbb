"""Retiring manifests: the one room that moves them out of the intake.

A finished manifest is copied to ``_done/`` or ``_failed/``, its intake copy is deleted (with any
copy an earlier run left in the other folder: one place per manifest), and only then is its
claim deleted. That order means a worker never sees a claimable manifest that has already run.
Deletes of many jobs are gathered into one DeleteObjects request a window (a quarter second):
a claim goes in the request after its manifest's, so a steady stream of short jobs costs one
request per window for both, not two per job. Nothing waits on it but the manifest's own task
(the GPU lane is free already), and a worker that stops flushes what is pending.

A retirement that fails (storage trouble) is tried again with a growing pause while the caller
keeps its lease alive. If it never succeeds, the manifest stays in the intake with its final
statuses written, and whoever claims it next sees that this very upload already ran and only
finishes the move.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence

from processor.errors import ObjectNotFound, RetireFailed, StorageError
from processor.logsafe import printable_logger
from processor.storage.base import Storage
from processor.storage.layout import Layout

log = printable_logger("comfys3.worker")

BATCH_WINDOW = 0.25  # seconds a delete waits for others to share its request
MAX_BATCH = 1000


class _DeleteBatch:
    """Deletes submitted within a short window share one request."""

    def __init__(self, delete_many: Callable[[Sequence[str]], Awaitable[None]]) -> None:
        self._delete_many = delete_many
        self._pending: list[tuple[list[str], asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def delete(self, keys: list[str]) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((keys, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        await future

    async def _flush(self) -> None:
        await asyncio.sleep(BATCH_WINDOW)
        while self._pending:
            batch: list[tuple[list[str], asyncio.Future[None]]] = []
            count = 0
            while self._pending and count + len(self._pending[0][0]) <= MAX_BATCH:
                keys, future = self._pending.pop(0)
                batch.append((keys, future))
                count += len(keys)
            if not batch:  # one oversized request: send it alone
                batch.append(self._pending.pop(0))
            keys = list(dict.fromkeys(key for group, _ in batch for key in group))
            try:
                await self._delete_many(keys)
            except Exception as error:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
            else:
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)


class Retirer:
    def __init__(
        self,
        storage: Storage,
        layout: Layout,
        *,
        tries: int = 8,
        pause: float = 0.5,
        max_pause: float = 30.0,
    ) -> None:
        self.storage = storage
        self.layout = layout
        self.tries = tries
        self.pause = pause
        self.max_pause = max_pause
        self._deletes = _DeleteBatch(storage.delete_many)
        self._set_aside: set[str] = set()

    async def retire(self, key: str, *, failed: bool, claim_key: str) -> None:
        """Move a finished manifest to ``_failed/`` or ``_done/``, then drop its claim."""
        name = self.layout.manifest_name(key)
        target = self.layout.failed_key(name) if failed else self.layout.done_key(name)
        twin = self.layout.done_key(name) if failed else self.layout.failed_key(name)
        await self._tried(f"retiring {key}", lambda: self._retire(key, target, twin, claim_key))

    async def drop_claim(self, claim_key: str) -> None:
        """The manifest is gone (another worker finished it): only the claim is left to go."""
        await self._tried(f"dropping claim {claim_key}", lambda: self._deletes.delete([claim_key]))

    async def _retire(self, key: str, target: str, twin: str, claim_key: str) -> None:
        with contextlib.suppress(ObjectNotFound):  # moved on an earlier try
            await self.storage.copy(key, target)
        await self._deletes.delete([key, twin])
        await self._deletes.delete([claim_key])  # the next request: never before the manifest

    async def _tried(self, what: str, step: Callable[[], Awaitable[None]]) -> None:
        pause = self.pause
        for attempt in range(1, self.tries + 1):
            try:
                await step()
                return
            except StorageError as error:
                if attempt == self.tries:
                    raise RetireFailed(f"{what} failed {self.tries} times: {error}") from None
                log.warning("%s failed (try %d of %d): %s", what, attempt, self.tries, error)
            await asyncio.sleep(pause)
            pause = min(pause * 2, self.max_pause)

    async def set_aside(self, key: str, reason: str) -> None:
        """Move a manifest whose name no job can use out of the intake, once, loudly."""
        if key in self._set_aside:
            return
        if len(self._set_aside) > 10_000:
            self._set_aside.clear()
        self._set_aside.add(key)
        name = self.layout.manifest_name(key)
        target = self.layout.aside_key(name)
        try:
            await self.storage.move(key, target, lenient=True)
        except ObjectNotFound:
            return  # another worker set it aside first
        except StorageError as error:
            log.error(
                "manifest %r cannot be run (%s) and could not be moved aside: %s",
                key,
                reason,
                error,
            )
            return
        log.error(
            "manifest %r cannot be run: %s; moved it to %s, with no status (rename it and "
            "drop it again to run it)",
            key,
            reason,
            target,
            extra={"manifest": key, "moved_to": target},
        )
