"""Input files by key, URL or s3:// reference: what validate and submit refuse (the same rules
as the worker's), and what submit looks up in the bucket (keys only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from processor.errors import StorageError
from processor.job.input_refs import input_source, key_problems, missing_inputs
from processor.job.manifest import load_jobs
from processor.ops.fetch_guard import FetchPolicy, UrlRules
from processor.storage.local import LocalStorage
from processor.workflows import WorkflowRegistry, builtin_workflows_dir

REGISTRY = WorkflowRegistry.load(builtin_workflows_dir())


def jobs(*images: str) -> list:  # type: ignore[type-arg]
    manifest = {"workflow": "scale", "batch": [{"image": image} for image in images]}
    return load_jobs(json.dumps(manifest).encode(), manifest_key="input/x.json", registry=REGISTRY)


def test_what_an_input_value_names() -> None:
    assert input_source("uploads/cat.png").kind == "key"
    url = input_source("https://images.example/a%20cat.png?sig=1")
    assert (url.kind, url.file_name) == ("url", "a cat.png")
    s3 = input_source("s3://other-bucket/in/dog.webp")
    assert (s3.kind, s3.bucket, s3.key, s3.file_name) == (
        "s3",
        "other-bucket",
        "in/dog.webp",
        "dog.webp",
    )
    for bad in ("s3://B_ad/x.png", "s3://bucket/../x.png", "../x.png", "/etc/passwd"):
        with pytest.raises(StorageError):
            input_source(bad)


def test_validate_applies_the_fetch_guard_to_input_urls() -> None:
    found = key_problems(
        jobs("https://images.example/cat.png", "http://images.example/cat.png", "s3://b/../x"),
        FetchPolicy(),
    )
    messages = {problem.path: problem.message for problem in found}
    assert len(found) == 2 and set(messages) == {"payload.image"}
    text = " | ".join(problem.message for problem in found)
    assert "COMFYS3_FETCH_ALLOW_HTTP" in text and "s3://b/../x" in text
    open_policy = FetchPolicy(rules=UrlRules(allow_http=True))
    assert key_problems(jobs("http://images.example/cat.png"), open_policy) == []


def test_validate_reads_the_fetch_settings_when_given_no_policy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert key_problems(jobs("http://images.example/cat.png"))
    monkeypatch.setenv("COMFYS3_FETCH_ALLOW_HTTP", "true")
    assert key_problems(jobs("http://images.example/cat.png")) == []


async def test_submit_looks_up_keys_only(tmp_path: Path) -> None:
    (tmp_path / "here.png").write_bytes(b"x")
    async with LocalStorage(tmp_path) as storage:
        missing = await missing_inputs(
            storage,
            jobs("here.png", "gone.png", "https://images.example/cat.png", "s3://other/x.png"),
        )
    assert len(missing) == 1 and "'gone.png'" in missing[0]
