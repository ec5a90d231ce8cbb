"""Warm start: the warm-up job loads the model, so the first user job does not; a warm-up
that fails is logged loudly and never stops the worker. ComfyUI is the fake, whose
``first_load_delay`` is paid once per checkpoint and listed in its stats."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from pydantic import ValidationError

from processor.comfy.client import ComfyClient
from processor.comfy.process import ComfyEngine
from processor.job.manifest import load_jobs
from processor.job.runner import JobRunner, Verdict
from processor.job.status import JobStatus
from processor.settings import JobLimits, WarmupSpec, WorkerSettings, parse_warmup
from processor.storage.layout import Layout
from processor.storage.local import LocalStorage
from processor.worker.warm_start import warm_up
from processor.workflows import WorkflowRegistry
from tests.fake_comfyui.thread import FakeComfyUIThread

REGISTRY = WorkflowRegistry.default(None)
CHECKPOINT = "v1-5-pruned-emaonly.safetensors"


def settings_for(fake: FakeComfyUIThread, warmup: str | None) -> WorkerSettings:
    return WorkerSettings(
        comfyui_url=fake.url,
        comfyui_input_dir=fake.input_dir,
        comfyui_output_dir=fake.output_dir,
        comfyui_temp_dir=fake.temp_dir,
        comfyui_startup_timeout=20,
        job_timeout=30,
        worker_id="test-worker",
        warmup=warmup,
    )


@pytest.fixture
async def engine(fake_comfyui: FakeComfyUIThread) -> AsyncIterator[tuple[ComfyEngine, Any]]:
    """A worker's view of the fake: the engine (for cleanup) and its ready client."""
    engine = ComfyEngine(settings_for(fake_comfyui, None))
    async with engine as client:
        yield engine, client


async def user_job(client: ComfyClient, root: Path, **payload: Any) -> JobStatus:
    """One txt2img job, run as a worker runs it (JobRunner over a local folder)."""
    document = {"id": "user-1", "workflow": "txt2img", "payload": {"steps": 2, **payload}}
    (job,) = load_jobs(json.dumps(document).encode(), manifest_key="user-1.json", registry=REGISTRY)
    async with LocalStorage(root) as storage:
        runner = JobRunner(
            storage=storage,
            comfy=client,
            layout=Layout("input", "output"),
            limits=JobLimits(job_timeout=30),
            worker_id="test-worker",
        )
        outcome = await runner.run(job, attempt=1, max_attempts=1)
    assert outcome.verdict is Verdict.succeeded, outcome.status.error
    return outcome.status


def loads(fake: FakeComfyUIThread) -> list[dict[str, Any]]:
    return list(fake.stats()["model_loads"])


async def test_after_warm_up_the_first_job_does_not_pay_the_model_load(
    fake_comfyui: FakeComfyUIThread, engine: tuple[ComfyEngine, Any], tmp_path: Path
) -> None:
    fake_comfyui.state.first_load_delay = 2.0
    comfy_engine, client = engine
    settings = settings_for(fake_comfyui, 'txt2img:{"steps": 1, "seed": 1}')

    result = await warm_up(client, REGISTRY, settings, cleanup=comfy_engine.cleanup)

    assert result.ran and result.succeeded and result.error is None
    assert result.spec == "txt2img"
    (warm_status,) = result.statuses
    assert warm_status.timings["execute"] >= 2.0  # the warm-up paid the load ...
    assert [load["ckpt_name"] for load in loads(fake_comfyui)] == [CHECKPOINT]
    assert [load["seconds"] for load in loads(fake_comfyui)] == [2.0]

    first = await user_job(client, tmp_path / "bucket", seed=7)

    assert len(fake_comfyui.stats()["executed"]) == 2  # the user job really ran its prompt
    assert len(loads(fake_comfyui)) == 1  # ... and the first user job did not
    assert first.outputs and first.timings["execute"] < warm_status.timings["execute"]


async def test_without_warm_up_the_first_job_pays_it(
    fake_comfyui: FakeComfyUIThread, engine: tuple[ComfyEngine, Any], tmp_path: Path
) -> None:
    """The control: the same job on a cold ComfyUI is the one that loads the model."""
    fake_comfyui.state.first_load_delay = 2.0
    _, client = engine
    skipped = await warm_up(client, REGISTRY, settings_for(fake_comfyui, None))
    assert not skipped.ran and fake_comfyui.stats()["executed"] == {}

    first = await user_job(client, tmp_path / "bucket", seed=7)

    assert [load["ckpt_name"] for load in loads(fake_comfyui)] == [CHECKPOINT]
    assert first.timings["execute"] >= 2.0


