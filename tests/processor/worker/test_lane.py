"""processor.worker.prompt_queue: how many prompts a worker keeps in flight, and what that
means for claims.

``LaneDepth`` is checked against its formula (1 + ceil(3 * p95 preparation / mean execution),
at least 2, capped by ``lane_depth_max`` and by the seconds of queued work allowed), ``Lane``
and ``Slot`` against their admission rules, and then the point of it all: workers sharing one
backlog and one (slow) ComfyUI each hold claims only for what their lane admits, so the
backlog is spread over them instead of hoarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest

from processor.job.runner import JobOutcome
from processor.storage.layout import Layout
from processor.storage.local import LocalStorage
from processor.worker.assembly import open_worker
from processor.worker.loop import Worker
from processor.worker.prompt_queue import MIN_DEPTH, WINDOW, Lane, LaneDepth, Slot
from tests.processor.worker.test_loop import drop, worker_settings

LAYOUT = Layout("input", "output")


def depth_with(
    prepare: list[float], execute: list[float], *, max_depth: int = 8, queued: float = 1e9
) -> LaneDepth:
    depth = LaneDepth(max_depth, max_queued_seconds=queued)
    for seconds in prepare:
        depth.record_prepare(seconds)
    for seconds in execute:
        depth.record_execute(seconds)
    return depth


# -- LaneDepth ----------------------------------------------------------------------------


def test_without_figures_the_depth_is_the_minimum() -> None:
    assert LaneDepth(8, max_queued_seconds=10).target() == MIN_DEPTH == 2
    assert depth_with([0.5], []).target() == MIN_DEPTH  # no execution seen yet
    assert depth_with([], [0.5]).target() == MIN_DEPTH


@pytest.mark.parametrize(
    ("prepare", "execute", "expected"),
    [
        # (binary fractions, so the ratios are exact)
        (0.25, 0.25, 1 + 3),  # preparing takes as long as running: three queued cover it
        (0.125, 0.25, 1 + 2),  # ceil(1.5)
        (0.0078125, 1.0, 2),  # slow prompts: one running and one waiting is enough
        (0.375, 0.25, 1 + 5),  # ceil(4.5)
    ],
)
def test_depth_is_one_plus_three_slow_preparations_per_execution(
    prepare: float, execute: float, expected: int
) -> None:
    assert depth_with([prepare] * 10, [execute] * 10).target() == expected
    assert expected == max(MIN_DEPTH, 1 + math.ceil(3 * prepare / execute))


def test_the_slow_end_of_preparation_counts_not_its_mean() -> None:
    """p95 of 20 values is the 19th smallest: one outlier in 20 is ignored, two are not."""
    one_outlier = [0.03125] * 19 + [1.0]
    two_outliers = [0.03125] * 18 + [1.0, 1.0]
    assert depth_with(one_outlier, [0.125]).target() == 1 + 1  # ceil(0.75)
    assert depth_with(two_outliers, [0.125], max_depth=100).target() == 1 + 24


def test_execution_is_taken_as_its_mean() -> None:
    assert depth_with([0.25], [0.125, 0.375]).target() == 1 + 3  # mean 0.25


def test_depth_is_capped_by_lane_depth_max() -> None:
    assert depth_with([1.0], [0.01], max_depth=8).target() == 8
    assert depth_with([1.0], [0.01], max_depth=5).target() == 5


def test_lane_depth_max_below_the_minimum_is_raised_to_it() -> None:
    assert LaneDepth(1, max_queued_seconds=10).max_depth == MIN_DEPTH
    assert depth_with([1.0], [0.01], max_depth=0).target() == MIN_DEPTH


def test_depth_is_capped_by_the_seconds_of_work_it_may_queue() -> None:
    """Claims held for queued prompts are claims other workers cannot have: no more than
    ``max_queued_seconds`` of work waits behind the running prompt."""
    assert depth_with([10.0], [2.0], queued=5.0).target() == 1 + 2  # floor(5 / 2)
    assert depth_with([10.0], [0.5], queued=5.0).target() == 8  # 1 + 10 > lane_depth_max
    assert depth_with([10.0], [30.0], queued=5.0).target() == MIN_DEPTH  # never below two


def test_only_the_recent_window_counts() -> None:
    depth = depth_with([1.0] * WINDOW, [0.125] * WINDOW, max_depth=100)
    assert depth.target() == 1 + 24
    for _ in range(WINDOW):
        depth.record_prepare(0.03125)
        depth.record_execute(0.125)
    assert depth.target() == 2  # ceil(0.75) + 1: the slow ones have left the window


def test_negative_figures_count_as_zero() -> None:
    depth = depth_with([-5.0], [-1.0])
    assert depth.target() == MIN_DEPTH  # execution floored to 1 ms, preparation to 0


# -- Lane and Slot ------------------------------------------------------------------------


async def settle() -> None:
    """Let every ready task run (no timing involved: a blocked take stays blocked)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_take_admits_up_to_the_target_then_waits_for_a_release() -> None:
    lane = Lane(LaneDepth(8, max_queued_seconds=10))
    first, second = await lane.take(), await lane.take()
    assert first is not None and second is not None and lane.in_use == 2

    third = asyncio.create_task(lane.take())
    await settle()
    assert not third.done()

    first.release()
    slot = await third
    assert isinstance(slot, Slot) and lane.in_use == 2


