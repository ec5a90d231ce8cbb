"""Priority in the intake: read from the manifests' names (never from their bodies), highest
first, ties oldest first, low priority last, for at most one more LIST per page age."""

from __future__ import annotations

import os
from pathlib import Path

from processor.storage.layout import priority_name
from processor.storage.local import LocalStorage
from processor.worker.intake import Intake
from tests.processor.worker.test_intake import (
    LAYOUT,
    Clock,
    RecordingStorage,
    drop,
    make_intake,
    manifest_names,
    never,
    sweep,
)


def drop_prioritised(root: Path, wanted: list[tuple[str, int, float]]) -> dict[str, str]:
    """Manifests named as `comfys3 submit` names them, uploaded at the given times."""
    keys = {}
    for name, priority, stamp in wanted:
        [key] = drop(root, [priority_name(name, priority)])
        os.utime(root / key, (stamp, stamp))
        keys[name] = key
    return keys


async def test_prioritised_manifests_are_offered_first_highest_then_oldest(
    tmp_path: Path,
) -> None:
    drop(tmp_path, manifest_names(3000))  # a backlog big enough to start at a random point
    keys = drop_prioritised(
        tmp_path,
        [("late-5", 5, 2000.0), ("early-5", 5, 1000.0), ("top", 900, 3000.0), ("one", 1, 500.0)],
    )
    for seed in range(4):
        intake = make_intake(LocalStorage(tmp_path), seed=seed)
        offered = [(await intake.next(never)) for _ in range(4)]
        assert [c.key for c in offered if c] == [
            keys["top"],
            keys["early-5"],
            keys["late-5"],
            keys["one"],
        ], seed


async def test_a_prioritised_manifest_dropped_later_jumps_the_page_within_a_page_age(
    tmp_path: Path,
) -> None:
    drop(tmp_path, manifest_names(3000))
    storage = RecordingStorage(tmp_path)
    clock = Clock()
    intake = make_intake(storage, clock, seed=1)
    first = await intake.next(never)
    assert first is not None and first.source == "listing"
    urgent = drop_prioritised(tmp_path, [("urgent", 10, 1000.0)])["urgent"]

    def head_lists() -> int:  # LISTs from the very start, the intake's first page included
        return sum(1 for start, _, _ in storage.intake_pages() if start is None)

    assert head_lists() == 1
    clock.now += 1.0  # the head was seen less than a page age ago: the page goes on
    second = await intake.next(never)
    assert second is not None and second.key != urgent
    assert head_lists() == 1

    clock.now += 1.5
    candidate = await intake.next(never)
    assert candidate is not None and (candidate.key, candidate.source) == (urgent, "priority")
    assert head_lists() == 2


async def test_the_head_costs_one_list_per_page_age_and_none_for_a_page_that_starts_there(
    tmp_path: Path,
) -> None:
    """A small intake is one page from the head: the head needs no LIST of its own."""
    drop(tmp_path, manifest_names(40))
    keys = drop_prioritised(tmp_path, [("vip", 3, 1000.0)])
    storage = RecordingStorage(tmp_path)
    clock = Clock()
    intake = make_intake(storage, clock)
    offered = []
    while (candidate := await intake.next(never)) is not None:
        offered.append(candidate.key)
        (tmp_path / candidate.key).unlink()  # claimed and finished
        clock.now += 0.5
        assert len(offered) <= 41
    assert offered[0] == keys["vip"]
    assert len(offered) == 41
    # Every page started at the head: none was listed for the head alone.
    assert all(start is None for start, _, _ in storage.intake_pages())


async def test_low_priority_comes_after_plain_names(tmp_path: Path) -> None:
    plain = drop(tmp_path, manifest_names(30))
    low = drop_prioritised(tmp_path, [("later", -1, 1000.0), ("last", -50, 1000.0)])
    intake: Intake = make_intake(LocalStorage(tmp_path))
    offered = [c.key for c in await sweep(intake)]
    assert sorted(offered[:30]) == sorted(plain)
    assert offered[30:] == [low["later"], low["last"]]


def test_the_name_carries_the_priority_and_the_job_id_does_not() -> None:
    from processor.job.manifest import default_job_id

    assert LAYOUT.submit_key("cat", 0) == "input/cat.json"
    assert LAYOUT.submit_key("cat", 5) == "input/!995.cat.json"
    assert LAYOUT.submit_key("cat", -5) == "input/~005.cat.json"
    for priority in (0, 5, 999, -1, -999):
        assert default_job_id(LAYOUT.submit_key("cat", priority)) == "cat"
    # Sorted as a listing sorts them: priority above 0 first, below 0 last.
    names = sorted(
        LAYOUT.submit_key(n, p) for n, p in [("a", 1), ("z", 0), ("b", 999), ("0", 0), ("c", -2)]
    )
    assert names == [
        "input/!001.b.json",
        "input/!999.a.json",
        "input/0.json",
        "input/z.json",
        "input/~002.c.json",
    ]
