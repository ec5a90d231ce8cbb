"""Putting a new manifest into the intake: never over one that waits to run.

Every front door (``comfys3 submit``, the jobs API, RunPod) writes manifests with
If-None-Match, so a second submission never replaces a first that has not run. One case looks
the same from outside and is not: a worker writes a job's final status first and moves its
manifest out of the intake just after (its deletes are gathered a quarter second, and retried
while storage is in trouble). A resubmit in that moment would be refused as "already waiting"
although nothing waits, so when the put is refused and every job of the manifest has ended,
the old copy is given a bounded while to go.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from processor.errors import PreconditionFailed
from processor.job.status_book import FINAL, StatusBook
from processor.storage.base import Storage

RETIRING_GRACE_SECONDS = 10.0
RETIRING_POLL_SECONDS = 0.2


async def put_new_manifest(
    storage: Storage, book: StatusBook, key: str, data: bytes, job_ids: Sequence[str]
) -> bool:
    """Put the manifest of ``job_ids`` only where none is; False if one stays there.

    The statuses are read only when a manifest is found (a submission that goes in costs one
    request): if every job has a final status, the one found is the last run's on its way
    out, and it is waited for within :data:`RETIRING_GRACE_SECONDS`; else the answer is
    immediate.
    """
    if await _put_if_none(storage, key, data):
        return True
    statuses = await book.read_many(job_ids)
    if not statuses or not all(s is not None and s.state in FINAL for s in statuses):
        return False
    deadline = time.monotonic() + RETIRING_GRACE_SECONDS
    while time.monotonic() < deadline:
        await asyncio.sleep(RETIRING_POLL_SECONDS)
        if await _put_if_none(storage, key, data):
            return True
    return False


async def _put_if_none(storage: Storage, key: str, data: bytes) -> bool:
    try:
        await storage.put(key, data, content_type="application/json", if_none_match=True)
    except PreconditionFailed:
        return False
    return True
