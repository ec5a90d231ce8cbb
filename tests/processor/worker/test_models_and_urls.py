"""A worker end to end with what users bring: a checkpoint named by URL and sha256, fetched into
the model cache once for two jobs; an input image by URL; a wrong sha256; URLs the guard
refuses. Against the fake ComfyUI, which lists the cache's checkpoints like a real one would."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from processor.job.status import JobState
from tests.file_server import FileServer, file_server
from tests.processor.worker.test_loop import drain, drop, executions, status_of, worker_settings


@pytest.fixture
def server() -> Iterator[FileServer]:
    with file_server() as running:
        yield running


def png(size: tuple[int, int] = (32, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def settings_with_cache(fake: Any, cache: Path, **extra: Any) -> Any:
    fake.state.checkpoint_dirs = [str(cache / "checkpoints")]
    values = {
        "model_cache": cache,
        "fetch_allow_http": True,
        "fetch_allow_private": True,
        **extra,
    }
    return worker_settings(fake, **values)


async def test_a_model_by_url_is_fetched_once_for_two_jobs_and_an_input_by_url(
    tmp_path: Path, fake_comfyui: Any, server: FileServer
) -> None:
    model = os.urandom(200_000)
    model_url = server.add("my-model.safetensors", model)
    image_url = server.add("cat.png", png())
    sha = hashlib.sha256(model).hexdigest()
    models = [{"url": model_url, "sha256": sha, "folder": "checkpoints"}]
    drop(
        tmp_path,
        "t2i",
        {
            "workflow": "txt2img",
            "payload": {"ckpt_name": "my-model.safetensors", "steps": 1},
            "models": models,
        },
    )
    drop(
        tmp_path,
        "i2i",
        {
            "workflow": "img2img",
            "payload": {"image": image_url, "ckpt_name": "my-model.safetensors", "steps": 1},
            "models": models,
        },
    )
    cache = tmp_path / "cache"
    later = {
        "workflow": "txt2img",
        "payload": {"ckpt_name": "my-model.safetensors", "steps": 1},
        "models": models,
    }

    counts = await drain(tmp_path, settings_with_cache(fake_comfyui, cache))

    assert (counts.succeeded, counts.failed) == (2, 0)
    assert server.requests["my-model.safetensors"] == 1
    assert server.requests["cat.png"] == 1
    # Run at once, both jobs waited for the one download (each says "fetched"); a later job
    # finds the model in the cache.
    drop(tmp_path, "later", {**later, "id": "later"})
    await drain(tmp_path, settings_with_cache(fake_comfyui, cache))
    assert server.requests["my-model.safetensors"] == 1
    records = [status_of(tmp_path, job).models for job in ("t2i", "i2i", "later")]
    assert [r[0].state for r in records] == ["fetched", "fetched", "cached"]
    for (record,) in records:
        assert (record.folder, record.name, record.sha256) == (
            "checkpoints",
            "my-model.safetensors",
            sha,
        )
        assert record.bytes == len(model) and record.source == model_url
    assert "models" in status_of(tmp_path, "t2i").timings
    assert (cache / "checkpoints" / "my-model.safetensors").read_bytes() == model
    assert executions(fake_comfyui) == 3


async def test_a_wrong_sha256_fails_the_job_naming_it_and_leaves_no_file(
    tmp_path: Path, fake_comfyui: Any, server: FileServer
) -> None:
    url = server.add("bad.safetensors", b"not what you think")
    drop(
        tmp_path,
        "bad",
        {
            "workflow": "txt2img",
            "payload": {"ckpt_name": "bad.safetensors"},
            "models": [{"url": url, "sha256": "ab" * 32, "folder": "checkpoints"}],
        },
    )
    cache = tmp_path / "cache"

    counts = await drain(tmp_path, settings_with_cache(fake_comfyui, cache))

    status = status_of(tmp_path, "bad")
    assert status.state is JobState.failed and status.error is not None
    assert status.error.type == "model_invalid" and "sha256" in status.error.message
    assert status.error.details["expected_sha256"] == "ab" * 32
    assert counts.retried == 0 and status.attempt == 1
    assert server.requests["bad.safetensors"] == 1
    assert not list((cache / "checkpoints").iterdir())
    assert not list((cache / ".comfys3" / "tmp").iterdir())
    assert executions(fake_comfyui) == 0


async def test_input_urls_the_guard_refuses_or_that_are_missing(
    tmp_path: Path, fake_comfyui: Any, server: FileServer
) -> None:
    missing = f"{server.url}/files/nope.png"
    text = server.add("notes.txt", b"hello")
    for name, image in [("missing", missing), ("text", text)]:
        drop(tmp_path, name, {"workflow": "scale", "payload": {"image": image}})
    drop(tmp_path, "no-http", {"workflow": "scale", "payload": {"image": missing}})

    await drain(tmp_path, settings_with_cache(fake_comfyui, tmp_path / "cache"))
    closed = worker_settings(fake_comfyui)  # https only, no private addresses
    drop(tmp_path, "closed", {"workflow": "scale", "payload": {"image": missing}})
    await drain(tmp_path, closed)

    found = {name: status_of(tmp_path, name).error for name in ("missing", "text", "closed")}
    assert found["missing"] is not None and found["missing"].type == "input_missing"
    assert "HTTP 404" in found["missing"].message
    assert found["text"] is not None and found["text"].type == "input_invalid"
    assert found["closed"] is not None and found["closed"].type == "input_invalid"
    assert "COMFYS3_FETCH_ALLOW_HTTP" in found["closed"].message
    assert server.requests["nope.png"] == 2  # the closed worker never connected
    assert executions(fake_comfyui) == 0


async def test_models_on_a_worker_without_a_cache_wait_for_one_that_has_it(
    tmp_path: Path, fake_comfyui: Any, server: FileServer
) -> None:
    """No cache, no fetching: the manifest is left for another worker (uncounted), and the
    worker with a cache runs it."""
    url = server.add("m.safetensors", b"m" * 100)
    drop(
        tmp_path,
        "needs-cache",
        {
            "workflow": "txt2img",
            "payload": {"ckpt_name": "m.safetensors", "steps": 1},
            "models": [{"url": url, "folder": "checkpoints"}],
        },
    )

    plain = await drain(tmp_path, worker_settings(fake_comfyui, capability_wait=60))
    assert plain.summary()["attempts"] == 0
    assert not (tmp_path / "output" / "needs-cache").exists()
    cached = await drain(tmp_path, settings_with_cache(fake_comfyui, tmp_path / "cache"))

    assert cached.succeeded == 1
    status = status_of(tmp_path, "needs-cache")
    assert status.state is JobState.succeeded and status.attempt == 1


async def test_a_comfyui_the_worker_starts_sees_the_model_cache(
    tmp_path: Path, server: FileServer
) -> None:
    """The worker passes --extra-model-paths-config to the ComfyUI it starts (the fake reads
    the file as ComfyUI does): a checkpoint fetched into the cache is one ComfyUI can load."""
    from tests.processor.comfy.test_process import local_settings

    model = os.urandom(1000)
    url = server.add("fresh.safetensors", model)
    cache = tmp_path / "cache"
    settings = local_settings(
        tmp_path / "comfy",
        worker_id="owner",
        model_cache=cache,
        fetch_allow_http=True,
        fetch_allow_private=True,
        capability_wait=0,
    )
    drop(
        tmp_path,
        "own",
        {
            "workflow": "txt2img",
            "payload": {"ckpt_name": "fresh.safetensors", "steps": 1},
            "models": [{"url": url, "folder": "checkpoints"}],
        },
    )

    counts = await drain(tmp_path, settings)

    assert counts.succeeded == 1, status_of(tmp_path, "own").error
    config = cache / ".comfys3" / "extra_model_paths.yaml"
    assert str(cache.resolve()) in config.read_text()
    assert status_of(tmp_path, "own").models[0].state == "fetched"
