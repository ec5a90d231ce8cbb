"""The fake ComfyUI's knobs and extras: the failure modes tests rely on must really happen.

Every test runs against both protocols the fake speaks (0.3.64 and today's), since the knobs
and failure modes are the same in both; prompt ids are canonical UUIDs, which both accept.
"""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys
import uuid
import wave
from pathlib import Path
from typing import Any

import pytest
import websocket
from PIL import Image

from tests.fake_comfyui.client import ComfyTestClient
from tests.fake_comfyui.fixtures import (
    FakeComfyUIProcess,
    both_protocols,
    free_port,
    start_fake_process,
)
from tests.fake_comfyui.state import ConfigError, FakeState
from tests.fake_comfyui.thread import FakeComfyUIThread
from tests.paths import REPO

INVERT = {
    "1": {
        "class_type": "EmptyImage",
        "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": 0xFF8000},
    },
    "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "inv"}},
}

TXT2IMG = {
    "4": {
        "class_type": "CheckpointLoaderSimple",
        "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"},
    },
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 48, "batch_size": 2}},
    "3": {
        "class_type": "KSampler",
        "inputs": {
            "seed": 5,
            "steps": 3,
            "cfg": 7.0,
            "sampler_name": "euler",
            "scheduler": "normal",
            "denoise": 1.0,
            "model": ["4", 0],
            "positive": ["6", 0],
            "negative": ["7", 0],
            "latent_image": ["5", 0],
        },
    },
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "t2i", "images": ["8", 0]}},
}


def graph(base: dict[str, Any], **changes: dict[str, Any]) -> dict[str, Any]:
    """A copy of `base` with node inputs changed: graph(INVERT, n3={"filename_prefix": "x"})."""
    out = copy.deepcopy(base)
    for key, inputs in changes.items():
        out[key.removeprefix("n")]["inputs"].update(inputs)
    return out


def pid(name: str) -> str:
    """A readable name as a canonical UUID prompt id (today's ComfyUI accepts nothing else)."""
    return str(uuid.uuid5(uuid.NAMESPACE_OID, name))


