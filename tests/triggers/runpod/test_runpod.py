"""The RunPod trigger as a RunPod caller sees it: each input form answers with the job's status
and fetchable output URLs, the bucket holds the same results, bad input gets a sentence back.

In-process tests call the handler the way the SDK does (``await handler(job)``); two
subprocess tests run the SDK itself: ``--test_input`` and the ``--rp_serve_api`` HTTP server.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError
from hypothesis import given, settings
from hypothesis import strategies as st

from processor.job.manifest import check_job_id
from processor.job.status import ProgressInfo
from processor.settings import S3Settings, WorkerSettings
from processor.storage.claims import ClaimStore
from processor.storage.s3 import S3Storage
from processor.worker.assembly import s3_layout
from tests.paths import DATA
from tests.processor.worker.test_loop import worker_settings as pipeline_worker_settings
from tests.s3_servers import free_port
from tests.workers import ROOT, get_json, keys, put_manifest, s3_client, s3_env, wait_until
from triggers.runpod.command import runpod_argv
from triggers.runpod.handler import RunpodHandler
from triggers.runpod.local_api import NOT_A_REQUEST
from triggers.runpod.progress import ProgressRelay
from triggers.runpod.request import (
    Drain,
    InlineJob,
    InputError,
    NamedManifest,
    inline_job_id,
    manifest_key,
    parse_request,
    sanitise_job_id,
)

TEST_INPUT = ROOT / "tests" / "test_input.json"
RUNPOD_ENV = {"RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true", "RUNPOD_SKIP_GPU_CHECK": "true"}


class Captured:
    """Stands in for runpod.serverless.progress_update."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, Any], Any]] = []

    def __call__(self, job: dict[str, Any], message: Any) -> None:
        self.calls.append((job, message))


def worker_settings(fake: Any, **overrides: Any) -> WorkerSettings:
    """The pipeline tests' settings, named as a RunPod worker, retrying after the default
    delay."""
    values: dict[str, Any] = {"worker_id": "runpod-test", "retry_delay": 2.0, **overrides}
    return pipeline_worker_settings(fake, **values)


@pytest.fixture
def progress() -> Captured:
    return Captured()


@pytest.fixture
def handler(
    moto_s3_settings: S3Settings, fake_comfyui: Any, progress: Captured
) -> Iterator[RunpodHandler]:
    made = RunpodHandler(
        s3=moto_s3_settings, settings=worker_settings(fake_comfyui), send_progress=progress
    )
    try:
        yield made
    finally:
        made.close()


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()  # type: ignore[no-any-return]


def assert_output_served(client: Any, settings: S3Settings, output: dict[str, Any]) -> None:
    """The answer's URL serves exactly the object the status names, as the answer describes."""
    data = fetch(output["url"])
    assert data.startswith(b"\x89PNG")
    assert len(data) == output["bytes"]
    assert hashlib.sha256(data).hexdigest() == output["sha256"]
    stored = client.get_object(Bucket=settings.bucket_name, Key=output["key"])
    assert stored["Body"].read() == data
    assert stored["ContentType"] == output["content_type"] == "image/png"


# -- input forms, no worker needed ------------------------------------------------------------


@pytest.mark.parametrize(
    ("job_input", "expected"),
    [
        (None, "has no 'input'"),
        (["txt2img"], "must be a JSON object, not an array"),
        ({}, "'input' is empty"),
        ({"prompt": "a cat"}, "unknown key(s): 'prompt'"),
        (
            {"manifest": "a.json", "workflow": "txt2img"},
            "either 'manifest' (a manifest already in the bucket) or an inline job",
        ),
        ({"manifest": "a.json", "drain": True}, "'manifest' takes no other keys"),
        ({"manifest": 3}, "'manifest' must be the name or key of a manifest"),
        ({"drain": "yes"}, "'drain' must be true, not 'yes'"),
        ({"drain": True, "max_jobs": 0}, "'max_jobs' must be a whole number of at least 1"),
        ({"drain": True, "max_seconds": -1}, "'max_seconds' must be a number above 0"),
        ({"drain": True, "max_job": 2}, "'max_job' (did you mean 'max_jobs'?)"),
        ({"workflow": "txt2img", "max_jobs": 2}, 'only go with "drain": true'),
    ],
)
def test_invalid_input_forms_are_refused_with_a_sentence(job_input: Any, expected: str) -> None:
    with pytest.raises(InputError) as caught:
        parse_request(job_input, "rp-1")
    assert expected in str(caught.value)


