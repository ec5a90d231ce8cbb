"""Capability-aware claiming: two ComfyUIs with different node sets (two fakes, each hiding a
node type the other has) share one intake; each job runs where it can, a manifest no worker
can run fails after COMFYS3_CAPABILITY_WAIT naming what is missing, and giving a manifest back
for another worker counts neither an attempt nor a try."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from processor.job.manifest import load_jobs
from processor.job.status import JobState
from processor.storage.base import StoredObject
from processor.storage.local import LocalStorage
from processor.worker.assembly import open_worker
from processor.worker.capabilities import Capabilities, lacking
from processor.worker.loop import _age
from processor.workflows import WorkflowRegistry, builtin_workflows_dir
from tests.fake_comfyui.state import FakeState
from tests.fake_comfyui.thread import FakeComfyUIThread
from tests.processor.worker.test_loop import LAYOUT, drain, drop, status_of, worker_settings


def graph(middle: str) -> dict[str, Any]:
    """EmptyImage -> <middle> -> SaveImage, as a raw graph."""
    inputs: dict[str, Any] = {"image": ["1", 0]}
    if middle == "ImageBlur":
        inputs |= {"blur_radius": 2, "sigma": 1.0}
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": 0},
        },
        "2": {"class_type": middle, "inputs": inputs},
        "3": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x", "images": ["2", 0]}},
    }


def raw(fake: Any, **extra: Any) -> Any:
    return worker_settings(fake, allow_raw_workflows=True, **extra)


def executed(fake: Any) -> int:
    return sum(fake.stats()["executed"].values())


async def test_each_job_runs_on_the_worker_whose_comfyui_has_its_nodes(
    tmp_path: Path, fake_comfyui: Any
) -> None:
    fake_comfyui.state.hidden_nodes = ["ImageBlur"]  # worker A: no blur
    other_state = FakeState()
    other_state.hidden_nodes = ["ImageInvert"]  # worker B: no invert
    for n in range(3):
        drop(tmp_path, f"invert-{n}", {"graph": graph("ImageInvert")})
        drop(tmp_path, f"blur-{n}", {"graph": graph("ImageBlur")})

    with FakeComfyUIThread(tmp_path / "other-comfyui", other_state) as other:
        first = await drain(tmp_path, raw(fake_comfyui, worker_id="A"))
        second = await drain(tmp_path, raw(other, worker_id="B"))
        assert executed(other) == 3

    assert (first.succeeded, first.failed, second.succeeded, second.failed) == (3, 0, 3, 0)
    assert executed(fake_comfyui) == 3
    for n in range(3):
        assert status_of(tmp_path, f"invert-{n}").worker == "A"
        blur = status_of(tmp_path, f"blur-{n}")
        assert blur.worker == "B" and blur.state is JobState.succeeded
        # A gave it back without counting an attempt or a try.
        assert blur.attempt == 1 and not blur.notes
    assert not list((tmp_path / "input" / "_claims").glob("*.json"))


async def test_workers_sharing_an_intake_at_once_sort_the_jobs_out(
    tmp_path: Path, fake_comfyui: Any
) -> None:
    """Both workers poll the same intake at the same time until every job is done."""
    fake_comfyui.state.hidden_nodes = ["ImageBlur"]
    other_state = FakeState()
    other_state.hidden_nodes = ["ImageInvert"]
    for n in range(4):
        drop(tmp_path, f"invert-{n}", {"graph": graph("ImageInvert")})
        drop(tmp_path, f"blur-{n}", {"graph": graph("ImageBlur")})
    stop = asyncio.Event()

    async def done_soon() -> None:
        for _ in range(300):
            finished = list((tmp_path / "input" / "_done").glob("*.json"))
            if len(finished) == 8:
                break
            await asyncio.sleep(0.1)
        stop.set()

    async def serve(settings: Any) -> None:
        async def pause(found: bool) -> None:
            await asyncio.sleep(0.05 if found else 0.2)

        async with open_worker(
            storage=LocalStorage(tmp_path), layout=LAYOUT, settings=settings
        ) as worker:
            await worker.run(wait_for_work=pause, stop=stop)

    with FakeComfyUIThread(tmp_path / "other-comfyui", other_state) as other:
        await asyncio.wait_for(
            asyncio.gather(
                # A worker that finds a key claimed looks again when that lease ends, also
                # when its holder gave it back at once: short leases keep this test short.
                serve(raw(fake_comfyui, worker_id="A", retry_delay=0.1, lease_seconds=3)),
                serve(raw(other, worker_id="B", retry_delay=0.1, lease_seconds=3)),
                done_soon(),
            ),
            60,
        )
        assert executed(other) == 4
    assert executed(fake_comfyui) == 4
    for n in range(4):
        assert status_of(tmp_path, f"invert-{n}").worker == "A"
        assert status_of(tmp_path, f"blur-{n}").worker == "B"


async def test_a_manifest_no_worker_can_run_fails_after_the_wait_naming_the_nodes(
    tmp_path: Path, fake_comfyui: Any
) -> None:
    fake_comfyui.state.hidden_nodes = ["ImageBlur", "ImageInvert"]
    drop(tmp_path, "nobody", {"graph": graph("ImageBlur")})
    settings = raw(fake_comfyui, capability_wait=1.0)

    early = await drain(tmp_path, settings)
    assert early.summary()["attempts"] == 0 and not (tmp_path / "output" / "nobody").exists()
    claim = json.loads((tmp_path / "input" / "_claims" / "nobody.json").read_text())
    assert (claim["state"], claim["attempt"], claim["tries"]) == ("released", 0, 0)
    assert claim["last_error"] is None  # nothing failed: it was left for another worker
    await asyncio.sleep(1.1)
    late = await drain(tmp_path, settings)

    assert late.failed == 1
    status = status_of(tmp_path, "nobody")
    assert status.state is JobState.failed and status.error is not None
    assert status.error.type == "capability_missing"
    assert "node types ImageBlur" in status.error.message
    assert "COMFYS3_CAPABILITY_WAIT" in status.error.message
    assert status.error.details["missing_node_types"] == ["ImageBlur"]
    assert (tmp_path / "input" / "_failed" / "nobody.json").exists()
    assert fake_comfyui.stats()["queued"] == 0


async def test_capabilities_are_read_again_when_comfyui_comes_back(
    tmp_path: Path, fake_comfyui: Any
) -> None:
    """The node set is read once per connection: a ComfyUI that restarts with the node (here:
    the websocket drops and reconnects after the knob changed) runs the job."""
    fake_comfyui.state.hidden_nodes = ["ImageBlur"]
    drop(tmp_path, "blur", {"graph": graph("ImageBlur")})
    settings = raw(fake_comfyui, capability_wait=60)
    async with open_worker(storage=LocalStorage(tmp_path), layout=LAYOUT, settings=settings) as w:
        assert (await w.run()).summary()["attempts"] == 0
        fake_comfyui.state.hidden_nodes = []
        generation = w.runner.comfy.generation
        w.runner.comfy.drop_connection()
        for _ in range(100):
            if w.runner.comfy.generation > generation and w.runner.comfy.connected:
                break
            await asyncio.sleep(0.05)
        w.intake.put_off("input/blur.json", 0)
        counts = await w.run()
    assert counts.succeeded == 1 and status_of(tmp_path, "blur").state is JobState.succeeded


async def test_a_node_left_out_of_object_info_because_it_failed_is_not_missing(
    tmp_path: Path, fake_comfyui: Any
) -> None:
    """A real ComfyUI leaves a node out of /object_info when its description raises (LoadImage
    while its input folder does not exist): asked one by one, it is there, and the job runs."""
    fake_comfyui.state.broken_info_nodes = ["ImageInvert"]
    drop(tmp_path, "invert", {"graph": graph("ImageInvert")})

    counts = await drain(tmp_path, raw(fake_comfyui, capability_wait=60))

    assert counts.succeeded == 1 and executed(fake_comfyui) == 1


def test_what_a_graph_lacks_models_included() -> None:
    info = {
        "CheckpointLoaderSimple": {
            "input": {"required": {"ckpt_name": [["a.safetensors", "sd15.safetensors"], {}]}}
        },
        "LoraLoader": {
            "input": {
                "required": {
                    "lora_name": ["COMBO", {"options": ["style.safetensors"]}],
                    "strength_model": ["FLOAT", {}],
                }
            }
        },
        "KSampler": {"input": {"required": {"sampler_name": [["euler", "ddim"], {}]}}},
        "SaveImage": {"input": {"required": {}}},
    }
    capabilities = Capabilities.from_object_info(info)
    assert set(capabilities.models) == {"CheckpointLoaderSimple", "LoraLoader"}
    registry = WorkflowRegistry.load(builtin_workflows_dir())
    manifest = {
        "workflow": "txt2img",
        "payload": {"ckpt_name": "sd15x.safetensors"},
    }
    (job,) = load_jobs(
        json.dumps(manifest).encode(), manifest_key="input/x.json", registry=registry
    )
    lack = lacking(capabilities, [job], None)
    assert lack is not None
    assert "CLIPTextEncode" in lack.nodes and "CheckpointLoaderSimple" not in lack.nodes
    assert lack.models == ("CheckpointLoaderSimple.ckpt_name = sd15x.safetensors",)
    assert "sd15.safetensors" in lack.describe()  # the closest one this worker has
    fetched = {
        **manifest,
        "models": [{"url": "https://e.example/sd15x.safetensors", "folder": "checkpoints"}],
    }
    (job,) = load_jobs(json.dumps(fetched).encode(), manifest_key="input/x.json", registry=registry)
    lack = lacking(capabilities, [job], None)
    assert lack is not None and lack.no_cache and not lack.models


def test_a_manifests_age_is_read_from_the_storages_clock() -> None:
    uploaded = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    stored = StoredObject(
        "input/x.json", b"{}", "e", None, uploaded, served_at=uploaded + timedelta(seconds=42)
    )
    assert _age(stored) == 42.0  # whatever this machine's clock says
    assert _age(StoredObject("input/x.json", b"{}", "e", None)) is None
