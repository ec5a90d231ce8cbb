"""Polling S3: quick right after finding work, backing off to a ceiling when idle.

The interval is what a user trades between pickup latency and request cost: with the default
ceiling of 5 s an idle worker makes 12 LIST requests a minute.
"""

from __future__ import annotations

import asyncio
import contextlib


class AdaptiveInterval:
    """``wait(found_work)``: after work, the floor; each idle poll doubles, up to the ceiling."""

    def __init__(self, floor: float, ceiling: float, stop: asyncio.Event) -> None:
        self.floor = floor
        self.ceiling = max(ceiling, floor)
        self.current = floor
        self._stop = stop

    def next_delay(self, found_work: bool) -> float:
        if found_work:
            self.current = self.floor
            return 0.0  # work found: look again at once; the lane's slots pace the claiming
        delay = self.current
        self.current = min(self.current * 2, self.ceiling)
        return delay

    async def wait(self, found_work: bool) -> None:
        delay = self.next_delay(found_work)
        if delay <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), delay)
