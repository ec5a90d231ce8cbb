"""What the report page shows, as plain values: the statuses read, turned into cards, failure
groups and a header, already formatted and cut to size.

The page template only lays these out, so every decision about what a person sees (which
fields, how long a message may be, which page a job is on) is here and testable without HTML.
Texts stay raw here; the template escapes all of them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import quote

from processor import JobStatus, OutputRecord, StorageError, validate_key
from triggers.report.data import JobRecord
from triggers.report.stats import (
    EXECUTE,
    NO_WORKFLOW,
    UNREADABLE,
    Summary,
    canonical,
    differing_fields,
    execute_seconds,
    failure_groups,
    media_of,
    summarize,
)
from triggers.report.thumbs import Thumb, is_image

PER_PAGE = 200
MAX_VALUE_CHARS = 80
MAX_TITLE_CHARS = 1000
MAX_LINE_CHARS = 300
MAX_MESSAGE_CHARS = 2000
MAX_DETAILS_CHARS = 4000
MAX_TEXTS = 5
MAX_FAILURE_ROWS = 50
MAX_UNREADABLE_ROWS = 200


@dataclass(frozen=True)
class FieldView:
    name: str
    value: str  # short, for the card
    full: str  # longer, for the tooltip


@dataclass(frozen=True)
class OutputView:
    name: str
    kind: str
    content_type: str
    size: str
    href: str | None
    thumb: str | None = None
    note: str | None = None
    media: str = ""  # images, video, audio, 3d, text ...: video and audio get a player


@dataclass(frozen=True)
class Card:
    job_id: str
    anchor: str
    self_href: str
    state: str
    workflow: str
    attempt: str
    fields: list[FieldView]
    timings: str
    images: list[OutputView]
    others: list[OutputView]
    texts: list[str]
    error_type: str | None
    error_line: str | None
    details: str


@dataclass(frozen=True)
class FailureRow:
    job_id: str
    href: str
    workflow: str
    attempt: str
    message: str


@dataclass(frozen=True)
class FailureSection:
    error_type: str
    count: int
    rows: list[FailureRow]
    hidden: int


@dataclass(frozen=True)
class UnreadableRow:
    job_id: str
    href: str
    key: str
    problem: str


@dataclass(frozen=True)
class Header:
    title: str
    jobs: int
    counts: list[tuple[str, int]]
    execute_total: str
    execute_median: str
    timed_jobs: int
    span: str
    generated: str
    varying: list[tuple[str, list[str]]]
    outputs: list[str]


@dataclass(frozen=True)
class ReportView:
    header: Header
    pages: list[list[Card]]
    failures: list[FailureSection]
    unreadable: list[UnreadableRow]
    unreadable_hidden: int


# -- formatting -------------------------------------------------------------------------------


def shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def human_size(size: int) -> str:
    if size < 1000:
        return f"{max(size, 0)} B"
    value = float(size)
    for unit in ("kB", "MB", "GB", "TB"):
        value /= 1000
        if value < 1000 or unit == "TB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


def human_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.2f} s" if seconds < 10 else f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def display_value(value: Any) -> str:
    """A payload value as a person reads it: strings bare, everything else as compact JSON."""
    return value if isinstance(value, str) else canonical(value)


def stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S %Z").strip()


def page_file(index: int) -> str:
    """Page 0 is index.html, so the report opens from its folder; later pages are numbered."""
    return "index.html" if index == 0 else f"page-{index + 1}.html"


def anchor_of(job_id: str) -> str:
    return f"job-{job_id}"


def card_href(job_id: str, page: int) -> str:
    return f"{page_file(page)}#{quote(anchor_of(job_id), safe='')}"


# -- building ---------------------------------------------------------------------------------


def in_job_folder(output: OutputRecord, job_prefix: str) -> bool:
    """An output key a status names must be a plain key in its own job's folder; anything else
    in the bucket (claims, other jobs, ``..`` out of a local root) is neither fetched nor linked."""
    try:
        validate_key(output.key)
    except StorageError:
        return False
    return output.key.startswith(job_prefix.rstrip("/") + "/")


def _output_view(
    output: OutputRecord, linked: bool, links: Mapping[str, str], thumbs: Mapping[str, Thumb]
) -> OutputView:
    name = PurePosixPath(output.key).name or output.key
    base = {
        "name": name,
        "kind": output.kind,
        "content_type": output.content_type,
        "size": human_size(output.bytes),
        "media": media_of(output),
    }
    if not linked:
        return OutputView(**base, href=None, note="not a key in the job's folder: not linked")
    thumb = thumbs.get(output.key)
    return OutputView(
        **base,
        href=links.get(output.key),
        thumb=thumb.path if thumb else None,
        note=thumb.problem if thumb else None,
    )


def _timings(status: JobStatus) -> str:
    parts = []
    execute = execute_seconds(status)
    if execute is not None:
        parts.append(f"{EXECUTE} {human_seconds(execute)}")
    total = status.timings.get("total")
    if total is not None and 0 <= total < float("inf"):
        parts.append(f"total {human_seconds(total)}")
    return " · ".join(parts)


def _attempt(status: JobStatus) -> str:
    if status.max_attempts:
        return f"{status.attempt} of {status.max_attempts}"
    return str(status.attempt)


def _details(status: JobStatus) -> str:
    document: dict[str, Any] = {"payload": status.payload}
    if status.metadata:
        document["metadata"] = status.metadata
    if status.timings:
        document["timings"] = status.timings
    text = json.dumps(document, indent=1, ensure_ascii=False, default=str)
    return shorten(text, MAX_DETAILS_CHARS)


def build_card(
    record: JobRecord,
    varying: Mapping[str, list[str]],
    job_prefix: str,
    links: Mapping[str, str],
    thumbs: Mapping[str, Thumb],
) -> Card:
    status = record.status
    if status is None:
        return Card(
            job_id=record.job_id,
            anchor=anchor_of(record.job_id),
            self_href="#" + quote(anchor_of(record.job_id), safe=""),
            state=UNREADABLE,
            workflow="",
            attempt="",
            fields=[],
            timings="",
            images=[],
            others=[],
            texts=[],
            error_type=None,
            error_line=shorten(record.problem or "", MAX_LINE_CHARS),
            details="",
        )
    workflow = status.workflow or NO_WORKFLOW
    fields = [
        FieldView(
            name=shorten(name, MAX_VALUE_CHARS),
            value=shorten(display_value(status.payload[name]), MAX_VALUE_CHARS),
            full=shorten(display_value(status.payload[name]), MAX_TITLE_CHARS),
        )
        for name in varying.get(workflow, [])
        if name in status.payload
    ]
    images: list[OutputView] = []
    others: list[OutputView] = []
    for output in status.outputs:
        view = _output_view(output, in_job_folder(output, job_prefix), links, thumbs)
        (images if is_image(output) and view.href is not None else others).append(view)
    texts = [
        shorten(f"{node}: {text}", MAX_LINE_CHARS)
        for node, values in status.texts.items()
        for text in values
    ][:MAX_TEXTS]
    error = status.error
    return Card(
        job_id=record.job_id,
        anchor=anchor_of(record.job_id),
        self_href="#" + quote(anchor_of(record.job_id), safe=""),
        state=status.state.value,
        workflow=workflow,
        attempt=_attempt(status),
        fields=fields,
        timings=_timings(status),
        images=images,
        others=others,
        texts=texts,
        error_type=error.type if error else None,
        error_line=shorten(error.message.strip().split("\n", 1)[0], MAX_LINE_CHARS)
        if error
        else None,
        details=_details(status),
    )


def _header(
    title: str, summary: Summary, varying: Mapping[str, list[str]], now: datetime
) -> Header:
    span = "—"
    if summary.started and summary.ended:
        length = max((summary.ended - summary.started).total_seconds(), 0.0)
        span = f"{stamp(summary.started)} → {stamp(summary.ended)} ({human_seconds(length)})"
    outputs = [
        f"{files} {kind} ({human_size(size)})"
        for kind, (files, size) in summary.outputs_by_kind.items()
    ]
    return Header(
        title=title,
        jobs=summary.jobs,
        counts=[(state, n) for state, n in summary.by_state.items() if n],
        execute_total=human_seconds(summary.execute_total) if summary.timed_jobs else "—",
        execute_median=(
            human_seconds(summary.execute_median) if summary.execute_median is not None else "—"
        ),
        timed_jobs=summary.timed_jobs,
        span=span,
        generated=stamp(now),
        varying=[(workflow, names) for workflow, names in sorted(varying.items())],
        outputs=outputs,
    )


def build_view(
    records: Sequence[JobRecord],
    *,
    title: str,
    job_prefix: Callable[[str], str],
    links: Mapping[str, str],
    thumbs: Mapping[str, Thumb],
    now: datetime,
    per_page: int = PER_PAGE,
) -> ReportView:
    """Records (in the order they are to be shown) -> everything the pages show.

    ``job_prefix`` maps a job id to its folder (``Layout.job_prefix``); ``links`` and
    ``thumbs`` map output keys to their link and thumbnail, made by the caller.
    """
    statuses = [r.status for r in records if r.status is not None]
    unreadable = [r for r in records if r.status is None]
    varying = differing_fields(statuses)
    cards = [build_card(r, varying, job_prefix(r.job_id), links, thumbs) for r in records]
    pages = [cards[i : i + per_page] for i in range(0, len(cards), per_page)] or [[]]
    page_of = {r.job_id: i // per_page for i, r in enumerate(records)}
    failures = [
        FailureSection(
            error_type=group.error_type,
            count=len(group.jobs),
            rows=[
                FailureRow(
                    job_id=status_id,
                    href=card_href(status_id, page_of[status_id]),
                    workflow=status.workflow or NO_WORKFLOW,
                    attempt=_attempt(status),
                    message=shorten(
                        status.error.message if status.error else "", MAX_MESSAGE_CHARS
                    ),
                )
                for status_id, status in group.jobs[:MAX_FAILURE_ROWS]
            ],
            hidden=max(len(group.jobs) - MAX_FAILURE_ROWS, 0),
        )
        for group in failure_groups((r.job_id, r.status) for r in records if r.status is not None)
    ]
    return ReportView(
        header=_header(title, summarize(statuses, len(unreadable)), varying, now),
        pages=pages,
        failures=failures,
        unreadable=[
            UnreadableRow(r.job_id, card_href(r.job_id, page_of[r.job_id]), r.key, r.problem or "")
            for r in unreadable[:MAX_UNREADABLE_ROWS]
        ],
        unreadable_hidden=max(len(unreadable) - MAX_UNREADABLE_ROWS, 0),
    )
