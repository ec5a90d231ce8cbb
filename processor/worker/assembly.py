"""Assembling a worker from settings: storage, ComfyUI, templates, the lane.

Triggers call this instead of wiring the parts themselves, so polling, watching a folder,
``exec`` and RunPod run exactly the same worker, with the same settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from processor.comfy.client import ComfyClient
from processor.comfy.gpus import gpus_of
from processor.comfy.process import ComfyEngine
from processor.comfy.waiting import WaitListener
from processor.job.runner import Cleanup, Comfy, ProgressHook, runner_for
from processor.models.cache import ModelCache
from processor.models.paths_config import cache_dir
from processor.ops.fetch_guard import Fetcher, fetch_policy
from processor.ops.metrics import CLOCK_WARN_SECONDS, describe_clock_offset
from processor.ops.parts import Ops, build_ops
from processor.ops.volume import worker_name
from processor.settings import S3Settings, WorkerSettings, load_s3_settings
from processor.storage.base import Storage
from processor.storage.claims_check import check_conditional_writes
from processor.storage.layout import Layout
from processor.storage.local import LocalStorage
from processor.storage.s3 import S3Storage
from processor.worker.loop import Worker
from processor.worker.warm_start import warm_up
from processor.workflows import WorkflowRegistry

log = logging.getLogger("comfys3.worker")

LOCAL_INPUT = "input"
LOCAL_OUTPUT = "output"


def s3_layout(settings: S3Settings) -> Layout:
    return Layout(settings.input_dir, settings.output_dir)


def local_layout() -> Layout:
    return Layout(LOCAL_INPUT, LOCAL_OUTPUT)


def open_storage(s3: S3Settings | None, local_root: Path | None) -> Storage:
    if local_root is not None:
        return LocalStorage(local_root)
    assert s3 is not None
    return S3Storage(s3)


def storage_from_env(local_root: Path | None) -> tuple[Storage, Layout]:
    """The storage a command works on: ``local_root`` when given (``--local DIR``), else S3
    from the COMFYS3_S3_* variables, which are only required in that case."""
    if local_root is not None:
        return LocalStorage(local_root), local_layout()
    s3 = load_s3_settings()
    return S3Storage(s3), s3_layout(s3)


def model_cache(settings: WorkerSettings, fetcher: Fetcher) -> ModelCache | None:
    """The cache of models manifests name, or None when this worker keeps none. A model used
    within a job timeout (and a half) is never evicted: a job of another worker sharing the
    volume may be loading it."""
    root = cache_dir(settings)
    if root is None:
        return None
    return ModelCache(
        root,
        max_bytes=int(settings.models.cache_max_gb * 1e9),
        fetcher=fetcher,
        recent_guard=1.5 * settings.jobs.job_timeout,
    )


@contextlib.asynccontextmanager
async def open_worker(
    *,
    storage: Storage,
    layout: Layout,
    settings: WorkerSettings,
    inputs: Storage | None = None,
    on_progress: ProgressHook | None = None,
    on_wait: WaitListener | None = None,
    ops: Ops | None = None,
    shared: bool = True,
    comfy: Comfy | None = None,
) -> AsyncIterator[Worker]:
    """A ready worker, the same for every trigger (``run``, ``exec``, RunPod): templates
    loaded, storage open and able to referee claims, ComfyUI answering and warmed up, and
    ``settings`` passed down whole, so no setting reaches one trigger and not another.

    Storage is checked before ComfyUI starts, so a wrong bucket fails in a second, not after a
    model load. ``ops`` (metrics, health, webhooks) is built from settings when not given; a
    trigger that serves /metrics passes its own. ``inputs``: where input files are read, when
    not from ``storage`` (``exec`` reads them from the current folder). ``shared``: other
    workers may use this storage, so it must referee claims; ``exec``'s output folder is its
    own. ``on_wait`` shows a person what the worker waits for (ComfyUI starting). ``comfy``: a
    ready client to use instead of attaching to or starting ComfyUI (bench/fleet.py runs
    hundreds of workers on in-process stand-ins); its owner opens and closes it.
    """
    registry = WorkflowRegistry.default(settings.jobs.workflows_dir)
    holder = worker_name(settings)
    ops = ops or build_ops(settings)
    fetcher = Fetcher(fetch_policy(settings))  # input and model URLs, through the one guard
    # One ComfyUI, or one per GPU (--gpus): each started, supervised and fed apart. None
    # when a ready client is given.
    gpus = gpus_of(settings) if comfy is None else []
    engines = (
        []
        if comfy is not None
        else [ComfyEngine(settings, on_wait=on_wait, gpu=gpu) for gpu in gpus]
        or [ComfyEngine(settings, on_wait=on_wait)]
    )
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(fetcher)
        await stack.enter_async_context(storage)
        if inputs is not None:
            await stack.enter_async_context(inputs)
        if shared and settings.lane.check_conditional_writes:
            await check_conditional_writes(storage, layout.claims_prefix, holder)
        ops.storage_ok()
        ops.health.set_clock_offset(storage.clock_offset)
        offset = storage.clock_offset()
        if offset is not None and abs(offset) >= CLOCK_WARN_SECONDS:
            log.warning("clock: %s", describe_clock_offset(offset))
        await ops.start()
        # Closed before storage: a webhook's record is written into its status.
        stack.push_async_callback(ops.aclose, min(5.0, settings.triggers.shutdown_grace))
        for engine in engines:
            stack.push_async_callback(engine.aclose)
        if comfy is None:
            clients = await _start_all(engines)
            for engine, client in zip(engines, clients, strict=True):
                _watch(engine, client, ops)
            comfies = [
                _Attached(client, engine.name, engine.url, engine.cleanup)
                for engine, client in zip(engines, clients, strict=True)
            ]
        else:
            ops.health.set_comfy_check(lambda: comfy.connected)
            comfies = [_Attached(comfy, "comfyui", "(given)", None)]
        models = model_cache(settings, fetcher)
        # Warm every ComfyUI at once: each loads the model for its own GPU.
        warmed = await asyncio.gather(
            *(warm_up(one.client, registry, settings, cleanup=one.cleanup) for one in comfies)
        )
        for warm in warmed:
            if warm.ran:
                ops.metrics.warmup_finished(warm.seconds, warm.succeeded)
        log.info(
            "worker %s ready: %r, manifests from %s/, results to %s/, ComfyUI at %s, templates: %s",
            holder,
            storage,
            layout.input_dir,
            layout.output_dir,
            ", ".join(f"{one.url} ({one.name})" for one in comfies) if gpus else comfies[0].url,
            ", ".join(registry.names()),
            extra={"worker": holder, "comfyui": comfies[0].url},
        )
        runners = [
            runner_for(
                settings,
                storage=storage,
                inputs=inputs,
                comfy=one.client,
                layout=layout,
                worker_id=holder,
                cleanup=one.cleanup,
                on_progress=on_progress,
                announce=ops.notify,
                fetcher=fetcher,
                models=models,
            )
            for one in comfies
        ]
        yield Worker(
            storage=storage,
            runner=runners[0],
            runner_name=comfies[0].name,
            more_runners=[
                (one.name, runner) for one, runner in zip(comfies[1:], runners[1:], strict=True)
            ],
            registry=registry,
            layout=layout,
            settings=settings,
            holder=holder,
            ops=ops,
        )


@dataclass(frozen=True)
class _Attached:
    """One ComfyUI a lane runs on: its client, and what the log and the runner need of it."""

    client: Comfy
    name: str
    url: str
    cleanup: Cleanup | None


async def _start_all(engines: list[ComfyEngine]) -> list[ComfyClient]:
    """Start every ComfyUI at once (each loads for a while); if one cannot start, the others
    are stopped too and its error, readable, is what the worker says."""
    tasks = [asyncio.ensure_future(engine.__aenter__()) for engine in engines]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _watch(engine: ComfyEngine, client: ComfyClient, ops: Ops) -> None:
    """Health follows each ComfyUI; one that dies is restarted by its own supervisor without
    stopping the others, and only one that will not come back makes the worker not live."""
    ops.health.set_comfy_check(lambda: client.connected, engine.name)
    which = f"ComfyUI ({engine.name})" if engine.gpu is not None else "ComfyUI"
    if engine.process is not None:
        engine.process.add_exit_listener(
            lambda code, restarting: (
                None
                if restarting
                else ops.health.fatal(f"{which} died ({code}) and will not be restarted")
            )
        )
