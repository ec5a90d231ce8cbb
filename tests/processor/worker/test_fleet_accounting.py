"""The fleet bench's accounting (tests/fleet.py, printed by bench/fleet.py) adds up: a short
run of a few workers on SeaweedFS ends every manifest once, its request counts equal what
SeaweedFS itself counted, and claims that ran nothing are counted as wasted, by kind."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from processor.storage.layout import Layout
from tests.fleet import FleetPlan, FleetReport, FleetRun, moto_sqs_process
from tests.s3_servers import S3Server, WeedMini
from tests.workers import keys, s3_client


@pytest.fixture(scope="module")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[WeedMini, S3Server]]:
    weed = WeedMini(tmp_path_factory.mktemp("fleet-weed"))
    server = weed.start()
    try:
        yield weed, server
    finally:
        weed.stop()


def assert_adds_up(report: FleetReport) -> dict[str, object]:
    figures = report.figures()
    assert figures["checks"] == {name: True for name in figures["checks"]}, (
        figures["checks"],
        figures["server_vs_counted"],
        figures,
    )
    ledger = report.ledger
    assert figures["finished"] == report.plan.manifests == sum(report.executions.values())
    assert figures["wasted_claims"] == sum(figures["wasted_by_kind"].values())
    assert figures["wasted_claims"] == sum(figures["wasted_by_source"].values())
    assert figures["wasted_claims"] == sum(figures["wasted_by_tenth"])
    assert figures["wasted_pct"] == round(100 * ledger.wasted / ledger.attempts, 1)
    # Per-job figures are the run's requests over its manifests, by type and in all.
    per_type = figures["s3_per_job_by_type"]
    assert sum(per_type.values()) == pytest.approx(figures["s3_requests_per_job"], abs=0.05)
    assert per_type["PUT"] >= 4  # a claim, a running status, an output, a final status
    json.dumps(figures)  # printable as it is
    return figures


async def test_a_polling_fleet_ends_every_manifest_once_and_counts_what_the_server_counts(
    weed: tuple[WeedMini, S3Server],
) -> None:
    run = FleetRun(FleetPlan(workers=4, manifests=40, timeout=240), *weed)
    report = await run.run()
    figures = assert_adds_up(report)
    assert figures["s3_per_job_by_type"]["LIST"] > 0  # polling lists; events mostly do not
    assert report.ledger.attempts == report.ledger.won + report.ledger.taken
    statuses = keys(s3_client(run.s3), run.s3, f"{run.layout.output_dir}/")
    assert sum(key.endswith("/status.json") for key in statuses) == 40


async def test_claims_on_held_and_missing_manifests_are_counted_as_wasted(
    weed: tuple[WeedMini, S3Server], tmp_path: Path
) -> None:
    """Events for keys never uploaded (``ghost_events``) each cost a claim won on a missing
    manifest (gone); a manifest whose claim another worker holds is found taken until that
    claim's lease runs out, then taken over and run. Both are wasted claims, and counted so."""
    with moto_sqs_process(tmp_path) as sqs:
        plan = FleetPlan(
            workers=3,
            manifests=30,
            mode="events",
            ghost_events=4,
            duplicate_events=0.2,
            timeout=240,  # a bound, not a speed: a busy CI machine is slow
            settings={"lease_seconds": 6.0},
        )
        run = FleetRun(plan, *weed, sqs_server=sqs)
        held = Layout(run.s3.input_dir).claims_prefix + "/job0000000.json"
        foreign = {"name": "job0000000", "holder": "elsewhere", "attempt": 1, "tries": 1,
                   "state": "held", "expires_at": 0, "token": "x"}  # fmt: skip
        s3_client(run.s3).put_object(
            Bucket=run.s3.bucket_name, Key=held, Body=json.dumps(foreign).encode()
        )
        report = await run.run()

    figures = assert_adds_up(report)
    ghosts = {run.layout.manifest_key(f"ghost{n:05d}") for n in range(4)}
    assert ghosts <= report.ledger.gone_keys
    assert figures["wasted_by_kind"]["gone"] >= 4
    assert figures["wasted_by_source"].get("hint", 0) >= 4  # the ghosts came as events
    assert figures["wasted_by_kind"]["taken"] >= 1  # the held claim, before its lease ran out
    assert report.executions["job0000000"] == 1  # then taken over, and run once
    assert figures["sqs_per_job_by_operation"]["DeleteMessage"] >= 1