def png_bytes(color: tuple[int, int, int], size: tuple[int, int] = (20, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


@both_protocols
def test_fail_at_node_reports_execution_error_then_recovers(
    fake_client: ComfyTestClient,
    fake_comfyui: FakeComfyUIThread,
    fake_protocol: str,
) -> None:
    fake_comfyui.state.update({"fail_at_node": "2", "fail_times": 1, "fail_message": "boom"})
    failed = fake_client.run(INVERT)
    error = failed.last("execution_error")["data"]
    assert (error["node_id"], error["node_type"], error["executed"]) == ("2", "ImageInvert", ["1"])
    assert (error["exception_message"], error["exception_type"]) == ("boom\n", "RuntimeError")
    assert error["traceback"] and all(isinstance(line, str) for line in error["traceback"])
    assert "execution_success" not in failed.types()
    entry = failed.history[failed.prompt_id]
    assert (entry["status"]["status_str"], entry["status"]["completed"]) == ("error", False)
    assert entry["outputs"] == {} and entry["meta"] == {}

    again = fake_client.run(INVERT)  # fail_times is used up: node 1 comes from cache, 2 runs now
    assert again.last("execution_cached")["data"]["nodes"] == ["1"]
    assert "execution_success" in again.types()
    assert fake_comfyui.state.fail_times == 0
    assert fake_comfyui.stats()["nodes_run"] == {"EmptyImage": 1, "ImageInvert": 1, "SaveImage": 1}


@both_protocols
def test_first_load_delay_is_paid_once_per_checkpoint(
    fake_client: ComfyTestClient,
    fake_comfyui: FakeComfyUIThread,
    fake_protocol: str,
) -> None:
    fake_comfyui.state.first_load_delay = 0.3
    first = fake_client.run(TXT2IMG)
    fake_client.run(INVERT)  # evicts the loader from the cache: it runs again below
    second = fake_client.run(graph(TXT2IMG, n3={"seed": 6}))
    other = fake_client.run(graph(TXT2IMG, n4={"ckpt_name": "random_sd15.safetensors"}))
    assert fake_comfyui.stats()["nodes_run"]["CheckpointLoaderSimple"] == 3
    assert fake_comfyui.stats()["model_loads"] == [
        {"prompt_id": first.prompt_id, "ckpt_name": "v1-5-pruned-emaonly.safetensors",
         "seconds": 0.3},
        {"prompt_id": other.prompt_id, "ckpt_name": "random_sd15.safetensors", "seconds": 0.3},
    ]  # fmt: skip
    assert second.prompt_id not in {
        load["prompt_id"] for load in fake_comfyui.stats()["model_loads"]
    }


@both_protocols
def test_an_interrupted_first_load_loads_nothing(
    fake_client: ComfyTestClient,
    fake_comfyui: FakeComfyUIThread,
    fake_protocol: str,
) -> None:
    fake_comfyui.state.first_load_delay = 60.0  # the interrupt ends it early
    prompt_id = pid("loading")
    fake_client.post_prompt(TXT2IMG, prompt_id)
    while True:  # until the loader starts (the fake sends "executing" before it waits)
        message = fake_client.receive()
        if message["type"] == "executing" and message["data"].get("node") == "4":
            break
    fake_client.request("POST", "/interrupt")
    tail = [m["type"] for m in fake_client.collect(prompt_id) if m["type"] != "status"]
    assert tail[-2:] == ["execution_interrupted", "executing"]
    assert fake_comfyui.stats()["model_loads"] == []
    fake_comfyui.state.first_load_delay = 0.0
    again = fake_client.run(TXT2IMG)  # the checkpoint was never loaded: this run loads it
    assert [load["prompt_id"] for load in fake_comfyui.stats()["model_loads"]] == [again.prompt_id]


@both_protocols
def test_exec_delay_keeps_a_prompt_running_and_progress_counts_steps(
    fake_client: ComfyTestClient,
    fake_comfyui: FakeComfyUIThread,
    fake_protocol: str,
) -> None:
    fake_client.run(TXT2IMG)  # warm the model nodes so only sampling is slow
    fake_comfyui.state.exec_delay = 60.0  # ~0.6 s per step of 100; the interrupt ends it early
    prompt_id = pid("slow-one")
    fake_client.post_prompt(graph(TXT2IMG, n3={"steps": 100, "seed": 9}), prompt_id)
    first_progress = None
    while first_progress is None:
        message = fake_client.receive()
        if message["type"] == "progress":
            first_progress = message["data"]
    assert first_progress == {"value": 1, "max": 100, "prompt_id": prompt_id, "node": "3"}
    assert fake_comfyui.stats()["running"] == prompt_id
    assert fake_client.get_json("/prompt") == {"exec_info": {"queue_remaining": 1}}

    status, _, _ = fake_client.request("POST", "/interrupt", {"prompt_id": "someone-else"})
    assert status == 200
    assert fake_comfyui.call(lambda engine: engine._interrupt.is_set()) is False
    fake_client.request("POST", "/interrupt")  # no body: a global interrupt, as ComfyUI allows
    tail = fake_client.collect(prompt_id)
    ending = [m["type"] for m in tail if m["type"] != "status"]
    assert ending[-2:] == ["execution_interrupted", "executing"]
    assert fake_comfyui.stats()["interrupted"] == [prompt_id]
    assert fake_client.history(prompt_id)[prompt_id]["status"]["status_str"] == "error"


@both_protocols
def test_drop_ws_at_node_closes_sockets_once_and_the_prompt_still_finishes(
    fake_comfyui: FakeComfyUIThread,
    fake_protocol: str,
) -> None:
    fake_comfyui.state.drop_ws_at_node = "2"
    c = ComfyTestClient(fake_comfyui.url, client_id="dropper")
    c.connect()
    status, body = c.post_prompt(INVERT, pid("dropped-run"))
    assert (status, body["prompt_id"]) == (200, pid("dropped-run"))
    seen = []
    with pytest.raises(websocket.WebSocketConnectionClosedException):
        while True:
            message = c.receive()
            seen.append(message["type"])
    assert "executing" in seen and "execution_success" not in seen
    c.ws = None
    c.connect()  # same client id: the worker reconnects and falls back to /history
    entry = c.history(pid("dropped-run"))[pid("dropped-run")]
    assert entry["status"]["status_str"] == "success"
    assert fake_comfyui.state.drop_ws_at_node is None
    assert fake_comfyui.stats()["ws_drops"] == 1
    later = c.run(graph(INVERT, n3={"filename_prefix": "after"}))  # no second drop
    assert later.types()[-1] == "executing"
    c.close()


@both_protocols
def test_stats_count_executions_per_prompt_id_and_rejections(
    fake_client: ComfyTestClient,
    fake_comfyui: FakeComfyUIThread,
    fake_protocol: str,
) -> None:
    fake_client.run(INVERT, prompt_id=pid("same-id"))
    fake_client.run(graph(INVERT, n3={"filename_prefix": "second"}), prompt_id=pid("same-id"))
    fake_client.run(INVERT, prompt_id=pid("other-id"))
    assert fake_client.post_prompt(graph(INVERT, n1={"width": 0}))[0] == 400
    stats = fake_client.get_json("/fake/stats")
    assert stats == fake_comfyui.stats()
    assert stats["executed"] == {pid("same-id"): 2, pid("other-id"): 1}
    assert (stats["queued"], stats["rejected"], stats["interrupted"]) == (3, 1, [])


@both_protocols
def test_prompts_run_one_at_a_time_in_fifo_order(
    fake_client: ComfyTestClient,
    fake_comfyui: FakeComfyUIThread,
    fake_protocol: str,
) -> None:
    fake_comfyui.state.exec_delay = 0.05
    ids = [pid(f"fifo-{i}") for i in range(3)]
    for i, prompt_id in enumerate(ids):
        fake_client.post_prompt(graph(INVERT, n1={"color": i}), prompt_id)
    messages = fake_client.collect(ids[-1])
    events = [
        (m["type"], m["data"].get("prompt_id"))
        for m in messages
        if m["type"] in ("execution_start", "execution_success")
    ]
    assert events == [
        (kind, pid) for pid in ids for kind in ("execution_start", "execution_success")
    ]
    remaining = [
        m["data"]["status"]["exec_info"]["queue_remaining"]
        for m in messages
        if m["type"] == "status"
    ]
    assert remaining[0] == 1 and max(remaining) <= 3 and remaining[-1] == 0


@both_protocols
def test_events_go_only_to_the_prompts_client(
    fake_comfyui: FakeComfyUIThread, fake_protocol: str
) -> None:
    owner, bystander = ComfyTestClient(fake_comfyui.url), ComfyTestClient(fake_comfyui.url)
    owner.connect()
    bystander.connect()
    run = owner.run(INVERT)
    assert "execution_start" in run.types()
    bystander.ws.settimeout(0.5)  # type: ignore[union-attr]
    seen = []
    try:
        while True:
            seen.append(bystander.receive()["type"])
    except websocket.WebSocketTimeoutException:
        pass
    assert seen and set(seen) == {"status"}
    owner.close()
    bystander.close()


@both_protocols
def test_model_nodes_are_deterministic_and_validate_like_comfyui(
    fake_client: ComfyTestClient,
    fake_comfyui: FakeComfyUIThread,
    fake_protocol: str,
) -> None:
    first = fake_client.run(TXT2IMG)
    images = first.history[first.prompt_id]["outputs"]["9"]["images"]
    assert [i["filename"] for i in images] == ["t2i_00001_.png", "t2i_00002_.png"]
    assert Image.open(fake_comfyui.output_dir / images[0]["filename"]).size == (64, 48)
    progress = [m["data"]["value"] for m in first.ws if m["type"] == "progress"]
    assert progress == [1, 2, 3]

    same_seed = fake_client.run(graph(TXT2IMG, n9={"filename_prefix": "again"}))
    other_seed = fake_client.run(graph(TXT2IMG, n3={"seed": 6}, n9={"filename_prefix": "other"}))
    read = lambda name: (fake_comfyui.output_dir / name).read_bytes()  # noqa: E731
    assert read("again_00001_.png") == read("t2i_00001_.png")
    assert read("other_00001_.png") != read("t2i_00001_.png")
    assert read("t2i_00001_.png") != read("t2i_00002_.png")  # batch items differ
    assert same_seed.last("execution_cached")["data"]["nodes"] == ["4", "6", "7", "5", "3", "8"]
    assert other_seed.last("execution_cached")["data"]["nodes"] == ["4", "6", "7", "5"]

    bad = graph(TXT2IMG, n3={"sampler_name": "nope", "steps": 0, "cfg": 101, "denoise": "x"})
    status, body = fake_client.post_prompt(bad)
    kinds = {e["extra_info"]["input_name"]: e["type"] for e in body["node_errors"]["3"]["errors"]}
    assert status == 400 and kinds == {
        "sampler_name": "value_not_in_list",
        "steps": "value_smaller_than_min",
        "cfg": "value_bigger_than_max",
        "denoise": "invalid_input_type",
    }
    fake_comfyui.state.installed_checkpoints = ["only.safetensors"]
    status, body = fake_client.post_prompt(TXT2IMG)
    assert status == 400 and body["node_errors"]["4"]["errors"][0]["type"] == "value_not_in_list"


@both_protocols
def test_loadimage_subfolder_reupload_and_save_subfolder(
    fake_client: ComfyTestClient,
    fake_comfyui: FakeComfyUIThread,
    fake_protocol: str,
) -> None:
    assert fake_client.upload("pic.png", png_bytes((255, 0, 0)), subfolder="job1") == (
        200,
        {"name": "pic.png", "subfolder": "job1", "type": "input"},
    )
    assert fake_client.upload("pic.png", png_bytes((0, 255, 0)), subfolder="job1")[1]["name"] == (
        "pic (1).png"
    )
    load = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "job1/pic.png"}},
        "2": {
            "class_type": "SaveImage",
            "inputs": {"images": ["1", 0], "filename_prefix": "jobs/j1/out"},
        },
    }
    first = fake_client.run(load)
    image = first.history[first.prompt_id]["outputs"]["2"]["images"][0]
    assert image == {"filename": "out_00001_.png", "subfolder": "jobs/j1", "type": "output"}
    status, content, _ = fake_client.request(
        "GET", "/view?filename=out_00001_.png&subfolder=jobs/j1&type=output"
    )
    assert status == 200 and Image.open(io.BytesIO(content)).getpixel((0, 0)) == (255, 0, 0)

    assert fake_client.run(load).last("execution_cached")["data"]["nodes"] == ["1", "2"]
    fake_client.upload("pic.png", png_bytes((0, 0, 255)), subfolder="job1", overwrite=True)
    changed = fake_client.run(load)  # same name, new bytes: LoadImage must not come from cache
    assert changed.last("execution_cached")["data"]["nodes"] == []
    newest = changed.history[changed.prompt_id]["outputs"]["2"]["images"][0]["filename"]
    assert newest == "out_00002_.png"
    pixel = Image.open(fake_comfyui.output_dir / "jobs/j1" / newest).getpixel((0, 0))
    assert pixel == (0, 0, 255)