def test_input_forms_are_recognised() -> None:
    inline = parse_request({"workflow": "txt2img", "payload": {"seed": 1}}, "sync-1/2 x")
    assert isinstance(inline, InlineJob) and inline.job_id == "sync-1-2-x"
    named = parse_request({"id": "mine", "workflow": "txt2img"}, "rp")
    assert isinstance(named, InlineJob) and named.job_id == "mine"
    assert parse_request({"manifest": " a.json "}, "rp") == NamedManifest("a.json")
    assert parse_request({"drain": True, "max_jobs": 2}, "rp") == Drain(2, None)
    assert parse_request({"drain": True, "max_seconds": 5}, "rp") == Drain(None, 5.0)


def test_job_ids_from_runpod_are_made_safe() -> None:
    assert sanitise_job_id("sync-4c1e-e1") == "sync-4c1e-e1"
    assert sanitise_job_id("sync 1//e1") == "sync-1-e1"
    assert sanitise_job_id("../../etc") == "etc"
    assert sanitise_job_id("..") == "runpod-job"
    assert len(sanitise_job_id("x" * 300)) == 128


def test_inline_jobs_without_an_id_never_share_one() -> None:
    """A real RunPod id names one request (and stays the same when RunPod delivers it again);
    the SDK's `local_test` and the fallback are the same for every request."""
    job = {"workflow": "solid"}
    real = [parse_request(job, "sync-1-e1"), parse_request(job, "sync-1-e1")]
    assert {r.job_id for r in real if isinstance(r, InlineJob)} == {"sync-1-e1"}
    for shared in ("local_test", "runpod-job", "..", ""):
        made = [parse_request(job, shared) for _ in range(3)]
        ids = {r.job_id for r in made if isinstance(r, InlineJob)}
        assert len(ids) == 3, ids
        assert all(i.startswith(("local_test-", "runpod-job-")) for i in ids)
    mine = parse_request({**job, "id": "local_test"}, "local_test")
    assert isinstance(mine, InlineJob) and mine.job_id == "local_test"  # the caller's own id


@settings(max_examples=200, derandomize=True, deadline=None)
@given(
    runpod_id=st.text(max_size=200)
    | st.sampled_from(["local_test", "runpod-job", "local_test-1", "sync-1/e1", "..", ""])
)
def test_any_runpod_id_gives_a_usable_job_id(runpod_id: str) -> None:
    job_id = inline_job_id(runpod_id)
    assert check_job_id(job_id) == job_id
    again = inline_job_id(runpod_id)
    if sanitise_job_id(runpod_id) in ("local_test", "runpod-job"):
        assert again != job_id  # an id every request shares is never reused
    else:
        assert again == job_id  # a real RunPod id names its request, every time


def test_manifest_references_resolve_inside_the_intake_prefix() -> None:
    layout = s3_layout_for("jobs/in")
    assert manifest_key("a.json", layout) == "jobs/in/a.json"
    assert manifest_key("a", layout) == "jobs/in/a.json"
    assert manifest_key("jobs/in/a.json", layout) == "jobs/in/a.json"
    for bad, message in [
        ("other/a.json", "not in the intake prefix jobs/in/"),
        ("jobs/in/_done/a.json", "not a manifest directly in jobs/in/"),
        ("a..json/..", "not in the intake prefix"),
    ]:
        with pytest.raises(InputError) as caught:
            manifest_key(bad, layout)
        assert message in str(caught.value)


def s3_layout_for(input_dir: str) -> Any:
    from processor.storage.layout import Layout

    return Layout(input_dir, "out")


def test_progress_is_throttled_per_job_and_routed_by_id() -> None:
    sent = Captured()
    now = [0.0]
    relay = ProgressRelay(sent, interval=1.0, clock=lambda: now[0])
    first, second = {"id": "rp-a"}, {"id": "rp-b"}
    half = ProgressInfo(fraction=0.5, node="3 (KSampler)", step=5, steps=10)
    with relay.watch(first, "a"), relay.watch(second, "b"):
        relay("a", half)
        relay("a", half)  # same second: dropped
        relay("b-2", half)  # a batch job of b
        now[0] = 1.5
        relay("a", half)
        relay("a", ProgressInfo(fraction=1.0))  # the end always goes out
        relay("zzz", half)  # nobody's job, and two requests run: dropped
    relay("a", half)  # no request watching: dropped
    assert [(job["id"], message["job_id"]) for job, message in sent.calls] == [
        ("rp-a", "a"),
        ("rp-b", "b-2"),
        ("rp-a", "a"),
        ("rp-a", "a"),
    ]
    assert sent.calls[0][1] == {
        "job_id": "a", "progress": 0.5, "node": "3 (KSampler)", "step": 5, "steps": 10,
    }  # fmt: skip


