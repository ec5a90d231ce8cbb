"""The worker end to end on a local folder and the fake ComfyUI: what a user sees in the
output prefix after dropping manifests in the input prefix."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from PIL import Image

from processor.job.runner import JobOutcome, Verdict
from processor.job.status import JobState, JobStatus
from processor.settings import WorkerSettings
from processor.storage.layout import Layout
from processor.storage.local import LocalStorage
from processor.worker.assembly import open_worker
from processor.worker.loop import Counts

LAYOUT = Layout("input", "output")


def worker_settings(fake: Any, **overrides: Any) -> WorkerSettings:
    values: dict[str, Any] = {
        "comfyui_url": fake.url,
        "comfyui_startup_timeout": 20,
        "job_timeout": 30,
        "lease_seconds": 30,
        "max_attempts": 3,
        "worker_id": "test-worker",
        "retry_delay": 0.2,
    }
    values.update(overrides)
    return WorkerSettings(**values)


def drop(root: Path, name: str, document: Any) -> None:
    folder = root / "input"
    folder.mkdir(parents=True, exist_ok=True)
    text = document if isinstance(document, str) else json.dumps(document)
    (folder / f"{name}.json").write_text(text)


async def drain(root: Path, settings: WorkerSettings) -> Counts:
    async with open_worker(storage=LocalStorage(root), layout=LAYOUT, settings=settings) as worker:
        return await worker.run()


def status_of(root: Path, job_id: str) -> JobStatus:
    return JobStatus.model_validate_json((root / "output" / job_id / "status.json").read_bytes())


def executions(fake: Any) -> int:
    return sum(fake.stats()["executed"].values())


async def test_seed_example_runs_and_is_retired(tmp_path: Path, fake_comfyui: Any) -> None:
    drop(tmp_path, "job1", {"workflow": "txt2img", "payload": {"seed": 123, "steps": 2}})

    counts = await drain(tmp_path, worker_settings(fake_comfyui))

    assert counts.succeeded == 1 and counts.failed == 0
    status = status_of(tmp_path, "job1")
    assert status.state is JobState.succeeded
    assert status.payload["seed"] == 123 and status.payload["width"] == 512
    assert status.worker == "test-worker" and status.attempt == 1
    assert [o.node_id for o in status.outputs] == ["9"]
    output = status.outputs[0]
    assert output.key == "output/job1/9_SaveImage_001.png"
    data = (tmp_path / output.key).read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) == output.bytes
    assert {"stage", "queue", "execute", "publish", "total"} <= set(status.timings)
    assert not (tmp_path / "input" / "job1.json").exists()
    assert (tmp_path / "input" / "_done" / "job1.json").exists()
    assert not list((tmp_path / "input" / "_claims").glob("*.json"))


async def test_broken_manifest_fails_clearly_and_worker_goes_on(
    tmp_path: Path, fake_comfyui: Any
) -> None:
    drop(tmp_path, "broken", '{"workflow": "solid", ')
    drop(tmp_path, "typo", {"workflow": "solid", "payload": {"widht": 8}})
    drop(tmp_path, "good", {"workflow": "solid"})

    counts = await drain(tmp_path, worker_settings(fake_comfyui))

    assert (counts.succeeded, counts.failed) == (1, 2)
    broken = status_of(tmp_path, "broken")
    assert broken.state is JobState.failed and broken.error is not None
    assert broken.error.type == "invalid_manifest"
    assert "not valid JSON" in broken.error.message and "line 1" in broken.error.message
    typo = status_of(tmp_path, "typo")
    assert typo.error is not None and "did you mean 'width'" in typo.error.message
    assert status_of(tmp_path, "good").state is JobState.succeeded
    assert (tmp_path / "input" / "_failed" / "broken.json").exists()
    assert (tmp_path / "input" / "_failed" / "typo.json").exists()
    assert executions(fake_comfyui) == 1


async def test_job_that_always_fails_stops_after_max_attempts(
    tmp_path: Path, fake_comfyui: Any
) -> None:
    fake_comfyui.state.fail_at_node = "2"
    drop(tmp_path, "doomed", {"workflow": "solid"})
    drop(tmp_path, "fine", {"workflow": "txt2img", "payload": {"steps": 1}})

    counts = await drain(tmp_path, worker_settings(fake_comfyui, max_attempts=2))

    doomed = status_of(tmp_path, "doomed")
    assert doomed.state is JobState.failed
    assert doomed.attempt == 2 and doomed.max_attempts == 2
    assert doomed.error is not None and doomed.error.type == "runtime"
    assert "node 2 (ImageInvert)" in doomed.error.message
    assert any("gave up after 2" in note for note in doomed.notes)
    assert any("previous try failed: runtime" in note for note in doomed.notes)
    assert status_of(tmp_path, "fine").state is JobState.succeeded
    assert (counts.failed, counts.succeeded, counts.retried) == (1, 1, 0)
    assert counts.summary()["attempts"] == 3 and counts.manifests == 2
    assert (tmp_path / "input" / "_failed" / "doomed.json").exists()
    assert executions(fake_comfyui) == 3  # doomed twice, fine once


async def test_succeeded_id_is_not_run_again_unless_asked(
    tmp_path: Path, fake_comfyui: Any
) -> None:
    settings = worker_settings(fake_comfyui)
    drop(tmp_path, "first", {"id": "same", "workflow": "solid"})
    await drain(tmp_path, settings)
    drop(tmp_path, "again", {"id": "same", "workflow": "solid"})

    counts = await drain(tmp_path, settings)

    assert counts.skipped == 1 and executions(fake_comfyui) == 1
    status = status_of(tmp_path, "same")
    assert status.state is JobState.succeeded
    assert any("arrived again" in note and "rerun" in note for note in status.notes)
    assert (tmp_path / "input" / "_done" / "again.json").exists()

    drop(tmp_path, "third", {"id": "same", "workflow": "solid", "rerun": True})
    counts = await drain(tmp_path, settings)
    assert counts.succeeded == 1 and executions(fake_comfyui) == 2


async def test_batch_manifest_makes_one_job_per_entry(tmp_path: Path, fake_comfyui: Any) -> None:
    drop(
        tmp_path,
        "colours",
        {
            "workflow": "solid",
            "payload": {"width": 16, "height": 8},
            "batch": [{"color": 0}, {"color": 0xFF0000}, {"color": 0x00FF00, "width": 32}],
            "metadata": {"customer": "acme"},
        },
    )

    counts = await drain(tmp_path, worker_settings(fake_comfyui))

    assert counts.succeeded == 3
    sizes = []
    for job_id in ("colours-1", "colours-2", "colours-3"):
        status = status_of(tmp_path, job_id)
        assert status.state is JobState.succeeded
        assert status.metadata == {"customer": "acme"}
        with Image.open(tmp_path / status.outputs[0].key) as image:
            sizes.append(image.size)
    assert sizes == [(16, 8), (16, 8), (32, 8)]


async def test_input_file_is_staged_and_missing_one_is_named(
    tmp_path: Path, fake_comfyui: Any
) -> None:
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    Image.new("RGB", (20, 10), "red").save(uploads / "red.png")
    drop(tmp_path, "grow", {"workflow": "scale", "payload": {"image": "uploads/red.png"}})
    drop(tmp_path, "lost", {"workflow": "scale", "payload": {"image": "uploads/nope.png"}})

    await drain(tmp_path, worker_settings(fake_comfyui))

    grow = status_of(tmp_path, "grow")
    assert grow.state is JobState.succeeded
    with Image.open(tmp_path / grow.outputs[0].key) as image:
        assert image.size == (40, 20)
    lost = status_of(tmp_path, "lost")
    assert lost.state is JobState.failed and lost.error is not None
    assert lost.error.type == "input_missing"
    assert "uploads/nope.png" in lost.error.message
    assert executions(fake_comfyui) == 1


async def test_output_converted_to_jpeg(tmp_path: Path, fake_comfyui: Any) -> None:
    drop(tmp_path, "jpg", {"workflow": "solid", "output": {"format": "jpeg", "quality": 80}})

    await drain(tmp_path, worker_settings(fake_comfyui))

    output = status_of(tmp_path, "jpg").outputs[0]
    assert output.key.endswith(".jpg") and output.content_type == "image/jpeg"
    data = (tmp_path / output.key).read_bytes()
    assert data[:3] == b"\xff\xd8\xff"
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "JPEG"


async def test_refused_graph_fails_without_retry(tmp_path: Path, fake_comfyui: Any) -> None:
    """A checkpoint this worker's ComfyUI lacks: with COMFYS3_CAPABILITY_WAIT=0 no other worker
    is waited for, and ComfyUI's own refusal names the file."""
    drop(
        tmp_path,
        "nockpt",
        {"workflow": "txt2img", "payload": {"ckpt_name": "missing.safetensors"}},
    )

    counts = await drain(tmp_path, worker_settings(fake_comfyui, capability_wait=0))

    status = status_of(tmp_path, "nockpt")
    assert status.state is JobState.failed and status.error is not None
    assert status.error.type == "validation"
    assert "missing.safetensors" in status.error.message
    assert "CheckpointLoaderSimple" in status.error.message
    assert counts.retried == 0 and executions(fake_comfyui) == 0


