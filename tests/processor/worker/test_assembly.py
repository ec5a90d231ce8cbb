"""open_worker with a ComfyUI client handed in ready (bench/fleet.py's seam): no engine is
attached or started, and jobs run through the given client like any other."""

from __future__ import annotations

import json
from pathlib import Path

from processor.job.status import JobState, JobStatus
from processor.settings import WorkerSettings
from processor.storage.layout import Layout
from processor.storage.local import LocalStorage
from processor.worker.assembly import open_worker
from tests.instant_comfy import PNG, InstantComfy

LAYOUT = Layout("input", "output")


async def test_a_given_client_runs_the_jobs_and_no_comfyui_is_attached(tmp_path: Path) -> None:
    (tmp_path / "input").mkdir()
    for name in ("one", "two"):
        (tmp_path / "input" / f"{name}.json").write_text(json.dumps({"workflow": "solid"}))
    comfy = InstantComfy()
    # A URL nothing answers at: attaching to it would fail; the given client is used instead.
    settings = WorkerSettings(comfyui_url="http://127.0.0.1:9", worker_id="given")
    async with open_worker(
        storage=LocalStorage(tmp_path), layout=LAYOUT, settings=settings, comfy=comfy
    ) as worker:
        assert worker.ops.health.readiness().ready
        counts = await worker.run()

    assert counts.succeeded == 2
    assert comfy.executions == {"one": 1, "two": 1}
    status = JobStatus.model_validate_json((tmp_path / "output/one/status.json").read_bytes())
    assert status.state is JobState.succeeded and status.worker == "given"
    assert [(tmp_path / output.key).read_bytes() for output in status.outputs] == [PNG]
    assert sorted(p.name for p in (tmp_path / "input/_done").iterdir()) == ["one.json", "two.json"]
