"""Chaos: `comfys3 run` workers drain a backlog on SeaweedFS while things break under them.

Four worker processes (`comfys3 run --log-format json`), 400 `solid` manifests and poison mixed
in, on `weed mini`. Worker w0 starts its own ComfyUI (the fake, through COMFYS3_COMFYUI_PATH);
the others attach to a fake ComfyUI process each. During the run, at fractions of the jobs run:

- 10%: w0's ComfyUI is SIGKILLed (w0 must start it again); again at 60%
- 20%: worker w3 is SIGKILLed; once its ComfyUI has run the dead worker's queue dry, it is
  started again (same worker id)
- 35%: SeaweedFS is stopped (SIGTERM) for 30 s and started again on the same data and ports

Poison: JSON nested 2000 deep, a 5000-digit integer, `..json`, a name with a control character,
a batch holding a lone surrogate, an input PNG of 0 bytes, claims reading `{"attempt": 1e400}`,
`"expires_at": 1e400` and `1e15`, and a claim without a manifest (see tests/chaos.py).

Figures (how each is counted is in tests/chaos.py's docstring): succeeded, failed by error type,
lost, duplicate executions by what explains them (counted on the fakes' exec logs, which outlive
a killed ComfyUI), what is left in `input/` and `_claims/`, claims won per poison, wasted claims
(claims won on a manifest another worker had already finished: the worker logs `... is gone`),
S3 requests per job and in the worst second (SeaweedFS's Prometheus counters, read every
second), wall time, and the invariants (`checks`). Prints figures; asserts nothing.

    python bench/chaos.py [--workers 4] [--manifests 400] [--exec-delay 0.3] [--lease 120]
                          [--outage 30] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.chaos import ChaosPlan, ChaosReport, ChaosRun, verdicts


def busiest_seconds(report: ChaosReport, count: int = 3) -> list[dict[str, object]]:
    """The sampling intervals with the most worker requests, with what they were."""
    start = report.intervals[0][0] if report.intervals else 0.0
    ranked = sorted(report.intervals, key=lambda item: -sum(item[2].values()))[:count]
    return [
        {
            "at_s": round(t0 - start, 1),
            "seconds": round(seconds, 1),
            "requests": sum(delta.values()),
            "by_type": {k: v for k, v in sorted(delta.items()) if k != "own"},
        }
        for t0, seconds, delta in ranked
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--manifests", type=int, default=400)
    parser.add_argument("--exec-delay", type=float, default=0.3, help="seconds per prompt")
    parser.add_argument("--lease", type=float, default=120.0, help="COMFYS3_LEASE_SECONDS")
    parser.add_argument("--outage", type=float, default=30.0, help="seconds SeaweedFS is down")
    parser.add_argument("--keep", type=Path, help="keep logs and exec logs in this folder")
    args = parser.parse_args()
    plan = ChaosPlan(
        workers=args.workers,
        manifests=args.manifests,
        exec_delay=args.exec_delay,
        lease_seconds=args.lease,
        s3_outage=args.outage,
    )
    with tempfile.TemporaryDirectory(prefix="comfys3-chaos-") as folder:
        base = args.keep or Path(folder)
        base.mkdir(parents=True, exist_ok=True)
        run = ChaosRun(plan, base, say=lambda line: print(line, file=sys.stderr, flush=True))
        report = run.run()
    figures = report.figures()
    checks = verdicts(report)
    checks["wasted_claims_under_10pct"] = figures["wasted_claims_pct"] < 10
    figures["busiest_seconds"] = busiest_seconds(report)
    figures["events"] = [f"{t:6.1f}s {what}" for t, what in report.events]
    print(json.dumps({**figures, "checks": checks}, indent=1, default=str))


if __name__ == "__main__":
    main()
