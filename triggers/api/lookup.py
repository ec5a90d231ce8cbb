"""``GET /jobs/{id}``: a job's status document, or ``waiting`` while its manifest has not been
claimed, as ``comfys3 status`` answers it.

A job of a batch (``cats-2``) has no manifest of its own name; while ``cats.json`` waits, its
jobs are waiting too. That is how the API names the manifests it writes, so a job POSTed a
moment ago is never "unknown" just because no worker has reached it yet.
"""

from __future__ import annotations

import re

from processor import (
    JobStatus,
    Layout,
    StatusBook,
    Storage,
    StorageError,
    check_job_id,
)
from triggers.api.models import ApiError, WaitingJob

BATCH_JOB = re.compile(r"^(?P<manifest>.+)-\d+$")


def checked_id(job_id: str) -> str:
    try:
        return check_job_id(job_id)
    except ValueError as error:
        raise ApiError(400, f"{job_id[:200]!r} is not a job id: it {error}") from None


async def job_view(storage: Storage, layout: Layout, job_id: str) -> JobStatus | WaitingJob:
    """The status, or the waiting manifest; 404 when there is neither."""
    record = await StatusBook(storage, layout).read_record(checked_id(job_id))
    if record.status is not None:
        return record.status
    if not record.missing:  # the bucket is untrusted: a foreign or broken document
        raise ApiError(500, f"the status at {record.key} is {record.problem}")
    waiting = await waiting_manifest(storage, layout, job_id)
    if waiting is not None:
        return WaitingJob(id=job_id, manifest_key=waiting)
    raise ApiError(404, f"no status for job {job_id!r} at {record.key}")


async def waiting_manifest(storage: Storage, layout: Layout, job_id: str) -> str | None:
    """The key of the manifest that will run ``job_id``, if one waits in the intake."""
    names = [job_id]
    batch = BATCH_JOB.match(job_id)
    if batch is not None:
        names.append(batch["manifest"])
    for name in names:
        key = layout.manifest_key(name)
        try:
            if await storage.head(key) is not None:
                return key
        except StorageError:
            continue  # a name no key can have: not waiting
    return None
