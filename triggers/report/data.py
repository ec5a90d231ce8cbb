"""What a report covers: which jobs, and what their status documents say.

Statuses are read from the bucket, so they are untrusted: a document that is missing, too big,
not JSON or not a status becomes a :class:`JobRecord` with a readable ``problem``, never an
exception. Reads run concurrently, at most ``concurrency`` at once, so 10,000 jobs cost a few
seconds of round trips without opening 10,000 connections.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pydantic import ValidationError

from processor.errors import problems_from_validation
from processor.job.manifest import JobStatus
from processor.storage.base import ObjectNotFound, Storage, StorageError, folder_prefix
from processor.storage.layout import Layout

STATUS_NAME = "status.json"
# A status carries payload, outputs and texts; a few MiB is far beyond any real one, and a
# hostile 5 GB object must not be pulled into memory.
MAX_STATUS_BYTES = 4 * 1024 * 1024
STATUS_CONCURRENCY = 32
_PROBLEMS_SHOWN = 3


@dataclass(frozen=True)
class Selection:
    """Which jobs: these ids, or every job whose id starts with ``prefix`` and whose status
    was written at or after ``since`` (both optional)."""

    job_ids: tuple[str, ...] = ()
    prefix: str | None = None
    since: datetime | None = None


@dataclass(frozen=True)
class JobRecord:
    """One job of the report: its status, or why it could not be read.

    ``job_id`` is the folder the status lives in, not the id the document claims: the folder
    is what links and thumbnails are made from, and a document may say anything.
    """

    job_id: str
    key: str
    status: JobStatus | None = None
    problem: str | None = None


def job_id_of(key: str, layout: Layout) -> str | None:
    """``<output>/<id>/status.json`` -> ``<id>``; any other key (outputs, deeper files) -> None."""
    base = folder_prefix(layout.output_dir)
    if not key.startswith(base):
        return None
    parts = key[len(base) :].split("/")
    if len(parts) != 2 or parts[1] != STATUS_NAME or not parts[0]:
        return None
    return parts[0]


async def select_jobs(
    storage: Storage, layout: Layout, selection: Selection
) -> list[tuple[str, int | None]]:
    """The job ids to report on, each with its status's size when the listing told it.

    Explicit ids are taken as given (a missing one is reported as such). Otherwise the output
    prefix is listed once, recursively: the storage API has no "folders only" listing, so the
    cost grows with outputs as well as jobs (about 1,000 keys per S3 request).
    """
    if selection.job_ids:
        return [(job_id, None) for job_id in dict.fromkeys(selection.job_ids)]
    found: list[tuple[str, int | None]] = []
    for info in await storage.list(layout.output_dir, recursive=True):
        job_id = job_id_of(info.key, layout)
        if job_id is None:
            continue
        if selection.prefix and not job_id.startswith(selection.prefix):
            continue
        if selection.since is not None and info.last_modified < selection.since:
            continue
        found.append((job_id, info.size))
    return sorted(found)


def parse_status(data: bytes) -> JobStatus | str:
    """Bytes of a status document -> the status, or a one-line reason it is unreadable."""
    try:
        return JobStatus.model_validate_json(data)
    except ValidationError as error:
        if any(item["type"] == "json_invalid" for item in error.errors()):
            return "not valid JSON"
        problems = [str(p) for p in problems_from_validation(error)]
        more = len(problems) - _PROBLEMS_SHOWN
        shown = "; ".join(problems[:_PROBLEMS_SHOWN]) + (f"; and {more} more" if more > 0 else "")
        return f"not a job status: {shown}"
    except (ValueError, RecursionError) as error:  # defensive: the parser's own limits
        return f"not a job status: {type(error).__name__}"


async def read_record(storage: Storage, layout: Layout, job_id: str, size: int | None) -> JobRecord:
    """One job's record; every way reading can fail ends as a ``problem``, not an exception."""
    key = layout.status_key(job_id)
    try:
        if size is None:
            info = await storage.head(key)
            if info is None:
                return JobRecord(job_id, key, problem="no status document")
            size = info.size
        if size > MAX_STATUS_BYTES:
            return JobRecord(
                job_id, key, problem=f"status is {size} bytes; the limit is {MAX_STATUS_BYTES}"
            )
        data = (await storage.get(key)).data
    except ObjectNotFound:
        return JobRecord(job_id, key, problem="no status document")
    except StorageError as error:
        return JobRecord(job_id, key, problem=f"cannot read it: {error}")
    if len(data) > MAX_STATUS_BYTES:  # grew since it was listed
        return JobRecord(
            job_id, key, problem=f"status is {len(data)} bytes; the limit is {MAX_STATUS_BYTES}"
        )
    parsed = parse_status(data)
    if isinstance(parsed, str):
        return JobRecord(job_id, key, problem=parsed)
    return JobRecord(job_id, key, status=parsed)


async def read_records(
    storage: Storage,
    layout: Layout,
    jobs: Iterable[tuple[str, int | None]],
    concurrency: int = STATUS_CONCURRENCY,
) -> list[JobRecord]:
    """Every job's record, in the order given, with at most ``concurrency`` reads at once."""
    gate = asyncio.Semaphore(concurrency)

    async def one(job_id: str, size: int | None) -> JobRecord:
        async with gate:
            return await read_record(storage, layout, job_id, size)

    return list(await asyncio.gather(*(one(job_id, size) for job_id, size in jobs)))


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``--since``: an ISO date or time (UTC unless it names a zone), or an age such as
    ``30m``, ``6h``, ``2d``. Raises ValueError with a message for the user."""
    text = text.strip()
    match = _DURATION.match(text)
    if match:
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        return (now or datetime.now(UTC)) - timedelta(seconds=seconds)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"--since {text!r}: give an ISO date or time (2025-06-01, 2025-06-01T14:30, "
            "2025-06-01T14:30+02:00) or an age (30m, 6h, 2d, 1w)"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
