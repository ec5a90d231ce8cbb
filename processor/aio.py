"""The two asyncio idioms this worker needs everywhere: waiting on several things at once, and
closing what an ``async with`` opened."""

from __future__ import annotations

import asyncio
import contextlib


async def wait_any(*events: asyncio.Event | None, timeout: float | None = None) -> None:
    """Return when any of ``events`` is set, or after ``timeout`` seconds (never raises)."""
    live = [event for event in events if event is not None]
    if any(event.is_set() for event in live):
        return
    if not live:
        if timeout is not None:
            await asyncio.sleep(max(0.0, timeout))
        return
    waiters = [asyncio.ensure_future(event.wait()) for event in live]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        for waiter in waiters:
            with contextlib.suppress(asyncio.CancelledError):
                await waiter


class ClosedOnExit:
    """``async with`` for anything that has an ``aclose``: leaving the block closes it, whatever
    ended the block. Classes define ``__aenter__`` (which opens what needs opening) and
    ``aclose``; this is the other half, written once."""

    async def aclose(self) -> None:
        raise NotImplementedError

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
