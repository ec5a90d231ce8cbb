"""``comfys3 run``, ``comfys3 status`` and ``comfys3 exec``: the commands that run jobs."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TextIO

from processor import (
    Counts,
    Job,
    JobRecord,
    JobState,
    JobStatus,
    Layout,
    LocalStorage,
    ManifestError,
    Ops,
    OpsServer,
    ProgressInfo,
    SettingsError,
    SqsSettings,
    StatusBook,
    Storage,
    StorageError,
    Verdict,
    WaitForWork,
    WorkerSettings,
    WorkflowRegistry,
    build_ops,
    load_jobs,
    load_s3_settings,
    load_sqs_settings,
    load_worker_settings,
    open_worker,
    parse_gpus,
    storage_from_env,
    validate_key,
)
from triggers.cli import backlog, logs
from triggers.cli.exec_folder import OUTPUT_PREFIX, OutputFolder
from triggers.cli.misplaced import MisplacedManifests
from triggers.cli.wait_line import WaitLine
from triggers.events.sqs import SqsEvents
from triggers.poll import AdaptiveInterval
from triggers.watch import FolderWatch

log = logging.getLogger("comfys3.worker")

# -- run ------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    logs.configure(args.log_format)
    settings = load_worker_settings()
    if args.gpus is not None:
        try:
            parse_gpus(args.gpus)
        except ValueError as error:
            raise SettingsError(f"--gpus {error}") from None
        settings = settings.replace(gpus=args.gpus)
    logs.to_volume(settings, args.log_format)
    sqs: SqsSettings | None = None
    if args.events == "sqs" and not args.once:
        if args.local is not None:
            raise SettingsError(
                "--events sqs reads S3 event notifications; a local folder (--local) is "
                "watched directly, so leave one of them out"
            )
        sqs = load_sqs_settings()
    storage, layout = storage_from_env(args.local)
    counts = asyncio.run(_run(args, settings, storage, layout, sqs))
    if args.once:
        print(f"done: {counts.describe()}")
    return 0


async def _run(
    args: argparse.Namespace,
    settings: WorkerSettings,
    storage: Storage,
    layout: Layout,
    sqs: SqsSettings | None = None,
) -> Counts:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # With events, an idle worker touches storage only at its fallback listing.
    listing = settings.triggers.events_fallback_interval if sqs is not None else 0.0
    ops = build_ops(settings, listing_interval=listing)

    def on_signal(signum: signal.Signals) -> None:
        if not stop.is_set():
            log.info(
                "%s: no new claims; running jobs get up to %g s to finish, then are given back",
                signum.name,
                settings.triggers.shutdown_grace,
            )
        ops.health.stopping()
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, on_signal, signum)
    async with contextlib.AsyncExitStack() as stack:
        if settings.metrics.port is not None:
            # First, so /livez answers (and /healthz says "not ready") while ComfyUI starts.
            server = OpsServer(
                ops.metrics, ops.health, host=settings.metrics.host, port=settings.metrics.port
            )
            try:
                await stack.enter_async_context(server)
            except OSError as error:
                raise SettingsError(str(error.strerror or error)) from None
        if settings.api.port is not None:
            # Before the worker, so jobs can be submitted while ComfyUI starts.
            from triggers.api.server import serving_api  # FastAPI loads only when it serves

            api_storage, _ = storage_from_env(args.local)
            await stack.enter_async_context(serving_api(settings, api_storage, layout))
        worker = await stack.enter_async_context(
            open_worker(storage=storage, layout=layout, settings=settings, ops=ops)
        )
        wait_for_work: WaitForWork | None = None  # --once: drain, then return
        may_list: Callable[[], bool] | None = None
        if args.once:
            pass
        elif args.local is not None:
            folder = Path(args.local) / layout.input_dir
            watch = FolderWatch(folder, stop, settings.triggers.poll_max_interval)
            wait_for_work = (await stack.enter_async_context(watch)).wait
        elif sqs is not None:
            events = await stack.enter_async_context(
                SqsEvents(
                    sqs=sqs,
                    s3=load_s3_settings(),
                    layout=layout,
                    stop=stop,
                    on_key=lambda key, ack: worker.hint(key, on_outcome=ack),
                    fallback_interval=settings.triggers.events_fallback_interval,
                    max_in_flight=settings.lane.lane_depth_max,
                    retry_visibility=max(1, round(settings.jobs.retry_delay)),
                )
            )
            wait_for_work = events.wait_for_work
            may_list = events.listing_due
        else:
            poll = AdaptiveInterval(
                settings.triggers.poll_min_interval, settings.triggers.poll_max_interval, stop
            )
            wait_for_work = poll.wait
        misplaced = MisplacedManifests(storage, layout)

        async def warn_misplaced() -> None:
            for warning in await misplaced.new_warnings():
                log.warning("%s", warning)

        work = worker.run(
            wait_for_work=wait_for_work,
            stop=stop,
            may_list=may_list,
            on_idle=warn_misplaced,
        )
        await _until_stopped(work, stop, settings.triggers.shutdown_grace)
    if stop.is_set():
        log.info("stopped: %s", worker.counts.describe(), extra=worker.counts.summary())
    return worker.counts


async def _until_stopped(
    work: Coroutine[Any, Any, Counts], stop: asyncio.Event, grace: float
) -> None:
    """On SIGTERM the worker stops claiming and finishes what it runs; past the grace period
    the running jobs are cancelled, which gives their claims back, so nothing is orphaned."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not task.done():
        done, _ = await asyncio.wait({task}, timeout=grace)
        if not done:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return
    task.result()  # a crash of the worker loop surfaces here, as a readable error


