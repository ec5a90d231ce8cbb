"""worker-comfyui's requests, served by the RunPod handler, as a worker-comfyui client sees them.

The request in ``tests/data/worker_comfyui_input.json`` has worker-comfyui's ``test_input.json``
shape (an API graph in ``workflow``, a base64 image with a ``data:`` prefix in ``images``); it
runs end to end on moto and the fake ComfyUI, in process and through the SDK's ``--test_input``.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import re
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from PIL import Image

from processor.settings import S3Settings
from tests.triggers.runpod.test_runpod import (
    Captured,
    fetch,
    local_test_ids,
    run_test_input,
    worker_settings,
)
from tests.workers import ROOT, get_json, keys, put_manifest, s3_client
from triggers.runpod.handler import RunpodHandler
from triggers.runpod.request import InputError
from triggers.runpod.worker_comfyui import (
    BASE64_BUDGET,
    SentImage,
    decode_images,
    image_mode,
    is_worker_comfyui,
    parse,
)

REQUEST = json.loads((ROOT / "tests" / "data" / "worker_comfyui_input.json").read_text())


def request_input(**changes: Any) -> dict[str, Any]:
    job_input: dict[str, Any] = copy.deepcopy(REQUEST["input"])
    job_input.update(changes)
    return job_input


def png(width: int, height: int, color: tuple[int, int, int] = (10, 120, 240)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def decoded(entry: dict[str, Any]) -> Image.Image:
    assert entry["type"] == "base64"
    return Image.open(io.BytesIO(base64.b64decode(entry["data"], validate=True)))


@pytest.fixture
def handler(moto_s3_settings: S3Settings, fake_comfyui: Any) -> Iterator[RunpodHandler]:
    settings = worker_settings(fake_comfyui, allow_raw_workflows=True)
    made = RunpodHandler(s3=moto_s3_settings, settings=settings, send_progress=Captured())
    try:
        yield made
    finally:
        made.close()


# -- the request's shape, no worker needed ------------------------------------------------------


def test_the_shape_is_told_apart_from_a_template_job() -> None:
    assert is_worker_comfyui(REQUEST["input"])
    assert not is_worker_comfyui({"workflow": "txt2img", "payload": {}})
    assert not is_worker_comfyui(None)
    job = parse(request_input(), "sync-7")
    assert job.job_id == "sync-7" and job.images_as is None and job.notes == ()
    [image] = job.images
    assert image.name == "input_image_1.png" and not image.encoded.startswith("data:")
    assert job.manifest(_layout()) == {
        "id": "sync-7",
        "graph": REQUEST["input"]["workflow"],
        "graph_inputs": {"input_image_1.png": "output/sync-7/inputs/input_image_1.png"},
    }


def _layout() -> Any:
    from processor.storage.layout import Layout

    return Layout("input", "output")


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"images": {"name": "a.png"}}, "'images' must be a list of objects with 'name' and"),
        ({"images": [{"name": "a.png"}]}, "images[0] is not"),
        ({"images": [{"name": "", "image": "x"}]}, "images[0].name must be a file name"),
        ({"images": [{"name": "a.png", "image": 3}]}, "images[0].image ('a.png') must be a"),
        ({"images": [{"name": "../a.png", "image": "x"}]}, "cannot name an input file"),
        ({"images": [{"name": "/etc/a.png", "image": "x"}]}, "no leading '/'"),
        (
            {"images": [{"name": "a.png", "image": "x"}, {"name": "a.png", "image": "y"}]},
            "images[1].name 'a.png' is given twice",
        ),
        ({"images_as": "url"}, '\'images_as\' must be "base64" or "s3_url"'),
        ({"payload": {"seed": 1}}, "not 'payload'; for a comfys3 manifest name a template"),
    ],
)
def test_a_malformed_request_is_refused_with_a_sentence(
    changes: dict[str, Any], expected: str
) -> None:
    with pytest.raises(InputError) as caught:
        parse(request_input(**changes), "rp")
    assert expected in str(caught.value)


def test_keys_worker_comfyui_knows_but_comfys3_does_not_use_are_noted() -> None:
    job = parse(request_input(comfy_org_api_key="k", webhook_v2=1), "rp")
    assert job.notes == (
        "ignored unknown key(s) of the input: webhook_v2",
        "comfy_org_api_key was ignored: comfys3 does not pass API keys to ComfyUI",
    )


def test_images_are_decoded_and_checked_before_anything_is_written() -> None:
    good = base64.b64encode(png(8, 6)).decode()
    [image] = decode_images([SentImage("a.png", good)], max_bytes=10_000, max_pixels=100)
    assert image.data == png(8, 6) and image.content_type == "image/png"
    spaced = "\n".join(good[i : i + 20] for i in range(0, len(good), 20))  # MIME line breaks
    assert decode_images([SentImage("a.png", spaced)], max_bytes=10_000, max_pixels=100)

    truncated = base64.b64encode(png(8, 6)[:-30]).decode()  # the header intact, pixels cut
    cases = [
        (SentImage("a.png", "not base64!"), 100, "image 'a.png' is not valid base64"),
        (SentImage("a.png", good), 40, "is 8x6 = 48 pixels; the limit is 40"),
        (SentImage("a.png", base64.b64encode(b"hello").decode()), 100, "not an image ComfyUI"),
        (SentImage("a.png", truncated), 100, "input file 'a.png' is not a readable image"),
        (SentImage("a.png", base64.b64encode(b"x" * 4000).decode()), 100, "the limit is 1,000"),
    ]
    for sent, max_pixels, expected in cases:
        with pytest.raises(InputError) as caught:
            decode_images([sent], max_bytes=1000, max_pixels=max_pixels)
        assert expected in str(caught.value), (sent, str(caught.value))


def test_base64_or_urls_as_the_caller_the_setting_or_worker_comfyui_decides() -> None:
    assert image_mode("s3_url", "base64", {}) == "s3_url"
    assert image_mode(None, "s3_url", {}) == "s3_url"
    assert image_mode(None, "auto", {}) == "base64"  # worker-comfyui's default
    assert image_mode(None, "auto", {"BUCKET_ENDPOINT_URL": "https://b.example"}) == "s3_url"


# -- on moto and the fake ComfyUI ---------------------------------------------------------------


async def test_a_worker_comfyui_request_answers_as_worker_comfyui_does(
    handler: RunpodHandler, moto_s3_settings: S3Settings, fake_comfyui: Any
) -> None:
    answer = await handler({"id": "sync-wc-1", "input": request_input()})

    assert "error" not in answer, answer
    assert set(answer) == {"images", "job_id", "status_key"}
    assert answer["job_id"] == "sync-wc-1"
    assert answer["status_key"] == "output/sync-wc-1/status.json"
    by_name = {entry["filename"]: entry for entry in answer["images"]}
    assert set(by_name) == {"9_SaveImage_001.png", "12_SaveImage_001.png"}
    assert decoded(by_name["9_SaveImage_001.png"]).size == (64, 48)  # the graph's latent
    inverted = decoded(by_name["12_SaveImage_001.png"])
    sent = Image.open(io.BytesIO(base64.b64decode(REQUEST["input"]["images"][0]["image"][22:])))
    assert inverted.size == sent.size == (24, 16)
    assert inverted.convert("RGB").getpixel((0, 0)) == (255 - 200, 255 - 30, 255 - 30)

    client = s3_client(moto_s3_settings)
    status = get_json(client, moto_s3_settings, answer["status_key"])
    assert status["state"] == "succeeded" and status["workflow"] == "(raw graph)"
    kept = client.get_object(
        Bucket=moto_s3_settings.bucket_name, Key="output/sync-wc-1/inputs/input_image_1.png"
    )
    assert kept["ContentType"] == "image/png"
    assert kept["Body"].read() == base64.b64decode(REQUEST["input"]["images"][0]["image"][22:])
    assert keys(client, moto_s3_settings, "input/_done/") == ["input/_done/sync-wc-1.json"]
    manifest = get_json(client, moto_s3_settings, "input/_done/sync-wc-1.json")
    assert manifest["graph_inputs"] == {
        "input_image_1.png": "output/sync-wc-1/inputs/input_image_1.png"
    }


async def test_urls_non_image_outputs_and_notes(
    handler: RunpodHandler, moto_s3_settings: S3Settings
) -> None:
    graph = {
        "1": {"class_type": "FakeTone", "inputs": {"seconds": 0.1, "frequency": 440.0}},
        "2": {"class_type": "FakeSaveAudio", "inputs": {"audio": ["1", 0], "filename_prefix": "a"}},
        "3": {"class_type": "ShowText", "inputs": {"text": "hello"}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "used.png"}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "b"}},
    }
    images = [
        {"name": "used.png", "image": base64.b64encode(png(5, 7)).decode()},  # no data: prefix
        {"name": "spare.png", "image": base64.b64encode(png(3, 3)).decode()},
    ]
    job_input = {"workflow": graph, "images": images, "images_as": "s3_url"}

    answer = await handler({"id": "sync-wc-2", "input": job_input})

    assert "error" not in answer, answer
    [image] = answer["images"]
    assert image["type"] == "s3_url" and image["filename"] == "5_SaveImage_001.png"
    assert Image.open(io.BytesIO(fetch(image["data"]))).size == (5, 7)
    [audio] = answer["files"]
    assert audio["type"] == "s3_url" and audio["content_type"].startswith("audio/")
    assert fetch(audio["data"]).startswith(b"RIFF")
    assert answer["texts"] == {"3": ["hello"]}
    assert answer["errors"] == [
        "image 'spare.png' is not used by any node of the workflow; it was not uploaded"
    ]
    inputs = keys(s3_client(moto_s3_settings), moto_s3_settings, "output/sync-wc-2/inputs/")
    assert inputs == ["output/sync-wc-2/inputs/used.png"]


async def test_base64_past_runpods_limit_goes_as_a_url_with_a_note(
    handler: RunpodHandler, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("triggers.runpod.worker_comfyui.BASE64_BUDGET", 10)
    assert BASE64_BUDGET > 10_000_000
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1,
                                                     "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
    }  # fmt: skip

    answer = await handler({"id": "sync-wc-3", "input": {"workflow": graph}})

    [image] = answer["images"]
    assert image["type"] == "s3_url" and image["data"].startswith("http")
    assert answer["errors"] == [
        "2_SaveImage_001.png is given as an s3_url: as base64 it would take the answer past "
        "RunPod's 20 MB limit"
    ]


async def test_a_workflow_without_images_says_so_as_worker_comfyui_does(
    handler: RunpodHandler,
) -> None:
    graph = {"1": {"class_type": "ShowText", "inputs": {"text": "only words"}}}

    answer = await handler({"id": "sync-wc-4", "input": {"workflow": graph}})

    assert answer["images"] == [] and answer["status"] == "success_no_images"
    assert answer["texts"] == {"1": ["only words"]}


@pytest.mark.parametrize(
    ("job_input", "expected"),
    [
        (
            request_input(images=[{"name": "input_image_1.png", "image": "%%%"}]),
            "image 'input_image_1.png' is not valid base64 (a data: URI prefix is fine)",
        ),
        (
            request_input(images=[{"name": "input_image_1.png", "image": "aGVsbG8="}]),
            "input file 'input_image_1.png' is not an image ComfyUI can load (or it is too "
            "large to decode safely)",
        ),
        (
            request_input(workflow={"1": {"class_type": "SaveImage"}}, images=None, x=1),
            None,  # a graph ComfyUI refuses: a failed job, answered with its error
        ),
    ],
)
async def test_bad_images_are_refused_before_anything_is_written(
    handler: RunpodHandler, moto_s3_settings: S3Settings, job_input: Any, expected: str | None
) -> None:
    answer = await handler({"id": "sync-wc-bad", "input": job_input})

    client = s3_client(moto_s3_settings)
    if expected is not None:
        assert answer == {"error": expected}
        assert keys(client, moto_s3_settings, "") == []
        assert not handler.host.started
    else:
        assert answer["error"].startswith("job sync-wc-bad failed (validation):")
        assert answer["job_id"] == "sync-wc-bad" and answer["images"] == []
        assert answer["errors"] == ["ignored unknown key(s) of the input: x"]


async def test_a_waiting_manifest_of_the_same_id_is_left_alone(
    handler: RunpodHandler, moto_s3_settings: S3Settings
) -> None:
    client = s3_client(moto_s3_settings)
    put_manifest(client, moto_s3_settings, "sync-wc-5", {"workflow": "solid"})

    answer = await handler({"id": "sync-wc-5", "input": request_input()})

    assert answer == {
        "error": "a manifest input/sync-wc-5.json is already waiting to run; give this job "
        """another 'id', or run that one with {"manifest": "sync-wc-5.json"}"""
    }
    assert get_json(client, moto_s3_settings, "input/sync-wc-5.json") == {"workflow": "solid"}
    assert keys(client, moto_s3_settings, "output/") == []  # its images were not kept either


async def test_raw_graphs_stay_behind_their_gate(
    moto_s3_settings: S3Settings, fake_comfyui: Any
) -> None:
    handler = RunpodHandler(
        s3=moto_s3_settings, settings=worker_settings(fake_comfyui), send_progress=Captured()
    )
    try:
        answer = await handler({"id": "rp-gate", "input": request_input()})
    finally:
        handler.close()

    assert answer == {
        "error": "invalid job input:\n  graph: raw ComfyUI graphs are not allowed on this "
        "worker; use a workflow template or set COMFYS3_ALLOW_RAW_WORKFLOWS=true"
    }
    assert keys(s3_client(moto_s3_settings), moto_s3_settings, "") == []


def test_test_input_in_worker_comfyuis_shape_runs_through_the_sdk(
    moto_s3_settings: S3Settings, fake_comfyui: Any
) -> None:
    result = run_test_input(
        moto_s3_settings,
        fake_comfyui,
        json.dumps(REQUEST),
        COMFYS3_ALLOW_RAW_WORKFLOWS="true",
        RUNPOD_LOG_LEVEL="INFO",
    )

    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # The SDK prints the result cut to 4 kB; the first image's base64 starts within it, and
    # its PNG header (the first 33 bytes) holds the size.
    [line] = [line for line in result.stdout.splitlines() if "Job result: " in line]
    first = re.search(
        r"'filename': '9_SaveImage_001.png', 'type': 'base64', 'data': '(\S{44})", line
    )
    assert first is not None, line[:1000]
    header = base64.b64decode(first.group(1))
    assert header.startswith(b"\x89PNG\r\n\x1a\n") and header[12:16] == b"IHDR"
    assert struct.unpack(">II", header[16:24]) == (64, 48)
    client = s3_client(moto_s3_settings)
    [job_id] = local_test_ids(client, moto_s3_settings)
    assert job_id.startswith("local_test-")
    assert get_json(client, moto_s3_settings, f"output/{job_id}/status.json")["state"] == (
        "succeeded"
    )
    assert f"output/{job_id}/inputs/input_image_1.png" in keys(
        client, moto_s3_settings, f"output/{job_id}/inputs/"
    )
    assert "Traceback" not in output
