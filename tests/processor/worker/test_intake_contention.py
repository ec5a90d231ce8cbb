"""Workers sharing a big backlog: where each starts, and what it does when it meets another.

bench/backlog.py found most claims of four workers wasted on a 1,000-manifest backlog named
``job0000000`` ..: the random start was drawn over the ten million names the first page
suggested, landed past the last one and wrapped round to the first page, for every worker; and
two workers on one page kept trying each other's keys. These tests pin down the three changes
that brought it under 2% (on a folder, with an injected clock; no timing).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from pathlib import Path

from processor.settings import WorkerSettings
from processor.storage.base import Page
from processor.storage.claims import Lease, Taken
from processor.storage.layout import Layout
from processor.storage.local import LocalStorage
from processor.worker.assembly import open_worker
from processor.worker.intake import MAX_DRAWS, HintOutcome, Intake, KeySpace
from tests.instant_comfy import InstantComfy

LAYOUT = Layout("input", "output")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Pages(LocalStorage):
    """A folder that remembers where each intake page started."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.starts: list[str | None] = []

    async def list_page(
        self, prefix: str, *, start_after: str | None = None, limit: int = 1000
    ) -> Page:
        if prefix == "input":
            self.starts.append(start_after)
        return await super().list_page(prefix, start_after=start_after, limit=limit)


def drop(root: Path, count: int, width: int = 7) -> list[str]:
    folder = root / "input"
    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    for n in range(count):
        (folder / f"job{n:0{width}d}.json").write_text("{}")
        keys.append(f"input/job{n:0{width}d}.json")
    return keys


def intake_for(storage: LocalStorage, seed: int, clock: Clock | None = None) -> Intake:
    return Intake(
        storage, LAYOUT, lease_seconds=30.0, rng=random.Random(seed), clock=clock or Clock()
    )


def never(key: str) -> bool:
    return False


# -- the key space ------------------------------------------------------------------------


def test_a_counter_page_suggests_its_width_and_starts_at_its_first_name() -> None:
    keys = [f"input/job{n:07d}.json" for n in range(5, 105)]
    space = KeySpace.guess(keys)
    assert space is not None
    assert (space.head, space.alphabet, space.length) == ("input/job", "0123456789", 7)
    assert space.low == 5 and space.size == 10**7
    assert space.key(1234) == "input/job0001234" and space.value("input/job0001234.json") == 1234
    assert space.ceiling_for("input/job0000999.json") == 1000
    assert space.value("output/x.json") is None


def test_draws_stay_between_the_first_name_and_the_ceiling() -> None:
    space = KeySpace("input/job", "0123456789", 4, low=100)
    rng = random.Random(7)
    values = [space.draw(rng, below=300) for _ in range(500)]
    assert all(drawn is not None and 100 <= drawn[0] < 300 for drawn in values)
    assert len({drawn[0] for drawn in values if drawn}) > 150  # spread, not a few points
    assert space.draw(rng, below=100) is None  # no room left under the ceiling


def test_names_outside_the_alphabet_keep_their_order() -> None:
    space = KeySpace("input/", "acgt", 3)
    ordered = ["input/aaa", "input/ab", "input/acz", "input/ct", "input/ttt"]
    values = [space.value(key) for key in ordered]
    assert values == sorted(values)  # at or below the true place, never out of order


# -- where a worker starts ------------------------------------------------------------------


async def test_starts_spread_over_the_names_that_exist_not_the_range_guessed(
    tmp_path: Path,
) -> None:
    """300 names in a range the first page guesses at ten million: the first random points
    land past the end; drawing again below them finds the real names, for a few LISTs."""
    keys = drop(tmp_path, 300)
    starts, lists = [], []
    for seed in range(8):
        intake = intake_for(LocalStorage(tmp_path), seed)
        candidate = await intake.next(never)
        assert candidate is not None
        starts.append(keys.index(candidate.key))
        lists.append(intake.lists)

    assert sum(1 for index in starts if index >= 100) >= 5, starts  # mostly past page 1
    assert len(set(starts)) >= 6  # two may share the short last page
    assert max(lists) <= 3 + MAX_DRAWS  # claims, first page, the draws; never the backlog


async def test_a_worker_alone_still_sweeps_every_manifest_once(tmp_path: Path) -> None:
    keys = drop(tmp_path, 450)
    intake = intake_for(LocalStorage(tmp_path), seed=3)
    offered = []
    while (candidate := await intake.next(never)) is not None:
        offered.append(candidate.key)
        assert len(offered) <= 2 * len(keys)
    assert sorted(set(offered)) == keys


# -- what a worker finished -----------------------------------------------------------------