# -- status ---------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    if args.summary or args.job_id is None:
        return backlog.cmd_summary(args)
    storage, layout = storage_from_env(args.local)

    async def read() -> tuple[JobRecord, bool]:
        """The job's status record, and whether a manifest of that name still waits to be run."""
        validate_key(layout.status_key(args.job_id))  # a name no key can have: a usage error
        async with storage:
            record = await StatusBook(storage, layout).read_record(args.job_id)
            if not record.missing:
                return record, False
            try:
                waiting = await storage.head(layout.manifest_key(args.job_id)) is not None
            except StorageError:  # not a usable manifest name: there is simply no such job
                waiting = False
            return record, waiting

    try:
        record, waiting = asyncio.run(read())
    except StorageError as error:
        print(f"comfys3: {error}", file=sys.stderr)
        return 2
    where = record.key
    if record.missing:
        if waiting:
            print(
                f"job {args.job_id}: waiting: {layout.manifest_key(args.job_id)} has not been "
                f"claimed by a worker yet (no status at {where})"
            )
            return 0
        print(f"comfys3: no status for job {args.job_id!r} at {where}")
        return 1
    if record.status is None:  # the bucket is untrusted: a foreign or broken document
        print(f"comfys3: the status at {where} is {record.problem}")
        return 1
    if args.json:
        print(record.status.model_dump_json(indent=2))
        return 0
    print(describe_status(record.status))
    return 0


