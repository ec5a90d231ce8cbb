"""A fleet, simulated: many workers in one process against one SeaweedFS, polling or on events.

Every worker is built as `comfys3 run` builds it (open_worker, its own S3 client, its own lane)
with a zero-cost in-process ComfyUI, so what is measured is comfys3's own coordination: claims,
listings, statuses, retirement, and SQS messages with ``--modes events`` (moto's server plays
SQS; the uploader sends the notification S3 would send after each PUT, since SeaweedFS cannot).
The workers start idle; the manifests are then uploaded (16 at a time, or at ``--rate`` a
second, by a producer process of its own) and the run ends when each has its final status;
``--preload`` uploads them all before the workers start (a fleet scaled up from zero on a
backlog). With ``--job-seconds`` each prompt takes that long (a sleep, one prompt at a time per
worker, as on a GPU). How each figure is counted is in tests/fleet.py's docstring:

- jobs/s: manifests over the span from the first PUT to the last final status
- wasted claims: claim attempts that ran no job (taken by another worker, manifest gone, job
  already done), and their share of all attempts
- S3 requests per job by type (SeaweedFS's types: GET includes HEAD; DELETE, DeleteObjects) and
  by key area; SQS requests per job
- pickup p50/p95: manifest PUT returned -> a worker won its claim; tail: last PUT -> last final
  status
- CPU ms per job of this process (every worker) and of SeaweedFS; memory per
  worker (RSS growth while the workers opened, over their number)
- checks: every manifest ended once, every job ran once, the claim accounting adds up, the
  workers' and uploader's requests equal what SeaweedFS counted, nothing is left behind

One JSON line per run, then a table. Nothing is asserted; the machine's cores are shared by
the fleet, the uploader and SeaweedFS, so jobs/s is a floor, not what a fleet of machines does.

    python bench/fleet.py [--workers 10 50 200] [--manifests 10000] [--modes poll events]
                          [--rate 0] [--job-seconds 0] [--duplicate-events 0] [--preload]
                          [--names counter|hash] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fleet import FleetPlan, FleetRun, moto_sqs_process
from tests.s3_servers import WeedMini

COLUMNS = [
    ("mode", "mode"),
    ("workers", "workers"),
    ("manifests", "manifests"),
    ("jobs_per_s", "jobs/s"),
    ("wasted_pct", "wasted %"),
    ("s3_requests_per_job", "S3 req/job"),
    ("sqs_requests_per_job", "SQS req/job"),
    ("pickup_p50_s", "pickup p50 s"),
    ("pickup_p95_s", "pickup p95 s"),
    ("tail_s", "tail s"),
    ("cpu_ms_per_job", "CPU ms/job"),
    ("rss_mb_per_worker", "MB/worker"),
]


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |"]
    lines.append("|" + "---|" * len(COLUMNS))
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(name, "")) for name, _ in COLUMNS) + " |")
    return "\n".join(lines)


def by_type(row: dict[str, Any]) -> str:
    types = ", ".join(f"{k} {v}" for k, v in row["s3_per_job_by_type"].items())
    return f"{row['mode']} x{row['workers']}: {types}"


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[10, 50, 200])
    parser.add_argument("--manifests", type=int, default=10_000)
    parser.add_argument(
        "--modes", nargs="+", choices=["poll", "events"], default=["poll", "events"]
    )
    parser.add_argument("--rate", type=float, default=0.0, help="uploads a second (0: max)")
    parser.add_argument("--job-seconds", type=float, default=0.0, help="each prompt's length")
    parser.add_argument("--duplicate-events", type=float, default=0.0,
                        help="share of manifests whose event SQS delivers twice")  # fmt: skip
    parser.add_argument("--names", choices=["counter", "hash"], default="counter")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds a run may take")
    parser.add_argument("--preload", action="store_true",
                        help="upload everything before the workers start")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="3 workers, 40 manifests")
    parser.add_argument("--log-level", default="ERROR", help="the workers' log level")
    parser.add_argument("--setting", action="append", default=[], metavar="NAME=VALUE",
                        help="a worker setting, e.g. events_fallback_interval=3600")  # fmt: skip
    args = parser.parse_args()
    if args.quick:
        args.workers, args.manifests = [3], 40
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
    configs = [(mode, workers) for mode in args.modes for workers in args.workers]
    if len(configs) == 1:
        print(json.dumps(run_one(args, *configs[0])), flush=True)
        return
    # Each run in a fresh process, with its own servers: memory and CPU figures of one run
    # must not carry what an earlier run left behind.
    rows = []
    for mode, workers in configs:
        command = [sys.executable, __file__, *passed_on(args), "--modes", mode]
        answer = subprocess.run(
            [*command, "--workers", str(workers)], stdout=subprocess.PIPE, text=True, check=True
        )
        row = json.loads(answer.stdout.strip().splitlines()[-1])
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(table(rows))
    print("\nS3 requests per job by type:")
    for row in rows:
        print("  " + by_type(row))


def passed_on(args: argparse.Namespace) -> list[str]:
    """The options of one run, for a child process."""
    options = [
        f"--manifests={args.manifests}",
        f"--rate={args.rate}",
        f"--job-seconds={args.job_seconds}",
        f"--duplicate-events={args.duplicate_events}",
        f"--names={args.names}",
        f"--timeout={args.timeout}",
        f"--log-level={args.log_level}",
        *(f"--setting={setting}" for setting in args.setting),
    ]
    return [*options, "--preload"] if args.preload else options


def run_one(args: argparse.Namespace, mode: str, workers: int) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="comfys3-fleet-")))
        weed = WeedMini(base / "weed")
        server = weed.start()
        stack.callback(weed.stop)
        sqs = stack.enter_context(moto_sqs_process(base)) if mode == "events" else None
        plan = FleetPlan(
            workers=workers,
            manifests=args.manifests,
            mode=mode,
            rate=args.rate,
            job_seconds=args.job_seconds,
            duplicate_events=args.duplicate_events if mode == "events" else 0.0,
            names=args.names,
            preload=args.preload,
            timeout=args.timeout,
            settings=dict(setting.split("=", 1) for setting in args.setting),
        )
        say(f"-- {mode}, {workers} workers, {args.manifests} manifests")
        report = asyncio.run(FleetRun(plan, weed, server, sqs, say=say).run())
        return report.figures()


if __name__ == "__main__":
    main()
