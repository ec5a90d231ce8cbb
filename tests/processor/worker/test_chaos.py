"""Chaos, short: two `comfys3 run` processes share 40 manifests and every kind of poison on
SeaweedFS while the bucket goes away for 5 s, one worker is SIGKILLed (and started again) and
the other worker's own ComfyUI is killed once.

The invariants of bench/chaos.py are asserted here (see tests/chaos.py for how each is
counted): nothing lost, no prompt run twice but what the dead worker's own queue or the killed
ComfyUI explains, every poison settled within its attempts, no worker exited, nothing left in
the intake or the claims. The figures (wasted claims, S3 requests, wall time) are the bench's.
"""

from __future__ import annotations

from pathlib import Path

from tests.chaos import MAX_ATTEMPTS, ChaosPlan, ChaosRun, verdicts

PLAN = ChaosPlan(
    workers=2,
    manifests=40,
    exec_delay=0.2,
    # A finished prompt waits out storage trouble for a lease, so the lease must outlast the
    # outage, which on a busy machine is the 5 s asked for plus as much again to stop and
    # start SeaweedFS. The dead worker's claims are taken over a lease after it died: it is
    # killed early, so that wait overlaps the rest of the run.
    lease_seconds=30,
    retry_delay=0.2,
    s3_outage=5,
    s3_retry_attempts=2,
    kill_worker_at=0.05,
    outage_at=0.25,
    comfy_kills_at=(0.4,),
    timeout=120,
)


def test_workers_ride_out_an_outage_a_kill_and_poison(tmp_path: Path) -> None:
    report = ChaosRun(PLAN, tmp_path, say=lambda _: None).run()

    checks = verdicts(report)
    assert checks == dict.fromkeys(checks, True), report.figures()
    assert report.lost() == []
    assert report.duplicates()["unexplained"] == {}
    assert report.left_pending == [] and report.left_claims == []
    assert report.exits == {"w0": [0], "w1": [-9, 0]}
    assert report.comfyui_starts == 2  # started, killed, started again
    runnable = [p for p in report.poison_list if p.expect == "succeeded"]
    assert report.succeeded() == PLAN.manifests + len(runnable)
    assert report.failed_by_type() == {"invalid_manifest": 3, "input_invalid": 1}
    results = report.poison_results()
    assert {kind: r["ok"] for kind, r in results.items()} == dict.fromkeys(results, True), results
    assert all(r["claims"] - r["gone"] <= MAX_ATTEMPTS for r in results.values())
    assert results["control_char_name"]["claims"] == 0
    # The work really was shared, and the bucket really was away.
    assert len({s["worker"] for s in report.statuses.values()}) >= 2
    assert report.outage_seconds >= PLAN.s3_outage
