"""How much time the ComfyUI client itself adds to a job.

Starts the fake ComfyUI (tests/fake_comfyui, as a subprocess, zero execution delay), then runs N
jobs one after another: queue_prompt -> wait_for -> fetch every output into memory. A job's
overhead is that wall time minus the time ComfyUI says it spent executing (RunResult's
execution_start -> execution_success). Prints p50/p95/max in milliseconds, and where the time
went (POST /prompt, waiting for the end, /view).

    .venv/bin/python bench/client_overhead.py [--jobs 200] [--graph solid|txt2img]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from processor.comfy.client import ComfyClient

FAKE_DIR = ROOT / "tests" / "fake_comfyui"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def graph_for(kind: str, index: int) -> dict[str, Any]:
    graph: dict[str, Any] = json.loads((ROOT / "workflows" / f"{kind}.json").read_text())
    if kind == "solid":
        # A new colour each job: nothing is cached, every job really executes and saves.
        graph["1"]["inputs"].update(width=64, height=64, color=index * 2654435 % 0xFFFFFF)
        graph["3"]["inputs"]["filename_prefix"] = "bench"
    else:
        graph["3"]["inputs"].update(seed=index, steps=1)
        graph["5"]["inputs"].update(width=64, height=64)
        graph["9"]["inputs"]["filename_prefix"] = "bench"
    return graph


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


async def bench(url: str, jobs: int, kind: str, warmup: int) -> None:
    overhead, queue_ms, wait_ms, fetch_ms, exec_ms = [], [], [], [], []
    async with ComfyClient(url) as client:
        await client.wait_ready(60)
        for index in range(warmup + jobs):
            graph = graph_for(kind, index)
            prompt_id = f"bench-{index}"
            t0 = time.perf_counter()
            await client.queue_prompt(graph, prompt_id)
            t1 = time.perf_counter()
            result = await client.wait_for(prompt_id, timeout=60)
            t2 = time.perf_counter()
            blobs = [await client.fetch_output(ref) for ref in result.files]
            t3 = time.perf_counter()
            assert blobs and all(blobs), "no output bytes"
            if index < warmup:
                continue
            total = t3 - t0
            overhead.append((total - result.execution_seconds) * 1000)
            queue_ms.append((t1 - t0) * 1000)
            wait_ms.append((t2 - t1) * 1000)
            fetch_ms.append((t3 - t2) * 1000)
            exec_ms.append(result.execution_seconds * 1000)

    def line(name: str, values: list[float]) -> str:
        p50, p95 = percentile(values, 0.50), percentile(values, 0.95)
        return (
            f"  {name:<28} p50 {p50:7.2f}   p95 {p95:7.2f}"
            f"   max {max(values):7.2f}   mean {statistics.fmean(values):7.2f}"
        )

    print(f"client overhead on the fake ComfyUI, graph={kind}, {jobs} jobs (+{warmup} warm-up), ms")
    print(line("overhead (total - exec)", overhead))
    print(
        line(
            "total queue->bytes",
            [q + w + f for q, w, f in zip(queue_ms, wait_ms, fetch_ms, strict=True)],
        )
    )
    print(line("  POST /prompt", queue_ms))
    print(line("  wait_for (incl. exec)", wait_ms))
    print(line("  /view fetch", fetch_ms))
    print(line("ComfyUI execution (its own)", exec_ms))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--graph", choices=["solid", "txt2img"], default="solid")
    parser.add_argument(
        "--history-gap",
        type=float,
        default=0.0,
        help="the fake's pause between execution_success and writing /history (s); real "
        "ComfyUI's is near zero, the fake's test default is 0.02",
    )
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="comfys3-bench-") as scratch:
        env = {
            **os.environ,
            "FAKE_COMFYUI_EXEC_DELAY": "0",
            "FAKE_COMFYUI_HISTORY_GAP": str(args.history_gap),
        }
        command = [
            sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(port), "--cpu",
            "--input-directory", f"{scratch}/in", "--output-directory", f"{scratch}/out",
            "--temp-directory", f"{scratch}/tmp",
        ]  # fmt: skip
        with open(f"{scratch}/fake.log", "wb") as log:
            fake = subprocess.Popen(
                command, cwd=FAKE_DIR, stdout=log, stderr=subprocess.STDOUT, env=env
            )
        try:
            asyncio.run(bench(f"http://127.0.0.1:{port}", args.jobs, args.graph, args.warmup))
        finally:
            fake.terminate()
            fake.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