async def test_a_slot_is_released_once_however_often_it_is_released() -> None:
    lane = Lane(LaneDepth(8, max_queued_seconds=10))
    first, second = lane.take_now(), lane.take_now()
    first.release()
    first.release()
    assert lane.in_use == 1  # the second slot is still held
    second.release()
    assert lane.in_use == 0


async def test_take_now_ignores_the_target_and_take_waits_until_below_it() -> None:
    lane = Lane(LaneDepth(8, max_queued_seconds=10))
    slots = [lane.take_now() for _ in range(3)]  # a batch manifest's further jobs
    assert lane.in_use == 3

    waiting = asyncio.create_task(lane.take())
    slots[0].release()
    await settle()
    assert not waiting.done()  # two in use: still at the target
    slots[1].release()
    assert await waiting is not None


async def test_a_higher_target_admits_a_waiting_take_when_announced() -> None:
    depth = LaneDepth(8, max_queued_seconds=100)
    lane = Lane(depth)
    lane.take_now(), lane.take_now()
    waiting = asyncio.create_task(lane.take())
    await settle()
    assert not waiting.done()

    depth.record_prepare(0.25)
    depth.record_execute(0.25)  # short prompts: the target becomes 4
    lane.changed()
    assert await waiting is not None
    assert lane.in_use == 3


async def test_stop_ends_a_waiting_take_with_none() -> None:
    lane = Lane(LaneDepth(8, max_queued_seconds=10))
    lane.take_now(), lane.take_now()
    stop = asyncio.Event()
    waiting = asyncio.create_task(lane.take(stop))
    await settle()
    stop.set()
    assert await waiting is None
    assert lane.in_use == 2


async def test_take_after_stop_is_none_even_with_room() -> None:
    lane = Lane(LaneDepth(8, max_queued_seconds=10))
    stop = asyncio.Event()
    stop.set()
    assert await lane.take(stop) is None
    assert lane.in_use == 0


async def test_ahead_counts_slots_whose_prompt_has_not_started() -> None:
    lane = Lane(LaneDepth(8, max_queued_seconds=10))
    running, queued = lane.take_now(), lane.take_now()
    running.started = True
    assert (lane.in_use, lane.ahead()) == (2, 1)
    queued.release()
    assert (lane.in_use, lane.ahead()) == (1, 0)


# -- several workers, one backlog ---------------------------------------------------------


def held_claims(root: Path) -> Counter[str]:
    """Live claims per holder, as any worker (or a person) sees them in the bucket."""
    held: Counter[str] = Counter()
    folder = root / "input" / "_claims"
    for path in folder.glob("*.json") if folder.is_dir() else []:
        with contextlib.suppress(OSError, ValueError):  # deleted or half-written meanwhile
            document = json.loads(path.read_bytes())
            if document.get("state") == "held":
                held[document["holder"]] += 1
    return held


