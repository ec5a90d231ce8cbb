"""What the fake's `current` protocol (ComfyUI 0.38.x) does differently from 0.3.64.

Each expectation comes from DELTA.md and the ComfyUI source it cites (server.py@002c3fb9,
comfy_execution/jobs.py@172be438, execution.py@04e2a914), or, for 0.3.64, from the recordings
(recordings/unknown_routes_0.3.64.json for the routes 0.3.64 lacks). Bodies are compared whole.
"""

from __future__ import annotations

import copy
import io
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.fake_comfyui.client import ComfyTestClient
from tests.fake_comfyui.fixtures import both_protocols, start_fake_process
from tests.fake_comfyui.state import PROTOCOL_0_3_64, PROTOCOL_CURRENT, ConfigError, FakeState
from tests.fake_comfyui.thread import FakeComfyUIThread
from tests.paths import RECORDINGS as RECORDINGS_DIR

RECORDINGS = RECORDINGS_DIR
UNKNOWN = json.loads((RECORDINGS / "unknown_routes_0.3.64.json").read_text())
current = pytest.mark.parametrize("fake_protocol", [PROTOCOL_CURRENT])

INVERT = {
    "1": {
        "class_type": "EmptyImage",
        "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": 0x2080FF},
    },
    "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "inv"}},
}
SLOW = {
    "4": {
        "class_type": "CheckpointLoaderSimple",
        "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"},
    },
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "3": {
        "class_type": "KSampler",
        "inputs": {
            "seed": 1,
            "steps": 40,
            "cfg": 7.0,
            "sampler_name": "euler",
            "scheduler": "normal",
            "denoise": 1.0,
            "model": ["4", 0],
            "positive": ["6", 0],
            "negative": ["6", 0],
            "latent_image": ["5", 0],
        },
    },
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "slow", "images": ["8", 0]}},
}


def new_id() -> str:
    return str(uuid.uuid4())


def invert(prefix: str, color: int = 0x2080FF) -> dict[str, Any]:
    graph = copy.deepcopy(INVERT)
    graph["1"]["inputs"]["color"] = color
    graph["3"]["inputs"]["filename_prefix"] = prefix
    return graph


def post_in_order(client: ComfyTestClient, *prompts: tuple[dict[str, Any], str]) -> None:
    """Queue prompts a few ms apart, so their create_time (ms) sorts them as posted."""
    for graph, prompt_id in prompts:
        assert client.post_prompt(graph, prompt_id)[0] == 200
        time.sleep(0.005)


def jobs(client: ComfyTestClient, query: str = "") -> tuple[int, Any]:
    status, raw, _ = client.request("GET", "/api/jobs" + query)
    return status, json.loads(raw)


def wait_progress(client: ComfyTestClient, prompt_id: str) -> None:
    """Until the prompt's sampler reports its first step: it is running, and slow."""
    while True:
        message = client.receive()
        if message["type"] == "progress" and message["data"]["prompt_id"] == prompt_id:
            return


# --- versions, flags and routes ---------------------------------------------------------------


@both_protocols
def test_system_stats_reports_the_version_spoken(
    fake_client: ComfyTestClient, fake_protocol: str
) -> None:
    stats = fake_client.get_json("/system_stats")
    recorded = UNKNOWN["system_stats_shape"]
    if fake_protocol == PROTOCOL_0_3_64:
        assert list(stats["system"]) == recorded["system_keys"]
        assert (stats["system"]["os"], stats["system"]["comfyui_version"]) == ("posix", "0.3.64")
    else:
        assert stats["system"]["comfyui_version"] == "0.38.1"
        assert stats["system"]["os"] == sys.platform == "linux"
        assert set(recorded["system_keys"]) < set(stats["system"])
        assert stats["system"]["deploy_environment"] == "local-git"
        packages = stats["system"]["comfy_package_versions"]
        assert packages and all(set(p) == {"name", "installed", "required"} for p in packages)
    assert list(stats["devices"][0]) == recorded["device_keys"]