async def test_progress_is_recorded_while_running(tmp_path: Path, fake_comfyui: Any) -> None:
    seen: list[float] = []
    fake_comfyui.state.exec_delay = 0.3
    drop(tmp_path, "slow", {"workflow": "txt2img", "payload": {"steps": 5}})
    async with open_worker(
        storage=LocalStorage(tmp_path),
        layout=LAYOUT,
        settings=worker_settings(fake_comfyui),
        on_progress=lambda job_id, info: seen.append(info.fraction),
    ) as worker:
        await worker.run()
    assert seen and max(seen) > 0 and seen == sorted(seen)
    assert status_of(tmp_path, "slow").progress.fraction == 1.0


async def test_broken_reupload_does_not_bury_an_earlier_result(
    tmp_path: Path, fake_comfyui: Any
) -> None:
    settings = worker_settings(fake_comfyui)
    drop(tmp_path, "keep", {"workflow": "solid"})
    await drain(tmp_path, settings)
    drop(tmp_path, "keep", '{"workflow": "solid", "payload": {"width": -1}}')

    counts = await drain(tmp_path, settings)

    assert counts.failed == 1
    status = status_of(tmp_path, "keep")
    assert status.state is JobState.succeeded and status.outputs
    assert any("not valid" in note and "payload.width" in note for note in status.notes)
    assert (tmp_path / "input" / "_failed" / "keep.json").exists()


def test_counts_are_by_job_and_a_later_window_never_goes_negative() -> None:
    def outcome(job_id: str, verdict: Verdict) -> JobOutcome:
        state = JobState.succeeded if verdict is Verdict.succeeded else JobState.queued
        return JobOutcome(verdict, JobStatus(id=job_id, state=state, manifest_key=f"in/{job_id}"))

    counts = Counts()
    counts.add(outcome("a", Verdict.retry))
    mark = len(counts.outcomes)
    counts.add(outcome("a", Verdict.succeeded))
    counts.add(outcome("b", Verdict.failed))

    assert counts.summary() == {
        "manifests": 2, "succeeded": 1, "failed": 1, "retried": 0, "skipped": 0, "cancelled": 0,
        "attempts": 3,
    }  # fmt: skip
    assert counts.since(mark).summary() == {
        "manifests": 2, "succeeded": 1, "failed": 1, "retried": 0, "skipped": 0, "cancelled": 0,
        "attempts": 2,
    }  # fmt: skip
