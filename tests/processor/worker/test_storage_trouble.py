"""A worker under storage trouble, as the chaos bench (bench/chaos.py) found it: slow claims must
not make it list the intake again and again, a prompt ComfyUI has run must not be run again
because an upload failed for a few seconds, and a lease must survive an outage longer than a
third of it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from processor.errors import StorageError
from processor.job.status import JobState, JobStatus
from processor.settings import WorkerSettings
from processor.storage import claims as claims_module
from processor.storage.base import Page
from processor.storage.claims import ClaimStore, Lease
from processor.storage.layout import Layout
from processor.storage.local import LocalStorage
from processor.worker.assembly import open_worker
from triggers.poll import AdaptiveInterval

LAYOUT = Layout("input", "output")


def settings_for(fake: Any, **overrides: Any) -> WorkerSettings:
    values: dict[str, Any] = {
        "comfyui_url": fake.url,
        "job_timeout": 30,
        "lease_seconds": 30,
        "worker_id": "w",
        "retry_delay": 0.2,
        "check_conditional_writes": False,
    }
    values.update(overrides)
    return WorkerSettings(**values)


def drop(root: Path, name: str) -> None:
    (root / "input").mkdir(parents=True, exist_ok=True)
    (root / "input" / f"{name}.json").write_text(json.dumps({"workflow": "solid"}))


class SlowClaims(LocalStorage):
    """Creating a claim takes half a second (a throttled or recovering S3); listings counted."""

    listings = 0

    async def put(self, key: str, data: bytes, **options: Any) -> str:
        if "/_claims/" in key and options.get("if_none_match"):
            await asyncio.sleep(0.5)
        return await super().put(key, data, **options)

    async def list_page(self, prefix: str, **options: Any) -> Page:
        if prefix == "input":
            self.listings += 1
        return await super().list_page(prefix, **options)


async def serve_until(worker: Any, done: Any) -> None:
    """Run the worker as `comfys3 run` does (polling) until ``done()``."""
    stop = asyncio.Event()
    poll = AdaptiveInterval(0.2, 1.0, stop)
    task = asyncio.create_task(worker.run(wait_for_work=poll.wait, stop=stop))
    for _ in range(300):
        if done():
            break
        await asyncio.sleep(0.1)
    stop.set()
    await task


async def test_slow_claims_do_not_make_the_worker_list_again_and_again(
    tmp_path: Path, fake_comfyui: Any
) -> None:
    for n in range(3):
        drop(tmp_path, f"j{n}")
    storage = SlowClaims(tmp_path)
    async with open_worker(
        storage=storage, layout=LAYOUT, settings=settings_for(fake_comfyui)
    ) as w:
        await serve_until(w, lambda: w.counts.succeeded == 3)

    assert w.counts.succeeded == 3
    # While a claim was being decided, every sweep found the same keys busy and listed again
    # at once: about 350 listings a second. Now a sweep waits for a claim to be decided.
    assert storage.listings < 30, storage.listings


class FlakyUploads(LocalStorage):
    """The first two uploads of an output, and the first write of a succeeded status, fail as
    if S3 were away for a moment."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.failures: list[str] = []

    async def put(self, key: str, data: bytes, **options: Any) -> str:
        is_output = key.endswith(".png") and key.startswith("output/")
        is_final = key.endswith("status.json") and b'"state": "succeeded"' in data
        if (is_output and self.failures.count(key) < 2) or (is_final and key not in self.failures):
            self.failures.append(key)
            raise StorageError(f"S3 put of {key} failed: Could not connect to the endpoint URL")
        return await super().put(key, data, **options)


async def test_a_finished_prompt_waits_out_storage_trouble_instead_of_running_again(
    tmp_path: Path, fake_comfyui: Any
) -> None:
    drop(tmp_path, "job")
    storage = FlakyUploads(tmp_path)
    async with open_worker(
        storage=storage, layout=LAYOUT, settings=settings_for(fake_comfyui)
    ) as worker:
        counts = await worker.run()

    status = JobStatus.model_validate_json((tmp_path / "output/job/status.json").read_bytes())
    assert status.state is JobState.succeeded and status.attempt == 1
    assert len(storage.failures) == 3  # two uploads and a status write were refused
    assert sum(fake_comfyui.stats()["executed"].values()) == 1  # and the prompt ran once
    assert counts.succeeded == 1 and counts.summary()["attempts"] == 1
    assert (tmp_path / "input/_done/job.json").exists()