def test_runpod_flags_pass_through_the_subcommand() -> None:
    import argparse

    from triggers.runpod import command as runpod

    parser = argparse.ArgumentParser(prog="comfys3")
    runpod.register(parser.add_subparsers())
    args = parser.parse_args(
        ["runpod", "--rp_serve_api", "--rp_api_host", "127.0.0.1", "--rp_api_port", "8123"]
    )
    assert args.handler is runpod.cmd_runpod
    assert runpod_argv(args) == [
        "--rp_serve_api", "--rp_api_host", "127.0.0.1", "--rp_api_port", "8123",
    ]  # fmt: skip
    args = parser.parse_args(["runpod", "--test_input", '{"input": {}}'])
    assert runpod_argv(args) == ["--test_input", '{"input": {}}']


# -- the handler on moto and the fake ComfyUI ----------------------------------------------------


async def test_inline_job_runs_and_answers_with_status_and_urls(
    handler: RunpodHandler, moto_s3_settings: S3Settings, fake_comfyui: Any, progress: Captured
) -> None:
    fake_comfyui.state.exec_delay = 1.5  # long enough for progress to be sent on the way
    job = {"id": "sync-1234/e1", "input": {"workflow": "txt2img", "payload": {"seed": 123}}}

    answer = await handler(job)

    assert "error" not in answer, answer
    status = answer["status"]
    assert status["id"] == "sync-1234-e1" and status["state"] == "succeeded"
    assert status["payload"]["seed"] == 123 and status["manifest_key"] == "input/sync-1234-e1.json"
    assert [o["key"] for o in answer["outputs"]] == ["output/sync-1234-e1/9_SaveImage_001.png"]
    client = s3_client(moto_s3_settings)
    assert_output_served(client, moto_s3_settings, answer["outputs"][0])
    stored = get_json(client, moto_s3_settings, "output/sync-1234-e1/status.json")
    assert stored["state"] == "succeeded" and stored["outputs"] == status["outputs"]
    assert keys(client, moto_s3_settings, "input/", delimiter="/") == []
    assert keys(client, moto_s3_settings, "input/_done/") == ["input/_done/sync-1234-e1.json"]
    assert progress.calls, "no progress update was sent"
    assert all(sent is job for sent, _ in progress.calls)
    assert {message["job_id"] for _, message in progress.calls} == {"sync-1234-e1"}
    # The sampler reports each of its 20 steps; about one update a second goes out (the exact
    # throttle is checked with a fake clock above).
    assert len(progress.calls) < 10
    assert all(0.0 <= message["progress"] <= 1.0 for _, message in progress.calls)


async def test_inline_batch_answers_one_entry_per_job(
    handler: RunpodHandler, moto_s3_settings: S3Settings
) -> None:
    job = {
        "id": "rp-batch",
        "input": {
            "id": "cats",
            "workflow": "txt2img",
            "payload": {"steps": 2},
            "batch": [{"seed": 1}, {"seed": 2}],
            "metadata": {"who": "test"},
        },
    }

    answer = await handler(job)

    assert "error" not in answer, answer
    jobs = answer["jobs"]
    assert [j["status"]["id"] for j in jobs] == ["cats-1", "cats-2"]
    assert [j["status"]["payload"]["seed"] for j in jobs] == [1, 2]
    assert all(j["status"]["metadata"] == {"who": "test"} for j in jobs)
    client = s3_client(moto_s3_settings)
    for entry in jobs:
        assert_output_served(client, moto_s3_settings, entry["outputs"][0])
        stored = get_json(client, moto_s3_settings, f"output/{entry['status']['id']}/status.json")
        assert stored["state"] == "succeeded"