@both_protocols
def test_non_image_outputs_text_and_audio(
    fake_client: ComfyTestClient,
    fake_comfyui: FakeComfyUIThread,
    fake_protocol: str,
) -> None:
    run = fake_client.run(
        {
            "1": {"class_type": "ShowText", "inputs": {"text": "hello"}},
            "2": {"class_type": "FakeTone", "inputs": {"seconds": 0.1, "frequency": 440.0}},
            "3": {
                "class_type": "FakeSaveAudio",
                "inputs": {"audio": ["2", 0], "filename_prefix": "audio/tone"},
            },
        }
    )
    outputs = run.history[run.prompt_id]["outputs"]
    assert outputs["1"] == {"text": ["hello"]}
    assert outputs["3"] == {
        "audio": [{"filename": "tone_00001_.wav", "subfolder": "audio", "type": "output"}]
    }
    status, content, headers = fake_client.request(
        "GET", "/view?filename=tone_00001_.wav&subfolder=audio&type=output"
    )
    assert status == 200 and headers["Content-Type"].startswith("audio/")
    with wave.open(io.BytesIO(content)) as audio:
        assert audio.getnframes() == 800


@both_protocols
def test_config_over_http_and_from_env(
    fake_client: ComfyTestClient,
    fake_comfyui: FakeComfyUIThread,
    fake_protocol: str,
) -> None:
    status, raw, _ = fake_client.request(
        "POST", "/fake/config", {"exec_delay": "0.25", "installed_checkpoints": ["a.safetensors"]}
    )
    assert status == 200 and json.loads(raw)["exec_delay"] == 0.25
    assert fake_comfyui.state.installed_checkpoints == ["a.safetensors"]
    status, raw, _ = fake_client.request("POST", "/fake/config", {"no_such_knob": 1})
    assert status == 400 and "no_such_knob" in json.loads(raw)["error"]
    assert fake_client.get_json("/fake/config")["exec_delay"] == 0.25

    state = FakeState.from_env(
        {
            "FAKE_COMFYUI_DIE_AT_NODE": "7",
            "FAKE_COMFYUI_INSTALLED_CHECKPOINTS": "x.ckpt, y.ckpt",
            "FAKE_COMFYUI_PREVIEW_FRAMES": "true",
            "FAKE_COMFYUI_HISTORY_GAP": "0",
        }
    )
    assert (state.die_at_node, state.installed_checkpoints) == ("7", ["x.ckpt", "y.ckpt"])
    assert (state.preview_frames, state.history_gap) == (True, 0.0)
    with pytest.raises(ConfigError, match="exec_delay"):
        FakeState.from_env({"FAKE_COMFYUI_EXEC_DELAY": "soon"})


