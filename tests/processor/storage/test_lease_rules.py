"""The lease rules as properties: whatever the workers' clocks say, a claim that is renewed every
third of a lease is never taken over, and one that stops being renewed is taken over a lease
after the last renewal a watcher saw, never sooner. Time is a shared timeline here; each worker
reads it through its own monotonic clock (any offset) and its own wall clock (any skew)."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processor.errors import LeaseLost
from processor.storage.claims import ClaimStore, ClaimWatch, Heartbeat, Lease, Taken
from processor.storage.local import LocalStorage

LEASE = 30.0
PROPERTIES = settings(max_examples=30, deadline=None, derandomize=True)


class Timeline:
    """The one true time, and a worker's view of it."""

    def __init__(self) -> None:
        self.now = 0.0

    def clock(self, offset: float) -> object:
        return lambda: self.now + offset


class NoStoreClock(LocalStorage):
    """A store whose clock is unknown, so only watching can tell (the store-clock rule is
    checked against real servers in tests/processor/worker/test_leases.py)."""

    def clock_offset(self) -> None:
        return None


def stores(root: Path, time: Timeline, offsets: tuple[float, float], skews: tuple[float, float]):
    storage = NoStoreClock(root)
    holder = ClaimStore(
        storage, "claims", "holder", LEASE,
        clock=time.clock(offsets[0]), wall_clock=time.clock(skews[0]),  # type: ignore[arg-type]
    )  # fmt: skip
    watcher = ClaimStore(
        storage, "claims", "watcher", LEASE,
        clock=time.clock(offsets[1]), wall_clock=time.clock(skews[1]),  # type: ignore[arg-type]
    )  # fmt: skip
    return holder, watcher


clocks = st.tuples(st.floats(-1e6, 1e6), st.floats(-1e6, 1e6))
# Gaps between events, as fractions of the renewal interval (a third of a lease).
gaps = st.lists(st.floats(0.01, 1.0), min_size=1, max_size=30)


@PROPERTIES
@given(offsets=clocks, skews=clocks, renewals=gaps, looks=gaps)
def test_a_claim_renewed_every_third_of_a_lease_is_never_taken(
    offsets: tuple[float, float],
    skews: tuple[float, float],
    renewals: list[float],
    looks: list[float],
) -> None:
    async def scenario(root: Path) -> None:
        time = Timeline()
        holder, watcher = stores(root, time, offsets, skews)
        lease = await holder.acquire("job")
        assert isinstance(lease, Lease)
        renew_at = [sum(renewals[: i + 1]) * LEASE / 3 for i in range(len(renewals))]
        look_at = [sum(looks[: i + 1]) * LEASE / 3 for i in range(len(looks))]
        for at, kind in sorted([(t, "renew") for t in renew_at] + [(t, "look") for t in look_at]):
            if at > renew_at[-1]:
                break  # past the holder's last renewal, it may well be dead
            time.now = at
            if kind == "renew":
                lease = await holder.renew(lease)
            else:
                assert isinstance(await watcher.acquire("job"), Taken), at

    with tempfile.TemporaryDirectory() as folder:
        asyncio.run(scenario(Path(folder)))


@PROPERTIES
@given(offsets=clocks, skews=clocks, looks=gaps)
def test_a_claim_nobody_renews_is_taken_a_lease_after_it_was_first_seen(
    offsets: tuple[float, float], skews: tuple[float, float], looks: list[float]
) -> None:
    async def scenario(root: Path) -> None:
        time = Timeline()
        holder, watcher = stores(root, time, offsets, skews)
        lease = await holder.acquire("job")
        assert isinstance(lease, Lease)
        first_seen: float | None = None
        at = 0.0
        for gap in [*looks, 2.0, 2.0, 2.0, 2.0]:  # then looks a lease apart: it must end
            at += gap * LEASE / 3
            time.now = at
            result = await watcher.acquire("job")
            first_seen = at if first_seen is None else first_seen
            if isinstance(result, Lease):
                assert at >= first_seen + LEASE  # never sooner than a lease of watching
                assert (result.attempt, result.tries, result.took_over) == (2, 2, True)
                with pytest.raises(LeaseLost):
                    await holder.renew(lease)  # the old holder, back, finds it lost
                return
            assert at < first_seen + LEASE, (at, first_seen)  # and no later than that
            assert 0 < result.recheck_in <= LEASE

    with tempfile.TemporaryDirectory() as folder:
        asyncio.run(scenario(Path(folder)))


def test_a_watch_forgets_its_oldest_sightings_first() -> None:
    time = Timeline()
    watch = ClaimWatch(time.clock(0.0))  # type: ignore[arg-type]
    for n in range(10_001):
        watch.unchanged_for(f"k{n}", "e")
    time.now = 100.0
    assert watch.unchanged_for("k0", "e") == 0.0  # forgotten, so seen anew
    assert watch.unchanged_for("k10000", "e") == 100.0
    assert watch.unchanged_for("k10000", "changed") == 0.0


async def test_a_fresh_lease_writes_without_a_request_and_a_stale_one_renews(
    tmp_path: Path,
) -> None:
    time = Timeline()
    holder, watcher = stores(tmp_path, time, (0.0, 5.0), (0.0, 0.0))
    lease = await holder.acquire("job")
    assert isinstance(lease, Lease)
    # The heartbeat as a job's writes use it, without its timer (which runs on real time).
    beat = Heartbeat(lease, holder)
    time.now = 0.4 * LEASE  # fresh: renewed (created) less than half a lease ago
    assert await beat.ensure() == lease
    time.now = 0.6 * LEASE  # no longer fresh: the fence renews first
    renewed = await beat.ensure()
    assert renewed.etag != lease.etag and beat.renewals == 1
    # The holder freezes; a watcher sees the claim unchanged for a lease, and takes it.
    assert isinstance(await watcher.acquire("job"), Taken)
    time.now += LEASE + 1
    assert isinstance(await watcher.acquire("job"), Lease)
    with pytest.raises(LeaseLost):
        await beat.ensure()  # woken, the holder learns it before it writes anything
    assert beat.lost is not None
