"""An idle worker with the default poll settings: its S3 requests per minute, and how long a
manifest waits before it is claimed (pickup latency, p50 and p95).

SeaweedFS on loopback and the fake ComfyUI; the worker serves as `comfys3 run` does (adaptive
poll interval from COMFYS3_POLL_MIN_INTERVAL / COMFYS3_POLL_MAX_INTERVAL). Manifests arrive
after random idle gaps, so pickups land at every point of the back-off.

    python bench/idle_worker.py [--idle 60] [--samples 20] [--max-gap 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from typing import Any

from harness import percentiles, real_parts, worker_for

from processor.settings import WorkerSettings
from processor.storage.s3 import S3Storage
from tests.workers import get_json, put_manifest, s3_client
from triggers.poll import AdaptiveInterval


async def measure(idle_s: float, samples: int, max_gap: float) -> None:
    defaults = WorkerSettings()
    with real_parts(0.0) as (s3, fake):
        client = s3_client(s3)
        storage = S3Storage(s3)
        requests: list[str] = []
        async with worker_for(s3, fake, storage=storage) as worker:
            storage._client.meta.events.register(
                "before-send.s3", lambda request, **_: requests.append(request.method)
            )
            stop = asyncio.Event()
            interval = AdaptiveInterval(
                defaults.triggers.poll_min_interval, defaults.triggers.poll_max_interval, stop
            )
            serving = asyncio.create_task(worker.run(wait_for_work=interval.wait, stop=stop))

            await asyncio.sleep(5)  # past start-up, into the idle back-off
            before = len(requests)
            await asyncio.sleep(idle_s)
            idle_per_minute = (len(requests) - before) * 60 / idle_s

            latencies: list[float] = []
            rng = random.Random(7)
            for n in range(samples):
                await asyncio.sleep(rng.uniform(0, max_gap))
                written = time.time()
                await asyncio.to_thread(put_manifest, client, s3, f"p{n}", {"workflow": "solid"})
                status: Any = None
                while status is None:
                    await asyncio.sleep(0.05)
                    try:
                        status = await asyncio.to_thread(
                            get_json, client, s3, f"{s3.output_dir}/p{n}/status.json"
                        )
                    except Exception:
                        status = None
                created = status["created_at"]
                claimed = _epoch(created)
                latencies.append(claimed - written)
            stop.set()
            await serving
        p50, p95 = percentiles(latencies)
        print(
            json.dumps(
                {
                    "poll_min_interval_s": defaults.triggers.poll_min_interval,
                    "poll_max_interval_s": defaults.triggers.poll_max_interval,
                    "idle_requests_per_minute": round(idle_per_minute, 1),
                    "pickup_samples": samples,
                    "pickup_p50_s": round(p50, 3),
                    "pickup_p95_s": round(p95, 3),
                    "pickup_max_s": round(max(latencies), 3),
                }
            )
        )


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--idle", type=float, default=60.0, help="idle seconds to count")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--max-gap", type=float, default=8.0)
    args = parser.parse_args()
    asyncio.run(measure(args.idle, args.samples, args.max_gap))


if __name__ == "__main__":
    main()