def wait_exit(proc: FakeComfyUIProcess, timeout: float = 20.0) -> int:
    return proc.proc.wait(timeout=timeout)


@both_protocols
def test_die_at_node_kills_the_subprocess_once_with_a_marker(
    tmp_path: Path, fake_protocol: str
) -> None:
    marker = tmp_path / "died-once"
    env = {
        "FAKE_COMFYUI_DIE_AT_NODE": "2",
        "FAKE_COMFYUI_DIE_EXIT_CODE": "7",
        "FAKE_COMFYUI_DIE_MARKER": str(marker),
    }
    env["FAKE_COMFYUI_PROTOCOL"] = fake_protocol
    first = start_fake_process(tmp_path / "base", env)
    try:
        first.wait_ready()
        c = ComfyTestClient(first.url)
        c.connect()
        assert c.post_prompt(INVERT, pid("doomed"))[0] == 200
        seen = []
        with pytest.raises((websocket.WebSocketConnectionClosedException, ConnectionError)):
            while True:
                seen.append(c.receive())
        assert seen[-1]["type"] == "executing" and seen[-1]["data"]["node"] == "2"
        assert wait_exit(first) == 7
        assert marker.exists()
        output = first.proc.stdout.read().decode() if first.proc.stdout else ""
        assert "To see the GUI go to: http://127.0.0.1:" in output and "POST /prompt" in output
    finally:
        first.stop()

    second = start_fake_process(tmp_path / "base", env, port=first.port)  # the supervisor's restart
    try:
        second.wait_ready()
        c = ComfyTestClient(second.url)
        c.connect()
        run = c.run(INVERT, pid("retried"))
        assert "execution_success" in run.types()
        assert (tmp_path / "base" / "output" / "inv_00001_.png").is_file()
        c.close()
    finally:
        second.stop()
    assert second.proc.returncode == 0


