"""``comfys3 dispatch``: one RunPod request per manifest that lands in the bucket.

On RunPod a worker exists only while requests keep it alive, so a manifest uploaded to the
intake prefix needs someone to send ``{"input": {"manifest": KEY}}`` to the endpoint's ``/run``.
The dispatcher does, and nothing else: no GPU, no ComfyUI. It learns of manifests from the
bucket's S3 events (SQS), or by listing the intake prefix; the same logic runs as an AWS Lambda
handler (:mod:`triggers.events.lambda_dispatch`).

**Never twice while pending.** Before it sends, the dispatcher creates a marker,
``<input>/_dispatched/<name>.json``, with a conditional write (``If-None-Match: *``): of two
dispatchers (or two copies of one event) racing, one wins and sends; the other sees the marker
and does nothing. The marker holds the RunPod job id, when it was sent, how many requests this
manifest has had, and the manifest's ETag.

**When a marker is stale** (the manifest is still pending, so the request did not lead to a
run that ended): RunPod says its job ended (COMPLETED, FAILED, CANCELLED, TIMED_OUT: e.g. the
run was given back for a retry) or no longer knows it; or it has sat IN_QUEUE longer than
``COMFYS3_DISPATCH_TTL`` (it is cancelled, then sent again); or RunPod cannot be asked and the
marker is older than the TTL; or a send never finished (no job id after ``SEND_WINDOW``); or the
manifest's ETag changed (a new manifest of the same name). IN_PROGRESS is never stale: a worker
is on it now. A stale marker is replaced with ``If-Match`` on its ETag, so again only one
dispatcher sends. A marker younger than ``CHECK_AFTER`` is trusted without asking RunPod, so
duplicate events cost no RunPod call. After ``COMFYS3_DISPATCH_MAX_REQUESTS`` requests for one
manifest the dispatcher gives up on it, logs an error once, and leaves it pending for a person
(or a new upload, which resets the count).

**Clean-up.** A full sweep (at start and every ``COMFYS3_EVENTS_FALLBACK_INTERVAL``) lists the
markers, then the pending manifests, and deletes each marker whose manifest is no longer
pending: its job finished and the manifest moved to ``_done/`` or ``_failed/``. Listing markers
first means a marker written during the sweep is never judged against an older listing.
Markers are tiny and live in a sub-prefix no poll lists, so a few minutes' delay costs nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from processor import (
    DISPATCHED,
    DispatchSettings,
    Layout,
    ObjectNotFound,
    PreconditionFailed,
    S3Settings,
    S3Storage,
    SqsSettings,
    Storage,
    StorageError,
    WorkerSettings,
    load_dispatch_settings,
    load_s3_settings,
    load_sqs_settings,
    load_worker_settings,
    s3_layout,
)
from triggers.cli import logs
from triggers.events.runpod_api import TERMINAL, RunPodApi, RunPodError
from triggers.events.sqs import KeyOutcome, SqsEvents
from triggers.stopping import stop_on_signals

log = logging.getLogger("comfys3.dispatch")

CHECK_AFTER = 30.0  # a marker this young is trusted without asking RunPod
SEND_WINDOW = 600.0  # a marker without a job id this old belongs to a send that never finished
MAX_MARKER_BYTES = 16_384
CONCURRENCY = 8  # dispatches in flight at once (S3 + RunPod calls)


class Verdict(StrEnum):
    sent = "sent"  # a RunPod request went out now
    pending = "pending"  # an earlier request is still on its way
    gone = "gone"  # no pending manifest at that key
    ignored = "ignored"  # not a manifest key of this intake
    gave_up = "gave_up"  # too many requests for this manifest already
    failed = "failed"  # S3 or RunPod trouble: try again later


OUTCOME = {
    Verdict.sent: KeyOutcome.settled,
    Verdict.pending: KeyOutcome.settled,
    Verdict.gave_up: KeyOutcome.settled,
    Verdict.gone: KeyOutcome.gone,
    Verdict.ignored: KeyOutcome.ignored,
    Verdict.failed: KeyOutcome.released,
}


@dataclass(frozen=True)
class Dispatch:
    key: str
    verdict: Verdict
    job_id: str | None = None
    detail: str = ""


@dataclass
class Marker:
    manifest: str
    manifest_etag: str
    job_id: str | None
    dispatched_at: float
    requests: int
    dispatcher: str
    gave_up: bool = False

    def encode(self) -> bytes:
        document = asdict(self)
        document["dispatched"] = datetime.fromtimestamp(self.dispatched_at, UTC).isoformat()
        return json.dumps(document, indent=1).encode()

    @classmethod
    def decode(cls, data: bytes) -> Marker | None:
        """A marker read back; None when it is not one we could have written."""
        if len(data) > MAX_MARKER_BYTES:
            return None
        try:
            document = json.loads(data)
        except (ValueError, RecursionError):
            return None
        if not isinstance(document, dict):
            return None
        manifest, etag, job_id = (document.get(k) for k in ("manifest", "manifest_etag", "job_id"))
        at, requests, who = (document.get(k) for k in ("dispatched_at", "requests", "dispatcher"))
        if not (isinstance(manifest, str) and isinstance(etag, str) and isinstance(who, str)):
            return None
        if job_id is not None and not isinstance(job_id, str):
            return None
        if not isinstance(at, int | float) or isinstance(at, bool) or not math.isfinite(at):
            return None
        if not isinstance(requests, int) or isinstance(requests, bool) or requests < 0:
            return None
        return cls(
            manifest, etag, job_id, float(at), requests, who, document.get("gave_up") is True
        )


class Dispatcher:
    """Decides, per manifest key, whether a RunPod request goes out, and sends it."""

    def __init__(
        self,
        *,
        storage: Storage,
        layout: Layout,
        api: RunPodApi,
        settings: DispatchSettings,
        name: str,
        clock: Callable[[], float] = time.time,
        check_after: float = CHECK_AFTER,
        concurrency: int = CONCURRENCY,
    ) -> None:
        self._storage = storage
        self._layout = layout
        self._api = api
        self._settings = settings
        self._name = name
        self._clock = clock
        self._check_after = check_after
        self._slots = asyncio.Semaphore(concurrency)

    @property
    def markers_prefix(self) -> str:
        return f"{self._layout.input_dir}/{DISPATCHED}"

    async def dispatch(self, key: str) -> Dispatch:
        """One manifest key (from an event or a listing) -> at most one RunPod request."""
        if not self._layout.is_manifest(key):
            return Dispatch(key, Verdict.ignored, detail="not a manifest of this intake")
        async with self._slots:
            try:
                return await self._dispatch(key)
            except StorageError as error:
                log.warning("dispatching %s: %s", key, error)
                return Dispatch(key, Verdict.failed, detail=str(error))

    async def _dispatch(self, key: str) -> Dispatch:
        info = await self._storage.head(key)
        if info is None:
            return Dispatch(key, Verdict.gone)
        marker_key = self._layout.dispatched_key(self._layout.manifest_name(key))
        fresh = Marker(key, info.etag, None, self._clock(), 1, self._name)
        try:
            etag = await self._storage.put(
                marker_key, fresh.encode(), content_type="application/json", if_none_match=True
            )
        except PreconditionFailed:
            taken = await self._take_over(key, marker_key, info.etag)
            if isinstance(taken, Dispatch):
                return taken
            fresh, etag = taken
        return await self._send(key, marker_key, fresh, etag)

    async def _take_over(
        self, key: str, marker_key: str, manifest_etag: str
    ) -> Dispatch | tuple[Marker, str]:
        """A marker exists: leave it (pending / gave up), or replace it when stale."""
        try:
            stored = await self._storage.get(marker_key)
        except ObjectNotFound:  # cleaned up a moment ago: the next event or sweep decides
            return Dispatch(key, Verdict.pending, detail="marker just removed")
        marker = Marker.decode(stored.data)
        requests = 0
        if marker is not None and marker.manifest_etag == manifest_etag:
            if marker.gave_up:
                return Dispatch(key, Verdict.gave_up, marker.job_id)
            reason = await self._stale(marker)
            if reason is None:
                return Dispatch(key, Verdict.pending, marker.job_id)
            requests = marker.requests
            if requests >= self._settings.dispatch_max_requests:
                marker.gave_up = True
                with contextlib.suppress(StorageError):
                    await self._storage.put(
                        marker_key,
                        marker.encode(),
                        content_type="application/json",
                        if_match=stored.etag,
                    )
                log.error(
                    "giving up on %s after %d RunPod requests (COMFYS3_DISPATCH_MAX_REQUESTS); "
                    "last job %s: %s. Upload the manifest again to retry.",
                    key,
                    requests,
                    marker.job_id,
                    reason,
                    extra={"manifest": key, "runpod_job_id": marker.job_id},
                )
                return Dispatch(key, Verdict.gave_up, marker.job_id, reason)
            log.info("sending %s again: %s", key, reason, extra={"manifest": key})
        replacement = Marker(key, manifest_etag, None, self._clock(), requests + 1, self._name)
        try:
            etag = await self._storage.put(
                marker_key,
                replacement.encode(),
                content_type="application/json",
                if_match=stored.etag,
            )
        except PreconditionFailed:  # another dispatcher replaced it first
            return Dispatch(key, Verdict.pending, detail="another dispatcher sent it")
        return replacement, etag

    async def _stale(self, marker: Marker) -> str | None:
        """Why the request a marker records can no longer lead to a run, or None."""
        age = self._clock() - marker.dispatched_at
        if age < self._check_after:
            return None
        if marker.job_id is None:
            return f"a send started {age:.0f} s ago never finished" if age > SEND_WINDOW else None
        try:
            status = await self._api.status(marker.job_id)
        except RunPodError as error:
            if age > self._settings.dispatch_ttl:
                return f"RunPod cannot say what became of job {marker.job_id} ({error})"
            return None
        if status is None:
            return f"RunPod no longer knows job {marker.job_id}"
        if status in TERMINAL:
            return f"RunPod job {marker.job_id} ended {status} and the manifest is still pending"
        if status == "IN_QUEUE" and age > self._settings.dispatch_ttl:
            with contextlib.suppress(RunPodError):
                await self._api.cancel(marker.job_id)
            return f"RunPod job {marker.job_id} waited in the queue for {age:.0f} s"
        return None

    async def _send(self, key: str, marker_key: str, marker: Marker, etag: str) -> Dispatch:
        try:
            job_id = await self._api.run({"manifest": key})
        except RunPodError as error:
            log.error("RunPod request for %s failed: %s", key, error, extra={"manifest": key})
            # No request went out (or none we know of): free the manifest for the next try.
            with contextlib.suppress(StorageError):
                await self._storage.delete(marker_key)
            return Dispatch(key, Verdict.failed, detail=str(error))
        marker.job_id = job_id
        try:
            await self._storage.put(
                marker_key, marker.encode(), content_type="application/json", if_match=etag
            )
        except StorageError as error:  # the request is out; only the bookkeeping is late
            log.warning("%s: RunPod job %s sent, marker not updated: %s", key, job_id, error)
        log.info(
            "dispatched %s: RunPod job %s (request %d)",
            key,
            job_id,
            marker.requests,
            extra={"manifest": key, "runpod_job_id": job_id},
        )
        return Dispatch(key, Verdict.sent, job_id)

    async def sweep(self, *, full: bool = True) -> list[Dispatch]:
        """Dispatch what the listing shows. ``full``: also re-check manifests that have a
        marker (stale ones are sent again) and delete markers of finished manifests; otherwise
        only manifests without a marker are looked at (cheap enough for a short interval)."""
        markers = await self._storage.list(self.markers_prefix)
        listed = await self._storage.list(self._layout.input_dir)
        pending = [i.key for i in listed if self._layout.is_manifest(i.key)]
        names = {self._layout.manifest_name(k) for k in pending}
        marked = {self._layout.manifest_name(i.key) for i in markers}
        if full:
            for info in markers:
                if self._layout.manifest_name(info.key) not in names:
                    with contextlib.suppress(StorageError):
                        await self._storage.delete(info.key)
                        log.debug("removed %s: its manifest is no longer pending", info.key)
        todo = [k for k in pending if full or self._layout.manifest_name(k) not in marked]
        return list(await asyncio.gather(*(self.dispatch(k) for k in todo)))


# -- serving --------------------------------------------------------------------------------


async def serve(
    dispatcher: Dispatcher,
    *,
    stop: asyncio.Event,
    sqs: SqsSettings | None,
    s3: S3Settings,
    layout: Layout,
    poll_interval: float,
    fallback_interval: float,
) -> None:
    """Until ``stop``: keys from S3 events as they come, a full sweep at start and every
    ``fallback_interval``; without a queue, a cheap sweep every ``poll_interval`` instead."""
    if sqs is None:
        await _poll(dispatcher, stop, poll_interval, fallback_interval)
        return
    tasks: set[asyncio.Task[None]] = set()

    async def decide(key: str, ack: Callable[[Any], Awaitable[None]]) -> None:
        try:
            result = await dispatcher.dispatch(key)
        except Exception as error:  # a bug must not keep the message hidden until max_hold
            log.error("dispatching %s crashed: %r", key, error)
            await ack(KeyOutcome.released)
            return
        await ack(OUTCOME[result.verdict])

    def on_key(key: str, ack: Callable[[Any], Awaitable[None]]) -> None:
        task = asyncio.create_task(decide(key, ack), name=f"dispatch {key}")
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    events = SqsEvents(
        sqs=sqs,
        s3=s3,
        layout=layout,
        on_key=on_key,
        stop=stop,
        fallback_interval=fallback_interval,
    )
    async with events:
        await _sweep_logged(dispatcher, full=True)
        while not stop.is_set():
            await events.wait_for_work(False)
            if events.last_wake == "fallback":
                await _sweep_logged(dispatcher, full=True)
        if tasks:
            await asyncio.wait(tasks, timeout=30)


async def _poll(
    dispatcher: Dispatcher, stop: asyncio.Event, poll_interval: float, fallback: float
) -> None:
    next_full = 0.0
    while not stop.is_set():
        full = time.monotonic() >= next_full
        await _sweep_logged(dispatcher, full=full)
        if full:
            next_full = time.monotonic() + fallback
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), poll_interval)


async def _sweep_logged(dispatcher: Dispatcher, *, full: bool) -> list[Dispatch]:
    try:
        return await dispatcher.sweep(full=full)
    except StorageError as error:
        log.warning("listing the intake failed: %s", error)
        return []


def summarise(results: Iterable[Dispatch]) -> dict[str, Any]:
    counts: dict[str, int] = {v.value: 0 for v in Verdict}
    jobs = []
    for result in results:
        counts[result.verdict.value] += 1
        if result.job_id and result.verdict is Verdict.sent:
            jobs.append({"manifest": result.key, "runpod_job_id": result.job_id})
    return {**counts, "jobs": jobs}


def dispatcher_name() -> str:
    return f"dispatch-{socket.gethostname()}-{os.getpid()}"


@contextlib.asynccontextmanager
async def open_dispatcher(
    s3: S3Settings, settings: DispatchSettings, name: str
) -> AsyncIterator[Dispatcher]:
    """A dispatcher with its bucket and RunPod API open: the command's and the Lambda's."""
    async with (
        S3Storage(s3) as storage,
        RunPodApi(
            base_url=settings.runpod_api_url,
            endpoint_id=settings.runpod_endpoint_id,
            api_key=settings.runpod_api_key.get_secret_value(),
        ) as api,
    ):
        yield Dispatcher(
            storage=storage, layout=s3_layout(s3), api=api, settings=settings, name=name
        )


# -- the command ----------------------------------------------------------------------------


def cmd_dispatch(args: argparse.Namespace) -> int:
    logs.configure(args.log_format)
    s3 = load_s3_settings()
    settings = load_dispatch_settings()
    worker = load_worker_settings()
    sqs = load_sqs_settings() if args.events == "sqs" and not args.once else None
    return asyncio.run(_dispatch_command(args, s3, settings, worker, sqs))


async def _dispatch_command(
    args: argparse.Namespace,
    s3: S3Settings,
    settings: DispatchSettings,
    worker: WorkerSettings,
    sqs: SqsSettings | None,
) -> int:
    stop = stop_on_signals()
    layout = s3_layout(s3)
    async with open_dispatcher(s3, settings, dispatcher_name()) as dispatcher:
        if args.once:
            summary = summarise(await dispatcher.sweep(full=True))
            print(json.dumps(summary))
            return 1 if summary["failed"] else 0
        log.info(
            "dispatching manifests from s3://%s/%s/ to RunPod endpoint %s (%s)",
            s3.bucket_name,
            layout.input_dir,
            settings.runpod_endpoint_id,
            f"S3 events from {sqs.queue_url}" if sqs else "polling",
        )
        await serve(
            dispatcher,
            stop=stop,
            sqs=sqs,
            s3=s3,
            layout=layout,
            poll_interval=worker.triggers.poll_max_interval,
            fallback_interval=worker.triggers.events_fallback_interval,
        )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "dispatch",
        help="send one RunPod request per manifest that lands in S3",
        description="Turn manifests arriving in COMFYS3_S3_INPUT_DIR into RunPod serverless "
        'requests: one POST /run with {"input": {"manifest": KEY}} per manifest to the '
        "endpoint COMFYS3_RUNPOD_ENDPOINT_ID, authorised by RUNPOD_API_KEY. A marker under "
        "<input>/_dispatched/ (written with a conditional create) keeps two dispatchers, or "
        "two copies of one event, from sending a manifest twice; a request RunPod reports as "
        "ended while the manifest is still pending is sent again. Needs no GPU and no "
        "ComfyUI. See docs/events.md.",
    )
    parser.add_argument(
        "--events",
        choices=["sqs", "poll"],
        default="sqs",
        help="sqs: react to the bucket's S3 events from COMFYS3_SQS_QUEUE_URL, with a full "
        "listing every COMFYS3_EVENTS_FALLBACK_INTERVAL; poll: list the intake every "
        "COMFYS3_POLL_MAX_INTERVAL (default: sqs)",
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="one full sweep of the intake (send what is due, clean up markers), print the "
        "counts as JSON and exit: 1 if any request failed",
    )
    parser.add_argument(
        "--log-format", choices=["text", "json"], default="text", help="log line format"
    )
    parser.set_defaults(handler=cmd_dispatch)