def describe_status(status: JobStatus) -> str:
    """The status for a person: the state first, then what they would look for next."""
    lines = [f"job {status.id}: {status.state.value} (attempt {status.attempt})"]
    if status.workflow:
        lines.append(f"  workflow  {status.workflow}")
    if status.worker:
        lines.append(f"  worker    {status.worker}")
    if status.manifest_key:
        lines.append(f"  manifest  {status.manifest_key}")
    if status.state is JobState.running:
        progress = status.progress
        where = f" at {progress.node}" if progress.node else ""
        lines.append(f"  progress  {progress.fraction:.0%}{where}")
    if status.time_limit is not None:
        limit = status.time_limit
        lines.append(f"  limit     {limit.seconds:g} s ({limit.source})")
    lines.append(f"  updated   {status.updated_at.isoformat(timespec='seconds')}")
    if status.timings:
        timings = ", ".join(f"{k} {v:.2f}s" for k, v in status.timings.items())
        lines.append(f"  timings   {timings}")
    for output in status.outputs:
        lines.append(f"  output    {output.key} ({output.content_type}, {output.bytes} bytes)")
    for node, texts in status.texts.items():
        for text in texts:
            flat = " ".join(text.split())
            lines.append(f"  text      node {node}: {flat[:200]}{'…' if len(flat) > 200 else ''}")
    if status.state is JobState.cancelled and status.error is not None:
        lines.append(f"  cancelled {status.error.message}")
    elif status.error is not None:
        lines.append(f"  error     {status.error.type}:")
        lines += [f"    {line}" for line in status.error.message.splitlines()]
    for note in status.notes:
        lines.append(f"  note      {note}")
    return "\n".join(lines)


# -- exec -----------------------------------------------------------------------------------


class ProgressBar:
    """One line on stderr, redrawn in place; plain lines when stderr is not a terminal."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._last = -1

    def __call__(self, job_id: str, progress: ProgressInfo) -> None:
        percent = int(progress.fraction * 100)
        step = f" step {progress.step}/{progress.steps}" if progress.step and progress.steps else ""
        node = f" {progress.node}" if progress.node else ""
        filled = percent // 5
        bar = f"[{'#' * filled}{'.' * (20 - filled)}] {percent:3d}% {job_id}{node}{step}"
        if self.tty:
            self.stream.write("\r" + bar.ljust(100)[:100])
            self.stream.flush()
        elif percent >= self._last + 10 or percent == 100:
            self._last = percent
            self.stream.write(bar + "\n")

    def close(self) -> None:
        """End this job's bar; the next job starts its own from 0%."""
        if self.tty:
            self.stream.write("\n")
        self._last = -1


def cmd_exec(args: argparse.Namespace) -> int:
    logs.configure("text", "ERROR")  # a failed job is reported once, below, not also logged
    settings = load_worker_settings()
    if args.comfyui_url:
        settings = settings.replace(comfyui_url=args.comfyui_url)
    if not settings.comfyui.url and settings.comfyui.path is None:
        print(
            "comfys3: no ComfyUI to run on: give --comfyui-url URL (a ComfyUI that runs), or "
            "set COMFYS3_COMFYUI_URL, or COMFYS3_COMFYUI_PATH to a ComfyUI checkout to start",
            file=sys.stderr,
        )
        return 2
    manifest = Path(args.manifest)
    try:
        data = manifest.read_bytes()
    except OSError as error:
        print(f"comfys3: cannot read {manifest}: {error.strerror}", file=sys.stderr)
        return 2
    registry = WorkflowRegistry.default(settings.jobs.workflows_dir)
    try:
        jobs = load_jobs(
            data,
            manifest_key=manifest.name,
            registry=registry,
            allow_raw=settings.jobs.allow_raw_workflows,
            max_bytes=settings.jobs.max_manifest_bytes,
        )
    except ManifestError as error:
        print(f"{manifest}: invalid manifest", file=sys.stderr)
        for problem in error.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return asyncio.run(_exec(jobs, settings, out))


async def _exec(jobs: list[Job], settings: WorkerSettings, out: Path) -> int:
    bar = ProgressBar()
    # Keys as a worker writes them (output/<job id>/...), files in out/<job id>/.
    layout = Layout("input", OUTPUT_PREFIX)
    failures = 0
    storage = OutputFolder(out)
    async with open_worker(
        storage=storage,
        inputs=LocalStorage(Path.cwd()),
        layout=layout,
        settings=settings,
        on_progress=bar,
        on_wait=WaitLine(),
        ops=Ops.quiet(),  # a try-out on one's own machine: no webhooks, no metrics
        shared=False,
    ) as worker:
        for job in jobs:
            outcome = await worker.runner.run(job, attempt=1, max_attempts=1)
            bar.close()
            folder = storage.path_of(layout.job_prefix(job.id))
            if outcome.verdict is Verdict.succeeded:
                print(f"{job.id}: succeeded -> {folder}/")
                for output in outcome.status.outputs:
                    print(f"  {storage.path_of(output.key)}")
            else:
                failures += 1
                error = outcome.status.error
                print(f"{job.id}: failed ({error.type if error else '?'})", file=sys.stderr)
                if error is not None:
                    for line in error.message.splitlines():
                        print(f"  {line}", file=sys.stderr)
            print(f"  status: {storage.path_of(layout.status_key(job.id))}")
    return 1 if failures else 0


