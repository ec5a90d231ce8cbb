"""Waiting for storage that does not answer yet, at a worker's start.

A worker is often started together with its storage (a compose file, a pod beside a MinIO, a
machine booting after an outage), and S3 may take a while to answer. Giving up after botocore's
few retries (about 20 s) made such a worker exit 1, and whatever restarted it did so into the
same outage. So the start-up checks wait, without a bound, for as long as the failure is one
that waiting can end (:class:`StorageUnreachable`: refused, timed out, DNS, 5xx, SlowDown),
with capped exponential back-off and jitter, one log line per try. Anything else (bad
credentials, no such bucket, a server that ignores conditional writes) is a configuration
error and is raised at once. SIGTERM or Ctrl-C ends the wait at once.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from processor.aio import StoppedFirst, unless_set, wait_any
from processor.errors import StoppedWhileStarting, StorageUnreachable

T = TypeVar("T")

FIRST_PAUSE = 1.0  # seconds before the second try
MAX_PAUSE = 30.0  # the longest pause between tries, however long the outage


@dataclass
class Backoff:
    """Pauses between tries: ``first`` doubled per failed try up to ``cap``, each drawn from
    its upper half ("equal jitter"), so workers started together do not knock in step while
    every pause still grows."""

    first: float = FIRST_PAUSE
    cap: float = MAX_PAUSE
    rng: random.Random = field(default_factory=random.Random)

    def pause(self, failures: int) -> float:
        """Seconds to wait after ``failures`` failed tries in a row (1 or more)."""
        ceiling = min(self.cap, self.first * 2 ** min(max(0, failures - 1), 30))
        return self.rng.uniform(ceiling / 2, ceiling)


OnWait = Callable[[StorageUnreachable, float], None]


def describe_wait(error: StorageUnreachable, pause: float) -> str:
    """The log line of one failed try: where, why, and when the next one comes."""
    details = error.details
    service = details.get("service") or "storage"
    endpoint = details.get("endpoint") or "?"
    reason = details.get("reason") or error.message
    return f"{service} at {endpoint} not reachable ({reason}); trying again in {pause:.1f} s"


async def until_reachable(
    attempt: Callable[[], Awaitable[T]],
    *,
    on_wait: OnWait,
    stop: asyncio.Event | None = None,
    backoff: Backoff | None = None,
) -> tuple[T, int]:
    """``attempt()``'s result and how many tries failed before it, trying again after each
    :class:`StorageUnreachable`. Any other error is raised at once; ``stop`` set (even in
    the middle of a try) raises :class:`StoppedWhileStarting`."""
    backoff = backoff or Backoff()
    failures = 0
    while True:
        if stop is not None and stop.is_set():
            raise _stopped()
        try:
            return await _unless_stopped(attempt(), stop), failures
        except StorageUnreachable as error:
            failures += 1
            pause = backoff.pause(failures)
            on_wait(error, pause)
        await wait_any(stop, timeout=pause)


async def _unless_stopped(work: Awaitable[T], stop: asyncio.Event | None) -> T:
    """``work``'s result, unless ``stop`` is set first (see :func:`processor.aio.unless_set`)."""
    try:
        return await unless_set(stop, work)
    except StoppedFirst:
        raise _stopped() from None


def _stopped() -> StoppedWhileStarting:
    return StoppedWhileStarting("asked to stop while waiting for storage to answer")
