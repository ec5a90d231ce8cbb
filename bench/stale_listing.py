"""Stale listings: what three workers sharing one backlog spend on claims that cannot win.

Three in-process workers (one event loop), the fake ComfyUI in a thread running 20 ms `solid`
prompts, a backlog of short manifests on a local folder and on moto's S3. Per round, figures
from every request the workers sent (tests/poison_parts.py counts them):

- claims_tried: claim creates (If-None-Match), every acquire starts with one
- wasted_on_retired: creates on a manifest whose retirement had already deleted it (the cost of
  a stale listing: a PUT, a GET that finds nothing, a DELETE)
- found_claimed_by_another: creates refused because another worker held the claim
- claims_won, listings, jobs_per_worker

    python bench/stale_listing.py [--jobs 60] [--rounds 5] [--backend local moto]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fake_comfyui.state import FakeState
from tests.fake_comfyui.thread import FakeComfyUIThread
from tests.poison_parts import Bucket, LocalBucket, S3Bucket, figures, three_workers
from tests.s3_servers import moto_s3_server, s3_settings_for


def one_round(backend: str, jobs: int, base: Path, server: object | None) -> dict[str, object]:
    bucket: Bucket
    if backend == "local":
        bucket = LocalBucket(base / "bucket")
    else:
        assert server is not None
        bucket = S3Bucket("moto", server.client(), s3_settings_for(server))  # type: ignore[attr-defined]
    with FakeComfyUIThread(base / "comfyui", FakeState()) as fake:
        counts, calls = asyncio.run(three_workers(bucket, fake, jobs))
        executed = fake.stats()["executed"]
    result: dict[str, object] = {"backend": backend, "jobs": jobs}
    result.update(figures(counts, calls))
    result["executed_twice"] = sum(1 for times in executed.values() if times > 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--backend", nargs="+", default=["local", "moto"])
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    with moto_s3_server() as server:
        for backend in args.backend:
            for _ in range(args.rounds):
                with tempfile.TemporaryDirectory(prefix="comfys3-bench-") as folder:
                    print(json.dumps(one_round(backend, args.jobs, Path(folder), server)))


if __name__ == "__main__":
    main()
