"""What a report covers: which jobs, and what their status documents say.

Statuses are read by the status book (:mod:`processor.job.status_book`): a document that is
missing, too big, not JSON or not a status becomes a :class:`JobRecord` with a readable
``problem``, never an exception. Reads run concurrently, at most ``concurrency`` at once, so
10,000 jobs cost a few seconds of round trips without opening 10,000 connections.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from processor import STATUS_CONCURRENCY, JobRecord, Layout, StatusBook, Storage, folder_prefix

STATUS_NAME = "status.json"


@dataclass(frozen=True)
class Selection:
    """Which jobs: these ids, or every job whose id starts with ``prefix`` and whose status
    was written at or after ``since`` (both optional)."""

    job_ids: tuple[str, ...] = ()
    prefix: str | None = None
    since: datetime | None = None


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


async def read_records(
    storage: Storage,
    layout: Layout,
    jobs: Iterable[tuple[str, int | None]],
    concurrency: int = STATUS_CONCURRENCY,
) -> list[JobRecord]:
    """Every selected job's record, in the order given (the status book reads them)."""
    return await StatusBook(storage, layout).read_records(
        [job_id for job_id, _ in jobs], concurrency
    )


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
