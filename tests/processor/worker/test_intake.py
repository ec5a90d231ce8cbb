"""processor.worker.intake: which manifest a worker tries next, without reading the whole backlog.

The intake runs here on its own, against a folder (and, where S3's paging semantics matter,
against moto), with an injected clock: what it offers, in which order, how many LIST requests
that costs, and that a sweep ends having offered every manifest once.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processor.settings import S3Settings
from processor.storage.base import Page, Storage
from processor.storage.layout import Layout
from processor.storage.local import LocalStorage
from processor.storage.s3 import S3Storage
from processor.worker.intake import (
    MAX_PAGE,
    MAX_REMEMBERED,
    MIN_PAGE,
    Candidate,
    HintOutcome,
    Intake,
    spread_key,
)
from tests.workers import put_manifest, s3_client

LAYOUT = Layout("input", "output")
LEASE = 30.0
# Before its first candidate the intake reads the claims prefix once, the first page, the page
# at its spread point, and (if that point lies past the last key) the first page again.
FIRST_CANDIDATE_LISTS = 4


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class RecordingStorage(LocalStorage):
    """A folder that notes every page it is asked for (prefix, start, limit, keys returned)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.pages: list[tuple[str, str | None, int, int]] = []

    async def list_page(
        self, prefix: str, *, start_after: str | None = None, limit: int = 1000
    ) -> Page:
        page = await super().list_page(prefix, start_after=start_after, limit=limit)
        self.pages.append((prefix, start_after, limit, len(page.items)))
        return page

    def intake_pages(self) -> list[tuple[str | None, int, int]]:
        return [(start, limit, n) for prefix, start, limit, n in self.pages if prefix == "input"]


def never(key: str) -> bool:
    return False


def manifest_names(count: int, width: int = 4) -> list[str]:
    return [f"job{n:0{width}d}" for n in range(count)]


def drop(root: Path, names: Iterable[str]) -> list[str]:
    folder = root / "input"
    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    for name in names:
        (folder / f"{name}.json").write_text("{}")
        keys.append(LAYOUT.manifest_key(name))
    return keys


@pytest.fixture(scope="module")
def backlog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """5000 waiting manifests, made once for the tests that only read them."""
    root = tmp_path_factory.mktemp("backlog")
    drop(root, manifest_names(5000))
    return root


def make_intake(
    storage: Storage,
    clock: Clock | None = None,
    seed: int = 0,
    *,
    page_max_age: float = 2.0,
    claims_scan_interval: float | None = None,
) -> Intake:
    return Intake(
        storage,
        LAYOUT,
        lease_seconds=LEASE,
        page_max_age=page_max_age,
        claims_scan_interval=claims_scan_interval,
        rng=random.Random(seed),
        clock=clock or Clock(),
    )


async def sweep(intake: Intake, busy: Callable[[str], bool] = never) -> list[Candidate]:
    """Everything ``next`` offers until it says the sweep is over."""
    offered = []
    while (candidate := await intake.next(busy)) is not None:
        offered.append(candidate)
        assert len(offered) < 100_000, "the sweep never ended"
    return offered


async def settle() -> None:
    """Let tasks the intake started (a dropped hint's report) run."""
    for _ in range(5):
        await asyncio.sleep(0)


class Heard:
    """A hint callback that remembers what it was told."""

    def __init__(self) -> None:
        self.outcomes: list[HintOutcome] = []

    async def __call__(self, outcome: HintOutcome) -> None:
        self.outcomes.append(outcome)


# -- hints --------------------------------------------------------------------------------


async def test_a_hint_comes_before_anything_listed_and_its_sender_hears_the_outcome(
    tmp_path: Path,
) -> None:
    drop(tmp_path, ["a", "b", "c"])
    intake = make_intake(LocalStorage(tmp_path))
    heard = Heard()

    intake.hint("input/c.json", heard)
    assert intake.hinted.is_set()
    first = await intake.next(never)

    assert first == Candidate("input/c.json", "hint")
    assert intake.lists == 0  # no LIST request was needed for it
    assert heard.outcomes == []  # nothing became of it yet
    await intake.report("input/c.json", HintOutcome.settled)
    assert heard.outcomes == [HintOutcome.settled]
    await intake.report("input/c.json", HintOutcome.gone)  # told once, then forgotten
    assert heard.outcomes == [HintOutcome.settled]
    assert (await intake.next(never)) is not None
    assert not intake.hinted.is_set()  # no hint left: a waiting worker sleeps again