class Outage(LocalStorage):
    """Every write fails while ``down`` is set."""

    down = False

    async def put(self, key: str, data: bytes, **options: Any) -> str:
        if self.down:
            raise StorageError(f"S3 put of {key} failed: Could not connect to the endpoint URL")
        return await super().put(key, data, **options)


async def test_a_lease_outlives_an_outage_longer_than_a_third_of_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Renewals come every third of a lease. An outage over two of them used to leave the next
    one for the moment the lease ran out, and another worker could take over a job still
    running; now a failed renewal is tried again soon."""
    monkeypatch.setattr(claims_module, "RENEW_RETRY", 0.1)
    storage = Outage(tmp_path)
    lease_seconds = 6.0  # renewals due at 2, 4, 6 s
    store = ClaimStore(storage, "claims", "owner", lease_seconds)
    lease = await store.acquire("job")
    assert isinstance(lease, Lease)
    async with store.heartbeat(lease) as beat:
        await asyncio.sleep(1.0)
        storage.down = True  # over the renewals due at 2 and 4 s
        await asyncio.sleep(3.5)
        storage.down = False
        await asyncio.sleep(1.0)  # 5.5 s: before, the next renewal was due only at 6 s
        renewed = beat()
    assert beat.lost is None
    assert beat.renewals >= 1 and renewed.expires_at > lease.expires_at


class RefusedClaims(LocalStorage):
    """Claims cannot be written until ``up`` is set; claim attempts counted."""

    up = False
    attempts = 0

    async def put(self, key: str, data: bytes, **options: Any) -> str:
        if "/_claims/" in key:
            self.attempts += 1
            if not self.up:
                raise StorageError(f"S3 put of {key} failed: Could not connect to the endpoint URL")
        return await super().put(key, data, **options)


async def test_claims_refused_by_storage_are_tried_less_and_less_often(
    tmp_path: Path, fake_comfyui: Any
) -> None:
    drop(tmp_path, "job")
    storage = RefusedClaims(tmp_path)
    settings = settings_for(fake_comfyui, retry_delay=0.1)
    async with open_worker(storage=storage, layout=LAYOUT, settings=settings) as worker:
        stop = asyncio.Event()
        task = asyncio.create_task(
            worker.run(wait_for_work=AdaptiveInterval(0.2, 1.0, stop).wait, stop=stop)
        )
        await asyncio.sleep(3.0)
        refused = storage.attempts
        storage.up = True
        for _ in range(150):
            if worker.counts.succeeded:
                break
            await asyncio.sleep(0.1)
        stop.set()
        await task

    # Every retry_delay (0.1 s) for 3 s would be about 30 tries; doubling pauses make 5.
    assert 2 <= refused <= 8, refused
    assert worker.counts.succeeded == 1


class SlowAnswers(LocalStorage):
    """A renewal lands at once, but its answer takes a second, as a retried request's does."""

    async def put(self, key: str, data: bytes, **options: Any) -> str:
        etag = await super().put(key, data, **options)
        if options.get("if_match") and b'"state": "held"' in data:
            await asyncio.sleep(1.0)
        return etag


async def test_giving_a_claim_back_waits_for_the_renewal_in_flight(tmp_path: Path) -> None:
    """Released with the lease read before a renewal's answer came, the claim failed to be given
    back (the renewal had changed its etag) and stayed held for a whole lease."""
    storage = SlowAnswers(tmp_path)
    store = ClaimStore(storage, "claims", "owner", 0.6)  # a renewal every 0.2 s
    lease = await store.acquire("job")
    assert isinstance(lease, Lease)
    async with store.heartbeat(lease) as beat:
        await asyncio.sleep(0.45)  # the first renewal has landed; its answer is on its way
        await beat.halt()
        await store.release(beat(), error="storage: down", charge=False)
    claim = json.loads((await storage.get("claims/job.json")).data)
    assert (claim["state"], claim["last_error"]) == ("released", "storage: down")
    assert beat.lost is None and beat.renewals == 1
