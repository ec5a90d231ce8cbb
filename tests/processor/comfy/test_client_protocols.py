"""ComfyClient against both ComfyUIs the fake plays (0.3.64 and today's 0.38.x): what it finds
out about the server, how it stops a prompt (never another one), time limits counted from the
start of execution, prompts queued without some outputs, readable refusals, and every output
kind (video, audio, text, 3-D) coming back as files with the right bytes."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from processor.comfy.client import (
    ComfyClient,
    RunLimit,
    new_prompt_id,
    parse_outputs,
    sniff_content_type,
)
from processor.comfy.node_errors import validation_error
from processor.comfy.websocket import PromptWatch
from processor.errors import ComfyInterrupted, ComfyTimeout, ComfyValidationError
from tests.fake_comfyui.fixtures import both_protocols
from tests.processor.comfy.test_client import fake_stats, solid, tiny_txt2img

CANONICAL_UUID4 = re.compile(
    r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"
)


@pytest.fixture
async def client(fake_comfyui: Any) -> AsyncIterator[ComfyClient]:
    async with ComfyClient(fake_comfyui.url) as comfy:
        await comfy.wait_ready(15)
        yield comfy


async def _get(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        body = await response.json(content_type=None) if response.status == 200 else None
        return response.status, body


def slow_txt2img(seed: int, steps: int = 40) -> dict[str, Any]:
    graph = tiny_txt2img(seed=seed, prefix=f"slow{seed}")
    graph["3"]["inputs"]["steps"] = steps
    return graph


# -- what the server speaks ----------------------------------------------------------------------


@both_protocols
async def test_server_info_is_found_once_per_connection(
    client: ComfyClient, fake_comfyui: Any, fake_protocol: str
) -> None:
    info = await client.server_info()
    current = fake_protocol == "current"
    assert info.job_api is current
    assert info.version == ("0.38.1" if current else "0.3.64")
    # Asked again and used for prompts: no new probe.
    await client.run(solid(prefix="probe"), new_prompt_id(), timeout=30)
    assert await client.server_info() is info
    # One probe (answered 404 by 0.3.64, which has no such route).
    assert (await fake_stats(fake_comfyui.url))["requests"]["GET /api/jobs"] == 1


@both_protocols
async def test_a_reconnect_asks_again(client: ComfyClient, fake_comfyui: Any) -> None:
    first = await client.server_info()
    client.drop_connection()
    for _ in range(200):
        if client._server is None and client.connected:  # the reconnect is seen
            break
        await asyncio.sleep(0.02)
    again = await client.server_info()
    assert again == first and again is not first


def test_prompt_ids_are_canonical_lowercase_uuid4() -> None:
    ids = {new_prompt_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(CANONICAL_UUID4.match(i) and str(uuid.UUID(i)) == i for i in ids)


@pytest.mark.parametrize("fake_protocol", ["current"])
async def test_todays_comfyui_refuses_other_ids_readably(client: ComfyClient) -> None:
    with pytest.raises(ComfyValidationError) as caught:
        await client.queue_prompt(solid(), "run-1")
    assert "canonical lowercase UUID" in str(caught.value)
    # Ours pass.
    result = await client.run(solid(prefix="ok"), new_prompt_id(), timeout=30)
    assert len(result.files) == 1


# -- stopping a prompt ---------------------------------------------------------------------------


@both_protocols
async def test_cancel_stops_the_running_prompt_only(
    client: ComfyClient, fake_comfyui: Any, fake_protocol: str
) -> None:
    fake_comfyui.state.step_delay = 0.2
    running, waiting = new_prompt_id(), new_prompt_id()
    await client.queue_prompt(slow_txt2img(1), running)
    await client.queue_prompt(solid(prefix="after"), waiting)
    started = asyncio.Event()
    waiter = asyncio.ensure_future(
        client.wait_for(running, timeout=60, on_progress=lambda _: started.set())
    )
    await asyncio.wait_for(started.wait(), 10)

    await client.cancel(running)
    with pytest.raises(ComfyInterrupted):
        await waiter
    # The prompt queued behind it was not touched: it runs to its end.
    result = await client.wait_for(waiting, timeout=30)
    assert len(result.files) == 1
    stats = await fake_stats(fake_comfyui.url)
    assert stats["interrupted"] == [running]
    assert await queue_empties(fake_comfyui.url)
    cancels = stats["requests"].get("POST /api/jobs/{job_id}/cancel", 0)
    interrupts = stats["requests"].get("POST /interrupt", 0)
    assert (cancels, interrupts) == ((1, 0) if fake_protocol == "current" else (0, 1))


@both_protocols
async def test_cancel_drops_a_waiting_prompt_and_spares_the_running_one(
    client: ComfyClient, fake_comfyui: Any
) -> None:
    fake_comfyui.state.step_delay = 0.05
    running, waiting = new_prompt_id(), new_prompt_id()
    await client.queue_prompt(slow_txt2img(2, steps=20), running)
    await client.queue_prompt(solid(prefix="never"), waiting)
    pending = asyncio.ensure_future(client.wait_for(waiting, timeout=60))

    await client.cancel(waiting)
    with pytest.raises(ComfyInterrupted) as caught:
        await pending
    assert caught.value.details["kind"] == "cancelled"
    assert "before it started" in str(caught.value)
    # The running one was never interrupted.
    result = await client.wait_for(running, timeout=60)
    assert len(result.files) == 1
    stats = await fake_stats(fake_comfyui.url)
    assert stats["interrupted"] == []
    assert waiting not in stats["executed"]
    assert stats["pending"] == 0
    assert stats["requests"].get("POST /interrupt", 0) == 0  # not even asked


@both_protocols
async def test_cancelling_a_finished_prompt_touches_nothing_else(
    client: ComfyClient, fake_comfyui: Any
) -> None:
    done = new_prompt_id()
    await client.run(solid(prefix="done"), done, timeout=30)
    fake_comfyui.state.step_delay = 0.05
    running = new_prompt_id()
    await client.queue_prompt(slow_txt2img(3, steps=20), running)
    await asyncio.sleep(0.2)
    await client.cancel(done)
    result = await client.wait_for(running, timeout=60)
    assert len(result.files) == 1
    assert (await fake_stats(fake_comfyui.url))["interrupted"] == []


@both_protocols
async def test_a_run_limit_counts_from_the_start_and_leaves_nothing_running(
    client: ComfyClient, fake_comfyui: Any
) -> None:
    fake_comfyui.state.step_delay = 0.1
    ahead, limited = new_prompt_id(), new_prompt_id()
    await client.queue_prompt(slow_txt2img(4, steps=8), ahead)  # about 0.8 s
    await client.queue_prompt(slow_txt2img(5, steps=40), limited)  # about 4 s
    # 0.6 s of its own: the 0.8 s it waits behind the first prompt do not count.
    with pytest.raises(ComfyTimeout) as caught:
        await client.wait_for(limited, timeout=60, run_limit=RunLimit(0.6, "timeout_s"))
    assert caught.value.details["limit"] == "timeout_s"
    assert "timed out after 0.6 s (timeout_s)" in str(caught.value)
    first = await client.wait_for(ahead, timeout=30)
    assert len(first.files) == 1
    assert (await fake_stats(fake_comfyui.url))["interrupted"] == [limited]
    assert await queue_empties(fake_comfyui.url)


async def queue_empties(url: str, within: float = 5.0) -> bool:
    """ComfyUI's /queue holds nothing, within a moment (it writes history, then lets go)."""
    for _ in range(int(within / 0.05)):
        status, queue = await _get(f"{url}/queue")
        if status == 200 and queue == {"queue_running": [], "queue_pending": []}:
            return True
        await asyncio.sleep(0.05)
    return False


