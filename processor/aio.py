"""The asyncio idioms this worker needs everywhere: waiting on several things at once, giving
up on work when asked to stop, and closing what an ``async with`` opened."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from processor.errors import StoppedFirst

T = TypeVar("T")


async def unless_set(event: asyncio.Event | None, work: Awaitable[T]) -> T:
    """``work``'s result, unless ``event`` is set first: then ``work`` is cancelled (a start-up
    step that waits out a connect timeout must not hold up a SIGTERM) and :class:`StoppedFirst`
    is raised."""
    if event is None:
        return await work
    task = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(event.wait())
    try:
        done, _ = await asyncio.wait((task, stopping), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # the caller was cancelled: so is everything it started
        task.cancel()
        stopping.cancel()
        raise
    stopping.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise StoppedFirst


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
