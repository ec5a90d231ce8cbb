"""Short jobs: can one worker keep a fast ComfyUI busy, and what does each job cost it?

One in-process worker, SeaweedFS on loopback, the fake ComfyUI as its own process running
`solid` prompts of a fixed length, every manifest uploaded before the worker starts. Figures:

- utilisation: ComfyUI's execution time over the span from the first prompt's start to the last
  one's end, both read from ComfyUI's own /history timestamps (as measured on a real ComfyUI)
- jobs/s over the same span, and over the worker's whole wall time
- worker CPU ms per job: this process's CPU time while the worker ran, over the jobs
- S3 requests per job: every HTTP request the worker's S3 client sent, retries included
- claims held ahead at most: the most claims the worker held at one time that ComfyUI had not
  finished executing (sampled every 5 ms)

    python bench/short_jobs.py [--jobs 300] [--delay 0.015 0.05] [--profile out.prof]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import cProfile
import json
import time
import urllib.request
from typing import Any

from harness import real_parts, worker_for

from tests.workers import put_manifest, s3_client


def history_span(url: str) -> tuple[float, float, int]:
    """(sum of execution seconds, span seconds, prompts) from ComfyUI's /history."""
    with urllib.request.urlopen(f"{url}/history", timeout=30) as response:
        history = json.loads(response.read())
    starts, ends, busy = [], [], 0.0
    for entry in history.values():
        stamps = {event: data.get("timestamp") for event, data in entry["status"]["messages"]}
        start, end = stamps.get("execution_start"), stamps.get("execution_success")
        if start is None or end is None:
            continue
        starts.append(start / 1000)
        ends.append(end / 1000)
        busy += (end - start) / 1000
    return busy, max(ends) - min(starts), len(starts)


def count_requests(worker: Any) -> collections.Counter[str]:
    """Count every request the worker's S3 client sends, by operation."""
    counter: collections.Counter[str] = collections.Counter()
    client = worker.storage._client  # the bench may look inside; the product never does

    def on_send(request: Any, **_: Any) -> None:
        counter[operation(request.method, request.url, request.headers)] += 1

    client.meta.events.register("before-send.s3", on_send)
    return counter


def operation(method: str, url: str, headers: Any) -> str:
    if method == "GET":
        return "ListObjectsV2" if "list-type=2" in url else "GetObject"
    if method == "PUT":
        return "CopyObject" if "x-amz-copy-source" in headers else "PutObject"
    return {"DELETE": "DeleteObject", "HEAD": "HeadObject"}.get(method, method)


async def held_ahead(worker: Any, stop: asyncio.Event, peak: list[int]) -> None:
    while not stop.is_set():
        held = getattr(worker, "claims_held_ahead", None)
        value = held() if callable(held) else len(getattr(worker, "_inflight", {}))
        peak[0] = max(peak[0], value)
        await asyncio.sleep(0.005)


async def measure(jobs: int, delay: float, profile: str | None) -> dict[str, Any]:
    with real_parts(delay, history_gap=0) as (s3, fake):
        client = s3_client(s3)
        for n in range(jobs):
            put_manifest(client, s3, f"job{n:04d}", {"workflow": "solid", "payload": {}})
        async with worker_for(s3, fake) as worker:
            requests = count_requests(worker)
            stop, peak = asyncio.Event(), [0]
            sampler = asyncio.create_task(held_ahead(worker, stop, peak))
            profiler = cProfile.Profile() if profile else None
            cpu, wall = time.process_time(), time.monotonic()
            if profiler:
                profiler.enable()
            counts = await worker.run()
            if profiler:
                profiler.disable()
                profiler.dump_stats(profile)
            cpu, wall = time.process_time() - cpu, time.monotonic() - wall
            stop.set()
            await sampler
        busy, span, prompts = history_span(fake.url)
    return {
        "prompt_ms": round(delay * 1000),
        "jobs": jobs,
        "succeeded": counts.succeeded,
        "utilisation": round(busy / span, 3),
        "jobs_per_s": round(prompts / span, 1),
        "jobs_per_s_wall": round(counts.succeeded / wall, 1),
        "worker_cpu_ms_per_job": round(cpu * 1000 / jobs, 2),
        "s3_requests_per_job": round(sum(requests.values()) / jobs, 2),
        "s3_requests_by_operation": dict(sorted(requests.items())),
        "claims_held_ahead_max": peak[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--delay", type=float, nargs="+", default=[0.015, 0.05])
    parser.add_argument("--profile", help="write a cProfile of the worker to this file")
    args = parser.parse_args()
    for delay in args.delay:
        print(json.dumps(asyncio.run(measure(args.jobs, delay, args.profile))))


if __name__ == "__main__":
    main()
