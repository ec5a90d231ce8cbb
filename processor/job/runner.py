"""One job, end to end on ComfyUI: stage inputs, queue, follow, publish outputs, report.

This knows nothing of claims or manifests' fate; :mod:`processor.worker.loop` decides those.
Here every failure becomes a :class:`JobOutcome` whose status already says what went wrong
(written by :mod:`processor.job.status_book`, decided by :mod:`processor.job.retry_table`), so
the caller only chooses between "done", "try again" and "give up".
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from processor.comfy.client import (
    ComfyClient,
    OutputFile,
    Progress,
    RunLimit,
    RunResult,
    new_prompt_id,
)
from processor.errors import (
    CapabilityMissing,
    ComfyError,
    ComfyTimeout,
    FetchError,
    FetchRefused,
    InputInvalid,
    InputMissing,
    JobCancelled,
    JobTimeLimitExceeded,
    LeaseLost,
    ObjectNotFound,
    ObjectTooLarge,
    StorageError,
)
from processor.job.cancel import CancelSignal
from processor.job.input_refs import InputSource, readable_source
from processor.job.inputs import check_image
from processor.job.manifest import Job
from processor.job.outputs import prepare_output
from processor.job.retry_table import describe, policy_for, will_retry
from processor.job.status import JobState, JobStatus, OutputRecord, ProgressInfo, TimeLimit
from processor.job.status_book import (
    FINAL,
    Announce,
    AttemptRecord,
    Beginning,
    Begun,
    Fence,
    StatusBook,
)
from processor.logsafe import printable_logger
from processor.models.cache import ModelCache
from processor.ops.fetch_guard import Fetcher, display_url, refusal_status
from processor.settings import JobLimits, WorkerSettings
from processor.storage.base import ObjectStore, Storage
from processor.storage.layout import Layout

log = printable_logger("comfys3.job")


# What a job needs of ComfyUI: the client itself (tests stand in with anything shaped alike).
Comfy = ComfyClient


Cleanup = Callable[[RunResult, str | None], Awaitable[None]]
ProgressHook = Callable[[str, ProgressInfo], None]


class Verdict(enum.Enum):
    succeeded = "succeeded"
    skipped = "skipped"
    retry = "retry"  # failed, and another attempt may succeed
    failed = "failed"  # failed, and another attempt cannot help
    cancelled = "cancelled"  # someone asked for it to stop: final, nobody's failure
    lost = "lost"  # another worker took the claim over; this attempt's results were dropped
    # The worker stopped mid-attempt and gave the job back (never returned by run(): the
    # attempt is cancelled; LaneHooks.on_given_back tells the lane).
    handed_back = "handed_back"


@dataclass
class JobOutcome:
    verdict: Verdict
    status: JobStatus
    # False when the job is not to blame for this try (ComfyUI died running another prompt,
    # or the worker stopped): the attempt is not counted against COMFYS3_MAX_ATTEMPTS.
    charged: bool = True
    # True when this upload of the manifest had already run to its end (its status says so)
    # and only its retirement was left undone: nothing ran now.
    leftover: bool = False


@dataclass
class LaneHooks:
    """How a job tells the lane where it is, so the lane can size ComfyUI's queue."""

    on_queued: Callable[[float], None] | None = None  # seconds spent preparing the prompt
    on_started: Callable[[], None] | None = None  # ComfyUI began executing it
    on_executed: Callable[[float], None] | None = None  # ComfyUI is done (its execution seconds)
    # A model must be downloaded: may the job leave the lane meanwhile (True: it left), so the
    # GPU is fed other jobs while it waits? And the way back in, before its prompt is queued.
    step_aside: Callable[[], bool] | None = None
    step_back: Callable[[], Awaitable[None]] | None = None
    on_given_back: Callable[[JobStatus], None] | None = None  # cancelled: the job is handed back


PROGRESS_INTERVAL = 1.0  # seconds between progress writes to a running job's status
UPLOAD_CONCURRENCY = 8  # outputs of one job uploaded at once
JOB_TIMEOUT = "COMFYS3_JOB_TIMEOUT"  # the worker's limit, as a status names it
OWN_TIMEOUT = "timeout_s"  # the manifest's


