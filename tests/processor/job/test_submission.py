"""Putting a new manifest: never over one that waits; a finished run's copy, on its way out of
the intake, is waited for within a bound; statuses are read only when a manifest is found."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from processor.job import submission
from processor.job.status_book import StatusBook
from processor.job.submission import put_new_manifest
from processor.storage.layout import Layout
from processor.storage.local import LocalStorage

LAYOUT = Layout("input", "output")
KEY = "input/job.json"


class CountingBook(StatusBook):
    def __init__(self, storage: LocalStorage) -> None:
        super().__init__(storage, LAYOUT)
        self.reads = 0

    async def read_many(self, job_ids: Any, concurrency: int = 8) -> Any:
        self.reads += 1
        return await super().read_many(job_ids, concurrency)


def with_status(root: Path, job_id: str, state: str) -> None:
    path = root / LAYOUT.status_key(job_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": 1, "id": job_id, "state": state}))


def waiting(root: Path) -> Path:
    path = root / KEY
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"old")
    return path


async def test_a_new_manifest_goes_in_without_reading_any_status(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    book = CountingBook(storage)
    assert await put_new_manifest(storage, book, KEY, b"new", ["job"])
    assert (tmp_path / KEY).read_bytes() == b"new"
    assert book.reads == 0


@pytest.mark.parametrize("state", ["running", "queued", None])
async def test_one_waiting_for_an_open_or_unknown_job_is_refused_at_once(
    tmp_path: Path, state: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = LocalStorage(tmp_path)
    old = waiting(tmp_path)
    if state is not None:
        with_status(tmp_path, "job", state)
    slept: list[float] = []

    async def no_sleep(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr(submission.asyncio, "sleep", no_sleep)
    assert not await put_new_manifest(storage, StatusBook(storage, LAYOUT), KEY, b"new", ["job"])
    assert old.read_bytes() == b"old" and slept == []


async def test_a_finished_runs_copy_is_waited_for_until_it_leaves(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    old = waiting(tmp_path)
    with_status(tmp_path, "a", "succeeded")
    with_status(tmp_path, "b", "failed")
    asyncio.get_running_loop().call_later(0.5, old.unlink)
    assert await put_new_manifest(storage, StatusBook(storage, LAYOUT), KEY, b"new", ["a", "b"])
    assert (tmp_path / KEY).read_bytes() == b"new"


async def test_a_finished_runs_copy_that_stays_is_refused_after_the_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = LocalStorage(tmp_path)
    old = waiting(tmp_path)
    with_status(tmp_path, "job", "succeeded")
    monkeypatch.setattr(submission, "RETIRING_GRACE_SECONDS", 0.5)
    assert not await put_new_manifest(storage, StatusBook(storage, LAYOUT), KEY, b"new", ["job"])
    assert old.read_bytes() == b"old"
