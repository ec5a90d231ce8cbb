"""The fake ComfyUI against recordings of a real ComfyUI 0.3.64.

Every graph here is the one the recording's /history shows, replayed over real HTTP and a real
websocket (websocket-client, as the worker uses). Where the fake and a recording disagree, the
fake is wrong: message types must come in the recorded order with the recorded data keys, 400
bodies must have the recorded shape and error types, history entries the recorded structure.

Tests marked @both_protocols run against both versions the fake speaks: today's ComfyUI shares
these behaviours, with the differences DELTA.md documents (`create_time` in extra_data, UUID-only
prompt ids), which the helpers allow for. tests/processor/comfy/test_fake_current_protocol.py
covers the rest.
"""

from __future__ import annotations

import copy
import io
import json
import re
from typing import Any

import pytest
from PIL import Image

from tests.fake_comfyui.client import ComfyTestClient, Run
from tests.fake_comfyui.fixtures import both_protocols
from tests.fake_comfyui.state import PROTOCOL_CURRENT, PROTOCOLS
from tests.fake_comfyui.thread import FakeComfyUIThread
from tests.paths import RECORDINGS


def load(name: str) -> dict[str, Any]:
    return dict(json.loads((RECORDINGS / name).read_text()))


WEIGHTFREE = load("weightfree.json")
EXTRA = load("extra.json")


def recorded_prompt(run: dict[str, Any]) -> dict[str, Any]:
    """The API graph the recorded run executed, from its history entry."""
    entry = next(iter(run["history"].values()))
    return copy.deepcopy(entry["prompt"][2])


def shape(value: Any) -> Any:
    """Structure without values: dict keys, list element shape, scalar type names."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return ["list", *([shape(value[0])] if value else [])]
    return None if value is None else type(value).__name__


def digits_free(name: str) -> str:
    return re.sub(r"\d{5}", "NNNNN", name)


def recorded_extra_keys(recorded: dict[str, Any], current: bool) -> set[str]:
    """The recorded extra_data keys; today's ComfyUI adds the queueing time, create_time."""
    return set(recorded) | ({"create_time"} if current else set())


def assert_run_matches(
    ours: Run,
    recorded: dict[str, Any],
    exact_files: bool = True,
    same_number: bool = True,
    current: bool = False,
) -> None:
    """Same message types in the same order, same data keys, same caching and history shape.

    `same_number` is False for runs whose recorded queue number came from prompts this test
    does not replay; `exact_files` is False where earlier files shifted the counter.
    """
    assert ours.post_status == recorded["post_status"] == 200
    assert ours.post_body.keys() == recorded["post_body"].keys()
    assert ours.post_body["prompt_id"] == ours.prompt_id
    assert ours.types() == [m["type"] for m in recorded["ws"]]
    for mine, theirs in zip(ours.ws, recorded["ws"], strict=True):
        assert shape(mine["data"]) == shape(theirs["data"]), mine["type"]
        data, want = mine["data"], theirs["data"]
        if mine["type"] in ("execution_start", "execution_success", "executing", "executed"):
            assert data["prompt_id"] == ours.prompt_id
        if mine["type"] == "execution_cached":
            assert data["nodes"] == want["nodes"]
        if mine["type"] == "executing":
            assert data["node"] == want["node"]
        if mine["type"] == "status":
            assert data == want
        if mine["type"] == "progress_state":
            assert {k: (n["state"], n["value"], n["max"]) for k, n in data["nodes"].items()} == {
                k: (n["state"], n["value"], n["max"]) for k, n in want["nodes"].items()
            }
        if mine["type"] == "progress":
            assert (data["value"], data["max"], data["node"]) == (
                want["value"],
                want["max"],
                want["node"],
            )
        if mine["type"] == "executed":
            got = json.dumps(data["output"], sort_keys=True)
            expected = json.dumps(want["output"], sort_keys=True)
            if not exact_files:
                got, expected = digits_free(got), digits_free(expected)
            if data["output"]["images"][0]["type"] == "temp":  # random ComfyUI_temp_xxxxx_
                got, expected = (
                    re.sub(r"temp_\w{5}_", "temp_", got),
                    re.sub(r"temp_\w{5}_", "temp_", expected),
                )
            assert got == expected
    assert_history_matches(ours, next(iter(recorded["history"].values())), same_number, current)