def runner_for(
    settings: WorkerSettings,
    *,
    storage: ObjectStore,
    comfy: Comfy,
    layout: Layout,
    worker_id: str,
    inputs: Storage | None = None,
    cleanup: Cleanup | None = None,
    on_progress: ProgressHook | None = None,
    announce: Announce | None = None,
    fetcher: Fetcher | None = None,
    models: ModelCache | None = None,
) -> JobRunner:
    """The one way a runner is built from settings (a worker, ``exec``, the warm-up): the job
    limits go whole, and storage trouble after a prompt ran is waited out for up to a lease
    (how long other workers wait for this one anyway). ``fetcher`` fetches input URLs,
    ``models`` the models manifests name (see :func:`processor.worker.assembly.open_worker`)."""
    return JobRunner(
        storage=storage,
        comfy=comfy,
        layout=layout,
        limits=settings.jobs,
        worker_id=worker_id,
        inputs=inputs,
        cleanup=cleanup,
        on_progress=on_progress,
        announce=announce,
        storage_patience=settings.lane.lease_seconds,
        fetcher=fetcher,
        models=models,
    )


class JobRunner:
    """Runs jobs on one ComfyUI, reading inputs from storage and recording results through the
    status book."""

    def __init__(
        self,
        *,
        storage: ObjectStore,
        comfy: Comfy,
        layout: Layout,
        limits: JobLimits,
        worker_id: str,
        inputs: Storage | None = None,
        cleanup: Cleanup | None = None,
        on_progress: ProgressHook | None = None,
        announce: Announce | None = None,
        storage_patience: float = 0.0,
        fetcher: Fetcher | None = None,
        models: ModelCache | None = None,
    ) -> None:
        """``limits`` is the settings group, whole: a limit added there reaches every runner.
        ``storage_patience``: seconds to wait out storage trouble once ComfyUI has run the
        prompt, before giving the job back (which runs the prompt again); 0 gives up at once.
        """
        self.storage = storage
        self.inputs: Storage = inputs or storage  # type: ignore[assignment]
        self.comfy = comfy
        self.layout = layout
        self.limits = limits
        self.worker_id = worker_id
        self.storage_patience = storage_patience
        self.cleanup = cleanup
        self.on_progress = on_progress
        self.fetcher = fetcher
        self.models = models
        self.book = StatusBook(storage, layout, worker=worker_id, announce=announce)

    # -- one job --------------------------------------------------------------------------

    async def run(
        self,
        job: Job,
        *,
        attempt: int,
        max_attempts: int,
        hooks: LaneHooks | None = None,
        notes: list[str] | None = None,
        manifest_version: str | None = None,
        resumed: bool = False,
        fence: Fence | None = None,
        cancel: CancelSignal | None = None,
    ) -> JobOutcome:
        """Run ``job`` once; never raises but for cancellation.

        ``fence``: the claim's heartbeat. Every write of the attempt (progress, outputs, final
        status) is then made only while it holds the claim; one that finds the claim taken
        over drops its results (:attr:`Verdict.lost`) and publishes nothing.

        ``resumed``: the manifest was claimed before (its claim existed), so this upload may
        already have run to its end, with only its retirement left undone.

        ``cancel``: set when someone asks the job to stop (a cancel object, RunPod). Asked
        before the prompt is queued, nothing reaches ComfyUI; asked while ComfyUI has it, the
        prompt is stopped there. Either way the status says ``cancelled``, by whom and when.
        Once ComfyUI has finished the prompt, a cancel changes nothing.

        Only what the prompt needs happens before it is queued: the status that says the job
        runs (whose conditional write also tells whether this job already has a status) and
        the input files. ``hooks.on_executed`` fires when ComfyUI is done with it, which is
        when the lane may queue another prompt; publishing happens after.
        """
        hooks = hooks or LaneHooks()
        record = self.book.attempt(
            job,
            attempt=attempt,
            max_attempts=max_attempts,
            notes=notes,
            manifest_version=manifest_version,
            fence=fence,
        )
        executed = _Once(hooks.on_executed)
        started = time.monotonic()
        charged = True
        run_id = new_prompt_id()
        result: RunResult | None = None
        patience: float | None = None  # until when storage trouble is waited out
        subfolder = f"comfys3/{run_id}"
        staged_any = False
        pins = contextlib.ExitStack()  # the job's models, kept from eviction until it ends
        aside: list[float] = []  # when the job stepped out of the lane to wait for a download
        try:
            if cancel is not None and cancel.requested:
                executed(0.0)
                return await self._cancelled_before_start(job, record, cancel)
            beginning = await record.begin(job, resumed=resumed)
            if beginning.begun is not Begun.run:
                executed(0.0)
                return _earlier(beginning)
            phase = time.monotonic()
            staged_any = bool(job.inputs)
            if job.models:
                pins.enter_context(self._model_cache(job).pinned(job.models))

            def fetching() -> None:
                if hooks.step_aside is not None and not aside and hooks.step_aside():
                    aside.append(time.monotonic())

            staged = await self._stage_all(job, subfolder, record, fetching)
            record.timing("stage", time.monotonic() - phase)
            graph = job.filled_graph(staged, run_id)
            aside_seconds = 0.0
            if aside and hooks.step_back is not None:
                await hooks.step_back()
                aside_seconds = time.monotonic() - aside[0]
            limit = self._time_limit(job)
            record.limited(limit)
            if cancel is not None and cancel.requested:
                raise cancel.error("before it started")

            phase = time.monotonic()
            for line in await self.comfy.queue_prompt(graph, run_id):
                record.note(f"ComfyUI left out an output that failed its checks: {line}")
            record.timing("queue", time.monotonic() - phase)
            if hooks.on_queued is not None:
                hooks.on_queued(time.monotonic() - started - aside_seconds)
            phase = time.monotonic()
            async with self._progress_writer(record, hooks.on_started) as on_progress:
                try:
                    result = await self._wait(run_id, limit, on_progress, cancel)
                except asyncio.CancelledError:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(self.comfy.cancel(run_id))
                    raise
            executed(result.execution_seconds)
            patience = time.monotonic() + self.storage_patience
            record.timing("wait", time.monotonic() - phase)
            record.timing("execute", result.execution_seconds)

            phase = time.monotonic()
            outputs = await self._publish(job, graph, result, patience, record)
            record.succeeded(outputs, result.texts)
            record.timing("publish", time.monotonic() - phase)
            verdict = Verdict.succeeded
        except LeaseLost as lost:
            executed(0.0)
            return self._dropped(job, record, lost, run_id, result is None)
        except asyncio.CancelledError:
            executed(0.0)
            record.given_back()
            if hooks.on_given_back is not None:
                hooks.on_given_back(record.status)
            with contextlib.suppress(Exception):
                await asyncio.shield(record.save())
            raise
        except Exception as error:
            executed(0.0)
            verdict, charged = self._failed(job, record, error)
        finally:
            pins.close()
            # Clean up after failures too: an attempt that staged inputs and then failed must
            # not leave them in ComfyUI's input folder, or a warm worker's disk creeps up.
            if self.cleanup is not None and (result is not None or staged_any):
                done = result or RunResult(run_id, [], {}, [], 0.0)
                with contextlib.suppress(Exception):
                    await self.cleanup(done, subfolder if staged_any else None)
        status = record.status
        record.timing("total", time.monotonic() - started)
        if verdict is Verdict.succeeded:
            log.info(
                "job %s succeeded in %.2f s (ComfyUI %.2f s), %d output(s)",
                job.id,
                status.timings["total"],
                status.timings.get("execute", 0.0),
                len(status.outputs),
                extra={
                    "job_id": job.id,
                    "attempt": attempt,
                    "state": status.state.value,
                    "seconds": status.timings["total"],
                    "outputs": len(status.outputs),
                },
            )
        try:
            if patience is not None:  # ComfyUI's work is in it: worth waiting for storage
                await _patiently("writing its status", job.id, patience, record.save)
            else:
                await record.save()
        except LeaseLost as lost:
            return self._dropped(job, record, lost, run_id, False)
        except Exception as error:  # storage trouble: the result is not recorded, so not done
            log.error("job %s: could not write its status: %s", job.id, error)
            if verdict is not Verdict.failed:
                return JobOutcome(Verdict.retry, status, charged=False)
            return JobOutcome(verdict, status, charged)
        if status.state in FINAL:
            self.book.announce_final(status, job.notify_url)
        return JobOutcome(verdict, status, charged)

    def _time_limit(self, job: Job) -> TimeLimit:
        """The manifest's ``timeout_s`` when it is below the worker's COMFYS3_JOB_TIMEOUT,
        which caps it, else the worker's."""
        worker = self.limits.job_timeout
        if job.timeout_s is not None and job.timeout_s < worker:
            return TimeLimit(seconds=job.timeout_s, source=OWN_TIMEOUT)
        return TimeLimit(seconds=worker, source=JOB_TIMEOUT)

    async def _wait(
        self,
        run_id: str,
        limit: TimeLimit,
        on_progress: Callable[[Progress], None],
        cancel: CancelSignal | None,
    ) -> RunResult:
        """ComfyUI's result, unless the time limit or a cancel ends the prompt first."""
        own = RunLimit(limit.seconds, OWN_TIMEOUT) if limit.source == OWN_TIMEOUT else None
        waiting = asyncio.ensure_future(
            self.comfy.wait_for(
                run_id,
                timeout=self.limits.job_timeout,
                on_progress=on_progress,
                run_limit=own,
            )
        )
        try:
            if cancel is not None:
                asked = asyncio.ensure_future(cancel.wait())
                try:
                    await asyncio.wait({waiting, asked}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    asked.cancel()
                if not waiting.done():
                    try:
                        await self.comfy.cancel(run_id)
                    except ComfyError as error:
                        log.warning("job prompt %s: could not stop it: %s", run_id, error)
                    waiting.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await waiting
                    raise cancel.error("while it ran")
            return await waiting
        except ComfyTimeout as error:
            if error.details.get("limit") != OWN_TIMEOUT:
                raise
            raise JobTimeLimitExceeded(
                f"the job ran longer than its manifest's timeout_s ({limit.seconds:g} s, "
                f"below COMFYS3_JOB_TIMEOUT={self.limits.job_timeout:g} s) and was "
                "cancelled on ComfyUI",
                error.details,
            ) from None
        finally:
            waiting.cancel()

    async def _cancelled_before_start(
        self, job: Job, record: AttemptRecord, cancel: CancelSignal
    ) -> JobOutcome:
        """Nothing of the job reached ComfyUI: its status says cancelled (an earlier success
        of the same id stands)."""
        info, _ = describe(cancel.error("before it started"))
        status, kept = await self.book.cancelled_before_start(job, record, info)
        log.info("job %s: %s", job.id, info.message, extra={"job_id": job.id, "state": "cancelled"})
        if kept:
            return JobOutcome(Verdict.skipped, status)
        return JobOutcome(Verdict.cancelled, status, charged=False)

    def _dropped(
        self, job: Job, record: AttemptRecord, lost: LeaseLost, run_id: str, running: bool
    ) -> JobOutcome:
        """This attempt lost its claim (its worker was frozen or cut off past its lease, and
        another took the job over): it writes nothing more, and its prompt, if still running,
        is stopped, since the new holder runs the job again."""
        log.warning(
            "job %s: %s; this try's results are dropped, not published",
            job.id,
            lost,
            extra={"job_id": job.id, "attempt": record.status.attempt, "state": "lost"},
        )
        if running:
            task = asyncio.ensure_future(self.comfy.cancel(run_id))
            task.add_done_callback(lambda done: done.cancelled() or done.exception())
        return JobOutcome(Verdict.lost, record.status, charged=False)

    def _failed(self, job: Job, record: AttemptRecord, error: Exception) -> tuple[Verdict, bool]:
        """Record a failed attempt: (verdict, whether the attempt counts). The retry table
        decides; the status book words it."""
        info, policy = describe(error)
        if isinstance(error, JobCancelled):
            record.cancelled(info)
            log.info("job %s: %s", job.id, info.message, extra={"job_id": job.id})
            return Verdict.cancelled, False
        status = record.status
        retrying = will_retry(policy, status.attempt, status.max_attempts or status.attempt)
        record.failed(info, retrying=retrying, charged=policy.charge)
        if policy.retry and not retrying:
            record.gave_up()
        if policy.internal:
            log.error("job %s attempt %d: internal error", job.id, status.attempt, exc_info=error)
        log.warning(
            "job %s attempt %d %s: %s: %s",
            job.id,
            status.attempt,
            "will be retried" if retrying else "failed",
            info.type,
            info.message,
            extra={
                "job_id": job.id,
                "attempt": status.attempt,
                "state": status.state.value,
                "error_type": info.type,
            },
        )
        return (Verdict.retry if retrying else Verdict.failed), policy.charge

    # -- phases ---------------------------------------------------------------------------

    def _model_cache(self, job: Job) -> ModelCache:
        if self.models is None:
            # Capability-aware claiming leaves such a manifest for a worker with a cache; this
            # is a runner without one (exec with no COMFYS3_MODEL_CACHE, say).
            raise CapabilityMissing(
                f"the manifest names {len(job.models)} model(s) and this worker keeps no model "
                "cache: set COMFYS3_MODEL_CACHE (or mount a network volume)",
                {"missing_models": [model.label for model in job.models]},
            )
        return self.models

    async def _stage_all(
        self, job: Job, subfolder: str, record: AttemptRecord, fetching: Callable[[], None]
    ) -> dict[str, str]:
        """Input files and models at once: a model download runs beside the input uploads."""
        if not job.models:
            return await self._stage_inputs(job, subfolder)
        cache = self._model_cache(job)
        started = time.monotonic()
        models = asyncio.ensure_future(cache.ensure_all(job.models, on_fetch=fetching))
        try:
            staged = await self._stage_inputs(job, subfolder)
        except BaseException:
            models.cancel()
            with contextlib.suppress(BaseException):
                await models
            raise
        record.models_ready(await models)
        record.timing("models", time.monotonic() - started)
        return staged

    async def _stage_inputs(self, job: Job, subfolder: str) -> dict[str, str]:
        async def stage_one(field_name: str, text: str) -> tuple[str, str]:
            try:  # never readable: invalid, as validate says, not missing
                source = readable_source(text)
            except InputInvalid as error:
                raise InputInvalid(f"input '{field_name}': {error}") from None
            data = await self._read_input(field_name, text, source)
            try:  # decoded in full, off the event loop: Pillow lets go of the GIL meanwhile
                await asyncio.to_thread(
                    check_image, data, text, max_pixels=self.limits.max_input_pixels
                )
            except InputInvalid as error:
                raise InputInvalid(f"input '{field_name}': {error}") from None
            name = await self.comfy.upload_input(data, source.file_name, subfolder)
            return field_name, name

        pairs = await asyncio.gather(*(stage_one(i.field, i.source) for i in job.inputs))
        return dict(pairs)

    async def _read_input(self, field_name: str, text: str, source: InputSource) -> bytes:
        """An input file's bytes, from storage, another bucket, or a URL (through the guard)."""
        limit = self.limits.max_input_bytes
        if source.kind == "url":
            return await self._fetch_input(field_name, source.url)
        store = self.inputs
        if source.kind == "s3":
            other = getattr(self.inputs, "in_bucket", None)
            if other is None:
                raise InputMissing(
                    f"input '{field_name}': {text!r} is in a bucket, and this worker reads no "
                    "bucket (s3:// inputs need a worker on S3)"
                )
            store = other(source.bucket)
        try:
            return (await store.get(source.key, max_bytes=limit)).data
        except ObjectNotFound:
            raise InputMissing(
                f"input '{field_name}': file {text!r} was not found "
                f"(looked for {store.location(source.key)})"
            ) from None
        except ObjectTooLarge as error:
            raise InputInvalid(f"input '{field_name}': {error} (COMFYS3_MAX_INPUT_BYTES)") from None

    async def _fetch_input(self, field_name: str, url: str) -> bytes:
        shown = display_url(url)
        if self.fetcher is None:
            raise InputInvalid(f"input '{field_name}': {shown}: this runner fetches no URLs")
        try:
            return await self.fetcher.read(url, max_bytes=self.limits.max_input_bytes)
        except FetchRefused as error:
            if refusal_status(error) == 404:
                raise InputMissing(f"input '{field_name}': {error}") from None
            hint = " (COMFYS3_MAX_INPUT_BYTES)" if "limit" in error.details else ""
            raise InputInvalid(f"input '{field_name}': {error}{hint}", error.details) from None
        except FetchError as error:
            raise FetchError(f"input '{field_name}': {error}", error.details) from None

    async def _publish(
        self,
        job: Job,
        graph: dict[str, Any],
        result: RunResult,
        patience: float,
        record: AttemptRecord,
    ) -> list[OutputRecord]:
        counters: dict[str, int] = {}
        plan = []
        for ref in result.files:
            counters[ref.node_id] = counters.get(ref.node_id, 0) + 1
            plan.append((ref, counters[ref.node_id]))
        limit = asyncio.Semaphore(UPLOAD_CONCURRENCY)

        async def publish_one(ref: OutputFile, index: int) -> OutputRecord | None:
            async with limit:
                try:
                    data = await self.comfy.fetch_output(ref)
                except ComfyError as error:
                    if ref.optional and error.details.get("kind") == "output_missing":
                        return None  # a preview of a file that is not an output of this job
                    raise
                prepared = prepare_output(
                    data, ref.filename, ref.kind, job.output, animated=ref.animated
                )
                class_type = str(graph.get(ref.node_id, {}).get("class_type", "node"))
                key = self.layout.output_key(
                    job.id, ref.node_id, class_type, index, prepared.ext, record.status.claim_try
                )
                if record.fence is not None:
                    await record.fence.ensure()  # nothing is published by a try that lost

                async def upload() -> object:
                    return await self.storage.put(
                        key, prepared.data, content_type=prepared.content_type
                    )

                await _patiently(f"uploading {key}", job.id, patience, upload)
                return OutputRecord(
                    key=key,
                    node_id=ref.node_id,
                    kind=ref.kind,
                    content_type=prepared.content_type,
                    bytes=len(prepared.data),
                    sha256=prepared.sha256,
                )

        published = await asyncio.gather(*(publish_one(ref, i) for ref, i in plan))
        return [record for record in published if record is not None]

    @contextlib.asynccontextmanager
    async def _progress_writer(
        self, record: AttemptRecord, on_started: Callable[[], None] | None = None
    ) -> Any:
        """Progress reaches the status at most once per ``progress_interval``, the first time
        after one interval: often enough to watch, rarely enough that a 50-step job does not
        become 50 S3 writes and a job shorter than the interval costs none."""
        latest: list[ProgressInfo] = []
        changed = asyncio.Event()
        started = _Once(on_started)

        def on_progress(progress: Progress) -> None:
            started()
            node = f"{progress.node_id} ({progress.node_type})" if progress.node_id else None
            info = ProgressInfo(
                fraction=max(0.0, min(1.0, progress.fraction)),
                node=node,
                step=progress.value if progress.max else None,
                steps=progress.max or None,
            )
            latest[:] = [info]
            changed.set()
            if self.on_progress is not None:
                self.on_progress(record.job_id, info)

        async def writer() -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), PROGRESS_INTERVAL)
            while True:
                await changed.wait()
                if stopping.is_set():
                    return
                changed.clear()
                record.progress(latest[-1])
                try:
                    await record.save()
                except StorageError as error:
                    log.warning("job %s: progress not saved: %s", record.job_id, error)
                except LeaseLost:
                    return  # publishing finds it out too, and drops the results
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), PROGRESS_INTERVAL)

        # Never cancel the writer mid-write: a write already sent could land after the final
        # status and turn a finished job back into "running". Ask it to stop and wait instead.
        stopping = asyncio.Event()
        task = asyncio.create_task(writer())
        try:
            yield on_progress
        finally:
            stopping.set()
            changed.set()
            await task