# -- what /prompt answers -------------------------------------------------------------------------


@both_protocols
async def test_a_prompt_queued_without_a_failing_output_says_which(client: ComfyClient) -> None:
    graph = solid(prefix="kept")
    graph["4"] = {
        "class_type": "EmptyImage",
        "inputs": {"width": -5, "height": 8, "batch_size": 1, "color": 0},
    }
    graph["5"] = {
        "class_type": "SaveImage",
        "inputs": {"images": ["4", 0], "filename_prefix": "dropped"},
    }
    prompt_id = new_prompt_id()
    dropped = await client.queue_prompt(graph, prompt_id)
    assert dropped == [
        "node 4 (EmptyImage) width: -5 is below the minimum 1 (output node 5 skipped)"
    ]
    result = await client.wait_for(prompt_id, timeout=30)
    assert [f.filename.split("_")[0] for f in result.files] == ["kept"]


@both_protocols
async def test_a_missing_node_type_is_named(client: ComfyClient) -> None:
    graph = solid()
    graph["2"]["class_type"] = "SomeCustomUpscaler"
    with pytest.raises(ComfyValidationError) as caught:
        await client.queue_prompt(graph, new_prompt_id())
    message = str(caught.value)
    assert "node 2" in message
    assert "'SomeCustomUpscaler', which this ComfyUI does not have" in message
    assert "install the custom node" in message