@both_protocols
def test_feature_flags_follow_the_protocol(
    fake_comfyui: FakeComfyUIThread, fake_protocol: str
) -> None:
    client = ComfyTestClient(fake_comfyui.url)
    answer = client.connect(feature_flags={"supports_preview_metadata": True})[1]["data"]
    client.close()
    assert answer == client.get_json("/features")
    if fake_protocol == PROTOCOL_0_3_64:
        assert answer == {"supports_preview_metadata": True, "max_upload_size": 104857600}
    else:
        assert answer == {
            "supports_preview_metadata": True,
            "supports_model_type_tags": True,
            "max_upload_size": 104857600,
            "extension": {"manager": {"supports_v4": True}},
            "node_replacements": True,
            "assets": False,
        }


@both_protocols
def test_routes_a_version_lacks_answer_as_its_unknown_paths(
    fake_client: ComfyTestClient, fake_protocol: str
) -> None:
    """Under 0.3.64 the job routes answer what a real 0.3.64 answered (recorded); bare /jobs
    and unknown paths answer the same under both protocols."""
    for want in UNKNOWN["unknown_routes"]:
        if fake_protocol == PROTOCOL_CURRENT and want["path"].startswith("/api/"):
            continue  # those exist today: covered below
        body = {} if want["method"] == "POST" else None
        status, raw, headers = fake_client.request(want["method"], want["path"], body)
        got = (status, headers.get("Content-Type"), headers.get("Allow"), raw.decode())
        assert got == (want["status"], want["content_type"], want["allow"], want["body"]), want


@both_protocols
def test_prompt_ids_any_string_then_only_canonical_uuids(
    fake_client: ComfyTestClient, fake_comfyui: FakeComfyUIThread, fake_protocol: str
) -> None:
    if fake_protocol == PROTOCOL_0_3_64:  # recorded: any string, and null becomes "None"
        status, body = fake_client.post_prompt(invert("a"), "not-a-uuid")
        assert (status, body["prompt_id"]) == (
            200,
            UNKNOWN["prompt_id_free_text"]["body_prompt_id"],
        )
        status, raw, _ = fake_client.request(
            "POST", "/prompt", {"prompt": invert("b"), "prompt_id": None}
        )
        assert json.loads(raw)["prompt_id"] == UNKNOWN["prompt_id_null"]["body_prompt_id"]
        return
    rejected = {
        "error": {
            "type": "invalid_prompt_id",
            "message": "prompt_id must be a valid UUID",
            "details": "prompt_id must be a UUID string in canonical lowercase hyphenated form; "
            "omit it to let the server generate one",
            "extra_info": {},
        },
        "node_errors": {},
    }
    good = new_id()
    for bad in (good.upper(), "{" + good + "}", good.replace("-", ""), "job-1", 12, ""):
        status, raw, _ = fake_client.request(
            "POST", "/prompt", {"prompt": invert("x"), "prompt_id": bad}
        )
        assert (status, json.loads(raw)) == (400, rejected), bad
    assert fake_comfyui.stats()["queued"] == 0
    status, body = fake_client.post_prompt(invert("y"), good)
    assert (status, body["prompt_id"]) == (200, good)
    for absent in ({}, {"prompt_id": None}):
        status, raw, _ = fake_client.request("POST", "/prompt", {"prompt": invert("z"), **absent})
        minted = json.loads(raw)["prompt_id"]
        assert status == 200 and str(uuid.UUID(minted)) == minted


