"""Putting a new manifest into the intake: never over one that waits to run.

Every front door (``comfys3 submit``, the jobs API, RunPod) writes manifests with
If-None-Match, so a second submission never replaces a first that has not run. One case looks
the same from outside and is not: a worker writes a job's final status first and moves its
manifest out of the intake just after (its deletes are gathered a quarter second, and retried
while storage is in trouble). A resubmit in that moment would be refused as "already waiting"
although nothing waits, so where every job of the manifest has ended, the old copy is given a
bounded while to go.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

from processor.errors import PreconditionFailed
from processor.job.status import JobStatus
from processor.job.status_book import FINAL
from processor.storage.base import Storage

RETIRING_GRACE_SECONDS = 10.0
RETIRING_POLL_SECONDS = 0.2


def all_ended(statuses: Iterable[JobStatus | None]) -> bool:
    """Whether every job has a final status: then a manifest found in the intake under their
    name is most likely the last run's, on its way out."""
    found = list(statuses)
    return bool(found) and all(s is not None and s.state in FINAL for s in found)


async def put_new_manifest(storage: Storage, key: str, data: bytes, *, retiring: bool) -> bool:
    """Put the manifest only where none is; False if one stays there.

    With ``retiring`` (see :func:`all_ended`) the one found is waited for, within
    :data:`RETIRING_GRACE_SECONDS`; without, the answer is immediate.
    """
    deadline = time.monotonic() + (RETIRING_GRACE_SECONDS if retiring else 0.0)
    while True:
        try:
            await storage.put(key, data, content_type="application/json", if_none_match=True)
        except PreconditionFailed:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(RETIRING_POLL_SECONDS)
        else:
            return True