def test_new_error_types_read_well() -> None:
    cycle = validation_error(
        400,
        {
            "error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs "
                      "failed validation", "details": "", "extra_info": {}},
            "node_errors": {
                "2": {"errors": [{"type": "dependency_cycle", "message": "Dependency cycle "
                      "detected", "details": "2 (ImageInvert) -> 3 (ImageBlur) -> 2 "
                      "(ImageInvert)", "extra_info": {"node_id": "2", "cycle_nodes": ["2", "3"]}}],
                      "dependent_outputs": ["9"], "class_type": "ImageInvert"},
            },
        },
    )  # fmt: skip
    assert cycle.lines == [
        "node 2 (ImageInvert) is in a loop of links (2 (ImageInvert) -> 3 (ImageBlur) -> 2 "
        "(ImageInvert)): a node cannot depend on its own output"
    ]
    dynamic = validation_error(
        400,
        {
            "error": {"type": "prompt_outputs_failed_validation", "message": "x", "details": "",
                      "extra_info": {}},
            "node_errors": {"7": {"errors": [{"type": "invalid_dynamic_input", "message":
                            "Invalid dynamic input", "details": "values.3: no such slot",
                            "extra_info": {"input_name": "values.3"}}], "class_type": "Switch"}},
        },
    )  # fmt: skip
    assert dynamic.lines == [
        "node 7 (Switch) values.3: invalid dynamic input: Invalid dynamic input "
        "(values.3: no such slot)"
    ]
    bad_id = validation_error(
        400,
        {
            "error": {"type": "invalid_prompt_id", "message": "prompt_id must be a valid UUID",
                      "details": "Use the canonical lowercase hyphenated form, or omit it",
                      "extra_info": {}},
            "node_errors": {},
        },
    )  # fmt: skip
    assert "canonical lowercase UUID" in str(bad_id)
    no_class = validation_error(
        400,
        {
            "error": {"type": "missing_node_type", "message": "Node 'ID #3' has no class_type.",
                      "details": "Node ID '#3'", "extra_info": {"node_id": "3", "class_type":
                      None, "node_title": None}},
            "node_errors": {},
        },
    )  # fmt: skip
    assert str(no_class) == (
        "ComfyUI rejected the prompt: node 3 has no class_type: the graph is not in "
        "ComfyUI's API format, or is damaged"
    )


# -- every output kind ---------------------------------------------------------------------------


def node(class_type: str, **inputs: Any) -> dict[str, Any]:
    return {"class_type": class_type, "inputs": inputs}


def media_graph() -> dict[str, Any]:
    """One prompt with every output kind ComfyUI has: video (core and VHS), audio in three
    formats, text and 3-D."""
    frames, tone, mesh = ["1", 0], ["7", 0], ["12", 0]
    return {
        "1": node("EmptyImage", width=16, height=16, batch_size=3, color=0x336699),
        "2": node("CreateVideo", images=frames, fps=8.0),
        "3": node("SaveVideo", video=["2", 0], filename_prefix="m/v", format="auto", codec="auto"),
        "4": node("SaveWEBM", images=frames, filename_prefix="m/w", codec="vp9", fps=8.0, crf=32.0),
        "5": node(
            "SaveAnimatedWEBP",
            images=frames,
            filename_prefix="m/anim",
            fps=6.0,
            lossless=True,
            quality=80,
            method="default",
        ),
        "6": node(
            "VHS_VideoCombine",
            images=frames,
            frame_rate=8,
            loop_count=0,
            filename_prefix="m/vhs",
            format="image/gif",
            pingpong=False,
            save_output=True,
        ),
        "7": node("FakeTone", seconds=0.05, frequency=440.0),
        "8": node("SaveAudio", audio=tone, filename_prefix="m/flac"),
        "9": node("SaveAudioMP3", audio=tone, filename_prefix="m/mp3", quality="V0"),
        "10": node("SaveAudioOpus", audio=tone, filename_prefix="m/opus", quality="128k"),
        "11": node("PreviewAny", source="a caption"),
        "12": node("FakeMesh", count=1),
        "13": node("SaveGLB", mesh=mesh, filename_prefix="m/mesh"),
    }