# -- registration ---------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    run = subparsers.add_parser(
        "run",
        help="run jobs from S3 (or a local folder) until stopped",
        description="""
            Poll COMFYS3_S3_INPUT_DIR for job manifests, claim them, run them on ComfyUI and
            write outputs and status.json under COMFYS3_S3_OUTPUT_DIR/<job id>/. Many workers
            may share one bucket; at start the worker checks that the storage honours the
            conditional writes that keep them from running a job twice. SIGTERM finishes (or
            gives back) the running jobs and exits.
        """,
    )
    run.add_argument(
        "--once", action="store_true", help="drain what is pending, print counts and exit"
    )
    run.add_argument(
        "--local",
        type=Path,
        metavar="DIR",
        help="use a folder instead of S3: manifests in DIR/input, results in DIR/output; "
        "dropped manifests are picked up at once",
    )
    run.add_argument(
        "--events",
        choices=["poll", "sqs"],
        default="poll",
        help="how new manifests are noticed: poll lists the intake every "
        "COMFYS3_POLL_MIN_INTERVAL..COMFYS3_POLL_MAX_INTERVAL s; sqs claims each manifest the "
        "bucket's S3 event notifications announce on COMFYS3_SQS_QUEUE_URL, with a full "
        "listing every COMFYS3_EVENTS_FALLBACK_INTERVAL s for lost events (docs/events.md). "
        "Ignored with --once (default: poll)",
    )
    run.add_argument(
        "--gpus",
        metavar="IDS",
        help="start one ComfyUI per GPU and feed them all from one intake: GPU ids (0,1) or all "
        "(counted with nvidia-smi -L); needs COMFYS3_COMFYUI_PATH (default: COMFYS3_GPUS, "
        "else one ComfyUI)",
    )
    run.add_argument(
        "--log-format", choices=["text", "json"], default="text", help="log line format"
    )
    run.set_defaults(handler=cmd_run)

    status = subparsers.add_parser(
        "status",
        help="show a job's status, or how the whole backlog stands",
        description="""
            Print the status document of a job for a person (or --json for the document itself).
            With --summary instead of a job id: how many manifests wait, run, succeeded and
            failed, counted from listings alone (no document is read).
        """,
    )
    status.add_argument("job_id", metavar="JOB_ID", nargs="?")
    status.add_argument(
        "--json", action="store_true", help="print the raw status document (or the counts)"
    )
    status.add_argument("--local", type=Path, metavar="DIR", help="read from a local folder")
    backlog.register_options(status)
    status.set_defaults(handler=cmd_status)

    run_one = subparsers.add_parser(
        "exec",
        help="run one manifest on a ComfyUI, no S3",
        description="""
            Run one manifest against a ComfyUI (--comfyui-url, or one started from
            COMFYS3_COMFYUI_PATH) with no S3 at all. Input files are paths relative to the
            current folder; outputs and status.json go to DIR/<job id>/. Exit 0 on success, 1
            with the readable error on failure.
        """,
    )
    run_one.add_argument("manifest", metavar="MANIFEST", help="manifest file (JSON)")
    run_one.add_argument("--out", required=True, metavar="DIR", help="where results go")
    run_one.add_argument("--comfyui-url", metavar="URL", help="a running ComfyUI to use")
    run_one.set_defaults(handler=cmd_exec)


__all__ = ["describe_status", "register"]
