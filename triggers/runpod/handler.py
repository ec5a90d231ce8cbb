"""The RunPod handler: each request becomes a manifest run by the same worker as ``comfys3 run``.

An inline job is written to the intake prefix as an ordinary manifest before it runs, so it
is claimed, retried, retired and reported exactly like one dropped into the bucket by hand,
and a poller sharing the bucket can never run it a second time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from processor import (
    ComfyError,
    Comfys3Error,
    JobOutcome,
    JobState,
    JobStatus,
    ManifestError,
    ObjectNotFound,
    S3Settings,
    SettingsError,
    StatusBook,
    Storage,
    StorageError,
    Worker,
    WorkerSettings,
    WorkflowLoadError,
    WorkflowRegistry,
    cancel_request,
    check_job_id,
    default_job_id,
    key_problems,
    load_jobs,
    open_storage,
    open_worker,
    put_new_manifest,
    s3_layout,
)
from triggers.runpod import worker_comfyui
from triggers.runpod.host import WorkerHost
from triggers.runpod.progress import (
    DEFAULT_INTERVAL,
    ProgressRelay,
    ProgressSender,
    runpod_progress_update,
)
from triggers.runpod.request import (
    FALLBACK_ID,
    Drain,
    InlineJob,
    InputError,
    NamedManifest,
    Request,
    manifest_key,
    parse_request,
)
from triggers.runpod.worker_comfyui import WorkerComfyuiJob, is_worker_comfyui

log = logging.getLogger("comfys3.runpod")


class HandlerError(Comfys3Error):
    """A request that was understood but cannot be served now; the message says why."""


class RunpodHandler:
    """``await handler(job)`` -> the answer RunPod returns to the caller.

    Errors come back as ``{"error": "..."}`` sentences, never as exceptions: the SDK would turn
    an exception into a traceback in the caller's answer.
    """

    def __init__(
        self,
        *,
        s3: S3Settings,
        settings: WorkerSettings,
        send_progress: ProgressSender = runpod_progress_update,
        progress_interval: float = DEFAULT_INTERVAL,
    ) -> None:
        self.s3 = s3
        self.settings = settings
        self.layout = s3_layout(s3)
        self.relay = ProgressRelay(send_progress, interval=progress_interval)
        self.host = WorkerHost(self._open_worker)
        self._registry: WorkflowRegistry | None = None

    def concurrency(self, current: int) -> int:
        """RunPod's ``concurrency_modifier``: a fixed number of jobs at once per worker."""
        del current
        return self.settings.runpod.runpod_concurrency

    def close(self) -> None:
        self.host.close()

    async def __call__(self, job: dict[str, Any]) -> dict[str, Any]:
        try:
            runpod_id = str(job.get("id") or FALLBACK_ID)
            request: Request | WorkerComfyuiJob
            if is_worker_comfyui(job.get("input")):
                request = worker_comfyui.parse(job["input"], runpod_id)
            else:
                request = parse_request(job.get("input"), runpod_id)
            if isinstance(request, InlineJob) and request.job_id not in (
                runpod_id,
                job["input"].get("id"),
            ):
                log.info("RunPod job %s: the inline job runs as job %s", runpod_id, request.job_id)
            answer = await self._serve(job, request)
        except (InputError, HandlerError) as error:
            answer = {"error": str(error)}
        except ManifestError as error:
            problems = "\n".join(f"  {problem}" for problem in error.problems)
            answer = {"error": f"invalid job input:\n{problems}"}
        except (ComfyError, StorageError, SettingsError, WorkflowLoadError) as error:
            answer = {"error": f"the worker could not run the job: {error}"}
        except Exception as error:
            log.exception("RunPod job %s failed unexpectedly", job.get("id"))
            answer = {"error": f"internal error ({type(error).__name__}): {error}"}
        if self.settings.runpod.refresh_worker:
            answer["refresh_worker"] = True
        return answer

    # -- the forms --------------------------------------------------------------------

    async def _serve(
        self, job: dict[str, Any], request: Request | WorkerComfyuiJob
    ) -> dict[str, Any]:
        if isinstance(request, WorkerComfyuiJob):
            return await self._serve_worker_comfyui(job, request)
        if isinstance(request, InlineJob):
            key, data = self._validated(request.document, request.job_id)

            async def inline(worker: Worker) -> dict[str, Any]:
                return await self._run_inline(worker, job, request, key, data)

            return await self.host.run(inline, on_cancel=self._canceller(job, request.job_id))
        if isinstance(request, NamedManifest):
            named = manifest_key(request.reference, self.layout)

            async def run_named(worker: Worker) -> dict[str, Any]:
                return await self._run_named(worker, job, named)

            return await self.host.run(
                run_named, on_cancel=self._canceller(job, default_job_id(named), named)
            )

        drain = request

        async def run_drain(worker: Worker) -> dict[str, Any]:
            return await self._drain(worker, job, drain)

        return await self.host.run(run_drain)

    def _validated(self, document: dict[str, Any], job_id: str) -> tuple[str, bytes]:
        """The manifest's key and bytes, checked in full (template, payload and input file
        names included) before the worker starts, so a bad request is refused at once and
        leaves nothing behind. Its ``priority`` goes into the key, as ``comfys3 submit`` does."""
        data = json.dumps(document).encode()
        jobs = load_jobs(
            data,
            manifest_key=self.layout.manifest_key(job_id),
            registry=self.registry,
            allow_raw=self.settings.jobs.allow_raw_workflows,
            max_bytes=self.settings.jobs.max_manifest_bytes,
        )
        problems = key_problems(jobs)
        if problems:
            raise ManifestError(problems)
        priority = jobs[0].priority if jobs else 0
        return self.layout.submit_key(job_id, priority), data

    def _canceller(
        self, job: dict[str, Any], job_id: str, key: str | None = None
    ) -> Callable[[Worker], Awaitable[None]]:
        """What RunPod's stop of this request does: the job (every job of a batch, named by
        its id) is cancelled like by ``comfys3 cancel``, on this worker at once and for any
        other through its cancel object. Its status says ``cancelled``; it is not given
        back to run again."""
        runpod_id = str(job.get("id") or FALLBACK_ID)

        async def cancel(worker: Worker) -> None:
            name = job_id
            if key is not None:  # a named manifest: the id it declares, if it can be read
                with contextlib.suppress(StorageError):
                    name = _peek((await worker.storage.get(key)).data, key)[0]
            log.info("RunPod stopped request %s: cancelling job %s", runpod_id, name)
            by = f"RunPod (request {runpod_id} was cancelled or timed out)"
            await worker.cancel([name], cancel_request(name, by))

        return cancel

    async def _put_manifest(self, storage: Storage, key: str, data: bytes, job_id: str) -> None:
        """Write an inline manifest, never over one that waits (its caller would get this
        request's answer, and this caller that one's); the one a finished run of this id
        leaves for its worker to move out is waited for a moment."""
        book = StatusBook(storage, self.layout)
        if not await put_new_manifest(storage, book, key, data, [job_id]):
            raise _already_waiting(key, job_id)

    async def _run_inline(
        self, worker: Worker, job: dict[str, Any], request: InlineJob, key: str, data: bytes
    ) -> dict[str, Any]:
        await self._put_manifest(worker.storage, key, data, request.job_id)
        with self.relay.watch(job, request.job_id):
            outcomes = await self._run_to_end(worker, key)
        return await self._answer(worker, key, outcomes, batch="batch" in request.document)

    async def _run_named(self, worker: Worker, job: dict[str, Any], key: str) -> dict[str, Any]:
        try:
            stored = await worker.storage.get(key)
        except ObjectNotFound:
            raise HandlerError(await self._missing(worker.storage, key)) from None
        job_id, batch = _peek(stored.data, key)
        with self.relay.watch(job, job_id):
            outcomes = await self._run_to_end(worker, key)
        return await self._answer(worker, key, outcomes, batch=batch)

    async def _serve_worker_comfyui(
        self, job: dict[str, Any], request: WorkerComfyuiJob
    ) -> dict[str, Any]:
        """A worker-comfyui request: checked whole (graph, then every image) before anything
        is written; its images kept beside the job, then the manifest; the answer in
        worker-comfyui's shape."""
        key, data = self._validated(request.manifest(self.layout), request.job_id)
        limits = self.settings.jobs
        images = await asyncio.to_thread(
            worker_comfyui.decode_images,
            request.used_images(),
            max_bytes=limits.max_input_bytes,
            max_pixels=limits.max_input_pixels,
        )
        mode = worker_comfyui.image_mode(request.images_as, self.settings.runpod.runpod_images)
        notes = [*request.notes, *request.unused_notes()]

        async def run(worker: Worker) -> dict[str, Any]:
            if await worker.storage.head(key) is not None:  # before its images are kept
                raise _already_waiting(key, request.job_id)
            await asyncio.gather(
                *(
                    worker.storage.put(
                        self.layout.upload_key(request.job_id, image.name),
                        image.data,
                        content_type=image.content_type,
                    )
                    for image in images
                )
            )
            await self._put_manifest(worker.storage, key, data, request.job_id)
            with self.relay.watch(job, request.job_id):
                outcomes = await self._run_to_end(worker, key)
            status = outcomes[0].status
            answer = await worker_comfyui.answer(
                worker.storage,
                self.layout,
                status,
                mode=mode,
                presign_seconds=self.settings.runpod.presign_seconds,
                notes=notes,
            )
            if status.state is not JobState.succeeded:
                answer["error"] = _failure_line(status)
            return answer

        return await self.host.run(run)

    async def _drain(self, worker: Worker, job: dict[str, Any], drain: Drain) -> dict[str, Any]:
        # The worker's counts run for its whole life; this drain's share is what came after.
        mark = len(worker.counts.outcomes)
        with self.relay.watch(job, None):
            await worker.run(max_manifests=drain.max_manifests, max_seconds=drain.max_seconds)
        counts = worker.counts.since(mark)
        answer: dict[str, Any] = dict(counts.summary())
        answer["jobs"] = [
            {"id": status.id, "state": status.state.value, "status_key": self._status_key(status)}
            for status in counts.statuses
        ]
        return answer

    # -- helpers --------------------------------------------------------------------------

    @property
    def registry(self) -> WorkflowRegistry:
        if self._registry is None:
            self._registry = WorkflowRegistry.default(self.settings.jobs.workflows_dir)
        return self._registry

    def _open_worker(self) -> AbstractAsyncContextManager[Worker]:
        return open_worker(
            storage=open_storage(self.s3, None),
            layout=self.layout,
            settings=self.settings,
            on_progress=self.relay,
        )

    async def _run_to_end(self, worker: Worker, key: str) -> list[JobOutcome]:
        """Run a manifest until its jobs are final, so the RunPod caller gets the final answer
        rather than "try later" (the worker retries as its retry table says)."""
        outcomes = await worker.run_to_end(key)
        if outcomes is None:
            raise HandlerError(
                f"manifest {key} is being run by another worker right now; its results "
                f"and status.json will appear under {self.layout.output_dir}/<job id>/"
            )
        if not outcomes:
            raise HandlerError(
                f"manifest {key} was gone when its turn came (another worker finished it); "
                f"see {self.layout.output_dir}/<job id>/status.json"
            )
        return outcomes

    async def _missing(self, storage: Storage, key: str) -> str:
        name = self.layout.manifest_name(key)
        for where, moved in (
            ("finished", self.layout.done_key(name)),
            ("failed", self.layout.failed_key(name)),
        ):
            if await storage.head(moved) is not None:
                return (
                    f"manifest {key} has already {where}: it was moved to {moved}; its "
                    f"status is under {self.layout.output_dir}/<job id>/status.json "
                    '(drop it in again, with "rerun": true, to run it again)'
                )
        return f"no manifest at {key} in bucket {self.s3.bucket_name}"

    async def _answer(
        self, worker: Worker, key: str, outcomes: list[JobOutcome], *, batch: bool
    ) -> dict[str, Any]:
        jobs = await asyncio.gather(*(self._job(worker.storage, o.status) for o in outcomes))
        answer: dict[str, Any] = dict(jobs[0]) if len(jobs) == 1 and not batch else {"jobs": jobs}
        failures = [
            _failure_line(outcome.status)
            for outcome in outcomes
            if outcome.status.state is not JobState.succeeded
        ]
        if failures:
            answer["error"] = "\n".join(failures)
        return answer

    async def _job(self, storage: Storage, status: JobStatus) -> dict[str, Any]:
        expires = self.settings.runpod.presign_seconds
        urls = await asyncio.gather(
            *(storage.presign_get(output.key, expires) for output in status.outputs)
        )
        return {
            "status": status.model_dump(mode="json"),
            "outputs": [
                {
                    "key": output.key,
                    "url": url,
                    "kind": output.kind,
                    "node_id": output.node_id,
                    "content_type": output.content_type,
                    "bytes": output.bytes,
                    "sha256": output.sha256,
                }
                for output, url in zip(status.outputs, urls, strict=True)
            ],
            "texts": status.texts,
        }

    def _status_key(self, status: JobStatus) -> str:
        return self.layout.status_key(status.id)


def _peek(data: bytes, key: str) -> tuple[str, bool]:
    """The job id a manifest will run under and whether it is a batch, read leniently: a broken
    manifest still runs (and fails with a readable status), it only routes progress."""
    try:
        document = json.loads(data)
    except ValueError:
        return default_job_id(key), False
    if not isinstance(document, dict):
        return default_job_id(key), False
    job_id = document.get("id")
    try:
        resolved = check_job_id(job_id) if isinstance(job_id, str) else default_job_id(key)
    except ValueError:
        resolved = default_job_id(key)
    return resolved, isinstance(document.get("batch"), list)


def _already_waiting(key: str, job_id: str) -> HandlerError:
    return HandlerError(
        f"a manifest {key} is already waiting to run; give this job another 'id', or "
        f'run that one with {{"manifest": "{job_id}.json"}}'
    )


def _failure_line(status: JobStatus) -> str:
    error = status.error
    if error is None:
        return f"job {status.id} {status.state.value}"
    return f"job {status.id} {status.state.value} ({error.type}): {error.message}"
