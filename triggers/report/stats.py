"""The numbers and groupings a report shows, computed from statuses alone (no I/O, no HTML).

Everything here takes statuses as found in a bucket: timings may be negative or infinite, dates
may lack a zone, payloads may hold anything JSON can. Odd values are left out of sums and
spans rather than trusted.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from processor import JobState, JobStatus, OutputRecord

EXECUTE = "execute"
UNREADABLE = "unreadable"
NO_WORKFLOW = "(none)"
STATE_ORDER = (
    JobState.succeeded.value,
    JobState.failed.value,
    JobState.cancelled.value,
    JobState.running.value,
    JobState.queued.value,
    UNREADABLE,
)


@dataclass(frozen=True)
class Summary:
    """The header of a report."""

    jobs: int
    by_state: dict[str, int]
    execute_total: float
    execute_median: float | None
    timed_jobs: int
    started: datetime | None
    ended: datetime | None
    outputs_by_kind: dict[str, tuple[int, int]]  # media (see media_of) -> (files, bytes)


@dataclass(frozen=True)
class FailureGroup:
    """Failed jobs that share an error type, most common type first."""

    error_type: str
    jobs: list[tuple[str, JobStatus]]


def aware(moment: datetime) -> datetime:
    """A status written by another tool may carry a time without a zone; ours are UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def media_of(output: OutputRecord) -> str:
    """What a person calls the file: images, video, audio, 3d, text, else ComfyUI's kind.
    By content type, because ComfyUI files today's videos under ``images``."""
    content_type = output.content_type.split(";", 1)[0].strip().lower()
    major = content_type.split("/", 1)[0]
    if major == "image":
        return "images"
    if major in ("video", "audio"):
        return major
    if major == "model" or output.kind == "3d":
        return "3d"
    if major == "text" or content_type == "application/json":
        return "text"
    return output.kind


def execute_seconds(status: JobStatus) -> float | None:
    """The ``execute`` timing when it is a plausible number of seconds, else None."""
    value = status.timings.get(EXECUTE)
    if value is None or not math.isfinite(value) or value < 0:
        return None
    return value


def summarize(statuses: Sequence[JobStatus], unreadable: int) -> Summary:
    by_state = dict.fromkeys(STATE_ORDER, 0)
    for status in statuses:
        by_state[status.state.value] += 1
    by_state[UNREADABLE] = unreadable
    timings = [t for t in (execute_seconds(s) for s in statuses) if t is not None]
    starts = [aware(s.created_at) for s in statuses]
    ends = [aware(s.updated_at) for s in statuses]
    files: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    for status in statuses:
        for output in status.outputs:
            files[media_of(output)] += 1
            sizes[media_of(output)] += max(output.bytes, 0)
    return Summary(
        jobs=len(statuses) + unreadable,
        by_state=by_state,
        execute_total=math.fsum(timings),
        execute_median=statistics.median(timings) if timings else None,
        timed_jobs=len(timings),
        started=min(starts) if starts else None,
        ended=max(ends) if ends else None,
        outputs_by_kind={kind: (files[kind], sizes[kind]) for kind in sorted(files)},
    )


def canonical(value: Any) -> str:
    """One text per JSON value, so equal payload values compare equal whatever their order."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def differing_fields(statuses: Iterable[JobStatus]) -> dict[str, list[str]]:
    """Per workflow, the payload fields whose values are not the same in all its jobs.

    Jobs are compared within their workflow only: a txt2img job and a scale job share no
    meaning, and comparing them would flag every field. A field that some jobs lack counts as
    differing. A workflow with one job has nothing to compare, so no fields.
    """
    payloads: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for status in statuses:
        payloads[status.workflow or NO_WORKFLOW].append(status.payload)
    result: dict[str, list[str]] = {}
    for workflow, group in payloads.items():
        if len(group) < 2:
            continue
        names = list(dict.fromkeys(name for payload in group for name in payload))
        # None stands for "absent", which no canonical text equals.
        result[workflow] = [
            name
            for name in names
            if len({canonical(p[name]) if name in p else None for p in group}) > 1
        ]
    return {workflow: names for workflow, names in result.items() if names}


def failure_groups(jobs: Iterable[tuple[str, JobStatus]]) -> list[FailureGroup]:
    """Failed jobs (id, status) by error type, the most common type first."""
    groups: dict[str, list[tuple[str, JobStatus]]] = defaultdict(list)
    for job_id, status in jobs:
        if status.state is JobState.failed:
            groups[status.error.type if status.error else "unknown"].append((job_id, status))
    ordered = sorted(groups.items(), key=lambda item: (-len(item[1]), item[0]))
    return [FailureGroup(error_type, members) for error_type, members in ordered]
