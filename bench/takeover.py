"""How long a job waits after its worker dies: time from SIGKILL to another worker's claim.

Two `comfys3 run` workers on one SeaweedFS bucket, each with its own fake ComfyUI; one job
longer than the lease is claimed by the first, which is killed a second into it; the second
worker's claim is seen in the job's status. Runs against the checkout it is started from, so
the same script measures any commit:

    python bench/takeover.py --lease 10 --runs 3
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.s3_servers import s3_settings_for, seaweedfs_server
from tests.workers import (
    comfys3,
    fake_comfy_process,
    get_json,
    put_manifest,
    s3_client,
    s3_env,
    wait_until,
)


def one_run(base: Path, server: object, lease: float, run: int) -> float:
    settings = s3_settings_for(server)  # type: ignore[arg-type]
    client = s3_client(settings)
    workers: list[subprocess.Popen[bytes]] = []
    try:
        with (
            fake_comfy_process(base / f"fake-a-{run}", exec_delay=3 * lease) as fake_a,
            fake_comfy_process(base / f"fake-b-{run}", exec_delay=3 * lease) as fake_b,
        ):
            for name, fake in (("a", fake_a), ("b", fake_b)):
                env = s3_env(
                    settings,
                    comfyui_url=fake.url,
                    worker_id=name,
                    lease_seconds=lease,
                    poll_max_interval=1.0,
                )
                log = (base / f"worker-{name}-{run}.log").open("wb")
                workers.append(
                    subprocess.Popen(comfys3("run"), cwd=ROOT, env=env, stdout=log, stderr=log)
                )
                if name == "a":
                    put_manifest(client, settings, "job", {"workflow": "solid"})

                    def claimed_by(who: str) -> bool:
                        try:
                            status = get_json(client, settings, "output/job/status.json")
                        except client.exceptions.NoSuchKey:
                            return False
                        return bool(status.get("worker") == who)

                    wait_until(lambda: claimed_by("a"), 60, "worker a's claim")
            time.sleep(1.0)
            workers[0].send_signal(signal.SIGKILL)
            killed = time.monotonic()
            wait_until(lambda: claimed_by("b"), 30 * lease, "worker b's takeover")
            return time.monotonic() - killed
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.terminate()
                worker.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lease", type=float, default=10.0, help="COMFYS3_LEASE_SECONDS")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder, seaweedfs_server(Path(folder) / "weed") as s3:
        figures = [one_run(Path(folder), s3, args.lease, run) for run in range(args.runs)]
    print(
        f"takeover after SIGKILL, lease {args.lease:g} s, {args.runs} runs: "
        f"min {min(figures):.1f} s, median {statistics.median(figures):.1f} s, "
        f"max {max(figures):.1f} s"
    )


if __name__ == "__main__":
    main()