@both_protocols
async def test_every_output_kind_comes_back(
    client: ComfyClient, fake_comfyui: Any, fake_protocol: str
) -> None:
    if fake_protocol == "current":
        fake_comfyui.state.assets = True  # file entries carry asset ids: ignored, not fatal
    result = await client.run(media_graph(), new_prompt_id(), timeout=30)
    found = {
        ref.node_id: (ref.kind, ref.animated, ref.filename.rsplit(".", 1)[-1])
        for ref in result.files
    }
    assert found == {
        "3": ("images", True, "mp4"),
        "4": ("images", True, "webm"),
        "5": ("images", True, "webp"),
        "6": ("gifs", False, "gif"),
        "8": ("audio", False, "flac"),
        "9": ("audio", False, "mp3"),
        "10": ("audio", False, "opus"),
        "13": ("3d", False, "glb"),
    }
    assert result.texts == {"11": ["a caption"]}
    sniffed = {
        ref.node_id: sniff_content_type(await client.fetch_output(ref)) for ref in result.files
    }
    assert sniffed == {
        "3": "video/mp4",
        "4": "video/webm",
        "5": "image/webp",
        "6": "image/gif",
        "8": "audio/flac",
        "9": "audio/mpeg",
        "10": "audio/ogg",
        "13": "model/gltf-binary",
    }


async def test_todays_extra_event_keys_are_taken_in_stride() -> None:
    """`activity` and `seconds` in progress_state, asset `id`/`preview_id` in `executed`: keys
    a client of 0.3.64 never saw, read past, not choked on."""
    watch = PromptWatch.for_graph("p", {"3": {"class_type": "KSampler", "inputs": {"steps": 4}}})
    watch.handle("execution_start", {"prompt_id": "p", "timestamp": 1})
    moved = watch.handle(
        "progress_state",
        {
            "prompt_id": "p",
            "nodes": {
                "3": {"value": 2, "max": 4, "state": "running", "node_id": "3",
                      "prompt_id": "p", "display_node_id": "3", "parent_node_id": None,
                      "real_node_id": "3", "activity": "sampling"},
                "4": {"value": 1, "max": 1, "state": "finished", "seconds": 0.4,
                      "activity": "loading"},
            },
        },
    )  # fmt: skip
    assert moved and 0 < watch.estimate() < 1
    assert not watch.handle(
        "executed",
        {"node": "9", "prompt_id": "p", "output": {"images": [{"filename": "a.png",
         "subfolder": "", "type": "output", "id": "3f2c...", "preview_id": "9a1b..."}]}},
    )  # fmt: skip
    files, _ = parse_outputs(
        {"9": {"images": [{"filename": "a.png", "subfolder": "", "type": "output", "id": "x",
                           "preview_id": "y"}]}},
        include_temp=False,
    )  # fmt: skip
    assert [(f.filename, f.kind) for f in files] == [("a.png", "images")]


def test_preview3d_names_a_model_file_that_may_not_be_an_output() -> None:
    outputs = {
        "5": {"result": ["mesh/ComfyUI_00001_.glb", None]},
        "6": {"3d": [{"filename": "ComfyUI_00001_.glb", "subfolder": "mesh", "type": "output",
                      "id": "0d5e..."}]},
        "7": {"text": ["mesh/not-a-model.txt"]},
    }  # fmt: skip
    files, texts = parse_outputs(outputs, include_temp=False)
    # The same file named twice is taken once, by the node that named it first.
    assert [(f.node_id, f.kind, f.subfolder, f.filename, f.optional) for f in files] == [
        ("5", "3d", "mesh", "ComfyUI_00001_.glb", True)
    ]
    assert texts == {"7": ["mesh/not-a-model.txt"]}
