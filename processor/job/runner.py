"""One job, end to end on ComfyUI: stage inputs, queue, follow, publish outputs, report.

This knows nothing of claims or manifests' fate; :mod:`processor.worker.loop` decides those. Here
every failure becomes a :class:`JobOutcome` whose status already says what went wrong, so the
caller only chooses between "done", "try again" and "give up".
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Protocol

from processor.comfy.client import OutputFile, Progress, RunResult
from processor.comfy.node_errors import (
    ComfyDiedWhileWaiting,
    ComfyError,
    ComfyInterrupted,
    ComfyRuntimeError,
    ComfyTimeout,
    ComfyUnavailable,
    ComfyValidationError,
)
from processor.errors import ManifestError
from processor.job.inputs import InputInvalid, check_image
from processor.job.manifest import (
    ErrorInfo,
    Job,
    JobState,
    JobStatus,
    OutputRecord,
    ProgressInfo,
    utcnow,
)
from processor.job.outputs import prepare_output
from processor.logsafe import printable_logger
from processor.ops.webhooks import NotifyRecord
from processor.storage.base import (
    InvalidKey,
    ObjectNotFound,
    ObjectTooLarge,
    PreconditionFailed,
    Storage,
    StorageError,
    StoredObject,
    validate_key,
)
from processor.storage.layout import Layout

log = printable_logger("comfys3.job")


class Comfy(Protocol):
    """The part of :class:`processor.comfy.client.ComfyClient` a job needs (a seam for tests)."""

    async def upload_input(self, data: bytes, filename: str, subfolder: str) -> str: ...

    async def queue_prompt(self, graph: dict[str, Any], prompt_id: str) -> None: ...

    async def wait_for(
        self,
        prompt_id: str,
        *,
        timeout: float,
        on_progress: Callable[[Progress], None] | None = None,
        include_temp: bool = False,
    ) -> RunResult: ...

    async def fetch_output(self, ref: OutputFile) -> bytes: ...

    async def interrupt(self, prompt_id: str | None = None) -> None: ...


class ResultStore(Protocol):
    """Where a job's status and outputs go: the part of :class:`Storage` a job writes with."""

    async def get(self, key: str, *, max_bytes: int | None = None) -> StoredObject: ...

    async def put(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str = "application/octet-stream",
        if_none_match: bool = False,
        if_match: str | None = None,
    ) -> str: ...


Cleanup = Callable[[RunResult, str | None], Awaitable[None]]
# Send a final status to its webhook in the background: (manifest URL or None for the
# worker's default, message id, body, what to do with the delivery's record) -> sent at all.
Announce = Callable[[str | None, str, bytes, Callable[[NotifyRecord], Awaitable[None]]], bool]
ProgressHook = Callable[[str, ProgressInfo], None]


class InputMissing(Exception):
    """An input file the payload names is not in storage; uploading it later will not help
    this attempt, so the job fails at once, naming it."""


class Verdict(enum.Enum):
    succeeded = "succeeded"
    skipped = "skipped"
    retry = "retry"  # failed, and another attempt may succeed
    failed = "failed"  # failed, and another attempt cannot help


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


@dataclass
class JobSettings:
    worker_id: str
    job_timeout: float
    progress_interval: float = 1.0
    upload_concurrency: int = 8
    max_input_bytes: int = 50 * 1024 * 1024
    max_input_pixels: int = 64 * 1024 * 1024
    # Seconds to wait out storage trouble once ComfyUI has run the prompt, before giving the
    # job back (which runs the prompt again); the worker uses its lease, 0 gives up at once.
    storage_patience: float = 0.0


def classify(error: BaseException) -> tuple[ErrorInfo, bool]:
    """An exception -> (what the status says, whether another attempt could succeed)."""
    details: dict[str, Any] = dict(getattr(error, "details", {}) or {})
    retry = True
    if isinstance(error, ManifestError):
        kind, retry = "invalid_manifest", False
        details["problems"] = [{"path": p.path, "message": p.message} for p in error.problems]
    elif isinstance(error, InputMissing):
        kind, retry = "input_missing", False
    elif isinstance(error, InputInvalid):
        kind, retry = "input_invalid", False
    elif isinstance(error, ComfyValidationError):
        kind, retry = "validation", False
        details.setdefault("lines", error.lines)
    elif isinstance(error, ComfyRuntimeError):
        kind = "runtime"
    elif isinstance(error, ComfyTimeout):
        kind = "timeout"
    elif isinstance(error, ComfyInterrupted):
        kind = "interrupted"
    elif isinstance(error, ComfyUnavailable):
        kind = "comfyui_unavailable"
    elif isinstance(error, ComfyError):
        kind = "comfyui"
    elif isinstance(error, StorageError):
        kind = "storage"
    else:
        kind = "internal"
        details["exception_type"] = type(error).__name__
        details["traceback"] = "".join(traceback.format_exception(error))
    message = str(error) or type(error).__name__
    return ErrorInfo(type=kind, message=message, details=details), retry


