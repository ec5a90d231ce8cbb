"""Big backlogs: does a worker start as fast, list as little and collide as rarely with
100,000 manifests pending as with 1,000?

A backlog of ``--sizes`` manifests (``solid`` jobs) is in place before any worker starts; then
1 and 4 in-process workers (each with its own storage client and claims, as separate machines
would have; one shared fake ComfyUI executing prompts in ``--delay`` seconds) run until
``--jobs`` manifests were claimed or ``--window`` seconds passed. The backlog is never drained:
what is measured is how the intake copes with its size. Figures:

- first claim s: from ``Worker.run()`` to the worker's first won claim (p50 and max over the
  workers)
- LIST per job: ListObjectsV2 requests (or folder scans) the intakes made, over claims won
- wasted claims: claim attempts that did not lead to a job, over all attempts: the claim was
  held by another worker (``taken``), or was won for a manifest another worker had already
  finished (``gone``: costs a claim write, a manifest read and a claim delete)
- jobs/s: manifests finished over the run's wall time (CPU-bound here: every worker, the
  shared fake ComfyUI and SeaweedFS share this machine's cores)
- S3 requests per job, by operation (S3 backends only)

Before the workers start, ``comfys3 status --summary --max-keys 0`` counts each backlog once:
its requests and seconds are printed on a line of their own.

Backends: ``seaweed`` (SeaweedFS on loopback, a real S3 server) and ``local`` (a folder; it has
no continuation token, so every page is a scan of the whole folder: its LIST figures count
scans, and a scan of 100,000 names costs far more than an S3 page).

    python bench/backlog.py [--sizes 1000 10000] [--backend seaweed] [--workers 1 4]
                            [--jobs 600] [--window 25] [--delay 0] [--names counter|hash]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import contextlib
import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import percentiles
from short_jobs import count_requests

from processor.settings import S3Settings, WorkerSettings
from processor.storage.base import Storage
from processor.storage.claims import Lease, Taken
from processor.storage.local import LocalStorage
from processor.storage.s3 import S3Storage
from processor.worker.assembly import local_layout, open_worker, s3_layout
from processor.worker.loop import Worker
from tests.s3_servers import s3_settings_for, seaweedfs_server
from tests.workers import FakeComfyProcess, fake_comfy_process, s3_client
from triggers.cli.backlog import summarise
from triggers.poll import AdaptiveInterval

MANIFEST = json.dumps({"workflow": "solid", "payload": {}}).encode()


def manifest_name(n: int, names: str) -> str:
    """``counter``: job000042, what most producers write; ``hash``: a short hash first, the
    shape docs/scale.md recommends at scale (S3 partitions a prefix by key ranges)."""
    if names == "hash":
        return f"{hashlib.sha1(str(n).encode()).hexdigest()[:6]}-job{n:07d}"
    return f"job{n:07d}"


@dataclass
class Tap:
    """What one worker did, seen by wrapping its claim store and retirer."""

    started: float = 0.0
    first_claim: float | None = None
    attempts: int = 0
    won: int = 0
    taken: int = 0
    gone: int = 0
    requests: collections.Counter[str] = field(default_factory=collections.Counter)

    def attach(self, worker: Worker) -> None:
        acquire, drop_claim = worker.claims.acquire, worker.retirer.drop_claim

        async def counted_acquire(name: str) -> Lease | Taken:
            self.attempts += 1
            result = await acquire(name)
            if isinstance(result, Taken):
                self.taken += 1
            else:
                self.won += 1
                if self.first_claim is None:
                    self.first_claim = time.monotonic() - self.started
            return result

        async def counted_drop(claim_key: str) -> None:
            self.gone += 1  # won a claim, then found the manifest already retired
            await drop_claim(claim_key)

        worker.claims.acquire = counted_acquire  # type: ignore[method-assign]
        worker.retirer.drop_claim = counted_drop  # type: ignore[method-assign]
        if isinstance(worker.storage, S3Storage):
            self.requests = count_requests(worker)


# -- backlogs -------------------------------------------------------------------------------


def fill_s3(s3: S3Settings, size: int, names: str) -> float:
    """Upload ``size`` manifests with 32 threads; the seconds it took."""
    client = s3_client(s3)
    started = time.monotonic()

    def put(n: int) -> None:
        key = f"{s3.input_dir}/{manifest_name(n, names)}.json"
        client.put_object(Bucket=s3.bucket_name, Key=key, Body=MANIFEST)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        list(pool.map(put, range(size), chunksize=64))
    return time.monotonic() - started


def fill_local(root: Path, size: int, names: str) -> float:
    started = time.monotonic()
    folder = root / local_layout().input_dir
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(size):
        (folder / f"{manifest_name(n, names)}.json").write_bytes(MANIFEST)
    return time.monotonic() - started


# -- one measurement ------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def workers(
    count: int, fake: FakeComfyProcess, s3: S3Settings | None, root: Path | None
) -> AsyncIterator[list[Worker]]:
    async with contextlib.AsyncExitStack() as stack:
        opened = []
        for index in range(count):
            storage: Storage = S3Storage(s3) if s3 is not None else LocalStorage(root or Path())
            layout = s3_layout(s3) if s3 is not None else local_layout()
            settings = WorkerSettings(comfyui_url=fake.url, worker_id=f"bench-{index}")
            worker = await stack.enter_async_context(
                open_worker(storage=storage, layout=layout, settings=settings)
            )
            opened.append(worker)
        yield opened


async def run_workers(
    count: int,
    fake: FakeComfyProcess,
    s3: S3Settings | None,
    root: Path | None,
    *,
    jobs: int,
    window: float,
) -> dict[str, Any]:
    async with workers(count, fake, s3, root) as fleet:
        taps = [Tap() for _ in fleet]
        lists_before = [worker.intake.lists for worker in fleet]
        for tap, worker in zip(taps, fleet, strict=True):
            tap.attach(worker)
        stop = asyncio.Event()

        async def watch() -> None:
            deadline = time.monotonic() + window
            while sum(tap.won for tap in taps) < jobs and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            stop.set()

        started = time.monotonic()
        for tap in taps:
            tap.started = started
        watcher = asyncio.create_task(watch())
        # wait_for_work keeps a worker serving after a sweep, as `comfys3 run` does; the
        # window or the job count ends the run, never the backlog.
        results = await asyncio.gather(
            *(
                worker.run(stop=stop, wait_for_work=AdaptiveInterval(0.5, 5.0, stop).wait)
                for worker in fleet
            )
        )
        wall = time.monotonic() - started
        await watcher
        lists = sum(w.intake.lists for w in fleet) - sum(lists_before)
    won = sum(tap.won for tap in taps)
    attempts = sum(tap.attempts for tap in taps)
    wasted = sum(tap.taken + tap.gone for tap in taps)
    firsts = [tap.first_claim for tap in taps if tap.first_claim is not None]
    p50, _ = percentiles(firsts) if firsts else (float("nan"), 0.0)
    requests: collections.Counter[str] = collections.Counter()
    for tap in taps:
        requests.update(tap.requests)
    figures: dict[str, Any] = {
        "workers": count,
        "claims_won": won,
        "succeeded": sum(result.succeeded for result in results),
        "first_claim_s_p50": round(p50, 3),
        "first_claim_s_max": round(max(firsts), 3) if firsts else None,
        "lists": lists,
        "lists_per_job": round(lists / max(1, won), 3),
        "claim_attempts": attempts,
        "wasted_taken": sum(tap.taken for tap in taps),
        "wasted_gone": sum(tap.gone for tap in taps),
        "wasted_pct": round(100 * wasted / max(1, attempts), 1),
        "jobs_per_s": round(sum(result.succeeded for result in results) / wall, 1),
        "wall_s": round(wall, 2),
    }
    if requests:
        figures["s3_requests_per_job"] = round(sum(requests.values()) / max(1, won), 2)
        figures["s3_by_operation"] = dict(sorted(requests.items()))
    return figures


# -- the runs -------------------------------------------------------------------------------


@contextlib.contextmanager
def seaweed(base: Path) -> Iterator[Any]:
    with seaweedfs_server(base / "weed") as server:
        yield server


def restore_s3(s3: S3Settings) -> None:
    """Put the manifests a run finished back in the intake, so the next run sees the same
    backlog without another upload (it writes to its own output prefix)."""
    client = s3_client(s3)
    pages = client.get_paginator("list_objects_v2")
    for folder in ("_done", "_failed", "_claims"):
        prefix = f"{s3.input_dir}/{folder}/"
        listing = pages.paginate(Bucket=s3.bucket_name, Prefix=prefix)
        keys = [item["Key"] for page in listing for item in page.get("Contents", [])]
        for key in keys:
            if folder != "_claims":
                manifest = f"{s3.input_dir}/{key.removeprefix(prefix)}"
                client.put_object(Bucket=s3.bucket_name, Key=manifest, Body=MANIFEST)
        for start in range(0, len(keys), 1000):
            chunk = [{"Key": key} for key in keys[start : start + 1000]]
            client.delete_objects(Bucket=s3.bucket_name, Delete={"Objects": chunk, "Quiet": True})


def restore_local(root: Path) -> None:
    """The same for a folder; its statuses go too, or the next run would skip every job
    that already succeeded instead of running it."""
    shutil.rmtree(root / local_layout().output_dir, ignore_errors=True)
    intake = root / local_layout().input_dir
    for folder in ("_done", "_failed", "_claims"):
        for path in (intake / folder).glob("*.json"):
            if folder == "_claims":
                path.unlink()
            else:
                path.replace(intake / path.name)


async def count_backlog(size: int, s3: S3Settings | None, root: Path | None) -> dict[str, Any]:
    """What ``comfys3 status --summary --max-keys 0`` costs on this backlog."""
    storage: Storage = S3Storage(s3) if s3 is not None else LocalStorage(root or Path())
    layout = s3_layout(s3) if s3 is not None else local_layout()
    async with storage:
        counted = await summarise(storage, layout, max_keys=None)
    return {
        "summary_of_backlog": size,
        "waiting": counted.waiting,
        "requests": counted.requests,
        "seconds": counted.seconds,
    }


def one_size(
    args: argparse.Namespace, size: int, base: Path, fake: FakeComfyProcess, server: Any
) -> None:
    s3, root = None, None
    if server is not None:
        s3 = s3_settings_for(server)
        upload = fill_s3(s3, size, args.names)
    else:
        root = base / f"local-{size}"
        upload = fill_local(root, size, args.names)
    print(json.dumps(asyncio.run(count_backlog(size, s3, root))), flush=True)
    for count in args.workers:
        run_s3 = s3.model_copy(update={"output_dir": f"out-{count}"}) if s3 else None
        figures = asyncio.run(
            run_workers(count, fake, run_s3, root, jobs=args.jobs, window=args.window)
        )
        line = {"backend": args.backend, "names": args.names, "backlog": size}
        print(json.dumps({**line, "upload_s": round(upload, 1), **figures}), flush=True)
        if s3 is not None:
            restore_s3(s3)
        elif root is not None:
            restore_local(root)


def measure(args: argparse.Namespace) -> None:
    with contextlib.ExitStack() as stack:
        base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="comfys3-backlog-")))
        fake = stack.enter_context(
            fake_comfy_process(base / "fake", exec_delay=args.delay, history_gap=0)
        )
        server = stack.enter_context(seaweed(base)) if args.backend == "seaweed" else None
        for size in args.sizes:
            one_size(args, size, base, fake, server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000])
    parser.add_argument("--backend", choices=["seaweed", "local"], default="seaweed")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--jobs", type=int, default=600, help="stop after this many claims")
    parser.add_argument("--window", type=float, default=25.0, help="or after these seconds")
    parser.add_argument("--delay", type=float, default=0.0, help="fake prompt seconds")
    parser.add_argument("--names", choices=["counter", "hash"], default="counter")
    measure(parser.parse_args())


if __name__ == "__main__":
    main()