async def test_hints_are_offered_in_the_order_they_came(tmp_path: Path) -> None:
    intake = make_intake(LocalStorage(tmp_path))
    for name in ("z", "m", "a"):
        intake.hint(LAYOUT.manifest_key(name))
    offered = [await intake.next(never) for _ in range(3)]
    assert [c.key for c in offered if c] == ["input/z.json", "input/m.json", "input/a.json"]
    assert {c.source for c in offered if c} == {"hint"}


async def test_a_hint_that_is_not_a_manifest_key_is_ignored_and_said_so(tmp_path: Path) -> None:
    drop(tmp_path, ["real"])
    intake = make_intake(LocalStorage(tmp_path))
    elsewhere, done = Heard(), Heard()
    intake.hint("output/real/status.json", elsewhere)
    intake.hint("input/_done/real.json", done)

    candidate = await intake.next(never)

    assert candidate == Candidate("input/real.json", "listing")
    assert elsewhere.outcomes == [HintOutcome.ignored]
    assert done.outcomes == [HintOutcome.ignored]


async def test_a_hint_for_a_manifest_in_flight_hears_the_outcome_of_that_run(
    tmp_path: Path,
) -> None:
    drop(tmp_path, ["busy", "other"])
    intake = make_intake(LocalStorage(tmp_path))
    first, second = Heard(), Heard()
    intake.hint("input/busy.json", first)

    candidate = await intake.next(lambda key: key == "input/busy.json")
    assert candidate == Candidate("input/other.json", "listing")  # not offered twice
    intake.hint("input/busy.json", second)  # again, while that run goes on
    assert (await intake.next(lambda key: key == "input/busy.json")) is None

    await intake.report("input/busy.json", HintOutcome.released)
    assert first.outcomes == second.outcomes == [HintOutcome.released]


async def test_a_failing_hint_callback_does_not_stop_the_others(tmp_path: Path) -> None:
    intake = make_intake(LocalStorage(tmp_path))
    heard = Heard()

    async def broken(outcome: HintOutcome) -> None:
        raise RuntimeError("the queue is gone")

    intake.hint("input/a.json", broken)
    intake.hint("input/a.json", heard)
    assert await intake.next(never) == Candidate("input/a.json", "hint")
    await intake.report("input/a.json", HintOutcome.taken)
    assert heard.outcomes == [HintOutcome.taken]


async def test_too_many_hints_at_once_release_the_oldest_to_the_listing(tmp_path: Path) -> None:
    """Memory is bounded: past MAX_REMEMBERED pending hints the oldest is dropped and its
    sender hears ``released`` (an SQS message then comes back later)."""
    intake = make_intake(LocalStorage(tmp_path))
    oldest, newest = Heard(), Heard()
    intake.hint("input/h0.json", oldest)
    for n in range(1, MAX_REMEMBERED):
        intake.hint(f"input/h{n}.json")
    assert oldest.outcomes == []
    intake.hint("input/last.json", newest)
    await settle()

    assert oldest.outcomes == [HintOutcome.released]
    first = await intake.next(never)
    assert first == Candidate("input/h1.json", "hint") and newest.outcomes == []


# -- due keys -----------------------------------------------------------------------------


async def test_a_retry_is_offered_once_its_delay_is_over_and_not_before(tmp_path: Path) -> None:
    drop(tmp_path, ["again", "x"])
    clock = Clock()
    intake = make_intake(LocalStorage(tmp_path), clock)
    intake.retry_at("input/again.json", 5.0)
    assert intake.retry_due() == clock.now + 5.0

    early = await sweep(intake)
    assert [c.key for c in early] == ["input/x.json"]  # the listing leaves it for later

    clock.now += 5.0
    assert await intake.next(never) == Candidate("input/again.json", "due")
    assert intake.retry_due() is None


async def test_a_retry_rescheduled_counts_at_its_latest_time(tmp_path: Path) -> None:
    clock = Clock()
    drop(tmp_path, ["a"])  # a due key is offered only while its manifest is still there
    intake = make_intake(LocalStorage(tmp_path), clock)
    intake.retry_at("input/a.json", 1.0)
    intake.retry_at("input/a.json", 10.0)
    clock.now += 2.0
    assert await intake.next(never) is None
    clock.now += 8.0
    assert await intake.next(never) == Candidate("input/a.json", "due")
    in_flight = lambda key: key == "input/a.json"  # noqa: E731 (now being claimed)
    assert await intake.next(in_flight) is None  # the stale first entry is not offered as well