class JobRunner:
    """Runs jobs on one ComfyUI, reading inputs from and writing results to storage."""

    def __init__(
        self,
        *,
        storage: ResultStore,
        comfy: Comfy,
        layout: Layout,
        settings: JobSettings,
        inputs: Storage | None = None,
        cleanup: Cleanup | None = None,
        on_progress: ProgressHook | None = None,
        announce: Announce | None = None,
    ) -> None:
        self.storage = storage
        self.inputs: Storage = inputs or storage  # type: ignore[assignment]
        self.comfy = comfy
        self.layout = layout
        self.settings = settings
        self.cleanup = cleanup
        self.on_progress = on_progress
        self.announce = announce

    # -- status ---------------------------------------------------------------------------

    async def read_status(self, job_id: str) -> JobStatus | None:
        try:
            stored = await self.storage.get(self.layout.status_key(job_id))
        except ObjectNotFound:
            return None
        try:
            status = JobStatus.model_validate_json(stored.data)
        except ValueError:
            return None  # a status we cannot read is treated as absent, never as success
        # Nor one that names another job: written back with a note, it would land in that
        # job's folder (or at no valid key at all).
        return status if status.id == job_id else None

    async def write_status(self, status: JobStatus, *, create: bool = False) -> None:
        """Write ``status``; with ``create``, only if the job has no status yet
        (:class:`PreconditionFailed` otherwise)."""
        status.updated_at = utcnow()
        await self.storage.put(
            self.layout.status_key(status.id),
            status.to_json(),
            content_type="application/json",
            if_none_match=create,
        )

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
    ) -> JobOutcome:
        """Run ``job`` once; never raises but for cancellation.

        ``resumed``: the manifest was claimed before (its claim existed), so this upload may
        already have run to its end, with only its retirement left undone.

        Only what the prompt needs happens before it is queued: the status that says the job
        runs (whose conditional write also tells whether this job already has a status) and
        the input files. ``hooks.on_executed`` fires when ComfyUI is done with it, which is
        when the lane may queue another prompt; publishing happens after.
        """
        hooks = hooks or LaneHooks()
        status = JobStatus(
            id=job.id,
            state=JobState.running,
            attempt=attempt,
            max_attempts=max_attempts,
            worker=self.settings.worker_id,
            manifest_key=job.manifest_key,
            manifest_version=manifest_version,
            workflow=job.workflow,
            payload=job.payload,
            metadata=job.metadata,
            notes=list(notes or []),
        )
        executed = _Once(hooks.on_executed)
        started = time.monotonic()
        charged = True
        run_id = str(uuid.uuid4())
        result: RunResult | None = None
        patience: float | None = None  # until when storage trouble is waited out
        subfolder = f"comfys3/{run_id}"
        staged_any = False
        try:
            earlier = await self._begin(job, status, resumed)
            if earlier is not None:
                executed(0.0)
                return earlier
            phase = time.monotonic()
            staged_any = bool(job.inputs)
            staged = await self._stage_inputs(job, subfolder)
            status.timings["stage"] = _since(phase)
            graph = job.filled_graph(staged, run_id)

            phase = time.monotonic()
            await self.comfy.queue_prompt(graph, run_id)
            status.timings["queue"] = _since(phase)
            if hooks.on_queued is not None:
                hooks.on_queued(time.monotonic() - started)
            phase = time.monotonic()
            async with self._progress_writer(status, hooks.on_started) as on_progress:
                try:
                    result = await self.comfy.wait_for(
                        run_id, timeout=self.settings.job_timeout, on_progress=on_progress
                    )
                except asyncio.CancelledError:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(self.comfy.interrupt(run_id))
                    raise
            executed(result.execution_seconds)
            patience = time.monotonic() + self.settings.storage_patience
            status.timings["wait"] = _since(phase)
            status.timings["execute"] = round(result.execution_seconds, 3)

            phase = time.monotonic()
            status.outputs = await self._publish(job, graph, result, patience)
            status.texts = result.texts
            status.timings["publish"] = _since(phase)
            status.state = JobState.succeeded
            status.progress = ProgressInfo(fraction=1.0, node=None)
            verdict = Verdict.succeeded
        except asyncio.CancelledError:
            executed(0.0)
            status.state = JobState.queued
            status.notes.append(
                f"attempt {attempt} was stopped with its worker; the job was given back "
                "and this try does not count"
            )
            with contextlib.suppress(Exception):
                await asyncio.shield(self.write_status(status))
            raise
        except Exception as error:
            executed(0.0)
            verdict, charged = self._failed(job, status, error, attempt, max_attempts)
        finally:
            # Clean up after failures too: an attempt that staged inputs and then failed must
            # not leave them in ComfyUI's input folder, or a warm worker's disk creeps up.
            if self.cleanup is not None and (result is not None or staged_any):
                done = result or RunResult(run_id, [], {}, [], 0.0)
                with contextlib.suppress(Exception):
                    await self.cleanup(done, subfolder if staged_any else None)
        status.timings["total"] = _since(started)
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
                await _patiently("writing its status", job.id, patience, self._write(status))
            else:
                await self.write_status(status)
        except Exception as error:  # storage trouble: the result is not recorded, so not done
            log.error("job %s: could not write its status: %s", job.id, error)
            if verdict is not Verdict.failed:
                return JobOutcome(Verdict.retry, status, charged=False)
            return JobOutcome(verdict, status, charged)
        if status.state in (JobState.succeeded, JobState.failed):
            self.announce_final(status, job.notify_url)
        return JobOutcome(verdict, status, charged)

    # -- webhooks -------------------------------------------------------------------------

    def announce_final(self, status: JobStatus, manifest_url: str | None) -> None:
        """Send a final status to its webhook without waiting; the delivery's record is
        written back into that status when it is known."""
        if self.announce is None:
            return
        sent = status.model_copy(deep=True)

        async def record(result: NotifyRecord) -> None:
            await self._record_notify(sent, result)

        self.announce(manifest_url, f"msg_{uuid.uuid4().hex}", sent.to_json(), record)

    async def _record_notify(self, sent: JobStatus, record: NotifyRecord) -> None:
        """Put the webhook's record into the status it announced, unless a newer run has
        replaced that status since: a conditional write, re-read if a note slipped in."""
        key = self.layout.status_key(sent.id)
        for _ in range(3):
            try:
                stored = await self.storage.get(key)
                current = JobStatus.model_validate_json(stored.data)
            except (StorageError, ValueError) as error:
                log.warning("job %s: webhook record not saved: %s", sent.id, error)
                return
            if (current.attempt, current.state, current.manifest_version) != (
                sent.attempt,
                sent.state,
                sent.manifest_version,
            ):
                return  # a newer run owns the status now
            current.notify = record
            current.updated_at = utcnow()
            try:
                await self.storage.put(
                    key, current.to_json(), content_type="application/json", if_match=stored.etag
                )
                return
            except PreconditionFailed:
                continue
            except StorageError as error:
                log.warning("job %s: webhook record not saved: %s", sent.id, error)
                return

    async def _begin(self, job: Job, status: JobStatus, resumed: bool) -> JobOutcome | None:
        """Write the "running" status, and learn from the same conditional write whether this
        job already has one. ``None``: go on and run it; otherwise the outcome that stands.

        - no status yet (nearly every job): the create is the only request;
        - a final status written for this very upload of a manifest claimed before: it ran to
          its end and only its retirement was cut short (an outage between status and move),
          so it is retired now, not run again. A fresh claim never means this: the same bytes
          uploaded again within a second (S3 times have one-second steps) still run;
        - an earlier success of the same id: not run again unless the manifest says ``rerun``;
        - anything else (an earlier failure, an attempt cut short): run, and say so.
        """
        try:
            await self.write_status(status, create=True)
            return None
        except PreconditionFailed:
            previous = await self.read_status(job.id)
        if (
            resumed
            and previous is not None
            and previous.state in (JobState.succeeded, JobState.failed)
            and status.manifest_version is not None
            and previous.manifest_version == status.manifest_version
        ):
            verdict = Verdict.succeeded if previous.state is JobState.succeeded else Verdict.failed
            return JobOutcome(verdict, previous, leftover=True)
        if previous is not None and previous.state is JobState.succeeded and not job.rerun:
            previous.notes.append(
                f"manifest {job.manifest_key} arrived again and was not run: "
                'this id already succeeded (set "rerun": true to run it again)'
            )
            await self.write_status(previous)
            return JobOutcome(Verdict.skipped, previous)
        await self.write_status(status)
        return None

    def _failed(
        self, job: Job, status: JobStatus, error: Exception, attempt: int, max_attempts: int
    ) -> tuple[Verdict, bool]:
        """Record a failed attempt in ``status``: (verdict, whether the attempt counts)."""
        info, retryable = classify(error)
        status.error = info
        verdict = Verdict.retry if retryable else Verdict.failed
        charged = True
        if isinstance(error, ComfyDiedWhileWaiting):
            charged = False
            status.state = JobState.queued
            status.notes.append(
                f"attempt {attempt} did not run: ComfyUI died while another job ran; "
                "it will be retried and this try does not count"
            )
        elif verdict is Verdict.retry and attempt < max_attempts:
            status.state = JobState.queued
            status.notes.append(
                f"attempt {attempt} of {max_attempts} failed ({info.type}); it will be retried"
            )
        else:
            status.state = JobState.failed
            if verdict is Verdict.retry:
                status.notes.append(f"gave up after {attempt} attempt(s)")
            verdict = Verdict.failed
        if info.type == "internal":
            log.error("job %s attempt %d: internal error", job.id, attempt, exc_info=error)
        log.warning(
            "job %s attempt %d %s: %s: %s",
            job.id,
            attempt,
            "failed" if status.state is JobState.failed else "will be retried",
            info.type,
            info.message,
            extra={
                "job_id": job.id,
                "attempt": attempt,
                "state": status.state.value,
                "error_type": info.type,
            },
        )
        return verdict, charged

    async def fail(
        self,
        job_id: str,
        manifest_key: str,
        error: BaseException,
        *,
        manifest_version: str | None = None,
    ) -> JobStatus:
        """Record a job that never got to run (broken manifest, out of attempts)."""
        info, _ = classify(error)
        status = JobStatus(
            id=job_id,
            state=JobState.failed,
            worker=self.settings.worker_id,
            manifest_key=manifest_key,
            manifest_version=manifest_version,
            error=info,
        )
        await self.write_status(status)
        return status

    # -- phases ---------------------------------------------------------------------------

    async def _stage_inputs(self, job: Job, subfolder: str) -> dict[str, str]:
        async def stage_one(field_name: str, source: str) -> tuple[str, str]:
            try:
                key = validate_key(source)
            except StorageError as error:
                raise InputMissing(f"input '{field_name}': {error}") from None
            try:
                stored = await self.inputs.get(key, max_bytes=self.settings.max_input_bytes)
            except ObjectNotFound:
                raise InputMissing(
                    f"input '{field_name}': file {source!r} was not found "
                    f"(looked for {self.inputs.location(key)})"
                ) from None
            except ObjectTooLarge as error:
                raise InputInvalid(
                    f"input '{field_name}': {error} (COMFYS3_MAX_INPUT_BYTES)"
                ) from None
            try:
                check_image(stored.data, source, max_pixels=self.settings.max_input_pixels)
            except InputInvalid as error:
                raise InputInvalid(f"input '{field_name}': {error}") from None
            name = await self.comfy.upload_input(stored.data, PurePosixPath(key).name, subfolder)
            return field_name, name

        pairs = await asyncio.gather(*(stage_one(i.field, i.source) for i in job.inputs))
        return dict(pairs)

    def _write(self, status: JobStatus) -> Callable[[], Awaitable[object]]:
        return lambda: self.write_status(status)

    async def _publish(
        self, job: Job, graph: dict[str, Any], result: RunResult, patience: float
    ) -> list[OutputRecord]:
        counters: dict[str, int] = {}
        plan = []
        for ref in result.files:
            counters[ref.node_id] = counters.get(ref.node_id, 0) + 1
            plan.append((ref, counters[ref.node_id]))
        limit = asyncio.Semaphore(self.settings.upload_concurrency)

        async def publish_one(ref: OutputFile, index: int) -> OutputRecord:
            async with limit:
                data = await self.comfy.fetch_output(ref)
                prepared = prepare_output(data, ref.filename, ref.kind, job.output)
                class_type = str(graph.get(ref.node_id, {}).get("class_type", "node"))
                key = self.layout.output_key(job.id, ref.node_id, class_type, index, prepared.ext)

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

        return list(await asyncio.gather(*(publish_one(ref, i) for ref, i in plan)))

    @contextlib.asynccontextmanager
    async def _progress_writer(
        self, status: JobStatus, on_started: Callable[[], None] | None = None
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
                self.on_progress(status.id, info)

        async def writer() -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), self.settings.progress_interval)
            while True:
                await changed.wait()
                if stopping.is_set():
                    return
                changed.clear()
                status.progress = latest[-1]
                try:
                    await self.write_status(status)
                except StorageError as error:
                    log.warning("job %s: progress not saved: %s", status.id, error)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), self.settings.progress_interval)

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
        except (InvalidKey, PreconditionFailed, ObjectTooLarge):
            raise  # not an outage: waiting cannot help
        except StorageError as error:
            if time.monotonic() + pause > deadline:
                raise
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


def _since(start: float) -> float:
    return round(time.monotonic() - start, 3)
