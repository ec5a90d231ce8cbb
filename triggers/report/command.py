"""``comfys3 report``: a batch at a glance, as a static HTML contact sheet.

Someone who dropped 500 jobs wants to look at the results, not read 500 status documents. The
report reads the statuses (concurrently, bounded), makes small thumbnails of the images, and
writes ``DIR/index.html`` (plus ``page-N.html`` for big batches) that opens from disk or from
any static host: no server, no script.

Why pages: a page holds at most 200 job cards, so a batch of 10,000 jobs gives 50 pages of the
same small weight instead of one page with 10,000 cards that a browser lays out for seconds.
The whole set is still summed up on every page (counts, times, span), and the first page groups
all failures by error type, so what went wrong is seen without paging.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

from processor import Layout, OutputRecord, Storage, StorageError, choose_store
from triggers.cli.logs import to_stderr
from triggers.report.data import JobRecord, Selection, parse_since, read_records, select_jobs
from triggers.report.page import render_pages
from triggers.report.thumbs import THUMB_DIR, Thumb, is_image, make_thumbnails
from triggers.report.view import PER_PAGE, build_view, in_job_folder

PRESIGN_MAX_SECONDS = 7 * 24 * 3600  # the longest an S3 (SigV4) presigned URL may live
LINK_CONCURRENCY = 32

Linker = Callable[[str], Awaitable[str]]


@dataclass(frozen=True)
class ReportResult:
    index: Path
    records: list[JobRecord]
    pages: int
    thumbs: dict[str, Thumb]


def relative_linker(out_dir: Path, local_root: Path | None) -> Linker:
    """Links that need no credentials: a path from the page to the file under ``--local``, or
    the bare key (relative to the bucket root) for S3."""
    page_dir = out_dir.resolve()
    root = local_root.resolve() if local_root is not None else None

    async def link(key: str) -> str:
        if root is None:
            return quote(key, safe="/")
        return quote(Path(os.path.relpath(root / key, page_dir)).as_posix(), safe="/")

    return link


def presign_linker(storage: Storage, expires: int) -> Linker:
    async def link(key: str) -> str:
        return await storage.presign_get(key, expires)

    return link


async def make_links(keys: Sequence[str], linker: Linker) -> dict[str, str]:
    gate = asyncio.Semaphore(LINK_CONCURRENCY)

    async def one(key: str) -> str | None:
        async with gate:
            try:
                return await linker(key)
            except StorageError:
                return None  # shown unlinked; the file is still listed with its size

    made = await asyncio.gather(*(one(key) for key in keys))
    return {key: url for key, url in zip(keys, made, strict=True) if url is not None}


def linked_outputs(records: Sequence[JobRecord], layout: Layout) -> list[OutputRecord]:
    """Outputs the statuses name inside their own job's folder: the only ones fetched or linked."""
    return [
        output
        for record in records
        if record.status is not None
        for output in record.status.outputs
        if in_job_folder(output, layout.job_prefix(record.job_id))
    ]


