"""A worker that starts ComfyUI itself (the fake, as a process that looks like ComfyUI):
ComfyUI dying mid-job is a retried job, not a lost one, and disk use stays flat."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from processor.job.status import JobState, JobStatus
from processor.settings import WorkerSettings
from processor.storage.layout import Layout
from processor.storage.local import LocalStorage
from processor.worker.assembly import open_worker
from tests.processor.comfy.test_process import local_settings

LAYOUT = Layout("input", "output")


def owned_comfyui(tmp_path: Path) -> WorkerSettings:
    """A worker that starts the fake itself; the fake's knobs reach it only because they are
    named in COMFYS3_COMFYUI_ENV (a started ComfyUI sees an allowlisted environment)."""
    return local_settings(
        tmp_path / "comfy",
        job_timeout=30,
        max_attempts=3,
        worker_id="owner",
        retry_delay=0.1,
        comfyui_env=["FAKE_COMFYUI_*"],
    )


def drop(root: Path, name: str, document: dict[str, object]) -> None:
    (root / "input").mkdir(parents=True, exist_ok=True)
    (root / "input" / f"{name}.json").write_text(json.dumps(document))


def status_of(root: Path, job_id: str) -> JobStatus:
    return JobStatus.model_validate_json((root / "output" / job_id / "status.json").read_bytes())


async def test_comfyui_dying_mid_job_is_restarted_and_the_job_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = tmp_path / "jobs"
    # Die when node 2 starts, once: the marker file lets the restarted process live.
    monkeypatch.setenv("FAKE_COMFYUI_DIE_AT_NODE", "2")
    monkeypatch.setenv("FAKE_COMFYUI_DIE_MARKER", str(tmp_path / "died-once"))
    drop(jobs, "victim", {"workflow": "solid"})
    async with open_worker(
        storage=LocalStorage(jobs), layout=LAYOUT, settings=owned_comfyui(tmp_path)
    ) as worker:
        counts = await worker.run()

    status = status_of(jobs, "victim")
    assert status.state is JobState.succeeded and status.attempt == 2
    assert any("previous try failed: comfyui_unavailable" in n for n in status.notes), status.notes
    assert "died" in " ".join(status.notes)
    assert counts.succeeded == 1 and counts.summary()["attempts"] == 2
    assert (tmp_path / "died-once").exists()


async def test_a_job_that_kills_comfyui_does_not_use_up_the_next_ones_attempts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one attempt allowed, the job that was running when ComfyUI died fails for good,
    and the one queued behind it runs again, because waiting was not its fault."""
    jobs = tmp_path / "jobs"
    monkeypatch.setenv("FAKE_COMFYUI_DIE_AT_NODE", "2")
    monkeypatch.setenv("FAKE_COMFYUI_DIE_MARKER", str(tmp_path / "died-once"))
    monkeypatch.setenv("FAKE_COMFYUI_EXEC_DELAY", "3")  # ~1 s a node: the second gets queued
    drop(jobs, "one", {"workflow": "solid"})
    drop(jobs, "two", {"workflow": "solid"})
    settings = owned_comfyui(tmp_path).replace(max_attempts=1)
    async with open_worker(storage=LocalStorage(jobs), layout=LAYOUT, settings=settings) as worker:
        counts = await worker.run()

    statuses = {s.state: s for s in (status_of(jobs, "one"), status_of(jobs, "two"))}
    assert set(statuses) == {JobState.failed, JobState.succeeded}, statuses
    suspect, bystander = statuses[JobState.failed], statuses[JobState.succeeded]
    assert suspect.error is not None and "died" in suspect.error.message
    assert bystander.attempt == 1
    assert any("while another job ran" in n for n in bystander.notes), bystander.notes
    assert (counts.succeeded, counts.failed) == (1, 1)


async def test_job_with_an_input_survives_a_comfyui_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Staging inputs waits for a restarting ComfyUI, as queueing does: found against a real
    ComfyUI, which takes 10-15 s to boot again."""
    jobs = tmp_path / "jobs"
    (jobs / "uploads").mkdir(parents=True)
    Image.new("RGB", (8, 8), "blue").save(jobs / "uploads" / "b.png")
    monkeypatch.setenv("FAKE_COMFYUI_DIE_AT_NODE", "2")
    monkeypatch.setenv("FAKE_COMFYUI_DIE_MARKER", str(tmp_path / "died-once"))
    monkeypatch.setenv("FAKE_COMFYUI_STARTUP_DELAY", "1")
    drop(jobs, "victim", {"workflow": "scale", "payload": {"image": "uploads/b.png"}})

    async with open_worker(
        storage=LocalStorage(jobs), layout=LAYOUT, settings=owned_comfyui(tmp_path)
    ) as worker:
        await worker.run()

    status = status_of(jobs, "victim")
    assert status.state is JobState.succeeded and status.attempt == 2, status.error


async def test_comfyui_folders_stay_empty_after_jobs(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs"
    (jobs / "uploads").mkdir(parents=True)
    Image.new("RGB", (8, 8), "blue").save(jobs / "uploads" / "b.png")
    for n in range(3):
        drop(jobs, f"s{n}", {"workflow": "scale", "payload": {"image": "uploads/b.png"}})
    drop(jobs, "t", {"workflow": "txt2img", "payload": {"steps": 1, "batch_size": 2}})
    # A job that fails after its input was staged must not leave the input behind either.
    (jobs / "uploads" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    drop(jobs, "bad", {"workflow": "scale", "payload": {"image": "uploads/broken.png"}})

    async with open_worker(
        storage=LocalStorage(jobs), layout=LAYOUT, settings=owned_comfyui(tmp_path)
    ) as worker:
        counts = await worker.run()

    assert counts.succeeded == 4 and counts.failed == 1
    assert status_of(jobs, "bad").error is not None
    assert len(status_of(jobs, "t").outputs) == 2
    comfy = tmp_path / "comfy"
    folders = [comfy / "in", comfy / "out", comfy / "tmp"]
    leftovers = [p for folder in folders for p in folder.rglob("*") if p.is_file()]
    assert leftovers == [], leftovers