@current
def test_unknown_and_classless_nodes_are_missing_node_type(
    fake_client: ComfyTestClient, fake_protocol: str
) -> None:
    cases = [
        (
            {"1": {"class_type": "NoSuchNode", "inputs": {}}},
            "Node 'NoSuchNode' not found. The custom node may not be installed.",
            {"node_id": "1", "class_type": "NoSuchNode", "node_title": "NoSuchNode"},
        ),
        (
            {"7": {"class_type": "NoSuchNode", "inputs": {}, "_meta": {"title": "My Upscaler"}}},
            "Node 'My Upscaler' not found. The custom node may not be installed.",
            {"node_id": "7", "class_type": "NoSuchNode", "node_title": "My Upscaler"},
        ),
        (
            {"1": {"inputs": {}}},
            "Node 'ID #1' has no class_type. The workflow may be corrupted or a custom node is "
            "missing.",
            {"node_id": "1", "class_type": None, "node_title": None},
        ),
        (
            {"2": {"inputs": {}, "_meta": {"title": "Loader"}}},
            "Node 'Loader' has no class_type. The workflow may be corrupted or a custom node is "
            "missing.",
            {"node_id": "2", "class_type": None, "node_title": "Loader"},
        ),
    ]
    for graph, message, extra in cases:
        status, body = fake_client.post_prompt(graph)
        node_id = extra["node_id"]
        assert (status, body) == (
            400,
            {
                "error": {
                    "type": "missing_node_type",
                    "message": message,
                    "details": f"Node ID '#{node_id}'",
                    "extra_info": extra,
                },
                "node_errors": {},
            },
        )


@both_protocols
def test_create_time_and_api_keys_in_queue_and_history(
    fake_client: ComfyTestClient, fake_comfyui: FakeComfyUIThread, fake_protocol: str
) -> None:
    fake_comfyui.state.exec_delay = 30.0
    first, second = new_id(), new_id()
    extra = {"extra_data": {"api_key_comfy_org": "secret", "extra_pnginfo": {"n": 1}}}
    assert fake_client.post_prompt(invert("first"), first)[0] == 200
    assert fake_client.post_prompt(invert("second"), second, **extra)[0] == 200
    while fake_comfyui.stats()["running"] != first:
        fake_client.receive()  # until the first prompt has started
    pending = next(i for i in fake_client.get_json("/queue")["queue_pending"] if i[1] == second)
    fake_comfyui.state.exec_delay = 0.0
    fake_client.request("POST", "/interrupt", {"prompt_id": first})
    fake_client.collect(second)
    stored = fake_client.history(second)[second]["prompt"][3]
    if fake_protocol == PROTOCOL_0_3_64:  # 0.3.64 shows the raw item in /queue
        assert pending[3] == {**extra["extra_data"], "client_id": fake_client.client_id}
        assert stored == {"extra_pnginfo": {"n": 1}, "client_id": fake_client.client_id}
    else:
        created = pending[3]["create_time"]
        assert isinstance(created, int) and created > 1_700_000_000_000  # milliseconds
        assert pending[3] == {
            "extra_pnginfo": {"n": 1},
            "client_id": fake_client.client_id,
            "create_time": created,
        }
        assert stored == pending[3]


@both_protocols
def test_object_info_keys(fake_client: ComfyTestClient, fake_protocol: str) -> None:
    info = fake_client.get_json("/object_info/FakePreviewPassthrough")["FakePreviewPassthrough"]
    new_keys = {"is_input_list", "has_intermediate_output", "search_aliases"}
    if fake_protocol == PROTOCOL_0_3_64:
        assert not new_keys & set(info)
    else:
        assert {k: info[k] for k in new_keys} == {
            "is_input_list": False,
            "has_intermediate_output": True,
            "search_aliases": [],
        }


# --- the job API ------------------------------------------------------------------------------