def assert_history_matches(
    ours: Run, want: dict[str, Any], same_number: bool = True, current: bool = False
) -> None:
    entry = ours.history[ours.prompt_id]
    assert list(entry) == list(want)
    number, prompt_id, prompt, extra, outputs = entry["prompt"]
    assert (prompt_id, prompt, outputs) == (ours.prompt_id, want["prompt"][2], want["prompt"][4])
    assert isinstance(number, int)
    if same_number:
        assert number == want["prompt"][0]
    assert extra.keys() == recorded_extra_keys(want["prompt"][3], current)
    if current:
        assert isinstance(extra["create_time"], int)
    assert shape(entry["status"]) == shape(want["status"])
    assert [m[0] for m in entry["status"]["messages"]] == [m[0] for m in want["status"]["messages"]]
    assert entry["status"]["status_str"] == want["status"]["status_str"]
    assert entry["status"]["completed"] == want["status"]["completed"]
    assert shape(entry["outputs"]) == shape(want["outputs"])
    assert entry["meta"] == want["meta"]


def test_websocket_greeting_and_feature_flags(fake_comfyui: FakeComfyUIThread) -> None:
    plain = ComfyTestClient(fake_comfyui.url, client_id="fixed-client-id")
    greeting = plain.connect()
    assert shape(greeting) == shape(WEIGHTFREE["ws_on_connect"])
    assert greeting[0]["data"]["sid"] == "fixed-client-id"
    assert greeting[0]["data"]["status"] == WEIGHTFREE["ws_on_connect"][0]["data"]["status"]
    plain.close()

    flagged = ComfyTestClient(fake_comfyui.url)
    handshake = flagged.connect(feature_flags={"supports_preview_metadata": True})
    recorded = WEIGHTFREE["ws_feature_flags_handshake"]
    assert [m["type"] for m in handshake] == [m["type"] for m in recorded]
    assert handshake[1] == recorded[1]
    flagged.close()


@both_protocols
def test_invert_fresh_then_fully_cached_then_new_prefix(
    fake_client: ComfyTestClient, fake_protocol: str
) -> None:
    current = fake_protocol == PROTOCOL_CURRENT
    for key in ("A1_invert_first", "A2_invert_identical_again", "A3_invert_new_prefix_only"):
        recorded = WEIGHTFREE[key]
        assert_run_matches(fake_client.run(recorded_prompt(recorded)), recorded, current=current)