@both_protocols
def test_module_entry_point_accepts_comfyui_flags_and_directories(
    tmp_path: Path, fake_protocol: str
) -> None:
    port = free_port()
    out_dir, in_dir = tmp_path / "out", tmp_path / "in"
    cmd = [
        sys.executable,
        "-m",
        "tests.fake_comfyui",
        "--listen",
        "127.0.0.1",
        "--port",
        str(port),
        "--cpu",
        "--preview-method",
        "auto",
        "--disable-auto-launch",
        "--output-directory",
        str(out_dir),
        "--input-directory",
        str(in_dir),
        "--temp-directory",
        str(tmp_path),
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env={**os.environ, "FAKE_COMFYUI_PROTOCOL": fake_protocol},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    fake = FakeComfyUIProcess(proc, port, tmp_path)
    try:
        fake.wait_ready()
        c = ComfyTestClient(fake.url)
        c.connect()
        run = c.run(
            {"1": INVERT["1"], "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}},
            str(uuid.uuid4()),
        )
        preview = run.last("executed")["data"]["output"]["images"][0]
        assert (tmp_path / "temp" / preview["filename"]).is_file()  # ComfyUI: <temp dir>/temp
        c.run(INVERT)
        assert (out_dir / "inv_00001_.png").is_file() and in_dir.is_dir()
        c.close()
    finally:
        fake.stop()
    assert b"ignoring flags --preview-method auto --disable-auto-launch" in proc.stdout.read()  # type: ignore[union-attr]