async def test_a_forgotten_retry_is_not_offered(tmp_path: Path) -> None:
    clock = Clock()
    intake = make_intake(LocalStorage(tmp_path), clock)
    intake.retry_at("input/a.json", 1.0)
    intake.forget("input/a.json")
    assert intake.retry_due() is None
    clock.now += 2.0
    assert await intake.next(never) is None


async def test_a_manifest_held_elsewhere_is_tried_after_its_lease_but_not_waited_for(
    tmp_path: Path,
) -> None:
    clock = Clock()
    drop(tmp_path, ["held"])
    intake = Intake(
        LocalStorage(tmp_path), LAYOUT, lease_seconds=LEASE, rng=random.Random(0), clock=clock
    )
    intake.held("input/held.json", recheck_in=10.0)
    assert intake.retry_due() is None  # a drain does not wait for another worker's lease

    clock.now += 9.0
    assert await intake.next(never) is None
    clock.now += 1.1
    assert await intake.next(never) == Candidate("input/held.json", "due")

    drop(tmp_path, ["forever"])
    intake.held("input/forever.json", recheck_in=1e9)  # capped: ten leases at most
    clock.now += 10 * LEASE + 0.1
    assert await intake.next(never) == Candidate("input/forever.json", "due")


async def test_a_due_key_that_is_busy_is_not_offered(tmp_path: Path) -> None:
    clock = Clock()
    intake = make_intake(LocalStorage(tmp_path), clock)
    intake.retry_at("input/a.json", 0.0)
    assert await intake.next(lambda key: True) is None


# -- the listing and its sweeps -----------------------------------------------------------


# (count, digits): with as many digits as the count needs, the spread point (guessed from the
# first page) lands inside the backlog, so a sweep starts mid-way and wraps round to it.
@pytest.mark.parametrize(("count", "width"), [(1, 4), (100, 4), (101, 4), (250, 3), (1000, 3)])
@pytest.mark.parametrize("seed", [0, 1, 2])
async def test_a_sweep_offers_every_manifest_exactly_once_then_none(
    tmp_path: Path, count: int, width: int, seed: int
) -> None:
    keys = drop(tmp_path, manifest_names(count, width))
    (tmp_path / "input" / "notes.txt").write_text("not a manifest")
    (tmp_path / "input" / "_done").mkdir()
    (tmp_path / "input" / "_done" / "old.json").write_text("{}")
    intake = make_intake(LocalStorage(tmp_path), seed=seed)

    first = await sweep(intake)
    second = await sweep(intake)

    for offered in (first, second):
        counted = Counter(c.key for c in offered)
        assert sorted(counted) == keys
        assert set(counted.values()) == {1}, [k for k, n in counted.items() if n > 1][:5]
        assert {c.source for c in offered} == {"listing"}


async def test_an_empty_intake_is_a_sweep_with_nothing_in_it(tmp_path: Path) -> None:
    intake = make_intake(LocalStorage(tmp_path))
    assert await intake.next(never) is None
    assert intake.seen_pending == 0


async def test_keys_in_flight_or_due_are_left_out_of_the_sweep(tmp_path: Path) -> None:
    keys = drop(tmp_path, manifest_names(300))
    intake = make_intake(LocalStorage(tmp_path))
    busy = set(keys[::3])
    intake.retry_at(keys[1], 60.0)

    offered = {c.key for c in await sweep(intake, lambda key: key in busy)}

    assert offered == set(keys) - busy - {keys[1]}


async def test_workers_with_different_seeds_start_at_different_places(backlog: Path) -> None:
    """The spread: a fleet sharing one backlog does not all start on its first page."""
    keys = sorted(LAYOUT.manifest_key(name) for name in manifest_names(5000))
    starts = []
    for seed in range(6):
        candidate = await make_intake(LocalStorage(backlog), seed=seed).next(never)
        assert candidate is not None
        starts.append(keys.index(candidate.key))
    assert len(set(starts)) == 6
    assert max(starts) > 1000, starts  # not all on the first page (keys 0..99)


async def test_a_page_is_listed_again_once_older_than_page_max_age(tmp_path: Path) -> None:
    """Manifests other workers took since the page was read are not offered from a page that
    is too old; a young page is used as it is (one LIST feeds many claims)."""
    keys = drop(tmp_path, manifest_names(300))
    clock = Clock()
    intake = make_intake(LocalStorage(tmp_path), clock, page_max_age=2.0)
    offered = [await intake.next(never), await intake.next(never)]
    lists = intake.lists

    clock.now += 1.9
    offered.append(await intake.next(never))
    assert intake.lists == lists  # still young: no LIST
    offered_keys = {c.key for c in offered if c is not None}
    assert len(offered_keys) == 3
    survivors = set(random.Random(1).sample(sorted(set(keys) - offered_keys), 3))
    for key in set(keys) - survivors:
        (tmp_path / key).unlink()  # taken and finished by other workers meanwhile

    clock.now += 0.2  # now older than page_max_age
    rest = [c.key for c in await sweep(intake)]
    assert intake.lists > lists
    assert sorted(rest) == sorted(survivors)


