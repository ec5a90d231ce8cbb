"""The worker's view of ``<input>/_cancel/``: which of its jobs someone asked to stop.

Cancel requests are objects in the bucket (:mod:`processor.job.cancel`), so they reach
whichever worker holds the job. What they cost is kept flat:

- **at a claim** a job is checked against a listing of ``_cancel/`` no older than the
  intake's page (2 s): while a worker claims many short jobs, one LIST serves them all, and
  a job that was cancelled before it started never reaches ComfyUI;
- **while jobs run** one LIST every ``interval`` seconds (``COMFYS3_CANCEL_CHECK_INTERVAL``)
  serves every job in flight, so a running job stops within about that long; an idle worker
  lists nothing;
- **a request is read** (one GET) only when its name matches a job here, to learn who asked;
- **once a job has ended**, its request is deleted by the worker that ended it; requests left
  behind (a job that finished before anyone saw the request) are removed by any worker that
  finds them older than :data:`STALE_AFTER` with a final status.

``_cancel/`` holds only open requests, so a listing of it is one request, a few hundred bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import PurePosixPath

from processor.errors import ObjectNotFound, StorageError
from processor.job.cancel import MAX_CANCEL_BYTES, CancelRequest, CancelSignal, parse_request
from processor.job.manifest import Job
from processor.job.status_book import FINAL, StatusBook
from processor.logsafe import printable_logger
from processor.storage.base import ObjectInfo, Storage
from processor.storage.layout import Layout

log = printable_logger("comfys3.cancel")

LIST_LIMIT = 1000  # one page of _cancel/; past it, jobs are checked one HEAD each
CHECK_TIMEOUT = 3.0  # a claim waits no longer than this for the listing (then the poll has it)
STALE_AFTER = 600.0  # seconds after which a request whose job has ended is cleared away
STALE_CHECKS = 20  # stale requests looked at per sweep (one status GET each), at most
STALE_SWEEP_INTERVAL = 300.0  # seconds between sweeps for stale requests, per worker


class CancelWatch:
    def __init__(
        self,
        storage: Storage,
        layout: Layout,
        *,
        interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``interval``: seconds between listings while jobs run (0: only at a claim)."""
        self.storage, self.layout, self.interval = storage, layout, interval
        self.book = StatusBook(storage, layout)  # reads statuses only (stale requests)
        self._clock = clock
        # The latest listing: name (job or batch id) -> its object, whether it was cut at
        # LIST_LIMIT, and when it was asked for.
        self._listing: dict[str, ObjectInfo] = {}
        self._truncated, self._listed_at = False, float("-inf")
        self._lock = asyncio.Lock()
        self._watched: dict[str, tuple[Job, CancelSignal]] = {}  # job id -> its signal
        self._batch_of: dict[str, str] = {}  # job id -> its batch's id, until the job ends
        self._poller: asyncio.Task[None] | None = None
        self._next_sweep = clock() + STALE_SWEEP_INTERVAL
        self._failing = False  # the last listing failed: said once, not every interval
        self.lists = 0  # LIST requests of _cancel/, for tests and benchmarks

    # -- jobs -----------------------------------------------------------------------------

    def watch(self, job: Job) -> CancelSignal:
        """A signal set once someone asks ``job`` to stop, while it is watched."""
        signal = CancelSignal()
        self._watched[job.id] = (job, signal)
        if job.base_id and job.base_id != job.id and len(self._batch_of) < 100_000:
            self._batch_of[job.id] = job.base_id
        if self.interval > 0 and (self._poller is None or self._poller.done()):
            self._poller = asyncio.create_task(self._poll(), name="comfys3-cancel-watch")
        return signal

    def unwatch(self, job: Job) -> None:
        self._watched.pop(job.id, None)

    async def check(self, job: Job, signal: CancelSignal, *, max_age: float) -> None:
        """Set ``signal`` if a request for ``job`` exists, by a listing at most ``max_age``
        old (one LIST at most, shared by every job claimed meanwhile)."""
        try:
            async with asyncio.timeout(CHECK_TIMEOUT):
                await self._fresh(max_age)
                name = next((n for n in job.cancel_names if n in self._listing), None)
                if name is None and self._truncated:
                    name = await self._head_any(job.cancel_names)
                if name is not None:
                    signal.set(await self._read(name))
        except (StorageError, TimeoutError) as error:  # no reason to hold the job back
            self._failed(f"job {job.id}: could not look for a cancel request", error)

    async def request(self, names: Iterable[str], request: CancelRequest) -> None:
        """Ask for jobs (or batches) to stop: the objects every worker sees, and at once for
        the jobs this worker runs (RunPod's cancel reaches the worker that runs the job)."""
        for name in names:
            document = request.model_copy(update={"job_id": name})
            key = self.layout.cancel_key(name)
            etag = await self.storage.put(key, document.to_json(), content_type="application/json")
            # Seen here at once: a job claimed next is checked against this listing.
            self._listing[name] = ObjectInfo(key, 0, etag, datetime.now(UTC))
            for job, signal in list(self._watched.values()):
                if name in job.cancel_names:
                    signal.set(document)

    async def ended(self, job_ids: Iterable[str]) -> None:
        """Every job of a manifest has ended: their requests, and their batch's, if any were
        seen, go."""
        ids = list(job_ids)
        batches = {self._batch_of.pop(job_id, "") for job_id in ids} - {""}
        names = [n for n in {*ids, *batches} if n in self._listing]
        if not names:
            return
        try:
            await self.storage.delete_many([self.layout.cancel_key(n) for n in names])
        except StorageError as error:  # left for the stale sweep
            log.warning("could not remove the cancel requests of %s: %s", ", ".join(names), error)
            return
        for name in names:
            self._listing.pop(name, None)

    async def aclose(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._poller
            self._poller = None

    # -- internals ------------------------------------------------------------------------

    async def _poll(self) -> None:
        """While jobs are watched: list every ``interval`` s, signal the ones asked to stop."""
        while self._watched:
            await asyncio.sleep(self.interval)
            try:
                await self._fresh(self.interval * 0.9)
                for job, signal in list(self._watched.values()):
                    name = next((n for n in job.cancel_names if n in self._listing), None)
                    if name is not None and not signal.requested:
                        signal.set(await self._read(name))
                await self._sweep_stale()
            except StorageError as error:
                self._failed(f"could not list {self.layout.cancel_prefix}/", error)

    def _failed(self, what: str, error: BaseException) -> None:
        """Storage trouble is said once per outage (the next success says it is over)."""
        if not self._failing:
            log.warning("%s: %s", what, error or type(error).__name__)
        self._failing = True

    async def _fresh(self, max_age: float) -> None:
        if self._clock() - self._listed_at <= max_age:
            return
        async with self._lock:  # one listing for everyone who asks at the same time
            if self._clock() - self._listed_at <= max_age:
                return
            sent = self._clock()
            page = await self.storage.list_page(self.layout.cancel_prefix, limit=LIST_LIMIT)
            self.lists += 1
            self._listing = {
                PurePosixPath(item.key).stem: item
                for item in page.items
                if item.key.endswith(".json")
            }
            self._truncated = page.truncated
            self._listed_at = sent
            if self._failing:
                self._failing = False
                log.info("%s/ can be listed again", self.layout.cancel_prefix)

    async def _head_any(self, names: Iterable[str]) -> str | None:
        for name in names:
            if await self.storage.head(self.layout.cancel_key(name)) is not None:
                return name
        return None

    async def _read(self, name: str) -> CancelRequest:
        try:
            stored = await self.storage.get(
                self.layout.cancel_key(name), max_bytes=MAX_CANCEL_BYTES
            )
            data: bytes | None = stored.data
        except (ObjectNotFound, StorageError):
            data = None  # withdrawn, unreadable or too large: the name alone still counts
        seen = self._listing.get(name)
        request = parse_request(data, name, seen.last_modified if seen else None)
        log.info("%s: %s", name, request.describe(), extra={"job_id": name})
        return request

    async def _sweep_stale(self) -> None:
        """Requests older than :data:`STALE_AFTER` whose job has a final status served their
        purpose (or came too late): removed, a few per sweep, so ``_cancel/`` stays small."""
        now = self._clock()
        if now < self._next_sweep:
            return
        self._next_sweep = now + STALE_SWEEP_INTERVAL
        old_before = time.time() - STALE_AFTER
        stale = [
            name
            for name, item in self._listing.items()
            if item.last_modified.timestamp() < old_before and name not in self._watched
        ][:STALE_CHECKS]
        for name in stale:
            with contextlib.suppress(StorageError, ValueError):
                status = await self.book.read(name)
                if status is not None and status.state in FINAL:
                    await self.storage.delete(self.layout.cancel_key(name))
                    self._listing.pop(name, None)
