"""Saying what the worker waits for, while it waits.

Waiting for ComfyUI can take minutes (a cold start loads models), and a wrong address used to
look the same as a slow one: minutes of silence, then an error. A wait here reports itself
every second to a listener, which decides how to show it: log lines for a worker
(:class:`LogNotices`), a line redrawn in place on a terminal (the CLI's own listener). It starts
reporting only once a try has failed: a ComfyUI that answers at once is not a wait, and a
notice then would only say something false ("gives up in 300 s").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

TICK_SECONDS = 1.0


@dataclass(frozen=True)
class Waiting:
    """One report of a wait: what is awaited, for how long so far, and the latest answer."""

    what: str  # "ComfyUI at http://127.0.0.1:8188"
    elapsed: float  # seconds since the wait began
    gives_up_in: float  # seconds left before it fails
    detail: str  # the latest answer: "connection refused", "HTTP 503", "starting"
    done: bool = False  # the last report: the wait is over
    ready: bool = False  # with done: it ended because the awaited thing answered


WaitListener = Callable[[Waiting], None]


@dataclass
class WaitState:
    """What the waiting code updates as it goes; the reports read it."""

    detail: str
    deadline: float  # time.monotonic() at which the wait fails
    ready: bool = False
    failed: bool = False  # a try failed: from now on the wait is shown


class LogNotices:
    """A wait as log lines: one at once, then every 5 s for a minute, then every 30 s; and one
    when a wait that was reported more than once ends well."""

    def __init__(self, logger: logging.Logger, *, every: float = 5.0, later: float = 30.0):
        self._log = logger
        self._every = every
        self._later = later
        self._next = 0.0
        self._lines = 0

    def __call__(self, waiting: Waiting) -> None:
        if waiting.done:
            if waiting.ready and self._lines > 1:
                self._log.info("%s answered after %.0f s", waiting.what, waiting.elapsed)
            return
        if waiting.elapsed < self._next:
            return
        self._lines += 1
        self._next += self._every if waiting.elapsed < 60 else self._later
        self._log.info(
            "waiting for %s: %s (%.0f s so far; gives up in %.0f s)",
            waiting.what,
            waiting.detail,
            waiting.elapsed,
            max(0.0, waiting.gives_up_in),
        )


@contextlib.asynccontextmanager
async def reporting(
    listener: WaitListener, what: str, timeout: float, detail: str = "no answer yet"
) -> AsyncIterator[WaitState]:
    """Report the wait inside this block to ``listener``: every second once a try has failed
    (the caller sets ``failed``, after it has set the detail and deadline that try taught it),
    and at its end.

    The caller updates the yielded state (its latest answer, a nearer deadline, ``ready``); a
    listener that raises is logged and otherwise ignored, so showing a wait never breaks it.
    """
    start = time.monotonic()
    state = WaitState(detail=detail, deadline=start + timeout)

    def report(done: bool = False) -> None:
        now = time.monotonic()
        waiting = Waiting(
            what=what,
            elapsed=now - start,
            gives_up_in=state.deadline - now,
            detail=state.detail,
            done=done,
            ready=state.ready,
        )
        try:
            listener(waiting)
        except Exception:
            logging.getLogger(__name__).exception("reporting a wait failed")

    async def tick() -> None:
        while True:
            if state.failed:
                report()
            await asyncio.sleep(TICK_SECONDS)

    ticker = asyncio.ensure_future(tick())
    try:
        yield state
    finally:
        ticker.cancel()  # not awaited: a cancellation of the waiter itself must go through
        report(done=True)