async def test_invalid_inline_job_is_refused_and_nothing_is_written(
    handler: RunpodHandler, moto_s3_settings: S3Settings
) -> None:
    job = {"id": "rp-bad", "input": {"workflow": "txt2img", "payload": {"steps": 0, "sede": 1}}}

    answer = await handler(job)

    error = answer["error"]
    assert error.startswith("invalid job input:")
    assert "payload.steps" in error and "did you mean 'seed'?" in error
    assert "Traceback" not in error and set(answer) == {"error"}
    assert keys(s3_client(moto_s3_settings), moto_s3_settings, "") == []
    assert not handler.host.started  # refused before ComfyUI was even needed


async def test_an_id_that_succeeded_is_not_run_again_unless_asked(
    handler: RunpodHandler, fake_comfyui: Any
) -> None:
    job_input = {"id": "once", "workflow": "solid"}

    first = await handler({"id": "rp-1", "input": job_input})
    second = await handler({"id": "rp-2", "input": job_input})
    third = await handler({"id": "rp-3", "input": {**job_input, "rerun": True}})

    assert [a["status"]["state"] for a in (first, second, third)] == ["succeeded"] * 3
    assert any("arrived again and was not run" in note for note in second["status"]["notes"])
    assert second["outputs"][0]["sha256"] == first["outputs"][0]["sha256"]
    assert sum(fake_comfyui.stats()["executed"].values()) == 2


async def test_an_inline_job_never_overwrites_a_pending_manifest(
    handler: RunpodHandler, moto_s3_settings: S3Settings
) -> None:
    client = s3_client(moto_s3_settings)
    put_manifest(client, moto_s3_settings, "taken", {"workflow": "solid", "metadata": {"n": 1}})

    answer = await handler({"id": "rp", "input": {"id": "taken", "workflow": "txt2img"}})

    assert answer == {
        "error": "a manifest input/taken.json is already waiting to run; give this job another "
        """'id', or run that one with {"manifest": "taken.json"}"""
    }
    assert get_json(client, moto_s3_settings, "input/taken.json")["metadata"] == {"n": 1}


@pytest.mark.parametrize(
    ("job_input", "expected"),
    [
        ("txt2img", "'input' must be a JSON object, not a string"),
        ({"workflow": "txt2img", "manifest": "a.json"}, "not both"),
        ({"workflow": "nope"}, "workflow: unknown workflow 'nope'"),
        ({"manifest": "../a.json"}, "is not in the intake prefix input/"),
    ],
)
async def test_invalid_requests_get_a_readable_error(
    handler: RunpodHandler, job_input: Any, expected: str
) -> None:
    answer = await handler({"id": "rp-x", "input": job_input})

    assert set(answer) == {"error"}
    assert expected in answer["error"] and "Traceback" not in answer["error"]


async def test_named_manifest_runs_once_then_says_where_it_went(
    handler: RunpodHandler, moto_s3_settings: S3Settings
) -> None:
    client = s3_client(moto_s3_settings)
    put_manifest(client, moto_s3_settings, "m1", {"workflow": "solid", "payload": {}})
    put_manifest(client, moto_s3_settings, "m2", {"id": "second", "workflow": "solid"})

    first = await handler({"id": "rp-1", "input": {"manifest": "m1.json"}})
    second = await handler({"id": "rp-2", "input": {"manifest": "input/m2.json"}})
    again = await handler({"id": "rp-3", "input": {"manifest": "m1"}})

    assert first["status"]["id"] == "m1" and first["status"]["state"] == "succeeded"
    assert second["status"]["id"] == "second" and second["status"]["state"] == "succeeded"
    for answer in (first, second):
        assert_output_served(client, moto_s3_settings, answer["outputs"][0])
    assert get_json(client, moto_s3_settings, "output/second/status.json")["state"] == "succeeded"
    assert sorted(keys(client, moto_s3_settings, "input/_done/")) == [
        "input/_done/m1.json",
        "input/_done/m2.json",
    ]
    assert set(again) == {"error"}
    assert (
        "input/m1.json has already finished: it was moved to input/_done/m1.json"
        in (again["error"])
    )
    missing = await handler({"id": "rp-4", "input": {"manifest": "ghost.json"}})
    assert missing == {"error": f"no manifest at input/ghost.json in bucket "
                       f"{moto_s3_settings.bucket_name}"}  # fmt: skip


