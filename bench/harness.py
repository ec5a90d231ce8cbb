"""Real parts for benchmarks: SeaweedFS on loopback, the fake ComfyUI, an in-process worker.

Benchmarks print figures; nothing here asserts a time.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from processor.settings import S3Settings, WorkerSettings
from processor.storage.base import Storage
from processor.storage.s3 import S3Storage
from processor.worker.assembly import open_worker, s3_layout
from processor.worker.loop import Worker
from tests.s3_servers import s3_settings_for, seaweedfs_server
from tests.workers import FakeComfyProcess, fake_comfy_process


@contextlib.contextmanager
def real_parts(exec_delay: float, **knobs: Any) -> Iterator[tuple[S3Settings, FakeComfyProcess]]:
    with tempfile.TemporaryDirectory(prefix="comfys3-bench-") as folder:
        base = Path(folder)
        with seaweedfs_server(base / "weed") as server:
            settings = s3_settings_for(server)
            with fake_comfy_process(base / "fake", exec_delay=exec_delay, **knobs) as fake:
                yield settings, fake


@contextlib.asynccontextmanager
async def worker_for(
    s3: S3Settings, fake: FakeComfyProcess, storage: Storage | None = None, **knobs: Any
) -> AsyncIterator[Worker]:
    settings = WorkerSettings(comfyui_url=fake.url, worker_id="bench", **knobs)
    async with open_worker(
        storage=storage or S3Storage(s3), layout=s3_layout(s3), settings=settings
    ) as worker:
        yield worker


def percentiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    p50 = statistics.median(ordered)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return p50, p95
