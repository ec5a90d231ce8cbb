"""First-job latency with and without a warm start.

Starts a fresh fake ComfyUI (as a process) whose first checkpoint load takes
``--load-delay`` seconds, then runs one txt2img job the way a worker does (JobRunner over a
local folder), once on a cold ComfyUI and once after ``warm_up`` ran ``COMFYS3_WARMUP``.
Prints the warm-up's time and the first job's total and ComfyUI execution seconds.

    .venv/bin/python bench/warm_start.py [--load-delay 3] [--steps 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from processor.comfy.process import ComfyEngine
from processor.job.manifest import load_jobs
from processor.job.runner import JobRunner
from processor.settings import JobLimits, WorkerSettings
from processor.storage.layout import Layout
from processor.storage.local import LocalStorage
from processor.worker.warm_start import warm_up
from processor.workflows import WorkflowRegistry
from tests.workers import fake_comfy_process


async def first_job(url: str, folder: Path, steps: int, warmup: str | None) -> dict[str, float]:
    settings = WorkerSettings(comfyui_url=url, worker_id="bench", job_timeout=120, warmup=warmup)
    registry = WorkflowRegistry.default(None)
    async with ComfyEngine(settings) as client:
        warm = await warm_up(client, registry, settings)
        document = {"id": "first", "workflow": "txt2img", "payload": {"steps": steps, "seed": 7}}
        (job,) = load_jobs(json.dumps(document).encode(), manifest_key="first.json",
                           registry=registry)  # fmt: skip
        async with LocalStorage(folder) as storage:
            runner = JobRunner(
                storage=storage,
                comfy=client,
                layout=Layout("input", "output"),
                limits=JobLimits(job_timeout=120),
                worker_id="bench",
            )
            outcome = await runner.run(job, attempt=1, max_attempts=1)
    return {
        "warmup": warm.seconds,
        "total": outcome.status.timings["total"],
        "execute": outcome.status.timings.get("execute", float("nan")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load-delay", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    warmup = 'txt2img:{"steps": 1, "seed": 1}'
    print(f"fake first_load_delay={args.load_delay:g} s, first job: txt2img {args.steps} steps")
    print(f"{'start':<6} {'warm-up s':>10} {'first job s':>12} {'ComfyUI s':>10}")
    for label, spec in (("cold", None), ("warm", warmup)):
        with tempfile.TemporaryDirectory(prefix="comfys3-bench-") as folder:
            base = Path(folder)
            with fake_comfy_process(base / "fake", first_load_delay=args.load_delay) as fake:
                figures = asyncio.run(first_job(fake.url, base / "out", args.steps, spec))
        print(
            f"{label:<6} {figures['warmup']:>10.2f} {figures['total']:>12.2f} "
            f"{figures['execute']:>10.2f}"
        )


if __name__ == "__main__":
    main()
