"""Manifests dropped where no worker looks are found and named once, on a local folder and on
S3, at the cost of one bounded listing above the intake (plus a bounded walk on disk)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


def put(root: Path, relative: str, text: str = MANIFEST) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


async def test_a_local_folder_names_manifests_above_and_below_the_intake(tmp_path: Path) -> None:
    put(tmp_path, "job.json")  # should be input/job.json
    put(tmp_path, "package.json", '{"name": "not a manifest"}')
    put(tmp_path, "notes.txt", MANIFEST)
    put(tmp_path, "input/ok.json")  # where it belongs
    put(tmp_path, "input/batch1/a.json")
    put(tmp_path, "input/batch1/deeper/b.json", json.dumps({"graph": {}}))
    put(tmp_path, "input/batch1/list.json", "[1, 2]")
    for own in ("_claims", "_done", "_failed"):
        put(tmp_path, f"input/{own}/x.json")
    put(tmp_path, "output/j/status.json", json.dumps({"workflow": "solid"}))  # not looked at

    async with LocalStorage(tmp_path) as storage:
        finder = MisplacedManifests(storage, local_layout())
        warnings = await finder.new_warnings()
        again = await finder.new_warnings()
        put(tmp_path, "input/batch2/c.json")
        later = await finder.new_warnings()

    assert len(warnings) == 3, warnings
    above, nested, deeper = warnings
    assert above == (
        f"{tmp_path / 'job.json'} looks like a job manifest, but it is outside input/, where no "
        "worker looks: workers run only the manifests directly in input/; move it to "
        f"{tmp_path / 'input' / 'job.json'} to run it"
    )
    assert nested.startswith(f"{tmp_path / 'input/batch1/a.json'} looks like a job manifest, ")
    assert "it is in a sub-folder of input/" in nested
    assert deeper.startswith(f"{tmp_path / 'input/batch1/deeper/b.json'} ")
    assert again == []  # once per file
    assert len(later) == 1 and "input/batch2/c.json" in later[0]


async def test_the_walk_below_the_intake_is_bounded(tmp_path: Path) -> None:
    for n in range(30):
        put(tmp_path, f"input/many/{n:02d}.json")
    async with LocalStorage(tmp_path) as storage:
        finder = MisplacedManifests(storage, local_layout(), limit=10)
        first = await finder.new_warnings()
    assert len(first) == 10


async def test_s3_names_a_manifest_at_the_bucket_root(moto_s3_settings: S3Settings) -> None:
    client = s3_client(moto_s3_settings)
    bucket = moto_s3_settings.bucket_name
    client.put_object(Bucket=bucket, Key="job.json", Body=MANIFEST.encode())
    client.put_object(Bucket=bucket, Key="config.json", Body=b'{"colour": "red"}')
    client.put_object(Bucket=bucket, Key="input/waiting.json", Body=MANIFEST.encode())
    client.put_object(Bucket=bucket, Key="input/sub/deep.json", Body=MANIFEST.encode())

    async with S3Storage(moto_s3_settings) as storage:
        finder = MisplacedManifests(storage, Layout("input", "output"))
        warnings = await finder.new_warnings()
        assert await finder.new_warnings() == []

    # Sub-folders of input/ are not listed on S3: that listing grows with history.
    assert warnings == [
        f"s3://{bucket}/job.json looks like a job manifest, but it is outside input/, where no "
        "worker looks: workers run only the manifests directly in input/; move it to "
        f"s3://{bucket}/input/job.json to run it"
    ]


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
    async def list(self, prefix: str, *, recursive: bool = False, limit: int | None = None) -> Any:
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