async def test_manifest_held_by_another_worker_is_refused(
    handler: RunpodHandler, moto_s3_settings: S3Settings
) -> None:
    client = s3_client(moto_s3_settings)
    put_manifest(client, moto_s3_settings, "busy", {"workflow": "solid"})
    layout = s3_layout(moto_s3_settings)
    async with S3Storage(moto_s3_settings) as storage:
        other = ClaimStore(storage, layout.claims_prefix, "other-worker", 60)
        assert await other.acquire("busy") is not None

        answer = await handler({"id": "rp-busy", "input": {"manifest": "busy.json"}})

    assert set(answer) == {"error"}
    assert "input/busy.json is being run by another worker" in answer["error"]
    assert keys(client, moto_s3_settings, "input/", delimiter="/") == ["input/busy.json"]
    assert keys(client, moto_s3_settings, "output/") == []


async def test_drain_runs_pending_manifests_within_its_bounds(
    handler: RunpodHandler, moto_s3_settings: S3Settings
) -> None:
    client = s3_client(moto_s3_settings)
    for n in range(3):
        put_manifest(client, moto_s3_settings, f"d{n}", {"workflow": "solid", "payload": {}})
    put_manifest(client, moto_s3_settings, "junk", {"workflow": "solid", "payload": "x"})

    first = await handler({"id": "rp-d1", "input": {"drain": True, "max_jobs": 2}})
    rest = await handler({"id": "rp-d2", "input": {"drain": True}})

    assert first["manifests"] == 2 and first["retried"] == 0
    assert rest["manifests"] == 2
    assert first["succeeded"] + rest["succeeded"] == 3
    assert first["failed"] + rest["failed"] == 1
    ran = {job["id"]: job["state"] for job in first["jobs"] + rest["jobs"]}
    assert ran == {"d0": "succeeded", "d1": "succeeded", "d2": "succeeded", "junk": "failed"}
    for job_id, state in ran.items():
        stored = get_json(client, moto_s3_settings, f"output/{job_id}/status.json")
        assert stored["state"] == state
    assert keys(client, moto_s3_settings, "input/", delimiter="/") == []
    empty = await handler({"id": "rp-d3", "input": {"drain": True, "max_seconds": 5}})
    assert empty["manifests"] == 0 and empty["jobs"] == []


async def test_a_retryable_failure_is_retried_before_answering(
    handler: RunpodHandler, moto_s3_settings: S3Settings, fake_comfyui: Any
) -> None:
    fake_comfyui.state.fail_at_node = "3"
    fake_comfyui.state.fail_times = 1

    answer = await handler({"id": "rp-flaky", "input": {"workflow": "txt2img"}})

    assert "error" not in answer, answer
    assert answer["status"]["state"] == "succeeded" and answer["status"]["attempt"] == 2
    assert any("previous try failed: runtime" in note for note in answer["status"]["notes"])
    assert_output_served(s3_client(moto_s3_settings), moto_s3_settings, answer["outputs"][0])


async def test_a_failed_job_answers_with_its_error_and_status(
    handler: RunpodHandler, moto_s3_settings: S3Settings
) -> None:
    payload = {"ckpt_name": "missing.safetensors"}

    answer = await handler({"id": "rp-fail", "input": {"workflow": "txt2img", "payload": payload}})

    assert answer["status"]["state"] == "failed" and answer["outputs"] == []
    assert answer["error"].startswith("job rp-fail failed (validation):")
    assert "missing.safetensors" in answer["error"]
    stored = get_json(s3_client(moto_s3_settings), moto_s3_settings, "output/rp-fail/status.json")
    assert stored["state"] == "failed" and stored["error"]["type"] == "validation"