@current
def test_jobs_list_filters_sorts_and_pages(
    fake_client: ComfyTestClient, fake_comfyui: FakeComfyUIThread, fake_protocol: str
) -> None:
    done = [fake_client.run(invert(f"done{i}")).prompt_id for i in range(3)]
    fake_comfyui.state.update({"fail_at_node": "2", "fail_times": 1})
    failed = fake_client.run(invert("boom", color=1)).prompt_id  # node 2 runs again, and fails
    flow = {"extra_data": {"extra_pnginfo": {"workflow": {"id": "wf-7"}}}}
    fake_comfyui.state.step_delay = 5.0
    running, waiting = new_id(), new_id()
    post_in_order(fake_client, (SLOW, running))
    fake_client.post_prompt(invert("waiting"), waiting, **flow)
    wait_progress(fake_client, running)

    status, body = jobs(fake_client)
    assert status == 200
    assert [job["id"] for job in body["jobs"]] == [waiting, running, failed, *reversed(done)]
    assert body["pagination"] == {"offset": 0, "limit": None, "total": 6, "has_more": False}
    by_id = {job["id"]: job for job in body["jobs"]}
    assert by_id[waiting] == {
        "id": waiting,
        "status": "pending",
        "priority": by_id[waiting]["priority"],
        "create_time": by_id[waiting]["create_time"],
        "outputs_count": 0,
        "previewable_outputs_count": 0,
        "workflow_id": "wf-7",
    }
    assert by_id[running]["status"] == "in_progress"
    assert by_id[failed]["status"] == "failed"
    assert by_id[failed]["execution_error"]["exception_message"] == (
        "Fake failure injected by fail_at_node\n"
    )
    finished = by_id[done[0]]
    assert finished["status"] == "completed" and finished["outputs_count"] == 1
    assert finished["preview_output"] == {
        "filename": "done0_00001_.png",
        "subfolder": "",
        "type": "output",
        "nodeId": "3",
        "mediaType": "images",
    }
    assert finished["execution_end_time"] >= finished["execution_start_time"]
    assert "outputs" not in finished and "workflow" not in finished

    assert [j["id"] for j in jobs(fake_client, "?status=completed&sort_order=asc")[1]["jobs"]] == (
        done
    )
    page = jobs(fake_client, "?limit=2&offset=1")[1]
    assert [j["id"] for j in page["jobs"]] == [running, failed]
    assert page["pagination"] == {"offset": 1, "limit": 2, "total": 6, "has_more": True}
    assert jobs(fake_client, "?offset=-4&limit=1")[1]["pagination"]["offset"] == 0
    assert [j["id"] for j in jobs(fake_client, "?workflow_id=wf-7")[1]["jobs"]] == [waiting]
    assert jobs(fake_client, "?status=pending,IN_PROGRESS")[1]["pagination"]["total"] == 2
    by_duration = jobs(fake_client, "?status=completed,failed&sort_by=execution_duration")[1]
    assert len(by_duration["jobs"]) == 4
    assert fake_client.get_json("/api/api/jobs?limit=1")["pagination"]["total"] == 6

    valid = "Valid values: pending, in_progress, completed, failed, cancelled"
    for query, error in [
        ("?status=done,pending", f"Invalid status value(s): done. {valid}"),
        ("?sort_by=name", "sort_by must be 'created_at' or 'execution_duration'"),
        ("?sort_order=up", "sort_order must be 'asc' or 'desc'"),
        ("?limit=0", "limit must be a positive integer"),
        ("?limit=many", "limit must be an integer"),
        ("?offset=x", "offset must be an integer"),
    ]:
        assert jobs(fake_client, query) == (400, {"error": error}), query
    fake_client.request("POST", "/api/jobs/cancel", {"job_ids": [running, waiting]})


@current
def test_job_detail_for_each_state(
    fake_client: ComfyTestClient, fake_comfyui: FakeComfyUIThread, fake_protocol: str
) -> None:
    run = fake_client.run(invert("detail"))
    detail = fake_client.get_json(f"/api/jobs/{run.prompt_id}")
    entry = run.history[run.prompt_id]
    assert detail["status"] == "completed"
    assert detail["outputs"] == entry["outputs"]
    assert detail["execution_status"] == entry["status"]
    assert detail["workflow"] == {"prompt": entry["prompt"][2], "extra_data": entry["prompt"][3]}

    fake_comfyui.state.step_delay = 5.0
    running, waiting = new_id(), new_id()
    post_in_order(fake_client, (SLOW, running), (invert("later"), waiting))
    wait_progress(fake_client, running)
    shown = fake_client.get_json(f"/api/jobs/{running}")
    assert shown["status"] == "in_progress" and shown["workflow"]["prompt"] == SLOW
    assert fake_client.get_json(f"/api/jobs/{waiting}")["status"] == "pending"
    status, raw, _ = fake_client.request("GET", f"/api/jobs/{new_id()}")
    assert (status, json.loads(raw)) == (404, {"error": "Job not found"})
    fake_client.request("POST", "/api/jobs/cancel", {"job_ids": [running, waiting]})