async def write_report(
    storage: Storage,
    layout: Layout,
    selection: Selection,
    out_dir: Path,
    *,
    linker: Callable[[Storage], Linker],
    title: str,
    per_page: int = PER_PAGE,
    now: datetime | None = None,
) -> ReportResult:
    """Read the selected statuses, make thumbnails and links, and write the pages to out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    async with storage:
        jobs = await select_jobs(storage, layout, selection)
        records = await read_records(storage, layout, jobs)
        outputs = linked_outputs(records, layout)
        thumbs = await make_thumbnails(storage, [o for o in outputs if is_image(o)], out_dir)
        links = await make_links([o.key for o in outputs], linker(storage))
    view = build_view(
        records,
        title=title,
        job_prefix=layout.job_prefix,
        links=links,
        thumbs=thumbs,
        now=now or datetime.now(UTC),
        per_page=per_page,
    )
    pages = render_pages(view)
    for name, html in pages.items():
        (out_dir / name).write_text(html, encoding="utf-8")
    for stale in out_dir.glob("page-*.html"):
        if stale.name not in pages:  # left by an earlier, longer report
            stale.unlink()
    return ReportResult(out_dir / "index.html", records, len(pages), thumbs)


def describe_selection(selection: Selection, layout: Layout) -> str:
    parts = []
    if selection.job_ids:
        parts.append(f"{len(selection.job_ids)} chosen job(s)")
    if selection.prefix:
        parts.append(f"jobs starting with {selection.prefix!r}")
    if selection.since:
        parts.append(f"written since {selection.since.isoformat(timespec='seconds')}")
    where = f"{layout.output_dir}/" if layout.output_dir else "the root"
    return f"comfys3 report: {', '.join(parts) or 'all jobs'} in {where}"


def cmd_report(args: argparse.Namespace) -> int:
    if args.job_ids and (args.prefix or args.since):
        print("comfys3: give job ids, or --prefix / --since, not both", file=sys.stderr)
        return 2
    try:
        since = parse_since(args.since) if args.since else None
    except ValueError as error:
        print(f"comfys3: {error}", file=sys.stderr)
        return 2
    if not 1 <= args.expires <= PRESIGN_MAX_SECONDS:
        print(f"comfys3: --expires must be 1 to {PRESIGN_MAX_SECONDS} seconds", file=sys.stderr)
        return 2
    selection = Selection(tuple(args.job_ids), args.prefix, since)
    choice = choose_store(args.local, say=to_stderr)
    storage, layout = choice.storage, choice.layout
    out_dir = Path(args.out)

    def linker(opened: Storage) -> Linker:
        if args.presign:
            return presign_linker(opened, args.expires)
        return relative_linker(out_dir, choice.local_root)

    result = asyncio.run(
        write_report(
            storage,
            layout,
            selection,
            out_dir,
            linker=linker,
            title=describe_selection(selection, layout),
        )
    )
    print(summary_line(result))
    if not result.records:
        print("comfys3: no jobs matched", file=sys.stderr)
        return 1
    return 0


def summary_line(result: ReportResult) -> str:
    states: dict[str, int] = {}
    for record in result.records:
        state = record.status.state.value if record.status else "unreadable"
        states[state] = states.get(state, 0) + 1
    counts = ", ".join(f"{n} {state}" for state, n in sorted(states.items())) or "no jobs"
    made = sum(1 for t in result.thumbs.values() if t.path)
    missing = len(result.thumbs) - made
    thumbs = f"{made} thumbnail(s)" + (f", {missing} without preview" if missing else "")
    pages = f"{result.pages} page(s)"
    return f"wrote {result.index} ({len(result.records)} jobs: {counts}; {pages}; {thumbs})"


def register(subparsers: argparse._SubParsersAction) -> None:
    report = subparsers.add_parser(
        "report",
        help="write an HTML contact sheet of jobs, outputs and failures",
        description=f"""
            Read the status of each chosen job and write a static page, DIR/index.html, with
            counts by state, execution times and the time span, a card per job (thumbnails
            linking to the full outputs, the payload fields that differ between jobs, timings,
            other outputs with kind and size), and the failures grouped by error type.
            Thumbnails go to DIR/{THUMB_DIR}/ and are reused by the next run. Big batches are
            paged, {PER_PAGE} jobs a page. The page runs no script; open it from disk or upload
            DIR anywhere static files are served. Without --presign, links are relative: a path
            to the file with --local, the object key (relative to the bucket root) with S3.
        """,
    )
    report.add_argument(
        "job_ids", nargs="*", metavar="JOB_ID", help="jobs to show (default: every job)"
    )
    report.add_argument(
        "--prefix",
        metavar="P",
        help="only jobs whose id starts with P (a batch 'sweep' is sweep-*)",
    )
    report.add_argument(
        "--since",
        metavar="T",
        help="only jobs whose status was written since T: an ISO date or time (UTC unless it "
        "names a zone) or an age such as 30m, 6h, 2d",
    )
    report.add_argument(
        "--out", required=True, type=Path, metavar="DIR", help="where the page goes"
    )
    report.add_argument(
        "--local", type=Path, metavar="DIR", help="read jobs from a local folder (DIR/output)"
    )
    report.add_argument(
        "--presign",
        action="store_true",
        help="link each output with a presigned URL (for S3: the page then works from anywhere "
        "until the URLs expire)",
    )
    report.add_argument(
        "--expires",
        type=int,
        default=PRESIGN_MAX_SECONDS,
        metavar="SECONDS",
        help=f"lifetime of presigned URLs (default and maximum {PRESIGN_MAX_SECONDS}, 7 days)",
    )
    report.set_defaults(handler=cmd_report)


__all__ = ["register", "write_report"]
