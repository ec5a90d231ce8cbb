"""Cancel and per-job limits, end to end: a worker on a local folder and the fake ComfyUI in
both protocols, driven by ``comfys3 cancel`` and by cancel objects dropped by hand.

What a user must see: a cancelled job's status says ``cancelled`` with who asked and when, a
waiting job never reaches ComfyUI, a running one is stopped there (never another), the claim
and manifest are settled like any other end and the cancel object goes; a job past its own
``timeout_s`` fails as ``timeout`` naming that limit and leaves ComfyUI's queue empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from processor.job.status import JobState, JobStatus
from processor.settings import WorkerSettings
from processor.storage.layout import Layout
from processor.storage.local import LocalStorage
from processor.worker.assembly import open_worker
from processor.worker.loop import Worker
from tests.fake_comfyui.fixtures import both_protocols
from tests.processor.worker.test_loop import drain, drop, status_of, worker_settings
from triggers.cli import main as cli

LAYOUT = Layout("input", "output")
LONG = {"workflow": "txt2img", "payload": {"steps": 40, "width": 64, "height": 64}}


def fake_queue(fake: Any) -> dict[str, Any]:
    with urllib.request.urlopen(f"{fake.url}/queue", timeout=5) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


async def until(check: Callable[[], Any], seconds: float, what: str) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {seconds:g} s: {what}")


def state_of(root: Path, job_id: str) -> str | None:
    path = root / "output" / job_id / "status.json"
    with contextlib.suppress(OSError, ValueError):
        return str(json.loads(path.read_text())["state"])
    return None


async def cancel_cli(root: Path, *args: str) -> int:
    """``comfys3 cancel ... --local ROOT`` as a user runs it (its own event loop)."""
    return await asyncio.to_thread(cli.main, ["cancel", *args, "--local", str(root)])


@contextlib.asynccontextmanager
async def serving(root: Path, settings: WorkerSettings) -> AsyncIterator[Worker]:
    """A worker polling ``root`` until the block ends."""
    stop = asyncio.Event()

    async def wait(found: bool) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.1)

    async with open_worker(storage=LocalStorage(root), layout=LAYOUT, settings=settings) as worker:
        task = asyncio.create_task(worker.run(wait_for_work=wait, stop=stop))
        try:
            yield worker
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)


def assert_settled(root: Path, name: str, folder: str = "_done") -> None:
    assert not (root / "input" / f"{name}.json").exists()
    assert (root / "input" / folder / f"{name}.json").exists()
    assert not list((root / "input" / "_claims").glob("*.json"))
    assert not list((root / "input" / "_cancel").glob("*.json"))


@both_protocols
async def test_a_running_job_is_cancelled_from_the_command_line(
    tmp_path: Path, fake_comfyui: Any
) -> None:
    fake_comfyui.state.step_delay = 0.25  # 40 steps: 10 s
    settings = worker_settings(fake_comfyui, cancel_check_interval=0.5)
    async with serving(tmp_path, settings):
        drop(tmp_path, "long", LONG)
        await until(lambda: fake_comfyui.stats()["running"], 20, "the prompt to run")
        asked = time.monotonic()
        assert await cancel_cli(tmp_path, "long", "--reason", "wrong prompt") == 0
        await until(lambda: state_of(tmp_path, "long") == "cancelled", 10, "cancelled")
        took = time.monotonic() - asked
        drop(tmp_path, "after", {"workflow": "solid"})
        await until(lambda: state_of(tmp_path, "after") == "succeeded", 20, "the next job")

    status = status_of(tmp_path, "long")
    assert status.state is JobState.cancelled and status.error is not None
    assert status.error.type == "cancelled"
    assert status.error.details["stage"] == "while it ran"
    assert status.error.details["reason"] == "wrong prompt"
    assert status.error.details["requested_by"].startswith("comfys3 cancel (")
    assert status.error.details["requested_at"]
    assert "wrong prompt" in status.error.message and status.attempt == 1
    assert took < 5, took
    assert_settled(tmp_path, "long")
    shown = await asyncio.to_thread(cli.main, ["status", "long", "--local", str(tmp_path)])
    assert shown == 0
    stats = fake_comfyui.stats()
    assert len(stats["interrupted"]) == 1 and len(stats["executed"]) == 2  # then "after" ran
    assert fake_queue(fake_comfyui) == {"queue_running": [], "queue_pending": []}


@both_protocols
async def test_a_job_cancelled_before_it_starts_never_reaches_comfyui(
    tmp_path: Path, fake_comfyui: Any
) -> None:
    # A cancel object dropped by hand (no CLI), empty: its name is all that counts.
    (tmp_path / "input" / "_cancel").mkdir(parents=True)
    (tmp_path / "input" / "_cancel" / "early.json").write_text("{}")
    drop(tmp_path, "early", {"workflow": "solid"})
    drop(tmp_path, "other", {"workflow": "solid", "payload": {"color": 5}})

    counts = await drain(tmp_path, worker_settings(fake_comfyui))

    assert (counts.cancelled, counts.succeeded) == (1, 1)
    status = status_of(tmp_path, "early")
    assert status.state is JobState.cancelled and status.error is not None
    assert status.error.details["stage"] == "before it started"
    assert status.error.details["requested_by"] == "a cancel object in the bucket"
    assert fake_comfyui.stats()["queued"] == 1  # only "other" was ever sent to ComfyUI
    assert_settled(tmp_path, "early")
    assert status_of(tmp_path, "other").state is JobState.succeeded


async def test_one_batch_entry_or_the_whole_batch(tmp_path: Path, fake_comfyui: Any) -> None:
    batch = {"workflow": "solid", "batch": [{"color": n} for n in range(3)]}
    drop(tmp_path, "one", {**batch, "id": "one"})
    drop(tmp_path, "all", {**batch, "id": "all"})
    assert await cancel_cli(tmp_path, "one-2") == 0
    assert await cancel_cli(tmp_path, "all-1", "--all-of-batch") == 0
    assert sorted(p.name for p in (tmp_path / "input" / "_cancel").iterdir()) == [
        "all.json",
        "one-2.json",
    ]

    counts = await drain(tmp_path, worker_settings(fake_comfyui))

    states = {j: state_of(tmp_path, j) for j in ("one-1", "one-2", "one-3", "all-1", "all-3")}
    assert states == {
        "one-1": "succeeded",
        "one-2": "cancelled",
        "one-3": "succeeded",
        "all-1": "cancelled",
        "all-3": "cancelled",
    }
    assert (counts.succeeded, counts.cancelled) == (2, 4)
    assert_settled(tmp_path, "one")
    assert_settled(tmp_path, "all")


async def test_cancelling_an_ended_or_unknown_job_says_so(
    tmp_path: Path, fake_comfyui: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    drop(tmp_path, "done", {"workflow": "solid"})
    await drain(tmp_path, worker_settings(fake_comfyui))
    capsys.readouterr()

    assert await cancel_cli(tmp_path, "done") == 1
    assert "job done has already succeeded: nothing to cancel" in capsys.readouterr().err
    assert await cancel_cli(tmp_path, "nobody") == 1
    assert "no job nobody" in capsys.readouterr().err
    assert await cancel_cli(tmp_path, "../x") == 2
    assert not (tmp_path / "input" / "_cancel").exists() or not list(
        (tmp_path / "input" / "_cancel").iterdir()
    )


async def test_a_waiting_manifest_named_with_its_priority_is_found(tmp_path: Path) -> None:
    drop(tmp_path, "!995.urgent", {"workflow": "solid", "priority": 5})
    assert await cancel_cli(tmp_path, "urgent") == 0
    assert (tmp_path / "input" / "_cancel" / "urgent.json").exists()


@both_protocols
async def test_a_job_past_its_own_timeout_fails_and_leaves_comfyui_idle(
    tmp_path: Path, fake_comfyui: Any
) -> None:
    fake_comfyui.state.step_delay = 0.25
    drop(tmp_path, "bounded", {**LONG, "timeout_s": 1})
    started = time.monotonic()

    counts = await drain(tmp_path, worker_settings(fake_comfyui, job_timeout=60))

    assert time.monotonic() - started < 10
    assert counts.failed == 1
    status = status_of(tmp_path, "bounded")
    assert status.state is JobState.failed and status.error is not None
    assert status.error.type == "timeout"
    assert "timeout_s (1 s" in status.error.message
    assert status.error.details["limit"] == "timeout_s"
    assert status.time_limit is not None
    assert (status.time_limit.seconds, status.time_limit.source) == (1, "timeout_s")
    assert status.attempt == 1  # the job's own bound: not retried
    assert_settled(tmp_path, "bounded", "_failed")
    assert fake_comfyui.stats()["interrupted"] == [status.error.details["prompt_id"]]
    assert fake_queue(fake_comfyui) == {"queue_running": [], "queue_pending": []}


async def test_status_shows_a_cancelled_job_for_a_person(
    tmp_path: Path, fake_comfyui: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    drop(tmp_path, "gone", {"workflow": "solid", "timeout_s": 60})
    assert await cancel_cli(tmp_path, "gone", "--reason", "not needed") == 0
    await drain(tmp_path, worker_settings(fake_comfyui))
    capsys.readouterr()
    assert await asyncio.to_thread(cli.main, ["status", "gone", "--local", str(tmp_path)]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("job gone: cancelled (attempt 1)")
    assert "  cancelled cancelled by comfys3 cancel (" in shown
    assert "not needed (before it started)" in shown


async def test_an_output_comfyui_left_out_is_a_note_not_a_failure(
    tmp_path: Path, fake_comfyui: Any
) -> None:
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1,
                                                      "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "a"}},
        "3": {"class_type": "EmptyImage", "inputs": {"width": -1, "height": 8, "batch_size": 1,
                                                      "color": 0}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "b"}},
    }  # fmt: skip
    drop(tmp_path, "partial", {"graph": graph})
    await drain(tmp_path, worker_settings(fake_comfyui, allow_raw_workflows=True))
    status = status_of(tmp_path, "partial")
    assert status.state is JobState.succeeded
    assert [o.node_id for o in status.outputs] == ["2"]
    assert status.notes == [
        "ComfyUI left out an output that failed its checks: node 3 (EmptyImage) width: -1 is "
        "below the minimum 1 (output node 4 skipped)"
    ]


async def test_the_workers_limit_caps_the_manifests(tmp_path: Path, fake_comfyui: Any) -> None:
    drop(tmp_path, "generous", {"workflow": "solid", "timeout_s": 3600})
    await drain(tmp_path, worker_settings(fake_comfyui, job_timeout=30))
    limit = status_of(tmp_path, "generous").time_limit
    assert limit is not None and (limit.seconds, limit.source) == (30, "COMFYS3_JOB_TIMEOUT")


async def test_submit_names_the_manifest_by_its_priority_and_workers_take_it_first(
    tmp_path: Path, fake_comfyui: Any
) -> None:
    files = tmp_path / "files"
    files.mkdir()
    root = tmp_path / "jobs"
    for name, priority in (("plain-a", 0), ("plain-b", 0), ("urgent", 7), ("background", -3)):
        document = {"workflow": "solid", "payload": {"color": len(name)}, "priority": priority}
        (files / f"{name}.json").write_text(json.dumps(document))
        paths = [str(files / f"{name}.json"), "--local", str(root)]
        assert await asyncio.to_thread(cli.main, ["submit", *paths]) == 0
    assert sorted(p.name for p in (root / "input").glob("*.json")) == [
        "!993.urgent.json",
        "plain-a.json",
        "plain-b.json",
        "~003.background.json",
    ]

    offered: list[str] = []
    settings = worker_settings(fake_comfyui)
    async with open_worker(storage=LocalStorage(root), layout=LAYOUT, settings=settings) as worker:
        pick = worker.intake.next

        async def noting(*args: Any, **kwargs: Any) -> Any:
            candidate = await pick(*args, **kwargs)
            if candidate is not None:
                offered.append(candidate.key)
            return candidate

        worker.intake.next = noting  # type: ignore[method-assign]
        counts = await worker.run()

    assert counts.succeeded == 4
    assert offered[0] == "input/!993.urgent.json" and offered[-1] == "input/~003.background.json"
    assert (root / "input" / "_done" / "!993.urgent.json").exists()
    assert status_of(root, "urgent").manifest_key == "input/!993.urgent.json"


def test_statuses_read_back(tmp_path: Path) -> None:
    """A cancelled status, as the model reads it back (the schema knows the state)."""
    document = {"id": "x", "state": "cancelled", "error": {"type": "cancelled", "message": "m"}}
    assert JobStatus.model_validate(document).state is JobState.cancelled
