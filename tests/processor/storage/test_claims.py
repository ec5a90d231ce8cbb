"""Claims on a folder, on a real S3 server (SeaweedFS), and on moto where it can referee."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest

from processor.errors import LeaseLost, PreconditionFailed
from processor.storage.base import Storage, StoredObject
from processor.storage.claims import ClaimStore, Lease
from processor.storage.local import LocalStorage
from tests.s3_servers import storage_backend


async def claim(store: ClaimStore, name: str) -> Lease | None:
    """The lease, or None when someone else holds the claim (acquire says who, until when)."""
    result = await store.acquire(name)
    return result if isinstance(result, Lease) else None


LEASE = 60.0


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["local", "seaweedfs", "moto"])
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    """moto enforces conditions one request at a time: fine for every sequential test here."""
    async with storage_backend(request.param, request, tmp_path / "root") as backend:
        yield backend


@pytest.fixture(params=["local", "seaweedfs"])
async def atomic_storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    """Backends that stay exclusive under concurrent conditional writes (moto does not)."""
    async with storage_backend(request.param, request, tmp_path / "root") as backend:
        yield backend


async def read_claim(storage: Storage, key: str) -> dict[str, object]:
    return dict(json.loads((await storage.get(key)).data))


async def test_first_acquire_creates_attempt_one(storage: Storage) -> None:
    clock = FakeClock()
    store = ClaimStore(storage, "claims/", "worker-a", LEASE, clock=clock, wall_clock=clock)
    lease = await claim(store, "job-1")
    assert lease is not None
    assert (lease.name, lease.key, lease.holder, lease.attempt) == (
        "job-1",
        "claims/job-1.json",
        "worker-a",
        1,
    )
    assert lease.expires_at == clock.now + LEASE
    assert lease.last_error is None
    document = await read_claim(storage, lease.key)
    assert isinstance(document.pop("token"), str)
    assert document == {
        "name": "job-1",
        "holder": "worker-a",
        "attempt": 1,
        "tries": 1,
        "expires_at": clock.now + LEASE,
        "state": "held",
        "last_error": None,
    }
    assert (await storage.get(lease.key)).etag == lease.etag


async def test_live_claim_is_not_taken(storage: Storage) -> None:
    clock = FakeClock()
    a = ClaimStore(storage, "claims", "worker-a", LEASE, clock=clock, wall_clock=clock)
    b = ClaimStore(storage, "claims", "worker-b", LEASE, clock=clock, wall_clock=clock)
    assert await claim(a, "job") is not None
    clock.now += LEASE - 1
    assert await claim(b, "job") is None
    assert await claim(a, "job") is None  # even its holder cannot claim it twice


async def test_expired_claim_is_taken_over_and_old_holder_loses(storage: Storage) -> None:
    clock = FakeClock()
    a = ClaimStore(storage, "claims", "worker-a", LEASE, clock=clock, wall_clock=clock)
    b = ClaimStore(storage, "claims", "worker-b", LEASE, clock=clock, wall_clock=clock)
    first = await claim(a, "job")
    assert first is not None
    await a.release(first, error="CUDA out of memory")
    again = await claim(a, "job")
    assert again is not None and again.last_error == "CUDA out of memory"

    assert await claim(b, "job") is None  # b sees the claim held, and starts watching it
    clock.now += LEASE + 1  # a lease on b's clock with no renewal by a
    taken = await claim(b, "job")
    assert taken is not None
    assert (taken.holder, taken.attempt, taken.last_error) == ("worker-b", 3, "CUDA out of memory")
    assert (await read_claim(storage, taken.key))["holder"] == "worker-b"

    with pytest.raises(LeaseLost, match=r"claims/job\.json"):
        await a.renew(again)
    with pytest.raises(LeaseLost):
        await a.release(again, error="late")
    assert (await read_claim(storage, taken.key))["holder"] == "worker-b"

    renewed = await b.renew(taken)
    assert renewed.etag != taken.etag
    assert renewed.attempt == 3


async def test_renew_extends_the_lease(storage: Storage) -> None:
    clock = FakeClock()
    a = ClaimStore(storage, "claims", "worker-a", LEASE, clock=clock, wall_clock=clock)
    b = ClaimStore(storage, "claims", "worker-b", LEASE, clock=clock, wall_clock=clock)
    lease = await claim(a, "job")
    assert lease is not None
    assert await claim(b, "job") is None  # b starts watching
    clock.now += LEASE - 1
    renewed = await a.renew(lease)
    assert renewed.expires_at == clock.now + LEASE
    clock.now += LEASE - 1  # past the first lease, inside the renewed one
    assert await claim(b, "job") is None  # the renewal changed the claim: b watches anew
    with pytest.raises(LeaseLost):
        await a.renew(lease)  # the old etag is stale now


async def test_release_then_reacquire_counts_attempts(storage: Storage) -> None:
    clock = FakeClock()
    a = ClaimStore(storage, "claims", "worker-a", LEASE, clock=clock, wall_clock=clock)
    b = ClaimStore(storage, "claims", "worker-b", LEASE, clock=clock, wall_clock=clock)
    lease = await claim(a, "job")
    assert lease is not None
    await a.release(lease, error="node 3: bad checkpoint")
    document = await read_claim(storage, lease.key)
    assert document["state"] == "released"
    assert document["attempt"] == 1
    assert document["expires_at"] == clock.now

    retry = await claim(b, "job")  # at once, no waiting for the lease
    assert retry is not None
    assert (retry.attempt, retry.last_error) == (2, "node 3: bad checkpoint")
    await b.release(retry, error=None)
    third = await claim(a, "job")
    assert third is not None
    assert (third.attempt, third.last_error) == (3, "node 3: bad checkpoint")


async def test_a_release_that_does_not_charge_keeps_the_attempt(storage: Storage) -> None:
    clock = FakeClock()
    a = ClaimStore(storage, "claims", "worker-a", LEASE, clock=clock, wall_clock=clock)
    b = ClaimStore(storage, "claims", "worker-b", LEASE, clock=clock, wall_clock=clock)
    lease = await claim(a, "job")
    assert lease is not None
    await a.release(lease, error="ComfyUI died while another job ran", charge=False)
    assert (await read_claim(storage, lease.key))["attempt"] == 0

    again = await claim(b, "job")
    assert again is not None
    assert (again.attempt, again.last_error) == (1, "ComfyUI died while another job ran")
    await b.release(again, error="node 3 raised")  # charged: the count moves on
    third = await claim(a, "job")
    assert third is not None and third.attempt == 2


async def test_finish_deletes_the_claim(storage: Storage) -> None:
    store = ClaimStore(
        storage, "claims", "worker-a", LEASE, clock=FakeClock(), wall_clock=FakeClock()
    )
    lease = await claim(store, "job")
    assert lease is not None
    await store.finish(lease)
    assert await storage.head(lease.key) is None
    fresh = await claim(store, "job")
    assert fresh is not None and fresh.attempt == 1


async def test_unreadable_claim_does_not_block_its_job(storage: Storage) -> None:
    await storage.put("claims/job.json", b"not json {")
    lease = await claim(
        ClaimStore(storage, "claims", "w", LEASE, clock=FakeClock(), wall_clock=FakeClock()), "job"
    )
    assert lease is not None and lease.attempt == 1


def test_claim_names_are_file_stems(tmp_path: Path) -> None:
    from processor.errors import StorageError

    store = ClaimStore(LocalStorage(tmp_path), "", "w", LEASE)
    assert store.key_for("job") == "job.json"
    for bad in ["", "a/b", "new\nline"]:
        with pytest.raises(StorageError):
            store.key_for(bad)


async def test_concurrent_acquirers_have_exactly_one_winner(atomic_storage: Storage) -> None:
    stores = [ClaimStore(atomic_storage, "claims", f"worker-{i}", LEASE) for i in range(20)]
    leases = await asyncio.gather(*(claim(store, "hot-job") for store in stores))
    winners = [lease for lease in leases if lease is not None]
    assert len(winners) == 1
    assert winners[0].attempt == 1
    assert (await read_claim(atomic_storage, "claims/hot-job.json"))["holder"] == winners[0].holder


async def test_concurrent_takeover_has_exactly_one_winner(atomic_storage: Storage) -> None:
    clock = FakeClock()
    first = await claim(ClaimStore(atomic_storage, "claims", "dead", LEASE, clock=clock), "job")
    assert first is not None
    stores = [ClaimStore(atomic_storage, "claims", f"w{i}", LEASE, clock=clock) for i in range(8)]
    assert not any(await asyncio.gather(*(claim(store, "job") for store in stores)))  # watched
    clock.now += LEASE + 1
    leases = await asyncio.gather(*(claim(store, "job") for store in stores))
    winners = [lease for lease in leases if lease is not None]
    assert len(winners) == 1
    assert winners[0].attempt == 2


async def test_heartbeat_keeps_a_short_lease_alive(atomic_storage: Storage) -> None:
    lease_seconds = 1.5
    owner = ClaimStore(atomic_storage, "claims", "owner", lease_seconds)
    rival = ClaimStore(atomic_storage, "claims", "rival", lease_seconds)
    lease = await claim(owner, "job")
    assert lease is not None
    loop = asyncio.get_running_loop()
    async with owner.heartbeat(lease) as beat:
        end = loop.time() + 2.2 * lease_seconds
        while loop.time() < end:
            assert await claim(rival, "job") is None
            await asyncio.sleep(0.2)
        latest = beat()
    assert beat.lost is None
    assert beat.renewals >= 2
    assert latest.etag != lease.etag
    assert latest.expires_at > lease.expires_at + lease_seconds
    assert beat.check() == latest
    assert await claim(rival, "job") is None
    await owner.finish(beat())
    assert await atomic_storage.head(lease.key) is None


async def test_heartbeat_records_a_lost_lease_without_cancelling(storage: Storage) -> None:
    lease_seconds = 30.0  # the owner renews every 10 s, and is told to at once below
    owner = ClaimStore(storage, "claims", "owner", lease_seconds)
    # The thief watched the claim unchanged for a lease (its clock jumps one past it).
    thief_clock = FakeClock()
    thief = ClaimStore(storage, "claims", "thief", 60, clock=thief_clock)
    lease = await claim(owner, "job")
    assert lease is not None
    finished_block = False
    async with owner.heartbeat(lease) as beat:
        assert await claim(thief, "job") is None
        thief_clock.now += 61
        assert await claim(thief, "job") is not None
        renewing = asyncio.ensure_future(beat.renew())  # the owner's next renewal finds out
        with pytest.raises(LeaseLost):
            await renewing
        for _ in range(100):
            if beat.lost is not None:
                break
            await asyncio.sleep(0.05)
        finished_block = True
    assert finished_block
    assert isinstance(beat.lost, LeaseLost)
    with pytest.raises(LeaseLost):
        beat.check()
    assert (await read_claim(storage, lease.key))["holder"] == "thief"


class LandedButLost:
    """A storage whose conditional puts land and then report 412, as a retried request does."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.tricks = 0

    async def get(self, key: str) -> StoredObject:
        return await self.inner.get(key)

    async def put(self, key: str, data: bytes, **options: Any) -> str:
        await self.inner.put(key, data, **options)
        self.tricks += 1
        raise PreconditionFailed(f"{key}: precondition failed (retried request)")

    async def delete(self, key: str) -> None:
        await self.inner.delete(key)


async def test_a_write_that_landed_is_recognised_as_ours(local_storage: LocalStorage) -> None:
    tricky = LandedButLost(local_storage)
    store = ClaimStore(cast(Storage, tricky), "claims", "w", LEASE)
    lease = await claim(store, "job")
    assert lease is not None
    assert lease.etag == (await local_storage.get(lease.key)).etag
    renewed = await store.renew(lease)
    assert renewed.etag == (await local_storage.get(lease.key)).etag
    assert tricky.tricks == 2

    rival_clock = FakeClock()
    rival = ClaimStore(local_storage, "claims", "rival", LEASE, clock=rival_clock)
    assert await claim(rival, "job") is None
    rival_clock.now += LEASE + 1
    assert await claim(rival, "job") is not None
    with pytest.raises(LeaseLost):
        await store.renew(renewed)  # a genuine loss is still a loss