@current
def test_cancel_running_pending_finished_and_unknown_jobs(
    fake_client: ComfyTestClient, fake_comfyui: FakeComfyUIThread, fake_protocol: str
) -> None:
    finished = fake_client.run(invert("finished")).prompt_id
    fake_comfyui.state.step_delay = 5.0  # 40 steps: 200 s unless cancelled
    running, waiting, after = new_id(), new_id(), new_id()
    fake_client.post_prompt(SLOW, running)
    fake_client.post_prompt(invert("waiting"), waiting)
    fake_client.post_prompt(invert("after"), after)
    wait_progress(fake_client, running)

    def cancel(job_id: str) -> tuple[int, Any]:
        status, raw, _ = fake_client.request("POST", f"/api/jobs/{job_id}/cancel")
        return status, json.loads(raw)

    assert cancel(waiting) == (200, {"cancelled": True})
    assert cancel(waiting) == (200, {"cancelled": False})  # gone already
    assert cancel(finished) == (200, {"cancelled": False})
    assert cancel(new_id()) == (200, {"cancelled": False})
    assert cancel("not-even-a-uuid") == (200, {"cancelled": False})
    assert fake_comfyui.stats()["running"] == running
    assert cancel(running) == (200, {"cancelled": True})

    messages = fake_client.collect(running)
    ending = next(m for m in messages if m["type"].startswith("execution_"))
    assert ending["type"] == "execution_interrupted"
    assert ending["data"]["prompt_id"] == running and ending["data"]["node_type"] == "KSampler"
    assert fake_client.history(running)[running]["status"]["status_str"] == "error"
    assert fake_client.get_json(f"/api/jobs/{running}")["status"] == "cancelled"
    fake_comfyui.state.step_delay = 0.0
    fake_client.collect(after)  # the queue goes on with the next prompt
    assert fake_client.get_json(f"/api/jobs/{after}")["status"] == "completed"
    assert fake_client.get_json(f"/history/{waiting}") == {}  # a cancelled pending job
    status, _, _ = fake_client.request("GET", f"/api/jobs/{waiting}")
    assert status == 404
    assert fake_comfyui.stats()["executed"] == {finished: 1, running: 1, after: 1}
    assert fake_comfyui.stats()["interrupted"] == [running]


@current
def test_batch_cancel_bodies(
    fake_client: ComfyTestClient, fake_comfyui: FakeComfyUIThread, fake_protocol: str
) -> None:
    def batch(raw: bytes) -> tuple[int, Any]:
        status, body, _ = fake_client.request(
            "POST", "/api/jobs/cancel", raw=raw, headers={"Content-Type": "application/json"}
        )
        return status, json.loads(body)

    assert batch(b"{nope") == (400, {"error": "Request body must be valid JSON"})
    assert batch(b'{"job_ids": "a"}') == (400, {"error": "job_ids must be a list"})
    assert batch(b"[1, 2]") == (400, {"error": "job_ids must be a list"})
    good = new_id()
    assert batch(json.dumps({"job_ids": [good, good.upper(), 7, "x"]}).encode()) == (
        400,
        {"error": "job_ids contains invalid id(s)", "invalid_ids": [good.upper(), "7", "x"]},
    )
    assert batch(json.dumps({"job_ids": [good]}).encode()) == (200, {"cancelled": False})

    fake_comfyui.state.step_delay = 5.0
    running, waiting = new_id(), new_id()
    fake_client.post_prompt(SLOW, running)
    fake_client.post_prompt(invert("w"), waiting)
    wait_progress(fake_client, running)
    assert batch(json.dumps({"job_ids": [good, waiting, running]}).encode()) == (
        200,
        {"cancelled": True},
    )
    fake_client.collect(running)
    assert fake_client.get_json("/queue") == {"queue_running": [], "queue_pending": []}
    assert jobs(fake_client, "?status=cancelled")[1]["pagination"]["total"] == 1


