"""The lane that keeps the GPU busy: claim manifests, run their jobs, retire them.

ComfyUI executes one prompt at a time from its own queue. The lane keeps that queue as deep as
it needs to be (:mod:`processor.worker.prompt_queue`): while job N runs, the next ones are
already claimed, validated, staged and queued, and earlier jobs' outputs upload, so the GPU
never waits for S3.
A slot is taken before a manifest is claimed, so a worker never holds claims on more work than
it can start soon, and other workers get the rest. Which manifest to try next comes from
:mod:`processor.worker.intake`, one page of the prefix at a time.

Every claimed manifest ends. A failure that another attempt could fix (ComfyUI died, a runtime
error, a timeout) releases the claim with its reason, and the manifest is tried again, by this
worker only after a pause that doubles each time. A failure no attempt can fix (a broken
manifest, a graph ComfyUI refuses, a missing or unreadable input) fails for good at once.
Anything unexpected while a manifest is handled counts as an attempt too, so nothing can loop:
after ``max_attempts`` the manifest is retired to ``_failed/`` with a status that says why.
Tries the manifest was not to blame for (its worker stopped, storage was unreachable, ComfyUI
died while another job ran) do not count as attempts, but they are bounded as well
(``max_tries``), so even those end.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from processor.aio import wait_any
from processor.errors import (
    CapabilityMissing,
    CapabilityWaitOver,
    InvalidKey,
    JsonLimitError,
    LeaseLost,
    ManifestError,
    ObjectNotFound,
    ObjectTooLarge,
    StorageError,
)
from processor.job.cancel import CancelRequest
from processor.job.manifest import Job, check_job_id, default_job_id, load_jobs
from processor.job.retry_table import (
    claim_retry_pause,
    describe,
    max_tries,
    policy_for,
    retry_pause,
)
from processor.job.runner import JobOutcome, JobRunner, LaneHooks, Verdict
from processor.job.status import ErrorInfo, JobStatus
from processor.logsafe import printable_logger
from processor.ops.parts import Ops
from processor.safejson import load_json
from processor.settings import WorkerSettings
from processor.storage.base import Storage, StoredObject
from processor.storage.claims import ClaimStore, Heartbeat, Lease, Taken
from processor.storage.layout import Layout, split_priority
from processor.storage.retirement import Retirer
from processor.worker.cancels import CancelWatch
from processor.worker.capabilities import CapabilityWatch, Lack
from processor.worker.intake import Candidate, HintCallback, HintOutcome, Intake
from processor.worker.prompt_queue import LaneDepth, Lanes, Slot
from processor.workflows import WorkflowRegistry

log = printable_logger("comfys3.worker")


PAGE_MAX_AGE = 2.0  # seconds a page of the intake is trusted before it is listed again
MAX_ASIDE = 2  # jobs at once that leave the lane to wait for a model download


@dataclass
class Counts:
    """What a worker did, for ``--once``, SIGTERM, RunPod's drain answer and the metrics: the
    one tally all of them read (the worker feeds the metrics from :meth:`add`'s answer).

    ``outcomes`` lists every attempt in order; the counts are by job: a job that succeeded
    counts as succeeded even if a duplicate of it was skipped later, otherwise its latest
    outcome counts (a job the worker handed back when it stopped counts as handed back). So
    the counts add up to the number of jobs.
    """

    outcomes: list[JobOutcome] = field(default_factory=list)

    def add(self, outcome: JobOutcome) -> bool:
        """Record an attempt; False when it changes no job's count (a skipped duplicate of a
        job that succeeded here), so the metrics leave it out as the summary does."""
        counted = not (
            outcome.verdict is Verdict.skipped
            and self._by_job().get(outcome.status.id) is Verdict.succeeded
        )
        self.outcomes.append(outcome)
        return counted

    def since(self, mark: int) -> Counts:
        """What happened after ``mark`` outcomes (e.g. during one RunPod drain call)."""
        return Counts(self.outcomes[mark:])

    @property
    def statuses(self) -> list[JobStatus]:
        return [outcome.status for outcome in self.outcomes]

    def _by_job(self) -> dict[str, Verdict]:
        latest: dict[str, Verdict] = {}
        for outcome in self.outcomes:
            job = outcome.status.id
            if outcome.verdict is Verdict.skipped and latest.get(job) is Verdict.succeeded:
                continue
            latest[job] = outcome.verdict
        return latest

    def _count(self, verdict: Verdict) -> int:
        return sum(1 for v in self._by_job().values() if v is verdict)

    succeeded = property(lambda self: self._count(Verdict.succeeded))
    failed = property(lambda self: self._count(Verdict.failed))
    # Jobs whose latest attempt failed and that wait for another one.
    retried = property(lambda self: self._count(Verdict.retry))
    skipped = property(lambda self: self._count(Verdict.skipped))
    cancelled = property(lambda self: self._count(Verdict.cancelled))
    # Jobs stopped mid-attempt with the worker and given back to the intake, uncounted.
    handed_back = property(lambda self: self._count(Verdict.handed_back))

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
            "cancelled": self.cancelled,
            "handed_back": self.handed_back,
            "attempts": len(self.outcomes),
        }

    def describe(self) -> str:
        """One line for a person; the same after ``--once`` and after SIGTERM."""
        summary = self.summary()
        jobs = sum(summary[state] for state in COUNTED)
        cancelled = f", {summary['cancelled']} cancelled" if summary["cancelled"] else ""
        handed = f", {summary['handed_back']} handed back" if summary["handed_back"] else ""
        return (
            f"{jobs} job(s): {summary['succeeded']} succeeded, {summary['failed']} failed, "
            f"{summary['retried']} to retry, {summary['skipped']} skipped{cancelled}{handed} "
            f"({summary['manifests']} manifests, {summary['attempts']} attempts)"
        )


# The states the summary counts jobs in; together they make its number of jobs.
COUNTED = ("succeeded", "failed", "retried", "skipped", "cancelled", "handed_back")

WaitForWork = Callable[[bool], Awaitable[None]]


class Worker:
    def __init__(
        self,
        *,
        storage: Storage,
        runner: JobRunner,
        registry: WorkflowRegistry,
        layout: Layout,
        settings: WorkerSettings,
        holder: str,
        ops: Ops | None = None,
        more_runners: Sequence[tuple[str, JobRunner]] = (),
        runner_name: str = "comfyui",
    ) -> None:
        """``runner`` runs jobs on one ComfyUI; ``more_runners`` on more (one per GPU), each
        named, each with a lane of its own fed from the one intake and claim store."""
        self.storage = storage
        self.ops = ops or Ops.quiet()
        self.runner = runner
        self.book = runner.book
        self.registry = registry
        self.layout = layout
        self.settings = settings
        self.claims = ClaimStore(
            storage,
            layout.claims_prefix,
            holder,
            settings.lane.lease_seconds,
            on_renewed=self.ops.storage_ok,
        )
        runners = [(runner_name, runner), *more_runners]
        self.lanes = Lanes(
            [
                (
                    name,
                    LaneDepth(
                        settings.lane.lane_depth_max,
                        max_queued_seconds=min(10.0, settings.lane.lease_seconds / 6),
                    ),
                )
                for name, _ in runners
            ]
        )
        self._runner_of = {
            lane: lane_runner
            for lane, (_, lane_runner) in zip(self.lanes.all, runners, strict=True)
        }
        self.lane = self.lanes.all[0]  # the first ComfyUI's: the only one without --gpus
        self.depth = self.lane.depth
        self.intake = Intake(
            storage,
            layout,
            lease_seconds=settings.lane.lease_seconds,
            page_max_age=PAGE_MAX_AGE,
            watch=self.claims.watch,  # what the intake's scans see, the claims judge by
        )
        self.retirer = Retirer(storage, layout)
        self.cancels = CancelWatch(storage, layout, interval=settings.lane.cancel_check_interval)
        self.max_tries = max_tries(settings.jobs.max_attempts)
        self.counts = Counts()
        self._inflight: dict[str, asyncio.Task[list[JobOutcome] | None]] = {}
        self._claiming = 0  # claim attempts in flight
        self._decided = asyncio.Event()  # set whenever a claim attempt is decided
        self._won = 0  # claims won since this worker started
        self._claim_failures = 0  # claim attempts in a row that storage failed
        self._crash_logged: set[str] = set()
        # What this worker's ComfyUI can run: a manifest it cannot is left for another worker.
        self.capabilities = CapabilityWatch(runner.comfy, runner.models)
        self._aside = 0  # jobs out of the lane while a model downloads

    # -- what triggers use ----------------------------------------------------------------

    def hint(self, key: str, on_outcome: HintCallback | None = None) -> None:
        """Claim ``key`` ahead of anything listed (an S3 event, a RunPod request named it)."""
        self.intake.hint(key, on_outcome)

    async def cancel(self, names: list[str], request: CancelRequest) -> None:
        """Ask jobs (or whole batches, by a batch manifest's id) to stop, here at once and on
        any worker through their cancel objects (RunPod's cancel of a request)."""
        await self.cancels.request(names, request)

    def claims_held_ahead(self) -> int:
        """Claims whose prompt ComfyUI has not started yet: what this worker keeps from others."""
        return self.lanes.ahead()

    async def run(
        self,
        *,
        wait_for_work: WaitForWork | None = None,
        stop: asyncio.Event | None = None,
        max_manifests: int | None = None,
        max_seconds: float | None = None,
        may_list: Callable[[], bool] | None = None,
        on_idle: Callable[[], Awaitable[None]] | None = None,
    ) -> Counts:
        """Claim and run manifests until stopped.

        With ``wait_for_work`` (a trigger's poll interval or folder watch) this serves forever;
        without it, it drains: it returns once a sweep of the whole intake found nothing it
        could claim and its own work is finished. ``may_list`` is asked before each sweep
        whether the intake prefix may be listed now (an event trigger lists only when its
        fallback is due); a sweep once begun runs to its end. ``on_idle``
        runs at each start of an idle period (a trigger's hints to the user, say).
        """
        stop = stop or asyncio.Event()
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        won_at_start = won_at_sweep = self._won
        idle = False
        sweeping = False  # a listing sweep, once begun, runs to its end

        def limited() -> bool:
            taken = self._won - won_at_start + self._claiming
            if max_manifests is not None and taken >= max_manifests:
                return True
            return deadline is not None and time.monotonic() >= deadline

        try:
            while not stop.is_set() and not limited():
                slot = await self.lanes.take(stop)
                if slot is None:
                    break
                try:
                    listing = sweeping = sweeping or may_list is None or may_list()
                    if listing and not self.intake.hinted.is_set() and self.intake.contested():
                        # Other workers take the keys this one lists (see Intake.contested):
                        # no claims ahead beyond one per lane, and one claim at a time.
                        if len(self._inflight) > len(self.lanes.all):
                            slot.release()
                            await self._until_one_finishes(stop)
                            continue
                        await self._claim_decided(stop)
                    candidate = await self.intake.next(self._busy, listing=listing)
                except StorageError as error:
                    slot.release()
                    self.ops.storage_failed("list", error)
                    if wait_for_work is None:
                        raise  # a drain that cannot list cannot say it drained anything
                    log.warning("listing %s failed: %s", self.layout.input_dir, error)
                    await self._idle(wait_for_work, stop)
                    continue
                self.ops.storage_ok()
                self.ops.metrics.set_manifests_pending(self.intake.seen_pending)
                if candidate is not None:
                    self._start(candidate, slot)
                    continue
                slot.release()
                sweeping = False
                if not listing and wait_for_work is not None:
                    # Only hints, due keys and stale claims were offered: wait for the next
                    # of those, or for the trigger to say a listing is due.
                    await self._idle(wait_for_work, stop)
                    continue
                # A sweep of the whole intake is over: did it find anything?
                if self._claiming > 0 and self._won == won_at_sweep:
                    await self._claim_decided(stop)
                found_work = self._won > won_at_sweep or self._claiming > 0
                won_at_sweep = self._won
                if wait_for_work is not None:
                    if found_work:
                        idle = False
                        await wait_for_work(True)
                        continue
                    if not idle:
                        log.info("idle: nothing to claim in %s", self.layout.input_dir)
                        if on_idle is not None:
                            await self._quietly(on_idle)
                    idle = True
                    await self._idle(wait_for_work, stop)
                elif self._inflight:
                    await self._until_one_finishes(stop)
                elif found_work:
                    continue
                elif (due := self.intake.retry_due()) is not None:
                    await wait_any(stop, self.intake.hinted, timeout=due - time.monotonic())
                else:
                    break
        finally:
            await self._finish_inflight()
        return self.counts

    async def run_manifest(self, key: str) -> list[JobOutcome] | None:
        """Claim and run one named manifest (RunPod's ``{"manifest": key}``).

        ``None`` when another worker holds it.
        """
        slot = self.lanes.take_now()
        task = self._start(Candidate(key, "request"), slot)
        try:
            return await task
        finally:
            self._reap()

    async def run_to_end(self, key: str) -> list[JobOutcome] | None:
        """Claim and run one named manifest until its jobs are final, for a caller that wants
        the final answer rather than "try later" (a RunPod request): a failure the retry table
        retries is tried again here, on this worker, after the table's pause, within
        ``max_tries``. ``None`` when another worker holds it.
        """
        outcomes: list[JobOutcome] = []
        for tries in range(1, self.max_tries + 1):
            found = await self.run_manifest(key)
            if found is None:
                return None
            outcomes = found
            if any(outcome.verdict is Verdict.lost for outcome in outcomes):
                return None  # another worker took it over and sees it through
            if not any(outcome.verdict is Verdict.retry for outcome in outcomes):
                break
            await asyncio.sleep(retry_pause(tries, self.settings.jobs.retry_delay))
        return outcomes

    # -- the loop's helpers ---------------------------------------------------------------

    def _busy(self, key: str) -> bool:
        return key in self._inflight

    async def _idle(self, wait_for_work: Callable[[bool], object], stop: asyncio.Event) -> None:
        """Wait for the trigger (poll interval, folder event), a hint, a due retry, or stop."""
        waiter = asyncio.ensure_future(_maybe_await(wait_for_work(False)))
        due = self.intake.retry_due()
        timeout = None if due is None else max(0.0, due - time.monotonic())
        hinted = asyncio.ensure_future(self.intake.hinted.wait())
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait(
                {waiter, hinted, stopped}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for task in (waiter, hinted, stopped):
                task.cancel()
            for task in (waiter, hinted, stopped):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    @staticmethod
    async def _quietly(hook: Callable[[], Awaitable[None]]) -> None:
        """A trigger's hook may fail; the worker loop must not."""
        try:
            await hook()
        except Exception as error:
            log.warning("idle hook failed: %s: %s", type(error).__name__, error)

    async def _claim_decided(self, stop: asyncio.Event) -> None:
        """Wait until one of the claim attempts in flight is decided (or a hint, or stop).

        Listing again before that would only find the same keys busy: with claims slowed down
        (storage throttling, retrying, or just back from an outage) the loop would otherwise
        send LIST after LIST, hundreds a second, for as long as the claims hang.
        """
        self._decided.clear()
        if self._claiming > 0:
            await wait_any(stop, self._decided, self.intake.hinted)

    async def _until_one_finishes(self, stop: asyncio.Event) -> None:
        tasks = set(self._inflight.values())
        stopped = asyncio.ensure_future(stop.wait())
        hinted = asyncio.ensure_future(self.intake.hinted.wait())
        try:
            await asyncio.wait(tasks | {stopped, hinted}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            hinted.cancel()
        self._reap()

    def _start(self, candidate: Candidate, slot: Slot) -> asyncio.Task[list[JobOutcome] | None]:
        key = candidate.key
        self._claiming += 1
        task = asyncio.create_task(self._attempt(candidate, slot), name=f"manifest {key}")
        self._inflight[key] = task
        task.add_done_callback(lambda _: self._reap())
        return task

    def _reap(self) -> None:
        for key, task in list(self._inflight.items()):
            if task.done():
                del self._inflight[key]
                if not task.cancelled() and task.exception() is not None:
                    log.error("manifest %s crashed: %r", key, task.exception())

    async def _finish_inflight(self) -> None:
        if self._inflight:
            await asyncio.gather(*self._inflight.values(), return_exceptions=True)
        self._reap()

    # -- one manifest ---------------------------------------------------------------------

    async def _attempt(self, candidate: Candidate, slot: Slot) -> list[JobOutcome] | None:
        """Claim the candidate and see it through; ``None`` if it could not be claimed.
        Never raises but for cancellation, or a claim error on a named request."""
        key = candidate.key
        claimed = False
        try:
            name = self.layout.manifest_name(key)
            problem = self.layout.name_problem(name)
            if problem is not None:
                await self.retirer.set_aside(key, problem)
                await self.intake.report(key, HintOutcome.gone)
                return None
            try:
                result = await self.claims.acquire(name)
            except InvalidKey as error:
                await self.retirer.set_aside(key, str(error))
                await self.intake.report(key, HintOutcome.gone)
                return None
            except StorageError as error:
                self.ops.storage_failed("claim", error)
                if candidate.source == "request":
                    raise
                # Storage is down or refusing: each failure in a row doubles the pause, so an
                # outage costs a few tries per key, not one every retry_delay for its length.
                self._claim_failures += 1
                pause = claim_retry_pause(self._claim_failures, self.settings.jobs.retry_delay)
                log.warning("claiming %s failed (again in %.1f s): %s", key, pause, error)
                self.intake.retry_at(key, pause)
                await self.intake.report(key, HintOutcome.released)
                return None
            self._claim_failures = 0
            if isinstance(result, Taken):
                self.intake.held(key, result.recheck_in)
                await self.intake.report(key, HintOutcome.taken)
                return None
            claimed = True
            self._claiming -= 1
            self._won += 1
            self._decided.set()
            if result.took_over:
                self.ops.metrics.claim_taken_over()
            return await self._claimed(key, result, slot, leave=candidate.source != "request")
        finally:
            if not claimed:
                self._claiming -= 1
                self._decided.set()
            slot.release()

    async def _claimed(
        self, key: str, lease: Lease, slot: Slot, *, leave: bool = True
    ) -> list[JobOutcome]:
        """Everything that happens to one claimed manifest. ``leave``: a manifest this worker
        cannot run may be left for another (not for a request made to this worker)."""
        log.info(
            "claimed %s (attempt %d)",
            key,
            lease.attempt,
            extra={"manifest": key, "attempt": lease.attempt},
        )
        outcomes: list[JobOutcome] = []
        latest: Callable[[], Lease] = lambda: lease  # noqa: E731
        try:
            async with self.claims.heartbeat(lease) as beat:
                latest = beat
                try:
                    outcomes = await self._jobs(key, beat, slot, leave=leave)
                    if beat.lost is None:
                        await self._settle(key, beat, outcomes)
                except asyncio.CancelledError:
                    raise
                except Exception as error:
                    await self._failed_handling(key, beat, error)
            if beat.lost is not None:
                self.ops.metrics.claim_lost()
                log.warning("%s: %s; leaving the manifest to its new holder", key, beat.lost)
                await self.intake.report(key, HintOutcome.taken)
        except asyncio.CancelledError:
            # Give the job back under the newest lease: the first one's ETag is stale after
            # any renewal, and releasing with it would leave the claim held until it expires.
            with contextlib.suppress(Exception):
                await asyncio.shield(
                    self.claims.release(latest(), error="worker stopped", charge=False)
                )
            raise
        except Exception as error:  # the heartbeat's own set-up or tear-down failed
            log.error("%s: %s: %s", key, type(error).__name__, error)
        for outcome in outcomes:
            self._record(outcome)
        return outcomes

    def _record(self, outcome: JobOutcome) -> None:
        counted = self.counts.add(outcome)
        self.ops.observe(outcome, counted=counted)

    async def _jobs(
        self, key: str, beat: Heartbeat, slot: Slot, *, leave: bool = True
    ) -> list[JobOutcome]:
        lease = beat()
        try:
            stored = await self.storage.get(key, max_bytes=self.settings.jobs.max_manifest_bytes)
        except ObjectNotFound:
            log.info("%s is gone (finished by another worker)", key)
            return []
        except ObjectTooLarge as error:
            slot.release()
            return [await self._invalid(key, None, ManifestError.single(f"manifest {error}"))]
        if lease.attempt > self.settings.jobs.max_attempts or lease.tries > self.max_tries:
            slot.release()
            return await self._give_up(key, stored, lease)
        try:
            jobs = self._load(stored, key, check_notify=True)
        except ManifestError as error:
            slot.release()
            log.warning("%s is not a valid manifest: %s", key, error)
            return [await self._invalid(key, stored, error)]
        lack = await self.capabilities.lacking(jobs)
        if lack is not None:
            ended = await self._lacking(key, stored, lease, jobs, lack, leave=leave)
            if ended is not None:
                slot.release()
                return ended
        tasks = [
            asyncio.create_task(
                self._job(job, beat, slot if index == 0 else self.lanes.take_now(), stored.version)
            )
            for index, job in enumerate(jobs)
        ]
        return list(await asyncio.gather(*tasks))

    def _load(self, stored: StoredObject, key: str, *, check_notify: bool) -> list[Job]:
        """The manifest's jobs, checked as this worker runs them (its templates, its limits,
        and, when it is to run, its webhook policy)."""
        return load_jobs(
            stored.data,
            manifest_key=key,
            registry=self.registry,
            allow_raw=self.settings.jobs.allow_raw_workflows,
            max_bytes=self.settings.jobs.max_manifest_bytes,
            notify_check=self.ops.webhook_refusal if check_notify else None,
        )

    async def _job(self, job: Job, beat: Heartbeat, slot: Slot, version: str) -> JobOutcome:
        """One job of a manifest; whatever happens to it stays with it, never with siblings.
        Its writes are fenced by the manifest's claim (``beat``)."""
        lease = beat()
        lane = slot.lane  # the ComfyUI (GPU) this job runs on
        runner = self._runner_of[lane]

        in_comfyui = False
        aside = False

        def queued(seconds: float) -> None:
            nonlocal in_comfyui
            in_comfyui = True
            lane.depth.record_prepare(seconds)
            self.ops.metrics.prompt_queued(lane.name)

        def began() -> None:
            slot.started = True

        def executed(seconds: float) -> None:
            if in_comfyui:
                self.ops.metrics.prompt_done(lane.name, executed=seconds > 0)
            if seconds > 0:
                lane.depth.record_execute(seconds)
            slot.release()
            self.lanes.changed()
            back()

        def step_aside() -> bool:
            """A model must be downloaded: leave the lane so other jobs feed the GPU, unless
            MAX_ASIDE jobs are out already (each one out lets another manifest be claimed)."""
            nonlocal aside
            if aside or self._aside >= MAX_ASIDE:
                return False
            aside = True
            self._aside += 1
            slot.release()
            return True

        def back() -> None:
            nonlocal aside
            if aside:
                aside = False
                self._aside -= 1

        async def step_back() -> None:
            """Into the lane again, at once: the job has waited long enough."""
            nonlocal slot
            back()
            slot = lane.take_now()

        def given_back(status: JobStatus) -> None:
            self._record(JobOutcome(Verdict.handed_back, status, charged=False))

        cancel = self.cancels.watch(job)
        try:
            await self.cancels.check(job, cancel, max_age=PAGE_MAX_AGE)
            return await runner.run(
                job,
                attempt=lease.attempt,
                max_attempts=self.settings.jobs.max_attempts,
                hooks=LaneHooks(
                    on_queued=queued,
                    on_started=began,
                    on_executed=executed,
                    step_aside=step_aside,
                    step_back=step_back,
                    on_given_back=given_back,
                ),
                notes=_previous_error_note(lease),
                manifest_version=version,
                resumed=lease.tries > 1,
                fence=beat,
                cancel=cancel,
            )
        finally:
            self.cancels.unwatch(job)
            back()
            slot.release()

    async def _settle(self, key: str, beat: Heartbeat, outcomes: list[JobOutcome]) -> None:
        """Decide the manifest's fate once all its jobs have an outcome. Only while this
        attempt still holds the claim: a try that lost it leaves the manifest to its new
        holder (the loss is noted on the heartbeat and logged by the caller)."""
        if any(outcome.verdict is Verdict.lost for outcome in outcomes):
            beat.lost = beat.lost or LeaseLost(f"claim {beat().key} was taken over")
            return
        try:
            await beat.ensure()  # retiring moves the manifest: the holder's act alone
        except LeaseLost:
            return
        lease = beat()
        if not outcomes:  # the manifest was gone: only our claim is left
            await self.retirer.drop_claim(lease.key)
            await self.intake.report(key, HintOutcome.gone)
            return
        retry = [o for o in outcomes if o.verdict is Verdict.retry]
        if retry:
            first = retry[0].status.error
            reason = f"{first.type}: {first.message}" if first else "failed"
            await self._give_back(key, beat, reason, charge=any(o.charged for o in retry))
            return
        failed = any(o.verdict is Verdict.failed for o in outcomes)
        await self.retirer.retire(key, failed=failed, claim_key=lease.key)
        self.intake.forget(key)
        await self.intake.report(key, HintOutcome.settled)
        await self.cancels.ended(o.status.id for o in outcomes)

    async def _give_back(self, key: str, beat: Heartbeat, reason: str, *, charge: bool) -> None:
        await beat.halt()  # a renewal landing after we read the lease would fail the release
        lease = beat()
        try:
            await self.claims.release(lease, error=reason, charge=charge)
        except (StorageError, LeaseLost) as error:  # either way the claim expires by itself
            log.warning("%s: could not give the claim back: %s", key, error)
        self.intake.retry_at(key, retry_pause(lease.tries, self.settings.jobs.retry_delay))
        await self.intake.report(key, HintOutcome.released)

    async def _failed_handling(self, key: str, beat: Heartbeat, error: Exception) -> None:
        """Handling a claimed manifest failed outside any job's attempt. The retry table says
        whose fault it is: storage trouble is not the manifest's, so it is given back
        uncounted (bounded by max_tries) and tried again after a pause; anything else counts
        as an attempt, like any failure of the manifest's."""
        if isinstance(error, CapabilityMissing):
            await self._leave(key, beat, error)
            return
        policy = policy_for(error)
        if policy.error_type == "storage":
            self.ops.storage_failed("job", error)
        if not policy.charge:
            log.warning("%s: %s trouble, giving it back: %s", key, policy.error_type, error)
            await self._give_back(key, beat, f"{policy.error_type}: {error}", charge=False)
            return
        await self._crashed(key, beat, error)

    async def _lacking(
        self,
        key: str,
        stored: StoredObject,
        lease: Lease,
        jobs: list[Job],
        lack: Lack,
        *,
        leave: bool,
    ) -> list[JobOutcome] | None:
        """A manifest that needs what this worker lacks. Until it is COMFYS3_CAPABILITY_WAIT
        seconds old it is left for another worker (:class:`CapabilityMissing`, handled by
        :meth:`_leave`); then no worker that has what it needs took it, and it fails. When
        only model files are missing, it runs instead (None): ComfyUI's own validation error
        names the file and lists those it has."""
        wait = self.settings.lane.capability_wait
        age = _age(stored)
        if leave and age is not None and age < wait:
            raise CapabilityMissing(
                f"this worker's ComfyUI {lack.describe()}",
                {**lack.details(), "left_for": round(wait - age, 1)},
            )
        if not lack.nodes and not lack.no_cache:
            return None
        waited = f"no worker that has them took it within {wait:g} s (COMFYS3_CAPABILITY_WAIT)"
        if not leave:
            waited = "this worker was asked to run it"
        error = CapabilityWaitOver(f"the job {lack.describe()}; {waited}", lack.details())
        info, _ = describe(error)
        log.warning("%s: %s", key, error, extra={"manifest": key, "error_type": info.type})
        outcomes = []
        for job in jobs:
            status, kept = await self.book.gave_up(
                job.id,
                key,
                job=job,
                manifest_version=stored.version,
                attempts=lease.attempt,
                max_attempts=self.settings.jobs.max_attempts,
                info=info,
                note=f"worker {self.claims.holder} {lack.describe()}; {waited}",
            )
            verdict = Verdict.succeeded if kept else Verdict.failed
            outcomes.append(JobOutcome(verdict, status, leftover=kept))
        return outcomes

    async def _leave(self, key: str, beat: Heartbeat, error: CapabilityMissing) -> None:
        """Give a manifest this worker cannot run back, as if it had never been claimed here
        (neither an attempt nor a try is counted: the wait bounds it), and look at it again
        only once its wait is over, when it fails if nobody took it."""
        await beat.halt()
        lease = beat()
        try:
            # No error recorded: nothing failed, and the next holder's status must not say so.
            await self.claims.release(lease, error=None, charge=False, count_try=False)
        except (StorageError, LeaseLost) as trouble:  # either way the claim expires by itself
            log.warning("%s: could not give the claim back: %s", key, trouble)
        pause = float(error.details.get("left_for", 0.0)) + 1.0
        self.intake.put_off(key, max(pause, self.settings.jobs.retry_delay))
        log.info("%s: left for another worker for %.0f s: %s", key, pause, error)
        await self.intake.report(key, HintOutcome.released)

    async def _crashed(self, key: str, beat: Heartbeat, error: BaseException) -> None:
        """Something unexpected while handling a claimed manifest: an attempt, like any other
        failure of the manifest's, so a manifest that always does this ends."""
        lease = beat()
        description = f"{type(error).__name__}: {error}"
        if key not in self._crash_logged:
            self._crash_logged.add(key)
            log.error("%s: internal error on attempt %d", key, lease.attempt, exc_info=error)
        else:
            log.error("%s: internal error on attempt %d: %s", key, lease.attempt, description)
        if lease.attempt < self.settings.jobs.max_attempts:
            await self._give_back(key, beat, f"internal: {description}"[:2000], charge=True)
            return
        info = ErrorInfo(
            type="internal",
            message=description,
            details={"exception_type": type(error).__name__},
        )
        try:
            stored: StoredObject | None = await self.storage.get(
                key, max_bytes=self.settings.jobs.max_manifest_bytes
            )
        except StorageError:
            stored = None
        outcomes = await self._write_final(key, stored, lease, info)
        await self._retire_failed(key, beat, outcomes)

    async def _retire_failed(self, key: str, beat: Heartbeat, outcomes: list[JobOutcome]) -> None:
        for outcome in outcomes:
            self._record(outcome)
        await self.retirer.retire(key, failed=True, claim_key=beat().key)
        self.intake.forget(key)
        await self.intake.report(key, HintOutcome.settled)

    async def _invalid(
        self, key: str, stored: StoredObject | None, error: ManifestError
    ) -> JobOutcome:
        """A broken manifest fails with a status that says why (never burying an earlier
        success of the same id). Where no status can be written (no usable id), the manifest
        still fails, once."""
        job_id = _declared_id(stored.data if stored else b"") or default_job_id(key)
        version = stored.version if stored else None
        try:
            check_job_id(job_id)
        except ValueError:
            log.error(
                "%s is not a valid manifest and has no usable job id for a status: %s",
                key,
                error,
            )
            return JobOutcome(Verdict.failed, self.book.unnamed(job_id, key))
        status, _ = await self.book.manifest_invalid(job_id, key, error, version)
        return JobOutcome(Verdict.failed, status)

    async def _give_up(self, key: str, stored: StoredObject, lease: Lease) -> list[JobOutcome]:
        """Out of attempts (or of tries): fail every job of the manifest with the last error."""
        reason = lease.last_error or "the worker running it stopped or died"
        info = ErrorInfo(type="attempts_exhausted", message=reason)
        if reason.startswith("internal: "):
            info = ErrorInfo(type="internal", message=reason.removeprefix("internal: "))
        return await self._write_final(key, stored, lease, info)

    async def _write_final(
        self, key: str, stored: StoredObject | None, lease: Lease, info: ErrorInfo
    ) -> list[JobOutcome]:
        """A failed status for each job of a manifest that will not run again. Job ids come
        from the manifest if it can still be read, else from its name."""
        ids: list[tuple[str, Job | None]] = []
        if stored is not None:
            with contextlib.suppress(Exception):
                ids = [(job.id, job) for job in self._load(stored, key, check_notify=False)]
        if not ids:
            declared = _declared_id(stored.data if stored else b"")
            ids = [(declared or split_priority(lease.name)[1], None)]
        attempts = min(lease.attempt, self.settings.jobs.max_attempts)
        note = (
            f"gave up after {attempts} attempt(s) and {lease.tries} tries in all "
            f"(COMFYS3_MAX_ATTEMPTS={self.settings.jobs.max_attempts}); last error: {info.message}"
        )
        outcomes = []
        for job_id, job in ids:
            try:
                check_job_id(job_id)
            except ValueError:
                log.error("%s: gave up (%s), and no status can be written for it", key, note)
                continue
            status, kept = await self.book.gave_up(
                job_id,
                key,
                job=job,
                manifest_version=stored.version if stored else None,
                attempts=attempts,
                max_attempts=self.settings.jobs.max_attempts,
                info=info,
                note=note,
            )
            if kept:
                outcomes.append(JobOutcome(Verdict.succeeded, status, leftover=True))
            else:
                outcomes.append(JobOutcome(Verdict.failed, status))
        log.warning("%s: %s", key, note, extra={"manifest": key, "error_type": info.type})
        return outcomes


async def _maybe_await(value: object) -> None:
    if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
        await value


def _declared_id(data: bytes) -> str | None:
    """The id a broken manifest asked for, if it can be read and is safe to use."""
    try:
        document = load_json(data)
    except JsonLimitError:
        return None
    value = document.get("id") if isinstance(document, dict) else None
    try:
        return check_job_id(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _age(stored: StoredObject) -> float | None:
    """Seconds since the manifest was uploaded, by the storage's clock alone (its Date
    header against the object's LastModified), falling back to this machine's clock when the
    storage did not say; None when the upload time is unknown."""
    if stored.last_modified is None:
        return None
    now = stored.served_at or datetime.now(UTC)
    return max(0.0, (now - stored.last_modified).total_seconds())


def _previous_error_note(lease: Lease) -> list[str]:
    if lease.last_error:  # also after a try that did not count, when the attempt stays 1
        return [f"the previous try failed: {lease.last_error}"]
    if lease.attempt > 1:
        return [f"attempt {lease.attempt - 1} did not finish (its worker stopped or died)"]
    return []
