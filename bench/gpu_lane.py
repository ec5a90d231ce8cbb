"""GPU-lane utilisation: how much of the wall time ComfyUI spends executing.

100 jobs on the fake ComfyUI at 200 ms a prompt, SeaweedFS on loopback, one worker. The figure
is the sum of ComfyUI's own execution times over the wall time from the first claim to the
last status written. 1.0 means the GPU never waited for S3.

``--history-gap`` is the fake ComfyUI's own pause between prompts (its history bookkeeping,
which a real ComfyUI also does in its prompt loop before taking the next prompt). It is ComfyUI's
time, not the worker's, so the default run sets it to 0; pass 0.02 to see the fake's test default.

    python bench/gpu_lane.py [--jobs 100] [--delay 0.2] [--history-gap 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from harness import real_parts, worker_for

from tests.workers import put_manifest, s3_client


async def measure(jobs: int, delay: float, history_gap: float) -> None:
    with real_parts(delay, history_gap=history_gap) as (s3, fake):
        client = s3_client(s3)
        for n in range(jobs):
            put_manifest(client, s3, f"job{n:03d}", {"workflow": "solid", "payload": {}})
        async with worker_for(s3, fake) as worker:
            started = time.monotonic()
            counts = await worker.run()
            wall = time.monotonic() - started
        executed = sum(status.timings.get("execute", 0.0) for status in counts.statuses)
        waits = [status.timings.get("wait", 0.0) for status in counts.statuses]
        print(
            json.dumps(
                {
                    "jobs": jobs,
                    "succeeded": counts.succeeded,
                    "prompt_seconds": delay,
                    "fake_history_gap_s": history_gap,
                    "wall_s": round(wall, 3),
                    "execution_s": round(executed, 3),
                    "utilisation": round(executed / wall, 4),
                    "ideal_wall_s": round(jobs * delay, 3),
                    "mean_wait_s": round(sum(waits) / len(waits), 3),
                }
            )
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--delay", type=float, default=0.2)
    parser.add_argument("--history-gap", type=float, default=0.0)
    args = parser.parse_args()
    asyncio.run(measure(args.jobs, args.delay, args.history_gap))


if __name__ == "__main__":
    main()
