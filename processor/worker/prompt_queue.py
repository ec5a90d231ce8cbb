"""How many prompts to keep in ComfyUI's queue, learned from the jobs themselves.

ComfyUI runs one prompt at a time. The worker keeps more in its queue so the GPU never waits
while the next job is claimed, read and staged. How many is enough depends on the ratio of the
two: a 30 s prompt hides any preparation behind one queued prompt, a 15 ms prompt needs several.
Too many is harmful too: every queued prompt is a claim this worker holds while other workers
may be idle. So the depth is the smallest that covers a few times the slow end (p95) of recent
preparation times, and never more than a few seconds of queued work.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque

from processor.aio import wait_any

MIN_DEPTH = 2  # one running, one waiting: what a slow prompt needs
WINDOW = 64  # recent jobs the figures are taken from
COVER = 3.0  # queued work must cover this many slow preparations


class LaneDepth:
    """The target number of prompts in flight (preparing, queued or running)."""

    def __init__(self, max_depth: int, *, max_queued_seconds: float) -> None:
        self.max_depth = max(MIN_DEPTH, max_depth)
        self.max_queued_seconds = max_queued_seconds
        self._prepare: deque[float] = deque(maxlen=WINDOW)
        self._execute: deque[float] = deque(maxlen=WINDOW)

    def record_prepare(self, seconds: float) -> None:
        """From taking a slot to the prompt accepted by ComfyUI."""
        self._prepare.append(max(0.0, seconds))

    def record_execute(self, seconds: float) -> None:
        """ComfyUI's own execution time of a prompt."""
        self._execute.append(max(0.0, seconds))

    def target(self) -> int:
        if not self._prepare or not self._execute:
            return MIN_DEPTH
        ordered = sorted(self._prepare)
        prepare_p95 = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
        execute = max(sum(self._execute) / len(self._execute), 1e-3)
        wanted = 1 + math.ceil(COVER * prepare_p95 / execute)
        hoard_cap = 1 + math.floor(self.max_queued_seconds / execute)
        return max(MIN_DEPTH, min(wanted, hoard_cap, self.max_depth))


class Slot:
    """One place in a lane; released exactly once, however its job ends."""

    def __init__(self, lane: Lane) -> None:
        self.lane = lane
        self._held = True
        self.started = False  # ComfyUI began executing its prompt

    def release(self) -> None:
        if self._held:
            self._held = False
            self.lane._release(self)


class Lane:
    """Admission to one ComfyUI's queue: at most ``depth.target()`` slots taken at once."""

    def __init__(
        self, depth: LaneDepth, name: str = "comfyui", changed: asyncio.Event | None = None
    ) -> None:
        self.depth = depth
        self.name = name
        self._taken: set[Slot] = set()
        self._changed = changed or asyncio.Event()

    @property
    def in_use(self) -> int:
        return len(self._taken)

    @property
    def room(self) -> int:
        return self.depth.target() - len(self._taken)

    def ahead(self) -> int:
        """Slots whose prompt has not started executing: claims held ahead of the GPU."""
        return sum(1 for slot in self._taken if not slot.started)

    def take_now(self) -> Slot:
        """A slot regardless of the target: a batch manifest's further jobs, or a RunPod
        request that must be served now."""
        slot = Slot(self)
        self._taken.add(slot)
        return slot

    async def take(self, stop: asyncio.Event | None = None) -> Slot | None:
        """Wait for room; ``None`` if ``stop`` is set first."""
        while len(self._taken) >= self.depth.target():
            if stop is not None and stop.is_set():
                return None
            self._changed.clear()
            await wait_any(self._changed, stop)
        if stop is not None and stop.is_set():
            return None
        return self.take_now()

    def changed(self) -> None:
        """Room may have appeared: a slot was released or the target moved."""
        self._changed.set()

    def _release(self, slot: Slot) -> None:
        self._taken.discard(slot)
        self._changed.set()


class Lanes:
    """Several lanes (one per ComfyUI, one per GPU) fed by one intake: a slot is taken from
    the lane with the most room, so every GPU is kept busy and none hoards claims."""

    def __init__(self, depths: list[tuple[str, LaneDepth]]) -> None:
        self._changed = asyncio.Event()
        self.all = [Lane(depth, name, self._changed) for name, depth in depths]

    def ahead(self) -> int:
        return sum(lane.ahead() for lane in self.all)

    def take_now(self) -> Slot:
        """A slot regardless of the targets, from the least busy lane."""
        return min(self.all, key=lambda lane: lane.in_use).take_now()

    async def take(self, stop: asyncio.Event | None = None) -> Slot | None:
        """Wait for room in any lane; ``None`` if ``stop`` is set first."""
        while True:
            if stop is not None and stop.is_set():
                return None
            best = max(self.all, key=lambda lane: (lane.room, -lane.in_use))
            if best.room > 0:
                return best.take_now()
            self._changed.clear()
            await wait_any(self._changed, stop)

    def changed(self) -> None:
        self._changed.set()