def count_finishing(worker: Worker, finishing: Counter[str]) -> None:
    """Count a worker's jobs whose prompt is done but whose claim is not yet retired: the
    lane frees their slot at once (the next prompt may queue while outputs upload), so they
    hold a claim outside the lane. Counted from just before the slot is freed until the
    retirement has returned, so the count is never too low."""
    holder = worker.claims.holder
    run, retire = worker.runner.run, worker.retirer.retire

    async def run_counted(job: Any, **options: Any) -> JobOutcome:
        hooks = options["hooks"]
        inner = hooks.on_executed

        def executed(seconds: float) -> None:
            finishing[holder] += 1
            if inner is not None:
                inner(seconds)

        options["hooks"] = dataclasses.replace(hooks, on_executed=executed)
        return await run(job, **options)

    async def retire_counted(key: str, *, failed: bool, claim_key: str) -> None:
        try:
            await retire(key, failed=failed, claim_key=claim_key)
        finally:
            finishing[holder] -= 1

    worker.runner.run = run_counted  # type: ignore[method-assign]
    worker.retirer.retire = retire_counted  # type: ignore[method-assign]


async def test_several_workers_hold_no_more_claims_than_their_lanes_and_share_the_work(
    tmp_path: Path, fake_comfyui: Any
) -> None:
    """Issue 10: with several workers on one backlog, no worker holds more claims than its
    lane. Slow prompts (0.4 s, preparing takes milliseconds) keep every lane at depth 2, so a
    worker holds at most two claims ahead of the GPU; the backlog goes to all of them."""
    fake_comfyui.state.exec_delay = 0.4
    for n in range(9):
        drop(tmp_path, f"job{n}", {"workflow": "solid"})
    finishing: Counter[str] = Counter()
    seen: dict[str, list[tuple[int, int, int, int, int]]] = defaultdict(list)

    async with contextlib.AsyncExitStack() as stack:
        workers = [
            await stack.enter_async_context(
                open_worker(
                    storage=LocalStorage(tmp_path),
                    layout=LAYOUT,
                    settings=worker_settings(fake_comfyui, worker_id=f"w{i}"),
                )
            )
            for i in range(3)
        ]
        for worker in workers:
            count_finishing(worker, finishing)
        runs = [asyncio.create_task(worker.run()) for worker in workers]
        while not all(run.done() for run in runs):
            # Worker state first, then the bucket: a claim on disk was admitted by a slot
            # taken before this (synchronous) sample began.
            state = {
                w.claims.holder: (w.depth.target(), w.lane.in_use, w.claims_held_ahead())
                for w in workers
            }
            on_disk = held_claims(tmp_path)
            for holder, (target, in_use, ahead) in state.items():
                seen[holder].append((target, in_use, ahead, on_disk[holder], finishing[holder]))
            await asyncio.sleep(0.005)
        counts = [run.result() for run in runs]

    assert sum(c.succeeded for c in counts) == 9
    assert set(fake_comfyui.stats()["executed"].values()) == {1}
    for holder, samples in seen.items():
        assert len(samples) > 20, holder
        lane = 0  # the deepest the lane has been so far: slots taken then may still be held
        for target, in_use, ahead, held, done in samples:
            lane = max(lane, target)
            assert in_use <= lane and ahead <= in_use, (holder, in_use, ahead, lane)
            # Every live claim has a lane slot, or is a finished job being retired.
            assert held <= in_use + done, (holder, held, in_use, done)
        # Slow prompts keep the lane at two (preparing takes milliseconds next to 0.4 s; a
        # machine slow enough to take 130 ms would make it three, hence the sampled lane).
        assert Counter(sample[0] for sample in samples).most_common(1)[0][0] == 2, holder
        # Claims beyond the deepest lane are finished jobs being retired, and nothing else.
        # How many are retired at once is timing: deletes are gathered a quarter second
        # (processor/storage/retirement.py), so on a busy machine a second 0.4 s prompt can
        # end inside one retirement (CI saw 4 claims: a lane of 2 and 2 retiring).
        assert all(held <= lane + done for _, _, _, held, done in samples), holder
        assert max(sample[2] for sample in samples) <= lane, holder
        assert max(sample[3] for sample in samples) >= 1, holder  # it got work
    assert all(c.succeeded >= 1 for c in counts), [c.summary() for c in counts]
    assert max(c.succeeded for c in counts) <= 5, [c.summary() for c in counts]
