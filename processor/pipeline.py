"""The lane that keeps the GPU busy: claim manifests, run their jobs, retire them.

ComfyUI executes one prompt at a time from its own queue. The lane keeps that queue one prompt
ahead (``lane_depth`` = 2 prompts inside ComfyUI: one running, one waiting), so while job N runs,
job N+1 is already claimed, validated, staged and queued, and job N-1's outputs upload: the GPU
never waits for S3. A slot is taken before a manifest is claimed, so a worker never holds claims
on more work than it can start soon, and other workers get the rest.

Retries: a failure that another attempt could fix (ComfyUI died, a runtime error, a timeout,
S3 trouble) releases the claim with its reason; the manifest stays pending and any worker picks
it up again as the next attempt. A failure no attempt can fix (a broken manifest, a graph
ComfyUI refuses, a missing input) and an attempt past ``max_attempts`` fail for good. A try
the job was not to blame for is not counted: its worker was stopped, or ComfyUI died while
another job ran and this one only waited in the queue behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from processor.claims import ClaimStore, Lease, LeaseLost
from processor.errors import ManifestError
from processor.jobrun import JobOutcome, JobRunner, Verdict
from processor.layout import Layout
from processor.manifest import ErrorInfo, Job, JobState, JobStatus, check_job_id, load_jobs
from processor.storage import ObjectNotFound, Storage, StorageError
from processor.workflows import WorkflowRegistry

log = logging.getLogger("comfys3.worker")


@dataclass
class LaneSettings:
    lease_seconds: float = 120.0
    max_attempts: int = 3
    allow_raw: bool = False
    max_manifest_bytes: int = 1_048_576
    lane_depth: int = 2
    retry_delay: float = 2.0


@dataclass
class Counts:
    """What a worker did, for ``--once`` and RunPod's drain answer.

    ``outcomes`` lists every attempt in order; the counts are by job, from each job's latest
    outcome, so a job that failed once and then succeeded counts as succeeded.
    """

    outcomes: list[JobOutcome] = field(default_factory=list)

    def add(self, outcome: JobOutcome) -> None:
        self.outcomes.append(outcome)

    def since(self, mark: int) -> Counts:
        """What happened after ``mark`` outcomes (e.g. during one RunPod drain call)."""
        return Counts(self.outcomes[mark:])

    @property
    def statuses(self) -> list[JobStatus]:
        return [outcome.status for outcome in self.outcomes]

    def _count(self, verdict: Verdict) -> int:
        latest = {outcome.status.id: outcome.verdict for outcome in self.outcomes}
        return sum(1 for v in latest.values() if v is verdict)

    @property
    def succeeded(self) -> int:
        return self._count(Verdict.succeeded)

    @property
    def failed(self) -> int:
        return self._count(Verdict.failed)

    @property
    def retried(self) -> int:
        """Jobs whose latest attempt failed and that wait for another one."""
        return self._count(Verdict.retry)

    @property
    def skipped(self) -> int:
        return self._count(Verdict.skipped)

    @property
    def manifests(self) -> int:
        return len({outcome.status.manifest_key for outcome in self.outcomes})

    def summary(self) -> dict[str, int]:
        return {
            "manifests": self.manifests,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "retried": self.retried,
            "skipped": self.skipped,
            "attempts": len(self.outcomes),
        }


class _Slot:
    """One place in ComfyUI's queue; released exactly once, however the job ends."""

    def __init__(self, semaphore: asyncio.Semaphore) -> None:
        self._semaphore = semaphore
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._semaphore.release()


WaitForWork = Callable[[bool], Awaitable[None]]