async def test_a_manifest_finished_after_its_page_was_listed_is_not_offered_from_it(
    tmp_path: Path,
) -> None:
    """A page lists a manifest this worker is retiring (its LIST went out as the retirement
    ended): claiming it would only find it gone. A page listed later offers it again (a new
    manifest of the same name)."""
    drop(tmp_path, 5, width=1)
    clock = Clock()
    intake = intake_for(LocalStorage(tmp_path), 0, clock)
    first = await intake.next(never)
    assert first is not None
    clock.now += 5  # the page is old: the next call lists it again, first still in it
    await intake.report(first.key, HintOutcome.settled)  # ended as that LIST went out

    offered = []
    while (candidate := await intake.next(never)) is not None:
        offered.append(candidate.key)
    assert first.key not in offered and len(offered) == 4

    clock.now += 5
    again = []
    while (candidate := await intake.next(never)) is not None:
        again.append(candidate.key)
    assert first.key in again


# -- two workers on one page -----------------------------------------------------------------


async def test_a_key_of_this_page_taken_elsewhere_moves_the_worker_to_another_point(
    tmp_path: Path,
) -> None:
    drop(tmp_path, 3000, width=4)
    storage = Pages(tmp_path)
    intake = intake_for(storage, seed=1)
    first = await intake.next(never)
    assert first is not None
    listed = len(storage.starts)
    page = storage.starts[-1]

    await intake.report(first.key, HintOutcome.taken)
    after = await intake.next(never)

    assert after is not None and len(storage.starts) > listed
    assert storage.starts[-1] != page  # a new point, not the same page again


async def test_outcomes_that_say_nothing_about_the_page_keep_the_worker_on_it(
    tmp_path: Path,
) -> None:
    drop(tmp_path, 3000, width=4)
    storage = Pages(tmp_path)
    intake = intake_for(storage, seed=1)
    first = await intake.next(never)
    second = await intake.next(never)
    assert first is not None and second is not None
    listed, page = len(storage.starts), storage.starts[-1]

    await intake.report(first.key, HintOutcome.settled)  # ran here: no one else is on it
    await intake.report(second.key, HintOutcome.released)
    await intake.next(never)
    assert len(storage.starts) == listed

    # Taken, but never offered from this page (a hint, a due key): the page may be stale, so
    # it is read again, from the same place.
    await intake.report("input/job2999.json", HintOutcome.taken)
    await intake.next(never)
    assert storage.starts[listed:] == [page]


async def test_a_drain_that_keeps_meeting_other_workers_still_ends_having_seen_all(
    tmp_path: Path,
) -> None:
    """Leaving a page starts a new sweep, so a sweep that ends saw every key; every third key
    here is held by another worker, and the sweep still ends."""
    keys = drop(tmp_path, 1200, width=4)
    intake = intake_for(LocalStorage(tmp_path), seed=5)
    offered: set[str] = set()
    calls = 0
    while (candidate := await intake.next(lambda key: key in offered)) is not None:
        calls += 1
        assert calls <= 10 * len(keys), "the sweep never ended"
        offered.add(candidate.key)
        if keys.index(candidate.key) % 3 == 0:
            intake.held(candidate.key, recheck_in=10**10)
            await intake.report(candidate.key, HintOutcome.taken)
    assert offered == set(keys)


async def test_a_fleet_that_started_idle_spreads_when_the_backlog_comes(tmp_path: Path) -> None:
    """Workers start before the work (the usual case): their first sweeps find one short page
    or nothing. When a backlog of many pages lands, each must still start at a random point,
    not all of them at the first page (bench/fleet.py: 82% of 50 polling workers' claims were
    wasted on each other's keys)."""
    (tmp_path / "input").mkdir()
    intakes = [intake_for(LocalStorage(tmp_path), seed) for seed in range(6)]
    for intake in intakes:
        assert await intake.next(never) is None  # an empty intake: a sweep of nothing
    keys = drop(tmp_path, 1000, width=4)

    starts = []
    for intake in intakes:
        candidate = await intake.next(never)
        assert candidate is not None
        starts.append(keys.index(candidate.key) if candidate.key in keys else -1)
    assert sum(1 for index in starts if index >= 100) >= 4, starts  # past the first page
    assert len(set(starts)) == len(starts)


# -- what other workers hold -----------------------------------------------------------------


def hold(root: Path, keys: list[str], age: float = 0.0) -> None:
    """Claims on ``keys`` by another worker, written ``age`` seconds ago."""
    folder = root / "input" / "_claims"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.time() - age
    for key in keys:
        path = folder / key.removeprefix("input/")
        path.write_text('{"holder": "elsewhere", "state": "held"}')
        os.utime(path, (stamp, stamp))