@both_protocols
def test_interrupt_names_only_the_running_prompt_and_queue_delete(
    fake_client: ComfyTestClient, fake_comfyui: FakeComfyUIThread, fake_protocol: str
) -> None:
    """DELTA §6: /interrupt {prompt_id} acts only when that prompt is the one running."""
    fake_comfyui.state.step_delay = 5.0
    running, waiting, doomed = new_id(), new_id(), new_id()
    fake_client.post_prompt(SLOW, running)
    fake_client.post_prompt(invert("waits"), waiting)
    fake_client.post_prompt(invert("deleted"), doomed)
    wait_progress(fake_client, running)
    for other in (waiting, doomed, new_id()):
        assert fake_client.request("POST", "/interrupt", {"prompt_id": other})[0] == 200
    assert fake_comfyui.call(lambda engine: engine._interrupt.is_set()) is False
    assert fake_client.request("POST", "/queue", {"delete": [doomed]})[0] == 200
    fake_client.request("POST", "/interrupt", {"prompt_id": running})
    fake_comfyui.state.step_delay = 0.0
    fake_client.collect(waiting)
    assert fake_comfyui.stats()["interrupted"] == [running]
    assert fake_client.history(waiting)[waiting]["status"]["status_str"] == "success"
    assert fake_client.get_json(f"/history/{doomed}") == {}
    assert doomed not in fake_comfyui.stats()["executed"]


@both_protocols
def test_step_delay_makes_every_step_report_progress(
    fake_client: ComfyTestClient, fake_comfyui: FakeComfyUIThread, fake_protocol: str
) -> None:
    fake_comfyui.state.step_delay = 0.01
    run = fake_client.run(SLOW)
    steps = [m["data"]["value"] for m in run.ws if m["type"] == "progress"]
    assert steps == list(range(1, 41))
    assert "execution_success" in run.types()


# --- outputs ----------------------------------------------------------------------------------


# Three different 24x16 frames as node "1" (identical frames would be merged by the encoders).
FRAMES = {
    "10": SLOW["4"],
    "11": SLOW["6"],
    "12": {
        "class_type": "EmptyLatentImage",
        "inputs": {"width": 24, "height": 16, "batch_size": 3},
    },
    "13": {"class_type": "KSampler", "inputs": {**SLOW["3"]["inputs"], "steps": 1}},
    "1": {"class_type": "VAEDecode", "inputs": {"samples": ["13", 0], "vae": ["10", 2]}},
}
FRAMES["13"]["inputs"].update(
    model=["10", 0], positive=["11", 0], negative=["11", 0], latent_image=["12", 0]
)
FRAMES["11"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "frames", "clip": ["10", 1]}}


