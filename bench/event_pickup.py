"""Polling vs S3 events, same machine, same run: how long a manifest waits before a worker
claims it (pickup latency, p50/p95), and how many S3 + SQS requests an idle worker makes a
minute.

moto's server plays S3 and SQS (it delivers the bucket's event notifications to the queue
itself), the fake ComfyUI runs the jobs. Each mode gets its own bucket, its own worker served as
`comfys3 run` serves it, and the same arrival pattern (random idle gaps, so pickups land at
every point of the poll back-off):

- ``poll``: the adaptive poll interval (COMFYS3_POLL_MIN_INTERVAL .. COMFYS3_POLL_MAX_INTERVAL);
- ``events``: :class:`triggers.events.sqs.SqsEvents` feeding the worker, with the full listing every
  COMFYS3_EVENTS_FALLBACK_INTERVAL behind it.

Requests are counted where they leave: a botocore ``before-send`` hook on the worker's S3
client and on the listener's SQS client.

    python bench/event_pickup.py [--modes poll events] [--idle 60] [--samples 20] [--max-gap 8]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from harness import percentiles, worker_for

from processor.settings import S3Settings, WorkerSettings
from processor.storage.layout import Layout
from processor.storage.s3 import S3Storage
from processor.worker.loop import Worker
from tests.s3_servers import S3Server, moto_s3_server, s3_settings_for
from tests.sqs_queues import notifying_queue
from tests.workers import FakeComfyProcess, fake_comfy_process, get_json, put_manifest, s3_client
from triggers.events.sqs import Ack, SqsEvents
from triggers.poll import AdaptiveInterval

WaitForWork = Callable[[bool], Awaitable[None]]


@dataclass
class Figures:
    mode: str
    idle_s3_per_minute: float
    idle_sqs_per_minute: float
    pickups: list[float]

    def report(self) -> dict[str, Any]:
        p50, p95 = percentiles(self.pickups)
        return {
            "mode": self.mode,
            "idle_s3_requests_per_minute": round(self.idle_s3_per_minute, 1),
            "idle_sqs_requests_per_minute": round(self.idle_sqs_per_minute, 1),
            "idle_requests_per_minute": round(
                self.idle_s3_per_minute + self.idle_sqs_per_minute, 1
            ),
            "pickup_samples": len(self.pickups),
            "pickup_p50_s": round(p50, 3),
            "pickup_p95_s": round(p95, 3),
            "pickup_max_s": round(max(self.pickups), 3),
        }


@contextlib.contextmanager
def moto_parts() -> Iterator[tuple[S3Server, FakeComfyProcess]]:
    with (
        tempfile.TemporaryDirectory(prefix="comfys3-bench-") as folder,
        moto_s3_server() as server,
        fake_comfy_process(Path(folder) / "fake", exec_delay=0.0) as fake,
    ):
        yield server, fake


class Counter:
    """Counts the HTTP requests a botocore client sends."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, **_: Any) -> None:
        self.count += 1


@contextlib.asynccontextmanager
async def poll_intake(
    server: S3Server, s3: S3Settings, worker: Worker, stop: asyncio.Event
) -> AsyncIterator[IntakeParts]:
    """What `comfys3 run` does without events: the adaptive poll interval."""
    defaults = WorkerSettings()
    interval = AdaptiveInterval(
        defaults.triggers.poll_min_interval, defaults.triggers.poll_max_interval, stop
    )
    yield interval.wait, lambda: 0, None


@contextlib.asynccontextmanager
async def events_intake(
    server: S3Server, s3: S3Settings, worker: Worker, stop: asyncio.Event
) -> AsyncIterator[IntakeParts]:
    """What `comfys3 run --events sqs` does: keys from the queue, the slow listing behind.

    Each announced key goes to the worker as a hint (claimed ahead of any listing); the
    message is deleted once the worker says what became of the manifest.
    """
    queue = notifying_queue(server, s3)

    def on_key(key: str, ack: Ack) -> None:
        worker.hint(key, on_outcome=ack)

    events = SqsEvents(
        sqs=queue.sqs,
        s3=s3,
        layout=Layout(s3.input_dir, s3.output_dir),
        on_key=on_key,
        stop=stop,
        fallback_interval=WorkerSettings().triggers.events_fallback_interval,
    )
    async with events:
        yield events.wait_for_work, lambda: events.requests, events.listing_due


IntakeParts = tuple[WaitForWork, Callable[[], int], Callable[[], bool] | None]
Intake = Callable[
    [S3Server, S3Settings, Worker, asyncio.Event],
    contextlib.AbstractAsyncContextManager[IntakeParts],
]
INTAKES: dict[str, Intake] = {"poll": poll_intake, "events": events_intake}


async def measure(
    mode: str,
    server: S3Server,
    fake: FakeComfyProcess,
    idle_s: float,
    samples: int,
    max_gap: float,
) -> Figures:
    s3 = s3_settings_for(server)
    client = s3_client(s3)
    storage = S3Storage(s3)
    s3_requests = Counter()
    async with worker_for(s3, fake, storage=storage) as worker:
        storage._client.meta.events.register("before-send.s3", s3_requests)
        stop = asyncio.Event()
        async with INTAKES[mode](server, s3, worker, stop) as parts:
            wait_for_work, sqs_requests, may_list = parts
            serving = asyncio.create_task(
                worker.run(wait_for_work=wait_for_work, stop=stop, may_list=may_list)
            )
            await asyncio.sleep(5)  # past start-up, into the idle back-off
            s3_before, sqs_before = s3_requests.count, sqs_requests()
            await asyncio.sleep(idle_s)
            idle_s3 = (s3_requests.count - s3_before) * 60 / idle_s
            idle_sqs = (sqs_requests() - sqs_before) * 60 / idle_s
            pickups = [
                await pickup(client, s3, f"{mode}-{n}", gap)
                for n, gap in enumerate(_gaps(samples, max_gap))
            ]
            stop.set()
            await serving
    return Figures(mode, idle_s3, idle_sqs, pickups)


def _gaps(samples: int, max_gap: float) -> list[float]:
    rng = random.Random(7)  # the same arrival pattern for every mode
    return [rng.uniform(0, max_gap) for _ in range(samples)]


async def pickup(client: Any, s3: S3Settings, name: str, gap: float) -> float:
    """Wait ``gap``, upload a manifest, return the seconds until its job was claimed (the
    status document's ``created_at``, written right after the claim)."""
    await asyncio.sleep(gap)
    written = time.time()
    await asyncio.to_thread(put_manifest, client, s3, name, {"workflow": "solid"})
    key = f"{s3.output_dir}/{name}/status.json"
    while True:
        await asyncio.sleep(0.02)
        with contextlib.suppress(Exception):
            status = await asyncio.to_thread(get_json, client, s3, key)
            return datetime.fromisoformat(status["created_at"]).timestamp() - written


async def run(modes: list[str], idle_s: float, samples: int, max_gap: float) -> None:
    with moto_parts() as (server, fake):
        for mode in modes:
            figures = await measure(mode, server, fake, idle_s, samples, max_gap)
            print(json.dumps(figures.report()), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", choices=list(INTAKES), default=list(INTAKES))
    parser.add_argument("--idle", type=float, default=60.0, help="idle seconds to count")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--max-gap", type=float, default=8.0)
    args = parser.parse_args()
    asyncio.run(run(args.modes, args.idle, args.samples, args.max_gap))


if __name__ == "__main__":
    main()