async def test_unreachable_comfyui_is_a_readable_error_and_is_retried_next_job(
    moto_s3_settings: S3Settings, fake_comfyui: Any
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    settings = worker_settings(
        fake_comfyui, comfyui_url=dead, comfyui_startup_timeout=1, refresh_worker=True
    )
    handler = RunpodHandler(s3=moto_s3_settings, settings=settings, send_progress=Captured())
    try:
        answer = await handler({"id": "rp-down", "input": {"workflow": "solid"}})
        assert answer["refresh_worker"] is True
        assert answer["error"].startswith("the worker could not run the job:")
        assert "Traceback" not in answer["error"] and not handler.host.started
        # The inline manifest was validated but not written: the worker never opened.
        assert keys(s3_client(moto_s3_settings), moto_s3_settings, "") == []
        handler.settings = settings.replace(comfyui_url=fake_comfyui.url)
        ok = await handler({"id": "rp-up", "input": {"workflow": "solid"}})
        assert ok["status"]["state"] == "succeeded" and handler.host.started
        assert ok["refresh_worker"] is True
    finally:
        handler.close()


def state_of(client: Any, settings: S3Settings, key: str) -> Any:
    try:
        return get_json(client, settings, key).get("state")
    except ClientError:
        return None


async def test_a_job_runpod_stops_is_cancelled_not_given_back(
    handler: RunpodHandler, moto_s3_settings: S3Settings, fake_comfyui: Any
) -> None:
    fake_comfyui.state.step_delay = 1.0  # 20 steps: 20 s
    client = s3_client(moto_s3_settings)
    task = asyncio.create_task(handler({"id": "rp-stop", "input": {"workflow": "txt2img"}}))
    status_key = "output/rp-stop/status.json"
    running = lambda: fake_comfyui.stats()["running"]  # noqa: E731
    await asyncio.to_thread(wait_until, running, 60, "the prompt to run")

    task.cancel()  # what the SDK does when RunPod stops (cancels or times out) a job
    with pytest.raises(asyncio.CancelledError):
        await task

    cancelled = lambda: state_of(client, moto_s3_settings, status_key) == "cancelled"  # noqa: E731
    await asyncio.to_thread(wait_until, cancelled, 60, "the job to be cancelled")
    status = get_json(client, moto_s3_settings, status_key)
    assert status["error"]["type"] == "cancelled"
    assert status["error"]["details"]["requested_by"].startswith("RunPod (request rp-stop")
    assert status["error"]["details"]["stage"] == "while it ran"
    done = ["input/_done/rp-stop.json"]
    settled = lambda: keys(client, moto_s3_settings, "input/_done/") == done  # noqa: E731
    await asyncio.to_thread(wait_until, settled, 60, "the manifest to be retired")
    assert keys(client, moto_s3_settings, "input/", delimiter="/") == []
    gone = lambda: not keys(client, moto_s3_settings, "input/_cancel/")  # noqa: E731
    await asyncio.to_thread(wait_until, gone, 60, "the cancel request to be removed")
    assert keys(client, moto_s3_settings, "input/_claims/") == []
    assert len(fake_comfyui.stats()["interrupted"]) == 1


async def test_an_inline_job_of_every_output_kind_answers_with_each(
    moto_s3_settings: S3Settings, fake_comfyui: Any, progress: Captured
) -> None:
    settings = worker_settings(fake_comfyui, workflows_dir=DATA / "media_workflows")
    made = RunpodHandler(s3=moto_s3_settings, settings=settings, send_progress=progress)
    try:
        answer = await made(
            {"id": "rp-media", "input": {"workflow": "media", "payload": {"caption": "hi"},
                                         "priority": 4}}
        )  # fmt: skip
    finally:
        made.close()

    assert "error" not in answer, answer
    assert answer["status"]["manifest_key"] == "input/!996.rp-media.json"
    assert answer["texts"] == {"11": ["hi"]}
    by_type = {(o["kind"], o["content_type"]) for o in answer["outputs"]}
    assert {
        ("images", "video/mp4"),
        ("images", "video/webm"),
        ("images", "image/webp"),
        ("gifs", "image/gif"),
        ("audio", "audio/flac"),
        ("audio", "audio/mpeg"),
        ("audio", "audio/ogg"),
        ("3d", "model/gltf-binary"),
        ("images", "image/png"),
    } == by_type
    client = s3_client(moto_s3_settings)
    for output in answer["outputs"]:
        data = fetch(output["url"])
        assert hashlib.sha256(data).hexdigest() == output["sha256"]
        stored = client.get_object(Bucket=moto_s3_settings.bucket_name, Key=output["key"])
        assert stored["ContentType"] == output["content_type"]


async def test_one_comfyui_connection_serves_every_job(
    handler: RunpodHandler, fake_comfyui: Any
) -> None:
    await handler({"id": "rp-a", "input": {"workflow": "solid"}})
    worker = handler.host._worker
    await handler({"id": "rp-b", "input": {"workflow": "solid"}})

    assert worker is not None and handler.host._worker is worker
    assert sum(fake_comfyui.stats()["executed"].values()) == 2
    assert handler.concurrency(7) == 1


# -- the SDK itself, as subprocesses ------------------------------------------------------------


def runpod_env(settings: S3Settings, fake: Any) -> dict[str, str]:
    comfyui = {} if fake is None else {"comfyui_url": fake.url}
    env = s3_env(settings, worker_id="rp-proc", **comfyui)
    env.update(RUNPOD_ENV)
    env.pop("RUNPOD_WEBHOOK_GET_JOB", None)
    return env


def run_test_input(
    settings: S3Settings, fake: Any, test_input: str, **extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "triggers.runpod", "--test_input", test_input],
        env={**runpod_env(settings, fake), **extra},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def local_test_ids(client: Any, settings: S3Settings) -> list[str]:
    """The job ids of the local tests that ran, from their status documents."""
    found = keys(client, settings, "output/")
    return sorted(k.split("/")[1] for k in found if k.endswith("/status.json"))


def test_test_input_runs_the_seed_example_and_each_run_is_a_new_job(
    moto_s3_settings: S3Settings, fake_comfyui: Any
) -> None:
    result = run_test_input(moto_s3_settings, fake_comfyui, TEST_INPUT.read_text())

    assert result.returncode == 0, result.stdout + result.stderr
    client = s3_client(moto_s3_settings)
    [first_id] = local_test_ids(client, moto_s3_settings)
    # The SDK names every local test job `local_test`; the job gets a name of its own.
    assert first_id.startswith("local_test-") and len(first_id) > len("local_test-")
    status = get_json(client, moto_s3_settings, f"output/{first_id}/status.json")
    assert status["state"] == "succeeded" and status["payload"]["seed"] == 123
    assert keys(client, moto_s3_settings, "input/_done/") == [f"input/_done/{first_id}.json"]
    assert "Traceback" not in result.stdout + result.stderr
    assert "Unclosed" not in result.stderr and "closing the worker" not in result.stderr
    assert "worker closed: ComfyUI and the S3 client are released" in result.stderr
    assert f"the inline job runs as job {first_id}" in result.stderr
    assert "DEBUG  |" in result.stdout  # the SDK's default level

    # Iterating on the test input: the second run is run, not answered from the first.
    second = json.dumps({"input": {"workflow": "txt2img", "payload": {"seed": 7}}})
    again = run_test_input(moto_s3_settings, fake_comfyui, second, RUNPOD_LOG_LEVEL="ERROR")

    assert again.returncode == 0, again.stdout + again.stderr
    ids = local_test_ids(client, moto_s3_settings)
    [second_id] = [i for i in ids if i != first_id]
    assert (
        get_json(client, moto_s3_settings, f"output/{second_id}/status.json")["payload"]["seed"]
        == 7
    )
    assert "already succeeded" not in again.stdout + again.stderr
    assert sum(fake_comfyui.stats()["executed"].values()) == 2
    # RUNPOD_LOG_LEVEL quiets the SDK, as docs/runpod.md says: none of its INFO/DEBUG lines.
    assert "DEBUG  |" not in again.stdout and "INFO   |" not in again.stdout


def test_a_comfyui_the_worker_started_stops_when_test_input_ends(
    moto_s3_settings: S3Settings, tmp_path: Any
) -> None:
    port = free_port()
    env = runpod_env(moto_s3_settings, None)
    env.update(
        {
            "COMFYS3_COMFYUI_PATH": str(ROOT / "tests" / "fake_comfyui"),
            "COMFYS3_COMFYUI_PYTHON": sys.executable,
            "COMFYS3_COMFYUI_PORT": str(port),
            "COMFYS3_COMFYUI_ARGS": f"--base-directory {tmp_path / 'comfyui'}",
            "COMFYS3_VOLUME_DIR": str(tmp_path / "volume"),  # as /runpod-volume on RunPod
        }
    )
    result = subprocess.run(
        [sys.executable, "-m", "triggers.runpod", "--test_input", TEST_INPUT.read_text()],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    client = s3_client(moto_s3_settings)
    [job_id] = local_test_ids(client, moto_s3_settings)
    status = get_json(client, moto_s3_settings, f"output/{job_id}/status.json")
    assert status["state"] == "succeeded"
    # What a dead worker did stays on the volume: its log and its ComfyUI's, by worker id.
    logs = tmp_path / "volume" / "logs"
    assert "main.py --listen 127.0.0.1" in (logs / "comfyui-rp-proc.log").read_text()
    worker_log = (logs / "worker-rp-proc.log").read_text()
    assert f"claimed input/{job_id}.json (attempt 1)" in worker_log
    assert "worker closed: ComfyUI and the S3 client are released" in worker_log
    with pytest.raises(OSError):  # nothing listens there any more: ComfyUI went with the worker
        urllib.request.urlopen(f"http://127.0.0.1:{port}/system_stats", timeout=2)


def test_test_input_with_a_bad_job_exits_1_with_the_reason(
    moto_s3_settings: S3Settings, fake_comfyui: Any
) -> None:
    bad = json.dumps({"input": {"workflow": "txt2img", "payload": {"steps": "many"}}})
    result = subprocess.run(
        [sys.executable, "-m", "triggers.runpod", "--test_input", bad],
        env=runpod_env(moto_s3_settings, fake_comfyui),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )

    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "payload.steps" in output and "Traceback" not in output
    assert keys(s3_client(moto_s3_settings), moto_s3_settings, "") == []


# `comfys3 runpod` as cli.py assembles it: the subcommand's flags reach the SDK.
COMFYS3_RUNPOD = """
import argparse, sys
from triggers.runpod import command as runpod
parser = argparse.ArgumentParser(prog="comfys3")
runpod.register(parser.add_subparsers())
args = parser.parse_args(sys.argv[1:])
sys.exit(args.handler(args))
"""


def test_serve_api_answers_runsync_with_the_output(
    moto_s3_settings: S3Settings, fake_comfyui: Any, tmp_path: Any
) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", COMFYS3_RUNPOD, "runpod", "--rp_serve_api",
             "--rp_api_host", "127.0.0.1", "--rp_api_port", str(port)],
            env=runpod_env(moto_s3_settings, fake_comfyui), cwd=ROOT,
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_until(lambda: serving(port, process, log), 60, "the RunPod API to answer")
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/runsync",
            data=TEST_INPUT.read_bytes(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        # A bad `input` reaches the handler, as on RunPod, and gets its sentence back.
        refused = post_json(port, "/runsync", {"input": "txt2img"})
        not_a_request = post_json(port, "/runsync", ["txt2img"])
        # /run only files the job away; POST /status/<id> runs it, once.
        queued = post_json(port, "/run", {"input": {"workflow": "solid"}})
        ran = post_json(port, f"/status/{queued[1]['id']}", None)
        again = post_json(port, f"/status/{queued[1]['id']}", None)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    served = log.read_text()
    assert process.returncode == 0, served  # SIGTERM: uvicorn returns, the worker is closed
    assert "Finished server process" in served and "Unclosed" not in served
    assert "worker closed: ComfyUI and the S3 client are released" in served

    assert answer["status"] == "COMPLETED", answer
    job_id = answer["id"]
    output = answer["output"]
    assert output["status"]["id"] == job_id and output["status"]["state"] == "succeeded"
    client = s3_client(moto_s3_settings)
    assert_output_served(client, moto_s3_settings, output["outputs"][0])
    stored = get_json(client, moto_s3_settings, f"output/{job_id}/status.json")
    assert stored["state"] == "succeeded" and stored["payload"]["seed"] == 123
    assert "Traceback" not in served

    status, body = refused
    assert status == 200 and body["status"] == "FAILED" and set(body) == {"id", "status", "error"}
    assert body["error"].startswith("'input' must be a JSON object, not a string; send ")
    assert not_a_request == (400, {"error": NOT_A_REQUEST})
    assert queued[1]["status"] == "IN_PROGRESS"
    assert ran[1]["status"] == "COMPLETED" and ran[1]["output"]["status"]["state"] == "succeeded"
    assert again[1] == {"id": queued[1]["id"], "status": "FAILED", "error": "Job ID not found"}


def post_json(port: int, path: str, body: Any) -> tuple[int, Any]:
    """POST ``body`` as JSON (no body for None); the HTTP status and the decoded answer."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def serving(port: int, process: subprocess.Popen[bytes], log: Any) -> bool:
    if process.poll() is not None:
        raise AssertionError(f"the RunPod API exited ({process.returncode}):\n{log.read_text()}")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/openapi.json", timeout=1):
            return True
    except (urllib.error.URLError, OSError):
        return False
