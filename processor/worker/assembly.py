"""Assembling a worker from settings: storage, ComfyUI, templates, the lane.

Triggers call this instead of wiring the parts themselves, so polling, watching a folder,
``exec`` and RunPod run exactly the same worker, with the same settings.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from processor.comfy.process import ComfyEngine
from processor.comfy.waiting import WaitListener
from processor.job.runner import Comfy, ProgressHook, runner_for
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
    engine = ComfyEngine(settings, on_wait=on_wait) if comfy is None else None
    async with contextlib.AsyncExitStack() as stack:
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
        if comfy is not None:
            client, cleanup, url = comfy, None, "(given)"
        else:
            assert engine is not None
            client = await stack.enter_async_context(engine)
            cleanup, url = engine.cleanup, engine.url
        ops.health.set_comfy_check(lambda: client.connected)
        if engine is not None and engine.process is not None:
            engine.process.add_exit_listener(
                lambda code, restarting: (
                    None
                    if restarting
                    else ops.health.fatal(f"ComfyUI died ({code}) and will not be restarted")
                )
            )
        warmed = await warm_up(client, registry, settings, cleanup=cleanup)
        if warmed.ran:
            ops.metrics.warmup_finished(warmed.seconds, warmed.succeeded)
        log.info(
            "worker %s ready: %r, manifests from %s/, results to %s/, ComfyUI at %s, templates: %s",
            holder,
            storage,
            layout.input_dir,
            layout.output_dir,
            url,
            ", ".join(registry.names()),
            extra={"worker": holder, "comfyui": url},
        )
        runner = runner_for(
            settings,
            storage=storage,
            inputs=inputs,
            comfy=client,
            layout=layout,
            worker_id=holder,
            cleanup=cleanup,
            on_progress=on_progress,
            announce=ops.notify,
        )
        yield Worker(
            storage=storage,
            runner=runner,
            registry=registry,
            layout=layout,
            settings=settings,
            holder=holder,
            ops=ops,
        )