async def test_a_young_page_is_used_without_listing_again(tmp_path: Path) -> None:
    keys = drop(tmp_path, manifest_names(150))
    intake = make_intake(LocalStorage(tmp_path), Clock(), page_max_age=2.0)
    first = await intake.next(never)
    assert first is not None
    lists = intake.lists
    for key in keys:
        (tmp_path / key).unlink()

    second = await intake.next(never)

    assert intake.lists == lists
    assert second is not None and second.key in keys  # from the page in hand, gone or not


async def test_the_page_grows_with_the_claim_rate_up_to_the_maximum(backlog: Path) -> None:
    """Each page is twice what the busiest recent page gave, within 50..1000: a worker that
    uses up whole pages gets bigger ones (fewer LISTs), up to S3's maximum."""
    storage = RecordingStorage(backlog)
    offered = await sweep(make_intake(storage))

    pages = storage.intake_pages()
    limits = [limit for _, limit, _ in pages]
    assert len(offered) == 5000
    # the first page, the one at the spread point, then twice what the last one gave
    assert limits[:6] == [100, 100, 200, 400, 800, MAX_PAGE], limits
    assert set(limits[5:]) == {MAX_PAGE}


async def test_the_page_shrinks_to_the_minimum_when_nothing_is_taken(tmp_path: Path) -> None:
    """Every manifest in flight elsewhere (busy): small pages, a fresh view each time."""
    drop(tmp_path, manifest_names(1500))
    storage = RecordingStorage(tmp_path)
    offered = await sweep(make_intake(storage), lambda key: True)

    limits = [limit for _, limit, _ in storage.intake_pages()]
    assert offered == []
    assert limits[:2] == [100, 100]
    assert set(limits[2:]) == {MIN_PAGE}


async def test_the_first_candidate_costs_the_same_few_lists_whatever_the_backlog(
    tmp_path: Path, backlog: Path
) -> None:
    """Time to the first claim must not grow with the backlog: LIST requests and keys read
    before the first candidate, for 100 and for 5000 waiting manifests, several seeds."""
    small = tmp_path / "small"
    drop(small, manifest_names(100))
    costs: dict[int, list[tuple[int, int]]] = {}
    for count, root in ((100, small), (5000, backlog)):
        costs[count] = []
        for seed in range(6):
            storage = RecordingStorage(root)
            intake = make_intake(storage, seed=seed)
            assert await intake.next(never) is not None
            keys_read = sum(n for _, _, _, n in storage.pages)
            costs[count].append((intake.lists, keys_read))

    for count, runs in costs.items():
        for lists, keys_read in runs:
            assert lists <= FIRST_CANDIDATE_LISTS, (count, runs)
            assert keys_read <= 3 * 100, (count, runs)  # pages of 100, never the backlog
    # 100 fit in one page (no spread needed); 5000 cost at most the fixed few more.
    assert max(n for n, _ in costs[5000]) - max(n for n, _ in costs[100]) <= 2, costs


# -- stale claims -------------------------------------------------------------------------


def claim(root: Path, name: str, age: float) -> None:
    folder = root / "input" / "_claims"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text('{"holder": "someone", "state": "held"}')
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))


async def test_a_claim_nobody_renewed_is_tried_before_the_listing(tmp_path: Path) -> None:
    drop(tmp_path, ["orphan", "fresh", "plain"])
    claim(tmp_path, "orphan", age=LEASE)  # quiet for a whole lease: its holder may be dead
    claim(tmp_path, "fresh", age=0)
    intake = make_intake(LocalStorage(tmp_path))

    first = await intake.next(never)

    assert first == Candidate("input/orphan.json", "claims")
    rest = await sweep(intake)
    assert {c.source for c in rest} == {"listing"}  # the fresh claim was not offered as stale