class AllPages(LocalStorage):
    """A folder that remembers every listing's prefix."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.prefixes: list[str] = []

    async def list_page(
        self, prefix: str, *, start_after: str | None = None, limit: int = 1000
    ) -> Page:
        self.prefixes.append(prefix)
        return await super().list_page(prefix, start_after=start_after, limit=limit)


async def test_a_worker_that_meets_others_skips_what_they_hold(tmp_path: Path) -> None:
    """Where a fleet keeps up, the intake lists mostly manifests in flight; trying them one by
    one is a wasted claim each (bench/fleet.py: 41% of 50 workers' claims). Once a worker has
    found a key taken, its pages leave out keys whose claims are fresh; stale ones stay in."""
    keys = drop(tmp_path, 120, width=4)
    held, stale = keys[:80], keys[80:90]
    hold(tmp_path, held)
    hold(tmp_path, stale, age=30.0)  # two thirds of the 30 s lease and more: maybe dead
    storage = AllPages(tmp_path)
    intake = intake_for(storage, seed=2)
    first = await intake.next(never)
    assert first is not None
    assert "input/_claims" not in storage.prefixes[1:]  # alone so far: no claims read

    await intake.report(first.key, HintOutcome.taken)  # another worker is here
    offered = [first.key]
    while (candidate := await intake.next(lambda key: key in offered)) is not None:
        offered.append(candidate.key)
        assert len(offered) <= len(keys)
    free = set(keys) - set(held) - {first.key}
    assert set(offered[1:]) == free  # the free and the stale keys, each once
    assert len(offered[1:]) == len(free)


async def test_a_worker_that_met_nobody_for_a_lease_stops_reading_claims(tmp_path: Path) -> None:
    drop(tmp_path, 300, width=4)
    storage = AllPages(tmp_path)
    clock = Clock()
    intake = Intake(
        storage,
        LAYOUT,
        lease_seconds=30.0,
        claims_scan_interval=10**6,  # the scan for stale claims is not what this is about
        rng=random.Random(4),
        clock=clock,
    )
    first = await intake.next(never)
    assert first is not None
    await intake.report(first.key, HintOutcome.taken)  # the page is read again, and claims
    listed = len(storage.prefixes)
    await intake.next(never)
    assert "input/_claims" in storage.prefixes[listed:]

    clock.now += 31.0  # a lease (30 s) without meeting anyone
    clock.now += 3.0  # the page is stale too: the next pick lists again
    listed = len(storage.prefixes)
    await intake.next(never)
    assert "input" in storage.prefixes[listed:]
    assert "input/_claims" not in storage.prefixes[listed:]


# -- a worker loop that meets others --------------------------------------------------------


async def peaks(root: Path, *, contested: bool) -> tuple[int, int]:
    """Run a worker over eight manifests (each prompt 50 ms); the most claim attempts it had
    in flight at once, and the most manifests (claiming, queued or running). ``contested``:
    it has just found a key taken by another worker (its intake's clock is frozen there, so
    the contest lasts the whole run)."""
    folder = root / "input"
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(8):
        (folder / f"job{n}.json").write_text(json.dumps({"workflow": "solid"}))
    settings = WorkerSettings(comfyui_url="http://127.0.0.1:9", worker_id="one")
    async with open_worker(
        storage=LocalStorage(root), layout=LAYOUT, settings=settings, comfy=InstantComfy(0.05)
    ) as worker:
        worker.intake._clock = Clock()
        if contested:
            await worker.intake.report("input/elsewhere.json", HintOutcome.taken)
        acquire = worker.claims.acquire
        claiming, peak_claims, peak_manifests = 0, 0, 0

        async def slow_acquire(name: str) -> Lease | Taken:
            nonlocal claiming, peak_claims, peak_manifests
            claiming += 1
            peak_claims = max(peak_claims, claiming)
            peak_manifests = max(peak_manifests, len(worker._inflight))
            try:
                await asyncio.sleep(0.05)  # a claim's round trip: others could start meanwhile
                return await acquire(name)
            finally:
                claiming -= 1

        worker.claims.acquire = slow_acquire  # type: ignore[method-assign]
        counts = await worker.run()
    assert counts.succeeded == 8
    return peak_claims, peak_manifests


async def test_a_worker_that_meets_others_claims_one_at_a_time_and_one_ahead(
    tmp_path: Path,
) -> None:
    """Where others take the keys this worker lists (bench/fleet.py: the end of a backlog,
    most wasted claims of a fleet), it waits for each claim's answer before the next, and
    holds one manifest ahead of its ComfyUI at most, instead of firing a lane's worth of
    claims at keys others are taking too."""
    claims, _ = await peaks(tmp_path / "alone", contested=False)
    assert claims >= 2  # alone, it claims ahead at once
    assert await peaks(tmp_path / "contested", contested=True) == (1, 2)
