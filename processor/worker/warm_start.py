"""Warm start: run one job before claiming any, so the first user job does not pay the load.

ComfyUI loads a checkpoint the first time a prompt needs it (seconds to minutes for a large
model) and keeps it. ``COMFYS3_WARMUP`` names a job the worker runs once after ComfyUI is up
and before it claims anything, so that cost falls on no one:

    COMFYS3_WARMUP=solid                        a template, default payload
    COMFYS3_WARMUP='txt2img:{"steps": 1}'       a template and a payload (JSON object)
    COMFYS3_WARMUP=@/jobs/warm.json             a manifest file (a batch warms several models)

The warm-up runs with the same :class:`processor.job.runner.JobRunner` as every job, over a local
folder in a temporary directory, so it touches no bucket and its outputs are thrown away (and
removed from ComfyUI's folders by ``cleanup``). Input files named by a manifest file are read
relative to that file's folder; for a template, relative to the current folder.

A failed warm-up is logged as an ERROR with its readable reason and never raised: a worker whose
warm-up failed can still run jobs (maybe the warm-up named a model this image lacks), and the
operator sees why the first job was slow.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from processor.errors import Comfys3Error, ManifestError
from processor.job.manifest import Job, load_jobs
from processor.job.runner import Cleanup, Comfy, Verdict, runner_for
from processor.job.status import JobStatus
from processor.settings import WarmupSpec, WorkerSettings, parse_warmup
from processor.storage.layout import Layout
from processor.storage.local import LocalStorage
from processor.workflows import WorkflowRegistry

log = logging.getLogger("comfys3.warmup")

WARMUP_ID = "warmup"


@dataclass
class WarmupResult:
    """What the warm-up did. ``ran`` is False when none is configured."""

    ran: bool
    succeeded: bool = False
    spec: str | None = None
    seconds: float = 0.0
    execute_seconds: float = 0.0
    error: str | None = None
    statuses: list[JobStatus] = field(default_factory=list)


class _WarmupFailed(Comfys3Error):
    """A warm-up that cannot start; its message is the readable reason."""


def _load(spec: WarmupSpec, registry: WorkflowRegistry, settings: WorkerSettings) -> list[Job]:
    if spec.manifest_path is not None:
        try:
            data = spec.manifest_path.read_bytes()
        except OSError as error:
            raise _WarmupFailed(
                f"cannot read the manifest {spec.manifest_path}: {error.strerror or error}"
            ) from None
        key = spec.manifest_path.name
    else:
        document = {"id": WARMUP_ID, "workflow": spec.workflow, "payload": spec.payload}
        data, key = json.dumps(document).encode(), f"{WARMUP_ID}.json"
    try:
        return load_jobs(
            data,
            manifest_key=key,
            registry=registry,
            allow_raw=settings.jobs.allow_raw_workflows,
            max_bytes=settings.jobs.max_manifest_bytes,
        )
    except ManifestError as error:
        raise _WarmupFailed(f"the warm-up job is not valid: {error}") from None


def _inputs_root(spec: WarmupSpec) -> Path:
    if spec.manifest_path is not None:
        return spec.manifest_path.resolve().parent
    return Path.cwd()


async def warm_up(
    client: Comfy,
    registry: WorkflowRegistry,
    settings: WorkerSettings,
    *,
    cleanup: Cleanup | None = None,
) -> WarmupResult:
    """Run ``settings.host.warmup`` once on ``client``; never raises (except when cancelled)."""
    if settings.host.warmup is None:
        return WarmupResult(ran=False)
    started = time.monotonic()
    result = WarmupResult(ran=True, spec=settings.host.warmup)
    try:
        spec = parse_warmup(settings.host.warmup)
        result.spec = spec.describe()
        jobs = _load(spec, registry, settings)
        log.info("warm-up: running %s before claiming any job", result.spec)
        with tempfile.TemporaryDirectory(prefix="comfys3-warmup-") as scratch:
            async with (
                LocalStorage(Path(scratch)) as storage,
                LocalStorage(_inputs_root(spec)) as inputs,
            ):
                runner = runner_for(
                    settings,
                    storage=storage,
                    inputs=inputs,
                    comfy=client,
                    layout=Layout("input", "output"),
                    worker_id=f"{settings.host.worker_id or 'worker'} (warm-up)",
                    cleanup=cleanup,
                )
                for job in jobs:
                    outcome = await runner.run(job, attempt=1, max_attempts=1)
                    result.statuses.append(outcome.status)
                    result.execute_seconds += outcome.status.timings.get("execute", 0.0)
                    if outcome.verdict is not Verdict.succeeded:
                        error = outcome.status.error
                        reason = f"{error.type}: {error.message}" if error else "it failed"
                        raise _WarmupFailed(f"job {job.id} failed: {reason}")
        result.succeeded = True
    except _WarmupFailed as error:
        result.error = str(error)
    except Exception as error:  # a warm-up must never stop the worker
        result.error = f"{type(error).__name__}: {error}"
    result.seconds = round(time.monotonic() - started, 3)
    result.execute_seconds = round(result.execute_seconds, 3)
    if result.succeeded:
        log.info(
            "warm-up %s done in %.1f s (ComfyUI %.1f s); claiming jobs now",
            result.spec,
            result.seconds,
            result.execute_seconds,
            extra={"warmup": result.spec, "seconds": result.seconds},
        )
    else:
        log.error(
            "warm-up %s FAILED after %.1f s: %s. The worker goes on without it; its first job "
            "may pay the model load (fix or unset COMFYS3_WARMUP)",
            result.spec,
            result.seconds,
            result.error,
            extra={"warmup": result.spec, "error": result.error},
        )
    return result
