"""What an idle poll costs, and whether it grows with history.

An idle worker lists the intake prefix over and over. Finished manifests move to a sub-prefix
(``input/_done/``), so a non-recursive listing (Delimiter="/") should cost one request and the
same time whether ten or ten thousand jobs are done. This starts SeaweedFS on loopback, fills
``input/_done/`` with N objects for each N given, and prints per poll: HTTP requests, p50/p95
milliseconds; the recursive listing is printed beside it for contrast.

    .venv/bin/python bench/s3_idle_requests.py [--history 0 1000 5000] [--polls 50]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from processor.storage.s3 import S3Storage
from tests.s3_servers import S3Server, s3_settings_for, seaweedfs_server


def fill(server: S3Server, bucket: str, start: int, stop: int) -> None:
    client = server.client()
    with ThreadPoolExecutor(16) as pool:
        list(
            pool.map(
                lambda i: client.put_object(
                    Bucket=bucket, Key=f"input/_done/{i:06d}.json", Body=b"{}"
                ),
                range(start, stop),
            )
        )


def figures(values: list[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return f"p50 {statistics.median(ordered) * 1000:7.1f} ms  p95 {p95 * 1000:7.1f} ms"


async def measure(storage: S3Storage, polls: int, recursive: bool) -> tuple[float, list[float]]:
    requests = 0

    def count(**_: Any) -> None:
        nonlocal requests
        requests += 1

    storage._s3.meta.events.register("before-send.s3.ListObjectsV2", count)
    times = []
    try:
        for _ in range(polls):
            began = time.perf_counter()
            await storage.list("input", recursive=recursive)
            times.append(time.perf_counter() - began)
    finally:
        storage._s3.meta.events.unregister("before-send.s3.ListObjectsV2", count)
    return requests / polls, times


async def run(server: S3Server, history: list[int], polls: int) -> None:
    settings = s3_settings_for(server)
    client = server.client()
    for i in range(3):
        client.put_object(Bucket=settings.bucket_name, Key=f"input/waiting-{i}.json", Body=b"{}")
    filled = 0
    print(f"{'history':>8}  {'listing':<10} {'req/poll':>8}  time per poll")
    async with S3Storage(settings) as storage:
        for size in sorted(history):
            fill(server, settings.bucket_name, filled, size)
            filled = max(filled, size)
            for recursive in (False, True):
                per_poll, times = await measure(storage, polls if not recursive else 5, recursive)
                kind = "recursive" if recursive else "flat"
                print(f"{size:>8}  {kind:<10} {per_poll:>8.1f}  {figures(times)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--history", type=int, nargs="+", default=[0, 1000, 5000])
    parser.add_argument("--polls", type=int, default=50)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="comfys3-bench-") as folder,
        seaweedfs_server(Path(folder)) as server,
    ):
        asyncio.run(run(server, args.history, args.polls))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