def view(client: ComfyTestClient, item: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    query = f"filename={item['filename']}&subfolder={item['subfolder']}&type={item['type']}"
    status, content, headers = client.request("GET", "/view?" + query)
    assert status == 200, item
    return content, headers


@both_protocols
def test_video_outputs_are_images_with_animated(
    fake_client: ComfyTestClient, fake_comfyui: FakeComfyUIThread, fake_protocol: str
) -> None:
    graph = {
        **FRAMES,
        "2": {"class_type": "CreateVideo", "inputs": {"images": ["1", 0], "fps": 12.0}},
        "3": {
            "class_type": "SaveVideo",
            "inputs": {
                "video": ["2", 0],
                "filename_prefix": "video/clip",
                "format": "auto",
                "codec": "auto",
            },
        },
        "4": {
            "class_type": "SaveWEBM",
            "inputs": {
                "images": ["1", 0],
                "filename_prefix": "w",
                "codec": "vp9",
                "fps": 24.0,
                "crf": 32.0,
            },
        },
        "5": {
            "class_type": "SaveAnimatedWEBP",
            "inputs": {
                "images": ["1", 0],
                "filename_prefix": "anim",
                "fps": 6.0,
                "lossless": True,
                "quality": 80,
                "method": "default",
            },
        },
    }
    run = fake_client.run(graph)
    outputs = run.history[run.prompt_id]["outputs"]
    assert outputs["3"] == {
        "images": [{"filename": "clip_00001_.mp4", "subfolder": "video", "type": "output"}],
        "animated": [True],
    }
    assert outputs["4"] == {
        "images": [{"filename": "w_00001_.webm", "subfolder": "", "type": "output"}],
        "animated": [True],
    }
    assert outputs["5"] == {
        "images": [{"filename": "anim_00001_.webp", "subfolder": "", "type": "output"}],
        "animated": [True],
    }
    mp4, headers = view(fake_client, outputs["3"]["images"][0])
    assert mp4[4:12] == b"ftypisom" and headers["Content-Type"] == "video/mp4"
    webm, headers = view(fake_client, outputs["4"]["images"][0])
    assert webm[:4] == b"\x1a\x45\xdf\xa3" and b"webm" in webm[:40]
    assert headers["Content-Type"] == "video/webm"
    webp, headers = view(fake_client, outputs["5"]["images"][0])
    assert headers["Content-Type"] == "image/webp"
    with Image.open(io.BytesIO(webp)) as picture:
        assert (picture.format, picture.n_frames, picture.size) == ("WEBP", 3, (24, 16))
    nosniff = headers.get("X-Content-Type-Options")
    assert nosniff == ("nosniff" if fake_protocol == PROTOCOL_CURRENT else None)


@both_protocols
def test_audio_text_and_vhs_gif_outputs(fake_client: ComfyTestClient, fake_protocol: str) -> None:
    tone = {"class_type": "FakeTone", "inputs": {"seconds": 0.1, "frequency": 330.0}}
    graph = {
        **FRAMES,
        "2": tone,
        "3": {"class_type": "SaveAudio", "inputs": {"audio": ["2", 0], "filename_prefix": "a/f"}},
        "4": {
            "class_type": "SaveAudioMP3",
            "inputs": {"audio": ["2", 0], "filename_prefix": "a/m", "quality": "320k"},
        },
        "5": {
            "class_type": "SaveAudioOpus",
            "inputs": {"audio": ["2", 0], "filename_prefix": "a/o", "quality": "64k"},
        },
        "6": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}},
        "7": {"class_type": "PreviewAny", "inputs": {"source": "plain words"}},
        "8": {
            "class_type": "VHS_VideoCombine",
            "inputs": {
                "images": ["1", 0],
                "frame_rate": 8,
                "loop_count": 0,
                "filename_prefix": "vhs/AnimateDiff",
                "format": "image/gif",
                "pingpong": False,
                "save_output": True,
            },
        },
    }
    run = fake_client.run(graph)
    outputs = run.history[run.prompt_id]["outputs"]
    sniffed = {
        "3": ("f_00001.flac", b"fLaC", "audio/flac"),
        "4": ("m_00001.mp3", b"ID3", "audio/mpeg"),
        "5": ("o_00001.opus", b"OggS", "audio/ogg"),
    }
    for node, (name, magic, content_type) in sniffed.items():
        item = {"filename": name, "subfolder": "a", "type": "output"}
        assert outputs[node] == {"audio": [item]}
        content, headers = view(fake_client, item)
        assert content.startswith(magic) and headers["Content-Type"] == content_type
    opus, _ = view(fake_client, outputs["5"]["audio"][0])
    assert opus[28:36] == b"OpusHead"
    assert outputs["6"]["text"][0].startswith("[")  # a non-string source is shown as text
    assert outputs["7"] == {"text": ["plain words"]}
    gif = outputs["8"]["gifs"][0]
    assert {k: gif[k] for k in ("filename", "subfolder", "type", "format", "frame_rate")} == {
        "filename": "AnimateDiff_00001.gif",
        "subfolder": "vhs",
        "type": "output",
        "format": "image/gif",
        "frame_rate": 8.0,
    }
    assert gif["workflow"] == "AnimateDiff_00001.png" and gif["fullpath"].endswith(
        "vhs/AnimateDiff_00001.gif"
    )
    content, headers = view(fake_client, gif)
    with Image.open(io.BytesIO(content)) as picture:
        assert (picture.format, picture.n_frames) == ("GIF", 3)
    assert headers["Content-Type"] == "image/gif"


