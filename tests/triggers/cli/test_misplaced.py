"""Manifests dropped where no worker runs them are found and named, one sentence per kind of
near miss (outside the intake, a folder like it, a sub-folder of it, the name's case, YAML), on
a local folder and on S3, with bounded listings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processor.errors import StorageError
from processor.settings import S3Settings
from processor.storage.layout import Layout
from processor.storage.local import LocalStorage
from processor.storage.s3 import S3Storage
from processor.worker.assembly import local_layout
from tests.workers import s3_client
from triggers.cli.misplaced import MisplacedManifests, looks_like_manifest

MANIFEST = json.dumps({"workflow": "solid"})
YAML = "workflow: solid\npayload:\n  color: 3\n"
# One of each kind of near miss, and files that must stay quiet.
NEAR_MISSES = {
    "job.json": MANIFEST,  # outside input/
    "inputs/plural.json": MANIFEST,  # a folder like input/
    "input/sub/nested.json": MANIFEST,  # a sub-folder
    "input/upper.JSON": MANIFEST,  # the case of its name
    "input/yam.yaml": YAML,  # YAML
}
QUIET = {
    "package.json": '{"name": "not a manifest"}',
    "notes.txt": MANIFEST,
    "input/ok.json": MANIFEST,  # where it belongs: work, not a near miss
    "input/config.yml": "colour: red\n",
    "input/sub/list.json": "[1, 2]",
    "input/_claims/x.json": MANIFEST,
    "input/_done/x.json": MANIFEST,
    "input/_failed/x.json": MANIFEST,
    "output/j/status.json": MANIFEST,
}


def put(root: Path, relative: str, text: str = MANIFEST) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def expected(where: Any) -> list[str]:
    """The five sentences, in kind order, for NEAR_MISSES at ``where(key)``."""
    return [
        f"{where('job.json')} looks like a job manifest, but it is outside input/, so no worker "
        "runs it: workers run only *.json files directly in input/; move it to "
        f"{where('input/job.json')} to run it",
        f"{where('inputs/plural.json')} looks like a job manifest, but it is in inputs/, not in "
        "input/, so no worker runs it: workers run only *.json files directly in input/; move it "
        f"to {where('input/plural.json')} to run it",
        f"{where('input/sub/nested.json')} looks like a job manifest, but it is in a sub-folder "
        "of input/, so no worker runs it: workers run only *.json files directly in input/; "
        f"move it to {where('input/nested.json')} to run it",
        f"{where('input/upper.JSON')} looks like a job manifest, but its name ends in '.JSON', "
        "not '.json', so no worker runs it: workers run only *.json files directly in input/; "
        f"rename it to {where('input/upper.json')} to run it",
        f"{where('input/yam.yaml')} looks like a job manifest, but it is YAML, so no worker runs "
        "it: workers run only *.json files directly in input/; write it as JSON, e.g. "
        f"{where('input/yam.json')} to run it",
    ]


async def test_a_local_folder_names_each_kind_of_near_miss_once(tmp_path: Path) -> None:
    for key, text in {**NEAR_MISSES, **QUIET}.items():
        put(tmp_path, key, text)

    async with LocalStorage(tmp_path) as storage:
        finder = MisplacedManifests(storage, local_layout())
        warnings = await finder.new_warnings()
        again = await finder.new_warnings()
        put(tmp_path, "input/batch2/c.json")
        put(tmp_path, "input/batch2/deeper/d.json", json.dumps({"graph": {}}))
        later = await finder.new_warnings()

    assert warnings == expected(lambda key: str(tmp_path / key))
    assert again == []  # once per file
    assert later == [
        f"{tmp_path / 'input/batch2/c.json'}, {tmp_path / 'input/batch2/deeper/d.json'} look like "
        "job manifests, but they are in a sub-folder of input/, so no worker runs them: workers "
        f"run only *.json files directly in input/; move them to {tmp_path / 'input/c.json'} "
        "(the others likewise) to run them"
    ]


@pytest.mark.parametrize("backend", ["moto", "seaweedfs"])
async def test_s3_names_each_kind_of_near_miss_once(
    backend: str, request: pytest.FixtureRequest
) -> None:
    """On S3 too, sub-folders included: a listing of input/ by folder shows _done/ as one
    entry, so the look costs the same after a million jobs."""
    s3: S3Settings = request.getfixturevalue(
        f"{'moto' if backend == 'moto' else 'seaweed'}_s3_settings"
    )
    client = s3_client(s3)
    for key, text in {**NEAR_MISSES, **QUIET}.items():
        client.put_object(Bucket=s3.bucket_name, Key=key, Body=text.encode())

    async with S3Storage(s3) as storage:
        finder = MisplacedManifests(storage, Layout("input", "output"))
        warnings = await finder.new_warnings()
        assert await finder.new_warnings() == []

    assert warnings == expected(lambda key: f"s3://{s3.bucket_name}/{key}")


async def test_the_looks_are_bounded(tmp_path: Path) -> None:
    for n in range(30):
        put(tmp_path, f"input/many/{n:02d}.json")
    async with LocalStorage(tmp_path) as storage:
        finder = MisplacedManifests(storage, local_layout(), limit=10)
        first = await finder.new_warnings()
    assert len(first) == 1
    assert first[0].startswith(f"{tmp_path / 'input/many/00.json'}, ")
    assert " and 5 more look like job manifests" in first[0]  # 10 looked at, 5 named


async def test_s3_looks_beside_a_nested_intake_prefix(moto_s3_settings: S3Settings) -> None:
    client = s3_client(moto_s3_settings)
    bucket = moto_s3_settings.bucket_name
    client.put_object(Bucket=bucket, Key="jobs/job.json", Body=MANIFEST.encode())
    client.put_object(Bucket=bucket, Key="job.json", Body=MANIFEST.encode())  # not its parent

    async with S3Storage(moto_s3_settings) as storage:
        warnings = await MisplacedManifests(storage, Layout("jobs/in", "out")).new_warnings()

    assert len(warnings) == 1
    assert warnings[0].startswith(f"s3://{bucket}/jobs/job.json looks like a job manifest")
    assert f"move it to s3://{bucket}/jobs/in/job.json" in warnings[0]


class BrokenStorage(LocalStorage):
    async def list_page(self, prefix: str, **options: Any) -> Any:
        raise StorageError("list failed: the bucket is gone")


async def test_storage_trouble_means_no_warning_this_time(tmp_path: Path) -> None:
    put(tmp_path, "job.json")
    async with BrokenStorage(tmp_path) as storage:
        assert await MisplacedManifests(storage, local_layout()).new_warnings() == []


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(["workflow", "graph", "payload", "x"]) | st.text(), inner)
    ),
    max_leaves=12,
)


@settings(max_examples=150, derandomize=True, deadline=None)
@given(content=st.binary(max_size=300) | JSON_VALUES.map(lambda v: json.dumps(v).encode()))
def test_any_file_content_is_judged_without_an_error(content: bytes) -> None:
    try:
        document = json.loads(content)
    except ValueError:
        document = None
    expected = isinstance(document, dict) and ("workflow" in document or "graph" in document)
    assert looks_like_manifest(content) is expected


def test_deeply_nested_json_is_not_a_manifest() -> None:
    assert looks_like_manifest(b"[" * 100_000 + b"]" * 100_000) is False
    assert looks_like_manifest(b'{"workflow": "solid"}') is True
