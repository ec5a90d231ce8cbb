"""What the poison tests share: a bucket reached past the worker's key checks (a poisoned name
must be put there the way a careless uploader would), a worker draining it through a
:class:`~tests.storage_spy.SpyStorage`, and the figures they assert on."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from processor.job.status import JobStatus
from processor.settings import S3Settings
from processor.storage.base import Storage
from processor.storage.layout import Layout
from processor.storage.local import LocalStorage
from processor.storage.s3 import S3Storage
from processor.worker.assembly import open_worker
from processor.worker.loop import Counts
from tests.processor.worker.test_loop import worker_settings
from tests.s3_servers import s3_settings_for
from tests.storage_spy import Call, Fault, SpyStorage, claim_creates, claims_won

LAYOUT = Layout("input", "output")


class Bucket:
    """Raw, synchronous access to a test's storage, for set-up and for checks."""

    name = "?"

    def storage(self) -> Storage:
        raise NotImplementedError

    def put(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def read(self, key: str) -> bytes | None:
        raise NotImplementedError

    def keys(self, prefix: str) -> list[str]:
        """Every key under ``prefix`` (recursive), sorted."""
        raise NotImplementedError

    def drop(self, name: str, document: Any) -> str:
        """A manifest at ``input/<name>.json``: a str is written as is, anything else as JSON."""
        text = document if isinstance(document, str | bytes) else json.dumps(document)
        key = f"input/{name}.json"
        self.put(key, text.encode() if isinstance(text, str) else text)
        return key

    def pending(self) -> list[str]:
        """Manifests still in the intake (not in its sub-folders)."""
        return [key for key in self.keys("input/") if "/" not in key[len("input/") :]]

    def status(self, job_id: str) -> JobStatus:
        data = self.read(f"output/{job_id}/status.json")
        assert data is not None, f"no status for {job_id}"
        return JobStatus.model_validate_json(data)


class LocalBucket(Bucket):
    name = "local"

    def __init__(self, root: Path) -> None:
        self.root = root

    def storage(self) -> Storage:
        return LocalStorage(self.root)

    def put(self, key: str, data: bytes) -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def read(self, key: str) -> bytes | None:
        path = self.root / key
        return path.read_bytes() if path.is_file() else None

    def keys(self, prefix: str) -> list[str]:
        base = self.root / prefix
        if not base.is_dir():
            return []
        found = [str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file()]
        return sorted(found)


class S3Bucket(Bucket):
    def __init__(self, name: str, client: Any, settings: S3Settings) -> None:
        self.name = name
        self.client = client
        self.settings = settings

    def storage(self) -> Storage:
        return S3Storage(self.settings)

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.settings.bucket_name, Key=key, Body=data)

    def read(self, key: str) -> bytes | None:
        try:
            response = self.client.get_object(Bucket=self.settings.bucket_name, Key=key)
        except self.client.exceptions.NoSuchKey:
            return None
        return response["Body"].read()  # type: ignore[no-any-return]

    def keys(self, prefix: str) -> list[str]:
        found: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.settings.bucket_name, Prefix=prefix):
            found += [item["Key"] for item in page.get("Contents", [])]
        return sorted(found)


def make_bucket(kind: str, request: pytest.FixtureRequest, root: Path) -> Bucket:
    if kind == "local":
        return LocalBucket(root)
    server = request.getfixturevalue("moto_server")
    return S3Bucket("moto", server.client(), s3_settings_for(server))


@dataclass
class Drained:
    """What one drain did, as the storage saw it."""

    counts: Counts
    calls: list[Call] = field(default_factory=list)

    def won(self) -> dict[str, int]:
        return claims_won(self.calls)


async def drain(
    bucket: Bucket,
    fake: Any,
    *,
    fault: Fault | None = None,
    tune: Any = None,
    **overrides: Any,
) -> Drained:
    """One worker, ``run()`` until the intake is drained. ``tune(worker)`` may adjust the
    worker before it starts (a retirer that gives up sooner, say)."""
    spy = SpyStorage(bucket.storage(), fault=fault)
    settings = worker_settings(fake, **overrides)
    async with open_worker(storage=spy, layout=LAYOUT, settings=settings) as worker:
        if tune is not None:
            tune(worker)
        counts = await worker.run()
    return Drained(counts, spy.calls)


def executions(fake: Any) -> int:
    """Prompts ComfyUI executed, counting every re-execution."""
    return sum(fake.stats()["executed"].values())


def ended(bucket: Bucket, name: str, where: str = "_failed") -> bool:
    """The manifest left the intake for ``where`` and its claim is gone."""
    return (
        f"input/{name}.json" not in bucket.keys("input/")
        and f"input/{where}/{name}.json" in bucket.keys(f"input/{where}/")
        and bucket.read(f"input/_claims/{name}.json") is None
    )


def wasted_claims(calls: list[Call]) -> int:
    """Claims tried on a manifest whose retirement had already deleted it: what a worker
    walking a stale listing pays for every manifest another worker finished meanwhile."""
    retired: set[str] = set()
    wasted = 0
    for call in calls:
        if call.op == "delete_many" and call.ok:
            retired |= {key for key in call.keys if key.count("/") == 1}
        elif call.op == "put" and call.if_none_match and call.keys[0].startswith("input/_claims/"):
            name = call.keys[0].removeprefix("input/_claims/")
            wasted += f"input/{name}" in retired
    return wasted


async def three_workers(bucket: Bucket, fake: Any, jobs: int) -> tuple[list[Counts], list[Call]]:
    """Three workers in one event loop drain ``jobs`` short manifests from one bucket."""
    fake.state.exec_delay = 0.02
    for n in range(jobs):
        bucket.drop(f"job{n:03d}", {"workflow": "solid"})
    calls: list[Call] = []

    async def one(index: int) -> Counts:
        spy = SpyStorage(bucket.storage(), calls)
        settings = worker_settings(fake, worker_id=f"w{index}")
        async with open_worker(storage=spy, layout=LAYOUT, settings=settings) as worker:
            return await worker.run()

    return list(await asyncio.gather(*(one(i) for i in range(3)))), calls


def figures(counts: list[Counts], calls: list[Call]) -> dict[str, Any]:
    """What sharing a backlog cost, for the assertion message and bench/stale_listing.py."""
    lost = [
        call
        for call in calls
        if call.op == "put" and call.if_none_match and not call.ok and "_claims/job" in call.keys[0]
    ]
    return {
        "claims_tried": sum(claim_creates(calls).values()),
        "wasted_on_retired": wasted_claims(calls),
        "found_claimed_by_another": len(lost),
        "claims_won": sum(claims_won(calls).values()),
        "listings": sum(1 for call in calls if call.op == "list_page"),
        "jobs_per_worker": [c.succeeded for c in counts],
    }


# -- fixtures shared by the poison tests (registered in conftest.py) --------------------------


@pytest.fixture(params=["local", "moto"])
def bucket(request: pytest.FixtureRequest, tmp_path: Path) -> Bucket:
    """Where a key's shape or a conditional write matters, both backends."""
    return make_bucket(request.param, request, tmp_path / "bucket")


@pytest.fixture
def local_bucket(tmp_path: Path) -> Bucket:
    """Where storage is only the way in (checks that happen before ComfyUI), one backend."""
    return LocalBucket(tmp_path / "bucket")