@both_protocols
def test_upload_load_scale_blur_and_view(
    fake_client: ComfyTestClient, fake_comfyui: FakeComfyUIThread, fake_protocol: str
) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (80, 60), (10, 200, 30)).save(buffer, format="PNG")
    status, body = fake_client.upload("peer_upload.png", buffer.getvalue())
    assert (status, body) == (
        WEIGHTFREE["upload_image"]["status"],
        WEIGHTFREE["upload_image"]["body"],
    )
    assert (fake_comfyui.input_dir / "peer_upload.png").read_bytes() == buffer.getvalue()

    recorded = WEIGHTFREE["B_load_scale_blur"]
    run = fake_client.run(recorded_prompt(recorded))
    assert_run_matches(run, recorded, same_number=False, current=fake_protocol == PROTOCOL_CURRENT)

    image = run.last("executed")["data"]["output"]["images"][0]
    status, content, headers = fake_client.request(
        "GET", f"/view?filename={image['filename']}&subfolder=&type=output"
    )
    want = WEIGHTFREE["view_output"]
    assert status == want["status"]
    assert headers["Content-Type"] == want["content_type"]
    assert content[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(Image.open(io.BytesIO(content)).size) == want["size"]

    status, content, _ = fake_client.request(
        "GET", "/view?filename=nope.png&subfolder=&type=output"
    )
    assert (status, content.decode()) == (
        WEIGHTFREE["view_missing"]["status"],
        WEIGHTFREE["view_missing"]["body"],
    )


@both_protocols
def test_preview_runtime_error_and_queue_endpoints(
    fake_client: ComfyTestClient, fake_comfyui: FakeComfyUIThread, fake_protocol: str
) -> None:
    current = fake_protocol == PROTOCOL_CURRENT
    preview_rec, error_rec = WEIGHTFREE["C_preview_image"], WEIGHTFREE["R_runtime_error"]
    preview = fake_client.run(recorded_prompt(preview_rec))
    assert_run_matches(preview, preview_rec, same_number=False, current=current)
    for image in preview.last("executed")["data"]["output"]["images"]:
        assert (fake_comfyui.temp_dir / image["filename"]).is_file()

    failed = fake_client.run(recorded_prompt(error_rec))
    assert_run_matches(failed, error_rec, same_number=False, current=current)
    error = failed.last("execution_error")["data"]
    want = next(m for m in error_rec["ws"] if m["type"] == "execution_error")["data"]
    for key in ("node_id", "node_type", "executed", "exception_message", "exception_type"):
        assert error[key] == want[key], key
    assert all(isinstance(line, str) for line in error["traceback"]) and error["traceback"]
    assert failed.history[failed.prompt_id]["outputs"] == {}

    assert fake_client.get_json("/queue") == WEIGHTFREE["queue_after"]
    assert fake_client.get_json("/prompt") == WEIGHTFREE["get_prompt"]
    assert list(fake_client.get_json("/history?max_items=2")) == [
        preview.prompt_id,
        failed.prompt_id,
    ]
    assert len(WEIGHTFREE["history_max_items_2_keys"]) == 2


def validation_requests() -> dict[str, Any]:
    """A request per recorded 400 case (the recordings keep the answers, not the requests)."""
    invert = recorded_prompt(WEIGHTFREE["A1_invert_first"])
    load_blur = recorded_prompt(WEIGHTFREE["B_load_scale_blur"])

    def edit(graph: dict[str, Any], node: str, **inputs: Any) -> dict[str, Any]:
        graph = copy.deepcopy(graph)
        graph[node]["inputs"].update(inputs)
        return {"prompt": graph}

    missing_input = copy.deepcopy(invert)
    missing_input["2"]["inputs"] = {}
    return {
        "unknown_class": {"prompt": {"1": {"class_type": "NoSuchNode", "inputs": {}}}},
        "missing_required_input": {"prompt": missing_input},
        "value_below_min": edit(invert, "1", width=-5),
        "value_above_max": edit(invert, "1", width=999999),
        "value_wrong_type": edit(invert, "1", width="abc"),
        "combo_not_in_list": edit(load_blur, "11", upscale_method="foo"),
        "loadimage_missing_file": edit(load_blur, "10", image="no_such_file.png"),
        "no_output_node": {"prompt": {k: v for k, v in invert.items() if k != "3"}},
        "link_to_missing_node": edit(invert, "2", image=["99", 0]),
        "link_bad_output_index": edit(invert, "3", images=["2", 5]),
        "link_type_mismatch": {
            "prompt": {
                "1": {
                    "class_type": "EmptyLatentImage",
                    "inputs": {"width": 64, "height": 64, "batch_size": 1},
                },
                "2": {
                    "class_type": "SaveImage",
                    "inputs": {"images": ["1", 0], "filename_prefix": "x"},
                },
            }
        },
        "missing_class_type": {"prompt": {"1": {"inputs": {}}}},
        "no_prompt_key": {"client_id": "someone"},
        "malformed_json_body": b'{"prompt": {',
    }


def without_tracebacks(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: (shape(v) if k == "traceback" else without_tracebacks(v)) for k, v in value.items()
        }
    if isinstance(value, list):
        return [without_tracebacks(v) for v in value]
    return value


# Today's ComfyUI names unknown nodes differently (missing_node_type); the current-protocol test
# file checks those two bodies. Every other 400 body is the same in both versions.
RENAMED_IN_CURRENT = {"unknown_class", "missing_class_type"}


@pytest.mark.parametrize(
    ("case", "fake_protocol"),
    [
        (case, protocol)
        for protocol in PROTOCOLS
        for case in sorted(WEIGHTFREE["validation_errors"])
        if not (protocol == PROTOCOL_CURRENT and case in RENAMED_IN_CURRENT)
    ],
)
def test_validation_error_bodies(
    case: str, fake_client: ComfyTestClient, fake_comfyui: FakeComfyUIThread, fake_protocol: str
) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    fake_client.upload("peer_upload.png", buffer.getvalue())
    request = validation_requests()[case]
    if isinstance(request, bytes):
        status, raw, _ = fake_client.request(
            "POST", "/prompt", raw=request, headers={"Content-Type": "application/json"}
        )
        body: Any = raw.decode()
    else:
        status, raw, _ = fake_client.request("POST", "/prompt", request)
        body = json.loads(raw)
    want = WEIGHTFREE["validation_errors"][case]
    assert status == want["status"]
    assert without_tracebacks(body) == without_tracebacks(want["body"])
    assert fake_comfyui.stats()["queued"] == 0
    assert fake_client.get_json("/queue") == {"queue_running": [], "queue_pending": []}


@both_protocols
def test_bad_checkpoint_body(
    fake_client: ComfyTestClient, fake_comfyui: FakeComfyUIThread, fake_protocol: str
) -> None:
    want = EXTRA["bad_ckpt"]
    fake_comfyui.state.installed_checkpoints = list(
        want["body"]["node_errors"]["4"]["errors"][0]["extra_info"]["input_config"][0]
    )
    graph = recorded_prompt(load("txt2img_tiny_1step.json")["cold"])
    graph["4"]["inputs"]["ckpt_name"] = "nope.safetensors"
    status, body = fake_client.post_prompt(graph)
    assert (status, body) == (want["status"], want["body"])
    assert fake_comfyui.stats()["queued"] == 0


@both_protocols
def test_txt2img_cold_then_warm_runs(fake_client: ComfyTestClient, fake_protocol: str) -> None:
    """Recorded on one server: the full-UNet file first, then the tiny one (node 5 stays cached)."""
    for name in ("txt2img_full_1step.json", "txt2img_tiny_1step.json"):
        recording = load(name)
        for recorded in [recording["cold"], *recording["warm_runs"], recording["warm_new_text"]]:
            run = fake_client.run(recorded_prompt(recorded))
            assert_run_matches(
                run, recorded, exact_files=False, current=fake_protocol == PROTOCOL_CURRENT
            )
            assert run.post_body["number"] == recorded["post_body"]["number"]
        view = recording["view"]
        image = run.last("executed")["data"]["output"]["images"][0]
        status, content, _ = fake_client.request(
            "GET", f"/view?filename={image['filename']}&type=output"
        )
        picture = Image.open(io.BytesIO(content))
        assert (status, list(picture.size), picture.mode) == (view["status"], view["size"], "RGB")


@both_protocols
def test_interrupt_running_prompt_and_delete_pending(
    fake_client: ComfyTestClient, fake_comfyui: FakeComfyUIThread, fake_protocol: str
) -> None:
    graph = recorded_prompt(load("txt2img_tiny_1step.json")["cold"])
    fake_client.run(graph)  # warm the cache, as in the recording: p1 finds 4, 6, 7, 5 cached
    fake_comfyui.state.exec_delay = 30.0  # ~1 s per step: the interrupt lands in step 1
    slow = copy.deepcopy(graph)
    slow["3"]["inputs"].update(seed=1234, steps=30)
    # Canonical UUIDs, the only ids today's ComfyUI accepts (0.3.64 takes any string).
    p1, p2, p3 = (f"{n}{n}{n}{n}{n}{n}{n}{n}-{n * 4}-4{n * 3}-8{n * 3}-{n * 12}" for n in "123")
    assert fake_client.post_prompt(slow, p1)[0] == 200
    second = copy.deepcopy(slow)
    second["3"]["inputs"].update(seed=99, steps=2)
    assert fake_client.post_prompt(second, p2)[0] == 200
    assert fake_client.post_prompt(second, p3)[0] == 200

    messages: list[dict[str, Any]] = []
    while not (messages and messages[-1]["type"] == "progress"):
        messages.append(fake_client.receive())
    queue = fake_client.get_json("/queue")
    want = EXTRA["queue_while_running"]
    assert (len(queue["queue_running"]), len(queue["queue_pending"])) == (
        want["running_len"],
        want["pending_len"],
    )
    running = queue["queue_running"][0]
    assert [type(x).__name__ for x in running] == want["running_item_shape"]
    assert (
        running[1] == p1
        and running[3]
        == {
            "client_id": fake_client.client_id,
            **(
                {"create_time": running[3].get("create_time")}
                if fake_protocol == PROTOCOL_CURRENT
                else {}
            ),
        }
        and running[4] == ["9"]
    )

    status, _, _ = fake_client.request("POST", "/queue", {"delete": [p3]})
    assert status == EXTRA["delete_pending"]
    fake_comfyui.state.exec_delay = 0.0
    status, _, _ = fake_client.request("POST", "/interrupt", {"prompt_id": p1})
    assert status == EXTRA["interrupt_status"]
    messages += fake_client.collect(p1)

    ends = ("execution_success", "execution_error", "execution_interrupted")
    end = next(m for m in messages if m["type"] in ends)
    want_end = EXTRA["p1_end_msg"]
    assert end["type"] == want_end["type"]
    assert shape(end["data"]) == shape(want_end["data"])
    assert {k: end["data"][k] for k in ("node_id", "node_type", "executed")} == {
        k: want_end["data"][k] for k in ("node_id", "node_type", "executed")
    }
    tail_types = [m["type"] for m in EXTRA["p1_ws_tail"]]
    ours_tail = [m["type"] for m in messages if m["type"] in set(tail_types)]
    # A loaded machine may fit a second step in before the interrupt lands: fold repeats.
    folded = [t for i, t in enumerate(ours_tail) if i == 0 or t != ours_tail[i - 1]]
    assert folded[-len(tail_types) :] == tail_types

    entry = fake_client.history(p1)[p1]
    assert shape(entry["status"]) == shape(EXTRA["p1_history_status"])
    assert entry["status"]["status_str"] == EXTRA["p1_history_status"]["status_str"]
    assert [m[0] for m in entry["status"]["messages"]] == [
        m[0] for m in EXTRA["p1_history_status"]["messages"]
    ]
    assert entry["status"]["messages"][1][1]["nodes"] == ["4", "6", "7", "5"]
    assert entry["outputs"] == EXTRA["p1_history_outputs"]

    p2_messages = fake_client.collect(p2)
    assert EXTRA["p2_end_msg_type"] in [m["type"] for m in p2_messages]
    assert fake_client.history(p3, wait=0.2) == EXTRA["p3_history_after_delete"]
    assert fake_client.get_json("/queue") == EXTRA["queue_after"]
    assert fake_comfyui.stats()["interrupted"] == [p1]


@both_protocols
@pytest.mark.parametrize("metadata", [False, True])
def test_binary_preview_frames(
    metadata: bool, fake_comfyui: FakeComfyUIThread, fake_protocol: str
) -> None:
    fake_comfyui.state.preview_frames = True
    c = ComfyTestClient(fake_comfyui.url)
    c.connect(feature_flags={"supports_preview_metadata": True} if metadata else None)
    graph = recorded_prompt(load("txt2img_tiny_1step.json")["cold"])
    graph["3"]["inputs"]["steps"] = 3
    run = c.run(graph)
    c.close()
    want = EXTRA["preview_metadata_client" if metadata else "preview_plain_client"]
    frames = [m for m in run.ws if m["type"] in ("progress", "<binary>")]
    assert [m["type"] for m in frames] == [m["type"] for m in want]
    for mine, theirs in zip(frames, want, strict=True):
        if mine["type"] == "<binary>":
            prefix = 16 if not metadata else 8  # event + image type, or event only
            assert mine["head_hex"][:prefix] == theirs["head_hex"][:prefix]
        else:
            assert {k: v for k, v in mine["data"].items() if k != "prompt_id"} == {
                k: v for k, v in theirs["data"].items() if k != "prompt_id"
            }


@both_protocols
def test_history_gap_is_reproduced(
    fake_client: ComfyTestClient, fake_comfyui: FakeComfyUIThread, fake_protocol: str
) -> None:
    """Right after execution_success, /history is still {}; after executing-null it is there."""
    fake_comfyui.state.history_gap = 1.0
    graph = recorded_prompt(WEIGHTFREE["A1_invert_first"])
    prompt_id = "6a9c1f52-7d0e-4c1b-9a55-3f2e8d4b7c60"
    assert fake_client.post_prompt(graph, prompt_id)[0] == 200
    while fake_client.receive()["type"] != "execution_success":
        pass
    assert fake_client.get_json(f"/history/{prompt_id}") == {}
    fake_client.collect(prompt_id)
    assert prompt_id in fake_client.get_json(f"/history/{prompt_id}")


@both_protocols
def test_every_route_is_served_under_api(fake_client: ComfyTestClient, fake_protocol: str) -> None:
    for path in ("/prompt", "/queue", "/history", "/system_stats", "/object_info", "/features"):
        assert fake_client.get_json("/api" + path) == fake_client.get_json(path)
    info = fake_client.get_json("/api/object_info/KSampler")["KSampler"]
    assert info["input"]["required"]["steps"][1]["max"] == 10000