async def _patiently(
    what: str, job_id: str, deadline: float, write: Callable[[], Awaitable[object]]
) -> None:
    """Write, riding out storage trouble until ``deadline`` (monotonic).

    Used once ComfyUI has run the prompt: giving the job back then means running the prompt
    again, so a storage outage of a few seconds would cost GPU time, once for every prompt
    that finished during it. The worker waits up to a lease (``storage_patience``): that is
    how long other workers wait for it anyway.
    """
    pause = 0.5
    while True:
        try:
            await write()
            return
        except StorageError as error:
            if not policy_for(error).wait_out or time.monotonic() + pause > deadline:
                raise  # not an outage (waiting cannot help), or waited long enough
            log.warning(
                "job %s: %s failed, trying again in %.1f s: %s",
                job_id,
                what,
                pause,
                error,
                extra={"job_id": job_id},
            )
        await asyncio.sleep(pause)
        pause = min(pause * 2, 10.0)


@dataclass
class _Once:
    callback: Callable[..., None] | None
    fired: bool = field(default=False)

    def __call__(self, *args: Any) -> None:
        if not self.fired and self.callback is not None:
            self.fired = True
            self.callback(*args)


def _earlier(beginning: Beginning) -> JobOutcome:
    """The outcome of a job whose earlier run stands (nothing ran now)."""
    previous = beginning.previous
    assert previous is not None
    if beginning.begun is Begun.already_succeeded:
        return JobOutcome(Verdict.skipped, previous)
    verdict = {
        JobState.succeeded: Verdict.succeeded,
        JobState.cancelled: Verdict.cancelled,
    }.get(previous.state, Verdict.failed)
    return JobOutcome(verdict, previous, leftover=True)
