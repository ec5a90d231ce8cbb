"""``comfys3 cancel``: ask for jobs to stop, on whichever worker holds them.

The command only writes a small object, ``<input>/_cancel/<job id>.json``; the workers do the
rest (docs/layout.md). So anyone who can write to the bucket can do the same without this
command. What it adds is the checks a person wants first: a job that has already ended, or
that nobody has heard of, is named as such (exit 1) instead of leaving a request that will
never be served.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from processor import (
    FINAL,
    JobState,
    JobStatus,
    Layout,
    ObjectNotFound,
    StatusBook,
    Storage,
    StorageError,
    cancel_request,
    check_job_id,
    command_line_requester,
    default_job_id,
    load_json,
    split_priority,
    storage_from_env,
)
from triggers.cli import submit

MAX_MANIFEST_BYTES = 1_048_576
MAX_SCAN_PAGES = 10  # pages of prioritised names looked through for a manifest's name


@dataclass
class Target:
    """What a request names, or why there is nothing to cancel."""

    job_id: str
    name: str = ""  # what the cancel object is named after: the job, or its batch
    where: str = ""  # for the person: running on ..., waiting in ...
    refusal: str = ""


def cmd_cancel(args: argparse.Namespace) -> int:
    for job_id in args.job_ids:
        try:
            check_job_id(job_id)
        except ValueError as error:
            print(f"comfys3: {job_id!r} is not a job id: it {error}", file=sys.stderr)
            return 2
    storage, layout = storage_from_env(args.local)
    return asyncio.run(_cancel(storage, layout, args))


async def _cancel(storage: Storage, layout: Layout, args: argparse.Namespace) -> int:
    requester = command_line_requester()
    failures = 0
    asked: list[str] = []
    async with storage:
        book = StatusBook(storage, layout)
        for job_id in args.job_ids:
            target = await find(storage, layout, book, job_id, whole_batch=args.all_of_batch)
            if target.refusal:
                print(f"comfys3: {target.refusal}", file=sys.stderr)
                failures += 1
                continue
            request = cancel_request(target.name, requester, args.reason or "")
            key = layout.cancel_key(target.name)
            await storage.put(key, request.to_json(), content_type="application/json")
            # It may have ended while we looked: then the request would never be served.
            ended = await _ended(book, target)
            if ended is not None:
                await storage.delete(key)
                print(
                    f"comfys3: job {job_id} {ended.state.value} before the cancel could "
                    "reach it: nothing to cancel",
                    file=sys.stderr,
                )
                failures += 1
                continue
            what = f"batch {target.name}" if target.name != job_id else f"job {job_id}"
            print(f"cancel requested for {what} ({target.where}): {storage.location(key)}")
            asked.append(job_id)
        if args.wait and asked:
            statuses = await submit.follow(storage, layout, asked, {}, args.timeout, 1.0)
            unfinished = [j for j in asked if j not in statuses or statuses[j].state not in FINAL]
            if unfinished:
                print(
                    f"comfys3: not ended yet after {args.timeout:g} s: {', '.join(unfinished)}",
                    file=sys.stderr,
                )
                failures += 1
    return 1 if failures else 0


async def _ended(book: StatusBook, target: Target) -> JobStatus | None:
    status = await book.read(target.job_id)
    return status if status is not None and status.state in FINAL else None


async def find(
    storage: Storage, layout: Layout, book: StatusBook, job_id: str, *, whole_batch: bool
) -> Target:
    """What to cancel for ``job_id``: a job that runs or waits for another attempt (its
    status says so), or one not started yet (a pending manifest of that name, or a batch
    manifest it is an entry of)."""
    status = await book.read(job_id)
    if status is not None and status.state in FINAL:
        return Target(
            job_id, refusal=f"job {job_id} has already {status.state.value}: nothing to cancel"
        )
    if status is not None:
        where = (
            f"running on {status.worker}"
            if status.state is JobState.running and status.worker
            else "waiting for another attempt"
        )
        name = job_id
        if whole_batch:
            batch = await _batch_of(storage, layout, status.manifest_key)
            if batch is None:
                return Target(job_id, refusal=f"job {job_id} is not an entry of a pending batch")
            name = batch
        return Target(job_id, name, where)
    manifest = await pending_manifest(storage, layout, job_id)
    if manifest is not None:
        return Target(job_id, job_id, f"waiting in {manifest}: it will not start")
    base, dash, number = job_id.rpartition("-")
    if dash and number.isdigit() and base:
        manifest = await pending_manifest(storage, layout, base)
        if manifest is not None:
            name = base if whole_batch else job_id
            return Target(job_id, name, f"an entry of {manifest}, not started: it will not start")
    for folder, verb in ((layout.done_key, "finished"), (layout.failed_key, "failed")):
        if await storage.head(folder(job_id)) is not None:
            return Target(
                job_id, refusal=f"manifest {job_id} has already {verb}: nothing to cancel"
            )
    return Target(
        job_id,
        refusal=(
            f"no job {job_id}: it has no status at {book.key(job_id)} and no manifest named "
            f"{job_id} waits in {layout.input_dir}/ (a manifest whose 'id' differs from its "
            "file name is found by its status, once a worker has started it)"
        ),
    )


async def pending_manifest(storage: Storage, layout: Layout, name: str) -> str | None:
    """The key of a manifest waiting under ``name``, plain or with a priority in its name
    (those sort at the head and the tail of the intake, so only those ends are read)."""
    plain = layout.manifest_key(name)
    if await storage.head(plain) is not None:
        return plain
    for start, mark in ((None, "!"), (f"{layout.input_dir}/~", "~")):
        after = start
        for _ in range(MAX_SCAN_PAGES):
            page = await storage.list_page(layout.input_dir, start_after=after, limit=1000)
            for item in page.items:
                stem = PurePosixPath(item.key).stem
                if not stem.startswith(mark):
                    break
                if layout.is_manifest(item.key) and split_priority(stem)[1] == name:
                    return item.key
            else:
                if page.truncated and page.items:
                    after = page.items[-1].key
                    continue
            break
    return None


async def _batch_of(storage: Storage, layout: Layout, manifest_key: str | None) -> str | None:
    """The id of the batch manifest at ``manifest_key``, while it is pending (or running)."""
    if not manifest_key or not layout.is_manifest(manifest_key):
        return None
    try:
        stored = await storage.get(manifest_key, max_bytes=MAX_MANIFEST_BYTES)
        document = load_json(stored.data)
    except (ObjectNotFound, StorageError, ValueError):
        return None
    if not isinstance(document, dict) or not isinstance(document.get("batch"), list):
        return None
    declared = document.get("id")
    return declared if isinstance(declared, str) else default_job_id(manifest_key)


def register(subparsers: argparse._SubParsersAction) -> None:
    cancel = subparsers.add_parser(
        "cancel",
        help="stop jobs: a waiting one never starts, a running one is stopped",
        description="""
            Ask for jobs to stop, wherever they run: this writes
            COMFYS3_S3_INPUT_DIR/_cancel/<job id>.json, which every worker looks for (dropping
            that object by any other means does the same). A job that has not started never
            starts; a running one is stopped on ComfyUI within a few seconds
            (COMFYS3_CANCEL_CHECK_INTERVAL); either way its status becomes 'cancelled', with
            who asked and when. A batch entry (<id>-<n>) is cancelled alone; give the batch
            manifest's id, or --all-of-batch, to cancel every entry. A job that has already
            ended, or that is unknown, is named as such: exit 1.
        """,
    )
    cancel.add_argument("job_ids", nargs="+", metavar="JOB_ID", help="job ids (or batch ids)")
    cancel.add_argument(
        "--all-of-batch",
        action="store_true",
        help="cancel every entry of the batch that JOB_ID is an entry of",
    )
    cancel.add_argument("--reason", metavar="TEXT", help="why, recorded in the status")
    cancel.add_argument(
        "--wait", action="store_true", help="follow the jobs until their status is final"
    )
    cancel.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="with --wait: stop waiting after this long (default 60)",
    )
    cancel.add_argument("--local", type=Path, metavar="DIR", help="a local folder, not S3")
    cancel.set_defaults(handler=cmd_cancel)


__all__ = ["find", "pending_manifest", "register"]
