"""ComfyClient against the protocol-faithful fake ComfyUI (tests/fake_comfyui)."""

from __future__ import annotations

import asyncio
import copy
import io
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image

from processor.comfy.client import ComfyClient, Progress, RunResult, sniff_content_type
from processor.comfy.node_errors import validation_error
from processor.errors import (
    ComfyDiedWhileWaiting,
    ComfyInterrupted,
    ComfyRuntimeError,
    ComfyTimeout,
    ComfyUnavailable,
    ComfyValidationError,
)
from processor.job.retry_table import policy_for
from tests.fake_comfyui.state import PROTOCOLS
from tests.paths import WORKFLOWS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(params=PROTOCOLS)
def fake_protocol(request: pytest.FixtureRequest) -> str:
    """Every test here that uses the fake runs against both ComfyUI versions it speaks."""
    return str(request.param)


def pid(name: str) -> str:
    """A prompt id as today's ComfyUI accepts one (a canonical lowercase UUID), stable per name
    so a test can look it up in the fake's stats."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, name))


def load_graph(name: str) -> dict[str, Any]:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def tiny_txt2img(seed: int = 1, batch_size: int = 1, prefix: str = "t2i") -> dict[str, Any]:
    graph = load_graph("txt2img")
    graph["3"]["inputs"].update(seed=seed, steps=3)
    graph["5"]["inputs"].update(width=64, height=64, batch_size=batch_size)
    graph["6"]["inputs"]["text"] = "a photo of a cat"
    graph["7"]["inputs"]["text"] = "blurry"
    graph["9"]["inputs"]["filename_prefix"] = prefix
    return graph


def solid(prefix: str = "solid", color: int = 0x102030, width: int = 16) -> dict[str, Any]:
    graph = load_graph("solid")
    graph["1"]["inputs"].update(color=color, width=width, height=16)
    graph["3"]["inputs"]["filename_prefix"] = prefix
    return graph


def png_bytes(size: tuple[int, int], color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def image_of(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


async def fake_stats(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/fake/stats") as response:
        result: dict[str, Any] = await response.json()
        return result


@pytest.fixture
async def client(fake_comfyui: Any) -> AsyncIterator[ComfyClient]:
    async with ComfyClient(fake_comfyui.url) as comfy:
        await comfy.wait_ready(15)
        yield comfy


async def test_txt2img_yields_png_and_progress(client: ComfyClient) -> None:
    seen: list[Progress] = []
    result = await client.run(tiny_txt2img(), pid("run-t2i"), timeout=30, on_progress=seen.append)

    assert result.prompt_id == pid("run-t2i")
    assert [(f.node_id, f.kind, f.type) for f in result.files] == [("9", "images", "output")]
    assert result.files[0].filename.startswith("t2i")
    data = await client.fetch_output(result.files[0])
    assert data.startswith(PNG_MAGIC)
    assert image_of(data).size == (64, 64)
    assert result.execution_seconds >= 0
    # Progress: the sampler reported its steps, the estimate never went back, and ended at 1.
    assert any(p.node_type == "KSampler" and p.max == 3 for p in seen)
    fractions = [p.fraction for p in seen]
    assert fractions == sorted(fractions)
    assert fractions[-1] == 1.0
    assert all(0.0 <= f <= 1.0 for f in fractions)


async def test_img2img_uses_the_uploaded_input(client: ComfyClient, fake_comfyui: Any) -> None:
    value = await client.upload_input(png_bytes((48, 32), (200, 10, 10)), "photo.png", "job-a")
    assert value == "job-a/photo.png"
    assert (Path(fake_comfyui.input_dir) / "job-a" / "photo.png").is_file()

    graph = load_graph("img2img")
    graph["1"]["inputs"]["image"] = value
    graph["3"]["inputs"]["denoise"] = 0.0  # the output is the input, passed through the VAE
    result = await client.run(graph, pid("run-i2i"), timeout=30)

    [ref] = result.files
    picture = image_of(await client.fetch_output(ref)).convert("RGB")
    assert picture.size == (48, 32)
    assert picture.getpixel((10, 10)) == (200, 10, 10)


async def test_uploads_of_same_name_do_not_collide_between_jobs(
    client: ComfyClient, fake_comfyui: Any
) -> None:
    first = await client.upload_input(png_bytes((8, 8), (1, 2, 3)), "in.png", "job-1")
    second = await client.upload_input(png_bytes((8, 8), (9, 9, 9)), "dir/../in.png", "job-2")
    assert (first, second) == ("job-1/in.png", "job-2/in.png")
    colors = [
        image_of((Path(fake_comfyui.input_dir) / v).read_bytes()).convert("RGB").getpixel((0, 0))
        for v in (first, second)
    ]
    assert colors == [(1, 2, 3), (9, 9, 9)]


def test_content_type_is_sniffed_from_bytes() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="JPEG")
    assert sniff_content_type(buffer.getvalue()) == "image/jpeg"
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="WEBP")
    assert sniff_content_type(buffer.getvalue()) == "image/webp"
    assert sniff_content_type(png_bytes((2, 2), (0, 0, 0))) == "image/png"
    assert sniff_content_type(b"plain text") == "application/octet-stream"


async def test_scale_template_doubles_the_size(client: ComfyClient) -> None:
    value = await client.upload_input(png_bytes((20, 10), (0, 128, 0)), "small.png", "job-s")
    graph = load_graph("scale")
    graph["1"]["inputs"]["image"] = value
    result = await client.run(graph, pid("run-scale"), timeout=30)
    [ref] = result.files
    assert image_of(await client.fetch_output(ref)).size == (40, 20)


async def test_bad_checkpoint_is_a_readable_validation_error(
    client: ComfyClient, fake_comfyui: Any
) -> None:
    fake_comfyui.state.installed_checkpoints = ["a.safetensors", "b.safetensors"]
    graph = tiny_txt2img()
    graph["4"]["inputs"]["ckpt_name"] = "x.safetensors"
    with pytest.raises(ComfyValidationError) as caught:
        await client.queue_prompt(graph, pid("run-bad-ckpt"))
    error = caught.value
    assert error.lines == [
        "node 4 (CheckpointLoaderSimple) ckpt_name: 'x.safetensors' is not installed; "
        "installed: a.safetensors, b.safetensors (choose one with payload.ckpt_name, or add "
        "the file to ComfyUI's models folder)"
    ]
    assert "x.safetensors" in str(error)
    assert error.details["node_errors"]["4"]["class_type"] == "CheckpointLoaderSimple"
    assert not policy_for(error).retry
    assert pid("run-bad-ckpt") not in (await fake_stats(fake_comfyui.url)).get("executed", {})


async def test_value_below_min_is_a_readable_validation_error(client: ComfyClient) -> None:
    graph = solid()
    graph["1"]["inputs"]["width"] = -5
    with pytest.raises(ComfyValidationError) as caught:
        await client.run(graph, pid("run-below-min"), timeout=10)
    assert caught.value.lines == ["node 1 (EmptyImage) width: -5 is below the minimum 1"]
    assert str(caught.value).startswith("ComfyUI rejected the prompt: Prompt outputs failed")


# Bodies exactly as a real ComfyUI 0.3.64 answered (see the protocol recordings).
RECORDED_400 = [
    (
        {
            "error": {"type": "invalid_prompt", "message": "Cannot execute because node "
                      "NoSuchNode does not exist.", "details": "Node ID '#1'", "extra_info": {}},
            "node_errors": {},
        },
        "ComfyUI rejected the prompt: node 1 is of type 'NoSuchNode', which this ComfyUI does "
        "not have: install the custom node that provides it (docs/image.md), or fix the graph",
        [],
    ),
    (
        {
            "error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs "
                      "failed validation", "details": "", "extra_info": {}},
            "node_errors": {
                "1": {"errors": [{"type": "value_bigger_than_max", "message": "Value 999999 "
                      "bigger than max of 16384", "details": "width", "extra_info": {
                          "input_name": "width", "input_config": ["INT", {"default": 512,
                          "min": 1, "max": 16384, "step": 1}], "received_value": 999999}}],
                      "dependent_outputs": ["3"], "class_type": "EmptyImage"},
                "2": {"errors": [{"type": "required_input_missing", "message": "Required input"
                      " is missing", "details": "image", "extra_info": {"input_name": "image"}}],
                      "dependent_outputs": ["3"], "class_type": "ImageInvert"},
                "11": {"errors": [{"type": "value_not_in_list", "message": "Value not in list",
                       "details": "upscale_method: 'foo' not in [...]", "extra_info": {
                           "input_name": "upscale_method", "input_config": [["nearest-exact",
                           "bilinear"], {}], "received_value": "foo"}}],
                       "dependent_outputs": ["13"], "class_type": "ImageScale"},
                "10": {"errors": [{"type": "custom_validation_failed", "message": "Custom "
                       "validation failed for node", "details": "image - Invalid image file: "
                       "no_such_file.png", "extra_info": {"input_name": "image"}}],
                       "dependent_outputs": ["13"], "class_type": "LoadImage"},
                "12": {"errors": [{"type": "return_type_mismatch", "message": "Return type "
                       "mismatch between linked nodes", "details": "images, received_type("
                       "LATENT) mismatch input_type(IMAGE)", "extra_info": {"input_name":
                       "images", "input_config": ["IMAGE", {}], "received_type": "LATENT",
                       "linked_node": ["1", 0]}}], "dependent_outputs": ["12"],
                       "class_type": "SaveImage"},
                "13": {"errors": [{"type": "invalid_input_type", "message": "Failed to convert "
                       "an input value to a INT value", "details": "width, abc, invalid",
                       "extra_info": {"input_name": "width", "input_config": ["INT", {}],
                       "received_value": "abc", "exception_message": "invalid literal for "
                       "int() with base 10: 'abc'"}}], "dependent_outputs": ["13"],
                       "class_type": "EmptyImage"},
            },
        },
        "ComfyUI rejected the prompt: Prompt outputs failed validation",
        [
            "node 1 (EmptyImage) width: 999999 is above the maximum 16384",
            "node 2 (ImageInvert) image: required input is missing",
            "node 10 (LoadImage) image: Invalid image file: no_such_file.png",
            "node 11 (ImageScale) upscale_method: 'foo' is not one of: nearest-exact, bilinear",
            "node 12 (SaveImage) images: linked to an output of type LATENT from node 1, "
            "but needs IMAGE",
            "node 13 (EmptyImage) width: 'abc' is not a valid INT (invalid literal for int() "
            "with base 10: 'abc')",
        ],
    ),
]  # fmt: skip


@pytest.mark.parametrize(("body", "headline", "lines"), RECORDED_400)
def test_recorded_400_bodies_read_well(body: dict[str, Any], headline: str, lines: list[str]):
    error = validation_error(400, body)
    assert str(error).splitlines()[0] == headline
    assert error.lines == lines
    assert str(error).splitlines()[1:] == [f"  - {line}" for line in lines]


async def test_runtime_error_names_node_and_exception(
    client: ComfyClient, fake_comfyui: Any
) -> None:
    fake_comfyui.state.fail_at_node = "2"
    with pytest.raises(ComfyRuntimeError) as caught:
        await client.run(solid(), pid("run-fail"), timeout=30)
    error = caught.value
    assert (error.node_id, error.node_type) == ("2", "ImageInvert")
    assert error.exception_type == "RuntimeError"
    assert fake_comfyui.state.fail_message in error.exception_message
    assert str(error).startswith("node 2 (ImageInvert) failed: RuntimeError: ")
    assert error.details["traceback"]
    # A node that raised may not raise on another attempt (an out-of-memory, a flaky custom
    # node): the retry table retries it, as the worker always has (the old, unread
    # ``retryable`` flag said otherwise).
    assert policy_for(error).retry


async def test_timeout_interrupts_the_prompt(client: ComfyClient, fake_comfyui: Any) -> None:
    fake_comfyui.state.exec_delay = 20.0
    with pytest.raises(ComfyTimeout, match=r"timed out after 0\.5 s"):
        await client.run(tiny_txt2img(seed=7), pid("run-slow"), timeout=0.5)
    stats = await fake_stats(fake_comfyui.url)
    assert stats["interrupted"] == [pid("run-slow")]
    # ComfyUI is free again: the next prompt runs normally.
    fake_comfyui.state.exec_delay = 0.0
    result = await client.run(solid(), pid("run-after-timeout"), timeout=30)
    assert len(result.files) == 1


async def test_timeout_while_still_queued_drops_it_from_the_queue(
    client: ComfyClient, fake_comfyui: Any
) -> None:
    fake_comfyui.state.exec_delay = 20.0
    await client.queue_prompt(tiny_txt2img(seed=31), pid("run-busy"))
    await client.queue_prompt(solid(prefix="never"), pid("run-never"))
    with pytest.raises(ComfyTimeout, match=rf"{pid('run-never')} timed out after 0\.3 s"):
        await client.wait_for(pid("run-never"), timeout=0.3)
    await client.cancel(pid("run-busy"))
    with pytest.raises(ComfyInterrupted):
        await client.wait_for(pid("run-busy"), timeout=30)
    stats = await fake_stats(fake_comfyui.url)
    assert pid("run-never") not in stats["executed"]
    assert stats["pending"] == 0


async def test_interrupt_by_someone_else_is_reported(
    client: ComfyClient, fake_comfyui: Any
) -> None:
    fake_comfyui.state.exec_delay = 20.0
    await client.queue_prompt(tiny_txt2img(seed=8), pid("run-cancelled"))
    waiter = asyncio.ensure_future(client.wait_for(pid("run-cancelled"), timeout=30))
    await asyncio.sleep(0.3)
    async with ComfyClient(fake_comfyui.url) as other:
        await other.cancel(pid("run-cancelled"))
    with pytest.raises(ComfyInterrupted, match=f"{pid('run-cancelled')} was interrupted"):
        await waiter


async def test_websocket_drop_mid_run_still_completes(
    client: ComfyClient, fake_comfyui: Any
) -> None:
    fake_comfyui.state.drop_ws_at_node = "3"
    fake_comfyui.state.exec_delay = 0.3
    result = await client.run(tiny_txt2img(seed=11), pid("run-drop"), timeout=30)
    assert fake_comfyui.state.drop_ws_at_node is None  # the fake did drop the socket
    assert len(result.files) == 1
    assert (await client.fetch_output(result.files[0])).startswith(PNG_MAGIC)


async def test_prompt_finishing_while_disconnected_completes_from_history(
    client: ComfyClient, fake_comfyui: Any
) -> None:
    # Dropped at the last node with no delay: the prompt ends before the socket is back.
    fake_comfyui.state.drop_ws_at_node = "3"
    result = await client.run(solid(prefix="while-down"), pid("run-drop-end"), timeout=30)
    assert [f.filename.startswith("while-down") for f in result.files] == [True]


async def test_reused_prompt_id_is_not_settled_by_the_old_history_entry(
    client: ComfyClient, fake_comfyui: Any
) -> None:
    fake_comfyui.state.fail_at_node = "2"
    fake_comfyui.state.fail_times = 1
    with pytest.raises(ComfyRuntimeError):
        await client.run(solid(prefix="reuse"), pid("run-reuse"), timeout=30)
    # Same id again (a retried job); the socket drops, so /history is consulted on reconnect
    # while it still holds the failed first attempt.
    fake_comfyui.state.drop_ws_at_node = "2"
    fake_comfyui.state.exec_delay = 0.3
    result = await client.run(solid(prefix="reuse"), pid("run-reuse"), timeout=30)
    assert result.files[0].filename.startswith("reuse")


async def test_cached_resubmission_still_yields_outputs(client: ComfyClient) -> None:
    first = await client.run(solid(prefix="cached"), pid("run-cache-1"), timeout=30)
    second = await client.run(solid(prefix="cached"), pid("run-cache-2"), timeout=30)
    assert sorted(second.cached_nodes) == ["1", "2", "3"]
    assert second.files == first.files
    assert (await client.fetch_output(second.files[0])).startswith(PNG_MAGIC)


async def test_batch_of_three_gives_three_files(client: ComfyClient) -> None:
    result = await client.run(
        tiny_txt2img(batch_size=3, prefix="batch"), pid("run-batch"), timeout=30
    )
    assert len(result.files) == 3
    assert len({f.filename for f in result.files}) == 3
    for ref in result.files:
        assert (await client.fetch_output(ref)).startswith(PNG_MAGIC)


async def test_non_image_outputs(client: ComfyClient) -> None:
    graph = {
        "1": {"class_type": "ShowText", "inputs": {"text": "hello from a node"}},
        "2": {"class_type": "FakeTone", "inputs": {"seconds": 0.05, "frequency": 440.0}},
        "3": {"class_type": "FakeSaveAudio", "inputs": {"audio": ["2", 0],
                                                         "filename_prefix": "audio/tone"}},
    }  # fmt: skip
    result = await client.run(graph, pid("run-audio"), timeout=30)
    assert result.texts == {"1": ["hello from a node"]}
    [ref] = result.files
    assert (ref.node_id, ref.kind, ref.subfolder) == ("3", "audio", "audio")
    data = await client.fetch_output(ref)
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"


async def test_temp_outputs_only_when_asked(client: ComfyClient) -> None:
    graph = solid()
    graph["3"] = {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}
    plain = await client.run(graph, pid("run-preview-1"), timeout=30)
    assert plain.files == []
    assert [f.type for f in plain.temp_files] == ["temp"]
    graph["1"]["inputs"]["color"] = 0x00FF00
    with_temp = await client.run(graph, pid("run-preview-2"), timeout=30, include_temp=True)
    assert [(f.kind, f.type) for f in with_temp.files] == [("images", "temp")]
    assert (await client.fetch_output(with_temp.files[0])).startswith(PNG_MAGIC)


async def test_two_prompts_queued_ahead_both_complete(
    client: ComfyClient, fake_comfyui: Any
) -> None:
    fake_comfyui.state.exec_delay = 0.2
    first_graph = tiny_txt2img(seed=21, prefix="ahead-a")
    second_graph = tiny_txt2img(seed=22, prefix="ahead-b")
    await client.queue_prompt(first_graph, pid("run-ahead-a"))
    await client.queue_prompt(second_graph, pid("run-ahead-b"))
    first = await client.wait_for(pid("run-ahead-a"), timeout=30)
    fake_comfyui.state.exec_delay = 0.0
    second_progress: list[Progress] = []
    second = await client.wait_for(
        pid("run-ahead-b"), timeout=30, on_progress=second_progress.append
    )
    assert first.files[0].filename.startswith("ahead-a")
    assert second.files[0].filename.startswith("ahead-b")
    executed = (await fake_stats(fake_comfyui.url))["executed"]
    assert executed.get(pid("run-ahead-a")) and executed.get(pid("run-ahead-b"))


async def test_waiting_concurrently_on_several_prompts(client: ComfyClient) -> None:
    graphs = {pid(f"run-many-{i}"): solid(prefix=f"many{i}", color=i) for i in range(4)}
    for prompt_id, graph in graphs.items():
        await client.queue_prompt(graph, prompt_id)
    results: list[RunResult] = await asyncio.gather(
        *(client.wait_for(prompt_id, timeout=30) for prompt_id in graphs)
    )
    assert [r.files[0].filename.split("_")[0] for r in results] == [f"many{i}" for i in range(4)]


async def test_wait_for_a_prompt_this_client_did_not_queue(
    client: ComfyClient, fake_comfyui: Any
) -> None:
    async with ComfyClient(fake_comfyui.url) as other:
        await other.wait_ready(10)
        await other.run(solid(prefix="other"), pid("run-other"), timeout=30)
    result = await client.wait_for(pid("run-other"), timeout=10)
    assert result.files[0].filename.startswith("other")


async def test_history_gap_is_retried(client: ComfyClient, fake_comfyui: Any) -> None:
    fake_comfyui.state.history_gap = 0.4
    result = await client.run(copy.deepcopy(solid(prefix="gap")), pid("run-gap"), timeout=30)
    assert len(result.files) == 1


async def test_wait_ready_names_url_and_log_tail() -> None:
    async with ComfyClient("http://127.0.0.1:9") as comfy:
        with pytest.raises(ComfyUnavailable) as caught:
            await comfy.wait_ready(0.3, log_tail=lambda: "CUDA out of memory\n")
    message = str(caught.value)
    assert "http://127.0.0.1:9" in message
    assert "CUDA out of memory" in message
    assert policy_for(caught.value).retry


async def test_a_crash_is_blamed_on_the_running_prompt_not_the_waiting_one(
    client: ComfyClient, fake_comfyui: Any
) -> None:
    fake_comfyui.state.exec_delay = 20.0
    started = asyncio.Event()
    await client.queue_prompt(tiny_txt2img(seed=41), pid("run-suspect"))
    await client.queue_prompt(solid(prefix="bystander"), pid("run-bystander"))
    suspect = asyncio.ensure_future(
        client.wait_for(pid("run-suspect"), timeout=30, on_progress=lambda _: started.set())
    )
    bystander = asyncio.ensure_future(client.wait_for(pid("run-bystander"), timeout=30))
    await asyncio.wait_for(started.wait(), 10)

    client.fail_pending(ComfyUnavailable("died"), waiting=ComfyDiedWhileWaiting("waited"))
    with pytest.raises(ComfyUnavailable) as ran:
        await suspect
    assert not isinstance(ran.value, ComfyDiedWhileWaiting)
    with pytest.raises(ComfyDiedWhileWaiting, match="waited"):
        await bystander
    await client.cancel(pid("run-suspect"))


async def test_a_crash_between_prompts_blames_every_prompt(
    client: ComfyClient, fake_comfyui: Any
) -> None:
    """Nobody is known to have been running: no prompt may go uncounted."""
    fake_comfyui.state.gc_pause = 5.0  # after each prompt the queue stalls for 5 s
    fake_comfyui.state.gc_interval = 0.0
    await client.run(solid(prefix="before"), pid("run-before"), timeout=30)
    await client.queue_prompt(solid(prefix="next"), pid("run-next"))  # waits out the stall
    waiter = asyncio.ensure_future(client.wait_for(pid("run-next"), timeout=30))
    client.fail_pending(ComfyUnavailable("died"), waiting=ComfyDiedWhileWaiting("waited"))
    with pytest.raises(ComfyUnavailable) as caught:
        await waiter
    assert not isinstance(caught.value, ComfyDiedWhileWaiting)
