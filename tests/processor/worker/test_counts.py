"""One tally for what a worker did: the summary it logs when it stops, the RunPod drain answer
and the Prometheus metrics all read :class:`processor.worker.loop.Counts`, so they agree; a job
handed back when the worker stops is counted, not lost from the summary."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from processor.ops.parts import build_ops
from processor.storage.local import LocalStorage
from processor.worker.assembly import open_worker
from tests.processor.worker.test_loop import LAYOUT, drop, status_of, worker_settings


def job_metrics(registry: Any) -> dict[tuple[str, str], float]:
    """comfys3_jobs by state, and comfys3_attempts by outcome: {(metric, label): value}."""
    found: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            if sample.name == "comfys3_jobs_total":
                key = ("jobs", sample.labels["state"])
            elif sample.name == "comfys3_attempts_total":
                key = ("attempts", sample.labels["outcome"])
            else:
                continue
            found[key] = found.get(key, 0.0) + sample.value
    return found


async def test_summary_and_metrics_count_the_same_jobs_including_one_handed_back(
    tmp_path: Path, fake_comfyui: Any
) -> None:
    settings = worker_settings(fake_comfyui, shutdown_grace=1)
    ops = build_ops(settings)
    drop(tmp_path, "a", {"workflow": "solid"})
    async with open_worker(
        storage=LocalStorage(tmp_path), layout=LAYOUT, settings=settings, ops=ops
    ) as worker:
        await worker.run()  # a succeeds
        drop(tmp_path, "a-again", {"id": "a", "workflow": "solid"})
        await worker.run()  # a duplicate of a, which already succeeded: skipped
        fake_comfyui.state.exec_delay = 60
        drop(tmp_path, "b", {"workflow": "solid"})
        stop = asyncio.Event()
        serving = asyncio.create_task(worker.run(stop=stop))
        for _ in range(300):
            path = tmp_path / "output" / "b" / "status.json"
            if path.exists() and json.loads(path.read_text())["state"] == "running":
                break
            await asyncio.sleep(0.1)
        # What `comfys3 run` does on a first Ctrl-C (stop claiming), then on the second or at
        # the grace's end (cancel the running jobs: they are handed back).
        stop.set()
        await asyncio.sleep(0.2)
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        counts = worker.counts

    assert status_of(tmp_path, "b").state.value == "queued"  # handed back, waiting again
    assert counts.summary() == {
        "manifests": 2,  # by the manifest each status names: the skip shows a's
        "succeeded": 1,
        "failed": 0,
        "retried": 0,
        "skipped": 0,  # the duplicate of a job that succeeded here adds no job
        "cancelled": 0,
        "handed_back": 1,
        "attempts": 3,
    }
    assert counts.describe() == (
        "2 job(s): 1 succeeded, 0 failed, 0 to retry, 0 skipped, 1 handed back "
        "(2 manifests, 3 attempts)"
    )
    metrics = job_metrics(ops.metrics.registry)
    assert metrics.get(("jobs", "succeeded")) == counts.succeeded
    assert metrics.get(("jobs", "skipped"), 0.0) == counts.skipped
    assert metrics.get(("attempts", "handed_back")) == counts.handed_back
    assert metrics.get(("attempts", "skipped")) == 1  # every attempt is still an attempt