async def test_the_claims_prefix_is_read_at_most_once_per_interval(tmp_path: Path) -> None:
    drop(tmp_path, ["a"])
    clock = Clock()
    storage = RecordingStorage(tmp_path)
    intake = make_intake(storage, clock, claims_scan_interval=5.0)

    def claim_scans() -> int:
        return sum(1 for prefix, *_ in storage.pages if prefix == "input/_claims")

    await sweep(intake)
    assert claim_scans() == 1
    claim(tmp_path, "late", age=LEASE)
    clock.now += 4.9
    assert all(c.source == "listing" for c in await sweep(intake))
    assert claim_scans() == 1
    clock.now += 0.2
    assert await intake.next(never) == Candidate("input/late.json", "claims")
    assert claim_scans() == 2


async def test_a_stale_claim_in_flight_here_or_due_is_not_offered(tmp_path: Path) -> None:
    claim(tmp_path, "mine", age=LEASE)
    claim(tmp_path, "later", age=LEASE)
    intake = make_intake(LocalStorage(tmp_path))
    intake.retry_at("input/later.json", 60.0)
    assert await intake.next(lambda key: key == "input/mine.json") is None


def test_the_claims_scan_interval_defaults_to_a_third_of_a_lease() -> None:
    storage = LocalStorage(Path("/nonexistent"))
    assert Intake(storage, LAYOUT, lease_seconds=30).claims_scan_interval == 10
    assert Intake(storage, LAYOUT, lease_seconds=1).claims_scan_interval == 1


# -- spread_key ---------------------------------------------------------------------------


def test_spread_key_follows_its_docstring_example() -> None:
    keys = [f"job{n:06d}.json" for n in range(1000)]
    key = spread_key(keys, random.Random(3))
    assert key is not None and re.fullmatch(r"job\d{6}", key)


@pytest.mark.parametrize(
    "keys", [[], ["input/a.json"], ["input/a.json", "input/notes.txt"], ["input/x", "input/y"]]
)
def test_spread_key_needs_two_manifest_names(keys: list[str]) -> None:
    assert spread_key(keys, random.Random(0)) is None


NAMES = st.lists(
    st.text(st.sampled_from("0123456789abcz-_./"), min_size=1, max_size=12),
    min_size=2,
    max_size=30,
    unique=True,
)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(names=NAMES, seed=st.integers(0, 2**32))
def test_spread_key_stays_in_the_folder_and_the_names_characters(
    names: list[str], seed: int
) -> None:
    keys = sorted(f"input/{name}.json" for name in names)
    key = spread_key(keys, random.Random(seed))

    assert key == spread_key(keys, random.Random(seed))  # the seed decides it all
    if key is None:
        return
    stems = [k.removesuffix(".json") for k in keys]
    assert key.startswith("input/")  # never a point outside the intake folder
    used = {char for stem in stems for char in stem[len("input/") :]} - {"/"}
    assert len(key) > len("input/") and set(key[len("input/") :]) <= used
    assert len(key) <= max(len(stem) for stem in stems)


# -- against S3 semantics (moto) ----------------------------------------------------------


async def test_paging_on_s3_sweeps_every_manifest_once_and_relists_stale_pages(
    moto_s3_settings: S3Settings,
) -> None:
    """StartAfter, MaxKeys, IsTruncated and the delimiter as an S3 server implements them:
    sub-prefixes are never offered, two sweeps offer every manifest once each, and a page
    older than page_max_age is read again from where it started."""
    client = s3_client(moto_s3_settings)
    bucket = moto_s3_settings.bucket_name
    # More than a first page of 100, so the spread and paging run; with seed 0 the spread
    # point falls inside the backlog and the sweep wraps round to it.
    names = manifest_names(130, width=3)
    for name in names:
        put_manifest(client, moto_s3_settings, name, {"workflow": "solid"})
    for key in ("input/_done/old.json", "input/sub/x.json"):
        client.put_object(Bucket=bucket, Key=key, Body=b"{}")
    clock = Clock()

    async with S3Storage(moto_s3_settings) as storage:
        intake = make_intake(storage, clock, seed=0)
        sweeps = [await sweep(intake), await sweep(intake)]

        first = await intake.next(never)
        assert first is not None
        gone = [{"Key": LAYOUT.manifest_key(name)} for name in names[:-1]]
        client.delete_objects(Bucket=bucket, Delete={"Objects": gone})  # taken by others
        clock.now += 2.1
        rest = await sweep(intake)

    for offered in sweeps:
        counted = Counter(c.key for c in offered)
        assert sorted(counted) == [LAYOUT.manifest_key(n) for n in names]
        assert set(counted.values()) == {1}
    assert [c.key for c in rest] == [LAYOUT.manifest_key(names[-1])]