async def test_warm_up_leaves_no_outputs_anywhere(
    fake_comfyui: FakeComfyUIThread,
    engine: tuple[ComfyEngine, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    comfy_engine, client = engine
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    result = await warm_up(
        client, REGISTRY, settings_for(fake_comfyui, "solid"), cleanup=comfy_engine.cleanup
    )
    assert result.succeeded and len(result.statuses[0].outputs) == 1
    assert [p for p in fake_comfyui.output_dir.rglob("*") if p.is_file()] == []
    assert list(here.iterdir()) == []  # nothing written in the current folder


async def test_a_manifest_file_reads_its_inputs_beside_it(
    fake_comfyui: FakeComfyUIThread, engine: tuple[ComfyEngine, Any], tmp_path: Path
) -> None:
    _, client = engine
    folder = tmp_path / "warm"
    folder.mkdir()
    picture = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(picture, format="PNG")
    (folder / "in.png").write_bytes(picture.getvalue())
    manifest = folder / "job.json"
    manifest.write_text(json.dumps({"workflow": "scale", "payload": {"image": "in.png"}}))

    result = await warm_up(client, REGISTRY, settings_for(fake_comfyui, f"@{manifest}"))

    assert result.succeeded, result.error
    assert result.spec == f"@{manifest}" and result.statuses[0].id == "job"
    assert sorted(p.name for p in folder.iterdir()) == ["in.png", "job.json"]


@pytest.mark.parametrize(
    ("warmup", "knobs", "error"),
    [
        ('txt2img:{"steps": 0}', {}, "the warm-up job is not valid: payload.steps"),
        ("nosuch", {}, "the warm-up job is not valid: workflow: unknown workflow 'nosuch'"),
        ("@/nowhere/warm.json", {}, "cannot read the manifest /nowhere/warm.json: No such file"),
        ("solid", {"fail_at_node": "1"}, "job warmup failed: runtime: "),
    ],
)
async def test_a_failed_warm_up_is_logged_loudly_and_never_raises(
    fake_comfyui: FakeComfyUIThread,
    engine: tuple[ComfyEngine, Any],
    caplog: pytest.LogCaptureFixture,
    warmup: str,
    knobs: dict[str, Any],
    error: str,
) -> None:
    fake_comfyui.state.update(knobs)
    _, client = engine
    with caplog.at_level(logging.INFO, logger="comfys3"):
        result = await warm_up(client, REGISTRY, settings_for(fake_comfyui, warmup))
    assert result.ran and not result.succeeded
    assert result.error is not None and result.error.startswith(error), result.error
    errors = [
        r for r in caplog.records if r.levelno == logging.ERROR and r.name == "comfys3.warmup"
    ]
    assert len(errors) == 1 and "FAILED" in errors[0].getMessage()
    assert result.error in errors[0].getMessage()


async def test_a_warm_up_on_a_dead_comfyui_fails_without_raising(
    fake_comfyui: FakeComfyUIThread,
) -> None:
    client = ComfyClient("http://127.0.0.1:9", reconnect_timeout=0.5)  # nothing listens there
    async with client:
        result = await warm_up(client, REGISTRY, settings_for(fake_comfyui, "solid"))
    assert result.ran and not result.succeeded
    assert result.error is not None and "comfyui_unavailable" in result.error


def test_warmup_syntax() -> None:
    assert parse_warmup("solid") == WarmupSpec(workflow="solid")
    assert parse_warmup(' txt2img:{"steps": 1} ') == WarmupSpec(
        workflow="txt2img", payload={"steps": 1}
    )
    assert parse_warmup("@/jobs/warm.json") == WarmupSpec(manifest_path=Path("/jobs/warm.json"))
    for bad, message in [
        ("@", "'@' must be followed by the path"),
        ("txt2img:{steps: 1}", "the payload after 'txt2img:' is not valid JSON"),
        ("txt2img:[1]", "must be a JSON object"),
        ("../etc", "is not a template name"),
        ("", "is not a template name"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_warmup(bad)
    with pytest.raises(ValidationError, match="warmup"):
        WorkerSettings(warmup="txt2img:{")