class Worker:
    def __init__(
        self,
        *,
        storage: Storage,
        runner: JobRunner,
        registry: WorkflowRegistry,
        layout: Layout,
        settings: LaneSettings,
        holder: str,
    ) -> None:
        self.storage = storage
        self.runner = runner
        self.registry = registry
        self.layout = layout
        self.settings = settings
        self.claims = ClaimStore(storage, layout.claims_prefix, holder, settings.lease_seconds)
        self._slots = asyncio.Semaphore(settings.lane_depth)
        self._inflight: dict[str, asyncio.Task[list[JobOutcome]]] = {}
        self.counts = Counts()
        # Manifests this worker gave back after a retryable failure, and when it may take them
        # again: a retry at once would burn every attempt on a ComfyUI still restarting.
        self._deferred: dict[str, float] = {}

    # -- discovery ------------------------------------------------------------------------

    async def pending(self) -> list[str]:
        """Manifest keys waiting in the intake prefix, shuffled so workers spread out."""
        listed = await self.storage.list(self.layout.input_dir)
        now = time.monotonic()
        self._deferred = {name: t for name, t in self._deferred.items() if t > now}
        keys = [
            info.key
            for info in listed
            if self.layout.is_manifest(info.key)
            and self.layout.manifest_name(info.key) not in self._inflight
            and self.layout.manifest_name(info.key) not in self._deferred
        ]
        random.shuffle(keys)
        return keys

    # -- the loop -------------------------------------------------------------------------

    async def run(
        self,
        *,
        wait_for_work: WaitForWork | None = None,
        stop: asyncio.Event | None = None,
        max_manifests: int | None = None,
        max_seconds: float | None = None,
    ) -> Counts:
        """Claim and run manifests until stopped.

        With ``wait_for_work`` (a trigger's poll interval or folder watch) this serves forever;
        without it, it drains: it returns once nothing it can claim is left and its own work
        is finished.
        """
        stop = stop or asyncio.Event()
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        started = 0
        idle = False

        def limited() -> bool:
            if max_manifests is not None and started >= max_manifests:
                return True
            return deadline is not None and time.monotonic() >= deadline

        try:
            while not stop.is_set() and not limited():
                claimed = 0
                try:
                    candidates = await self.pending()
                except StorageError as error:
                    if wait_for_work is None:
                        raise  # a drain that cannot list cannot say it drained anything
                    log.warning("listing %s failed: %s", self.layout.input_dir, error)
                    candidates = []
                for key in candidates:
                    if stop.is_set() or limited():
                        break
                    slot = await self._take_slot(stop)
                    if slot is None:
                        break
                    lease = await self._try_claim(key)
                    if lease is None:
                        slot.release()
                        continue
                    claimed += 1
                    started += 1
                    self._start(key, lease, slot)
                self._reap()
                if claimed:
                    idle = False
                    if wait_for_work is not None:
                        await wait_for_work(True)
                    continue
                if wait_for_work is not None:
                    if not idle:
                        log.info("idle: nothing to claim in %s", self.layout.input_dir)
                    idle = True
                    await wait_for_work(False)
                elif self._inflight:
                    await asyncio.wait(
                        list(self._inflight.values()), return_when=asyncio.FIRST_COMPLETED
                    )
                    self._reap()
                elif self._deferred:
                    await self._sleep_until(min(self._deferred.values()), stop)
                else:
                    break
        finally:
            await self._finish_inflight()
        return self.counts

    async def run_manifest(self, key: str) -> list[JobOutcome] | None:
        """Claim and run one named manifest (RunPod's ``{"manifest": key}``).

        ``None`` when another worker holds it.
        """
        slot = await self._take_slot(None)
        assert slot is not None
        lease = await self._try_claim(key)
        if lease is None:
            slot.release()
            return None
        task = self._start(key, lease, slot)
        try:
            return await task
        finally:
            self._reap()

    # -- internals ------------------------------------------------------------------------

    async def _take_slot(self, stop: asyncio.Event | None) -> _Slot | None:
        if stop is None:
            await self._slots.acquire()
            return _Slot(self._slots)
        acquire = asyncio.ensure_future(self._slots.acquire())
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({acquire, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if acquire.done() and not acquire.cancelled():
            if stop.is_set():
                self._slots.release()
                return None
            return _Slot(self._slots)
        acquire.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await acquire
        return None

    @staticmethod
    async def _sleep_until(moment: float, stop: asyncio.Event) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, moment - time.monotonic()))

    async def _try_claim(self, key: str) -> Lease | None:
        try:
            return await self.claims.acquire(self.layout.manifest_name(key))
        except StorageError as error:
            log.warning("claiming %s failed: %s", key, error)
            return None

    def _start(self, key: str, lease: Lease, slot: _Slot) -> asyncio.Task[list[JobOutcome]]:
        name = self.layout.manifest_name(key)
        task = asyncio.create_task(self._manifest(key, lease, slot), name=f"manifest {name}")
        self._inflight[name] = task
        return task

    def _reap(self) -> None:
        for name, task in list(self._inflight.items()):
            if task.done():
                del self._inflight[name]
                if not task.cancelled() and task.exception() is not None:
                    log.error("manifest %s crashed: %r", name, task.exception())

    async def _finish_inflight(self) -> None:
        if self._inflight:
            await asyncio.gather(*self._inflight.values(), return_exceptions=True)
        self._reap()

    async def _manifest(self, key: str, lease: Lease, slot: _Slot) -> list[JobOutcome]:
        """Everything that happens to one claimed manifest; never raises on a job's failure."""
        outcomes: list[JobOutcome] = []
        latest: Callable[[], Lease] = lambda: lease  # noqa: E731
        log.info(
            "claimed %s (attempt %d)",
            key,
            lease.attempt,
            extra={"manifest": key, "attempt": lease.attempt},
        )
        try:
            async with self.claims.heartbeat(lease) as beat:
                latest = beat
                outcomes = await self._manifest_jobs(key, lease, slot)
            if beat.lost is not None:
                log.warning("%s: %s; leaving the manifest to its new holder", key, beat.lost)
                return outcomes
            await self._settle(key, beat(), outcomes)
        except asyncio.CancelledError:
            # Give the job back under the newest lease: the first one's ETag is stale after
            # any renewal, and releasing with it would leave the claim held until it expires.
            with contextlib.suppress(Exception):
                await asyncio.shield(
                    self.claims.release(latest(), error="worker stopped", charge=False)
                )
            raise
        except Exception as error:  # storage trouble around the jobs: give the claim back
            log.error("%s: %s: %s", key, type(error).__name__, error)
            with contextlib.suppress(Exception):
                await self.claims.release(latest(), error=f"{type(error).__name__}: {error}")
            return outcomes
        finally:
            slot.release()
        for outcome in outcomes:
            self.counts.add(outcome)
        return outcomes

    async def _manifest_jobs(self, key: str, lease: Lease, slot: _Slot) -> list[JobOutcome]:
        name = self.layout.manifest_name(key)
        try:
            stored = await self.storage.get(key)
        except ObjectNotFound:
            log.info("%s is gone (finished by another worker)", key)
            return []
        try:
            jobs = load_jobs(
                stored.data,
                manifest_key=key,
                registry=self.registry,
                allow_raw=self.settings.allow_raw,
                max_bytes=self.settings.max_manifest_bytes,
            )
        except ManifestError as error:
            slot.release()
            log.warning("%s is not a valid manifest: %s", key, error)
            return [await self._invalid(key, _declared_id(stored.data) or name, error)]

        if lease.attempt > self.settings.max_attempts:
            slot.release()
            return await self._give_up(jobs, lease)

        tasks: list[asyncio.Task[JobOutcome]] = []
        for index, job in enumerate(jobs):
            job_slot = slot if index == 0 else await self._take_slot(None)
            assert job_slot is not None
            skip = await self._already_done(job)
            if skip is not None:
                job_slot.release()
                tasks.append(asyncio.create_task(_done(skip)))
                continue
            tasks.append(
                asyncio.create_task(
                    self.runner.run(
                        job,
                        attempt=lease.attempt,
                        max_attempts=self.settings.max_attempts,
                        on_executed=job_slot.release,
                        notes=_previous_error_note(lease),
                    )
                )
            )
        return list(await asyncio.gather(*tasks))

    async def _invalid(self, key: str, job_id: str, error: ManifestError) -> JobOutcome:
        """A broken manifest fails with a status that says why, but never buries the result
        of an earlier run of the same id: that status keeps its state and gets a note."""
        previous = await self.runner.read_status(job_id)
        if previous is not None and previous.state is JobState.succeeded:
            previous.notes.append(
                f"manifest {key} arrived again but was not run, because it is not valid: {error}"
            )
            await self.runner.write_status(previous)
            return JobOutcome(Verdict.failed, previous)
        return JobOutcome(Verdict.failed, await self.runner.fail(job_id, key, error))

    async def _already_done(self, job: Job) -> JobOutcome | None:
        """A manifest whose id already succeeded is not run again unless it asks to be."""
        if job.rerun:
            return None
        previous = await self.runner.read_status(job.id)
        if previous is None or previous.state is not JobState.succeeded:
            return None
        note = (
            f"manifest {job.manifest_key} arrived again and was not run: "
            'this id already succeeded (set "rerun": true to run it again)'
        )
        previous.notes.append(note)
        await self.runner.write_status(previous)
        return JobOutcome(Verdict.skipped, previous)

    async def _give_up(self, jobs: list[Job], lease: Lease) -> list[JobOutcome]:
        outcomes = []
        reason = lease.last_error or "the worker running it stopped or died"
        for job in jobs:
            previous = await self.runner.read_status(job.id)
            if previous is not None and previous.state is JobState.succeeded:
                outcomes.append(JobOutcome(Verdict.skipped, previous))
                continue
            status = previous or JobStatus(
                id=job.id, state=JobState.failed, manifest_key=job.manifest_key
            )
            status.state = JobState.failed
            status.attempt = lease.attempt - 1
            status.max_attempts = self.settings.max_attempts
            if status.error is None:
                status.error = ErrorInfo(type="attempts_exhausted", message=reason)
            status.notes.append(
                f"gave up after {lease.attempt - 1} attempt(s) (COMFYS3_MAX_ATTEMPTS="
                f"{self.settings.max_attempts}); last error: {reason}"
            )
            await self.runner.write_status(status)
            outcomes.append(JobOutcome(Verdict.failed, status))
        return outcomes

    async def _settle(self, key: str, lease: Lease, outcomes: list[JobOutcome]) -> None:
        """Decide the manifest's fate once all its jobs have an outcome."""
        name = self.layout.manifest_name(key)
        retry = [o for o in outcomes if o.verdict is Verdict.retry]
        try:
            if retry:
                first = retry[0].status.error
                reason = f"{first.type}: {first.message}" if first else "failed"
                charge = any(o.charged for o in retry)
                await self.claims.release(lease, error=reason[:2000], charge=charge)
                delay = min(30.0, self.settings.retry_delay * 2 ** (lease.attempt - 1))
                self._deferred[name] = time.monotonic() + delay
                return
            failed = any(o.verdict is Verdict.failed for o in outcomes)
            if outcomes:
                target = self.layout.failed_key(name) if failed else self.layout.done_key(name)
                with contextlib.suppress(ObjectNotFound):
                    await self.storage.move(key, target)
            await self.claims.finish(lease)
        except (LeaseLost, StorageError) as error:
            log.warning("%s: could not settle the claim: %s", key, error)


def _declared_id(data: bytes) -> str | None:
    """The id a broken manifest asked for, if it can be read and is safe to use."""
    try:
        value = json.loads(data).get("id")
        return check_job_id(value) if isinstance(value, str) else None
    except (ValueError, AttributeError):
        return None


def _previous_error_note(lease: Lease) -> list[str]:
    if lease.last_error:  # also after a try that did not count, when the attempt stays 1
        return [f"the previous try failed: {lease.last_error}"]
    if lease.attempt > 1:
        return [f"attempt {lease.attempt - 1} did not finish (its worker stopped or died)"]
    return []


async def _done(outcome: JobOutcome) -> JobOutcome:
    return outcome