@both_protocols
def test_intermediate_output_is_replayed_only_today(
    fake_client: ComfyTestClient, fake_protocol: str
) -> None:
    graph = {
        **INVERT,
        "2": {"class_type": "FakePreviewPassthrough", "inputs": {"images": ["1", 0]}},
    }
    first = fake_client.run(graph)
    assert [m["data"]["node"] for m in first.ws if m["type"] == "executed"] == ["2", "3"]
    again = copy.deepcopy(graph)
    again["3"]["inputs"]["filename_prefix"] = "again"
    second = fake_client.run(again)
    assert second.last("execution_cached")["data"]["nodes"] == ["1", "2"]
    executed = [m["data"]["node"] for m in second.ws if m["type"] == "executed"]
    types = second.types()
    if fake_protocol == PROTOCOL_CURRENT:
        assert executed == ["3", "2"]
        replay = [m for m in second.ws if m["type"] == "executed"][1]
        assert types.index("execution_success") > second.ws.index(replay)
        assert replay["data"]["output"] == first.history[first.prompt_id]["outputs"]["2"]
    else:
        assert executed == ["3"]
    assert set(second.history[second.prompt_id]["outputs"]) == {"2", "3"}


@both_protocols
def test_assets_knob_adds_ids_today_only(
    fake_client: ComfyTestClient, fake_comfyui: FakeComfyUIThread, fake_protocol: str
) -> None:
    fake_comfyui.state.assets = True
    first = fake_client.run(INVERT)
    again = fake_client.run(INVERT)  # fully cached: the same file, the same asset
    item = first.history[first.prompt_id]["outputs"]["3"]["images"][0]
    replayed = again.last("executed")["data"]["output"]["images"][0]
    if fake_protocol == PROTOCOL_0_3_64:
        assert set(item) == {"filename", "subfolder", "type"}
        assert "assets" not in fake_client.get_json("/features")
        return
    assert str(uuid.UUID(item["id"])) == item["id"] and item["preview_id"] == item["id"]
    assert first.last("executed")["data"]["output"]["images"][0] == item
    assert replayed == item
    assert fake_client.get_json("/features")["assets"] is True
    fake_comfyui.state.assets = False
    plain = fake_client.run(INVERT).last("executed")["data"]["output"]["images"][0]
    assert set(plain) == {"filename", "subfolder", "type"}


# --- switching ------------------------------------------------------------------------------


def test_protocol_knob_in_process_over_http_and_by_env(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="protocol must be one of"):
        FakeState.from_env({"FAKE_COMFYUI_PROTOCOL": "0.38"})
    with FakeComfyUIThread(tmp_path / "thread") as fake:
        client = ComfyTestClient(fake.url)
        assert client.get_json("/system_stats")["system"]["comfyui_version"] == "0.3.64"
        fake.state.protocol = PROTOCOL_CURRENT  # in-process, at any time
        assert client.get_json("/api/jobs")["jobs"] == []
        client.request("POST", "/fake/config", {"protocol": PROTOCOL_0_3_64})
        assert client.request("GET", "/api/jobs")[0] == 404
        status, raw, _ = client.request("POST", "/fake/config", {"protocol": "1.0"})
        assert status == 400 and "protocol must be one of" in json.loads(raw)["error"]

    process = start_fake_process(tmp_path / "proc", {"FAKE_COMFYUI_PROTOCOL": PROTOCOL_CURRENT})
    try:
        process.wait_ready()
        client = ComfyTestClient(process.url)
        assert client.get_json("/system_stats")["system"]["comfyui_version"] == "0.38.1"
        client.connect()
        run = client.run(INVERT)
        assert client.get_json(f"/api/jobs/{run.prompt_id}")["status"] == "completed"
        client.close()
    finally:
        process.stop()
