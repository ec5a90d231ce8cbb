"""``comfys3 submit``: check manifests the way a worker will, then drop them into the intake.

Checking first is the point. A typo found here costs nothing; the same typo found by a worker
is a failed status that someone has to notice. ``--wait`` then follows the jobs' statuses
until they end, so a script can submit and block on the result with one command.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from processor import (
    FINAL,
    RULE,
    EmbeddedS3Storage,
    Job,
    JobState,
    JobStatus,
    Layout,
    LocalStorage,
    ManifestError,
    StatusBook,
    Storage,
    WorkflowRegistry,
    key_problems,
    load_jobs,
    load_worker_settings,
    missing_inputs,
    put_new_manifest,
    split_priority,
    storage_from_env,
)
from triggers.cli import logs

# How long --wait stays quiet before saying that no worker has touched the jobs: long enough
# for a worker that is already running to claim them, short enough that a typo in the bucket or
# prefix shows soon. It is said again after twice as long each time, up to every 10 minutes.
NOBODY_HINT_SECONDS = 15.0
NOBODY_HINT_MAX_SECONDS = 600.0


@dataclass
class Submission:
    """One manifest file, checked: its name in the intake and the jobs it will become."""

    path: Path
    name: str
    data: bytes
    jobs: list[Job]

    @property
    def priority(self) -> int:
        """The manifest's ``priority``: it goes into the key, where workers see it in a
        listing (docs/layout.md), without reading the manifest."""
        return self.jobs[0].priority if self.jobs else 0


def cmd_submit(args: argparse.Namespace) -> int:
    settings = load_worker_settings()
    registry = WorkflowRegistry.default(settings.jobs.workflows_dir)

    # The files first: a missing or broken manifest is named before any S3 setting is needed.
    submissions: list[Submission] = []
    problems = 0
    for path in args.manifests:
        checked = check(
            path, registry, settings.jobs.allow_raw_workflows, settings.jobs.max_manifest_bytes
        )
        if isinstance(checked, str):
            print(checked, file=sys.stderr)
            problems += 1
        else:
            submissions.append(checked)
    clash = _same_name(submissions)
    if clash:
        print(clash, file=sys.stderr)
        problems += 1
    if problems:
        print("comfys3: nothing was submitted", file=sys.stderr)
        return 1
    storage, layout = storage_from_env(args.local, say=logs.to_stderr)
    return asyncio.run(_submit(storage, layout, submissions, args))


def check(
    path: Path, registry: WorkflowRegistry, allow_raw: bool, max_bytes: int
) -> Submission | str:
    """A manifest file -> its submission, or the message that says why it cannot go."""
    try:
        data = path.read_bytes()
    except OSError as error:
        return f"{path}: cannot read it: {error.strerror}"
    try:
        jobs = check_manifest(data, path.stem, registry, allow_raw, max_bytes)
    except ManifestError as error:
        lines = [f"{path}: invalid manifest"] + [f"  {problem}" for problem in error.problems]
        return "\n".join(lines)
    # A file already named with a priority marker keeps only its name: the manifest says.
    return Submission(path, split_priority(path.stem)[1], data, jobs)


def check_manifest(
    data: bytes, name: str, registry: WorkflowRegistry, allow_raw: bool, max_bytes: int
) -> list[Job]:
    """The jobs a manifest to be named ``<name>.json`` in the intake becomes, checked as a
    worker will check them (input file names included), or a ManifestError with every problem.
    The one check behind ``submit`` and the jobs API's ``POST /jobs``."""
    jobs = load_jobs(
        data,
        manifest_key=f"{name}.json",
        registry=registry,
        allow_raw=allow_raw,
        max_bytes=max_bytes,
    )
    problems = key_problems(jobs)
    if problems:
        raise ManifestError(problems)
    return jobs


def already_succeeded(job_id: str) -> str:
    """The warning for a job id that succeeded before: workers will not run it again."""
    return (
        f"job {job_id} already succeeded, so a worker will not run it again; set "
        '"rerun": true in the manifest to run it anyway'
    )


def _same_name(submissions: list[Submission]) -> str | None:
    seen: dict[str, Path] = {}
    for submission in submissions:
        other = seen.setdefault(submission.name, submission.path)
        if other != submission.path:
            return (
                f"{other} and {submission.path} would both be {submission.name}.json in the "
                "intake: rename one"
            )
    return None


async def _missing_inputs(storage: Storage, submissions: list[Submission]) -> int:
    """Print each input file that is not where a worker will look; how many manifests lack one."""
    lacking = 0
    for submission in submissions:
        missing = await missing_inputs(storage, submission.jobs)
        if missing:
            lacking += 1
            print(f"{submission.path}: an input file is missing", file=sys.stderr)
            for line in missing:
                print(f"  {line}", file=sys.stderr)
    if lacking:
        print(f"  ({RULE})", file=sys.stderr)
    return lacking


async def _submit(
    storage: Storage, layout: Layout, submissions: list[Submission], args: argparse.Namespace
) -> int:
    async with storage:
        if await _missing_inputs(storage, submissions):
            print("comfys3: nothing was submitted", file=sys.stderr)
            return 1
        refused = 0
        jobs = [job.id for s in submissions for job in s.jobs]
        # What each job's status said before: a job run before keeps its old final status
        # until a worker claims it again, and that old one must not end the wait.
        book = StatusBook(storage, layout)
        found = await book.read_many(jobs)
        before = dict(zip(jobs, found, strict=True))
        waiting: list[str] = []
        for submission in submissions:
            key = layout.submit_key(submission.name, submission.priority)
            ids = [job.id for job in submission.jobs]
            if not await put_new_manifest(storage, book, key, submission.data, ids):
                print(
                    f"{submission.path}: {key} is already waiting to run; "
                    "not replaced (rename the file to submit it again)",
                    file=sys.stderr,
                )
                refused += 1
                continue
            waiting.append(key)
            print(f"submitted {submission.path} -> {key} (job {', '.join(ids)})")
            for job in submission.jobs:
                previous = before[job.id]
                if not job.rerun and previous and previous.state is JobState.succeeded:
                    print(f"  warning: {already_succeeded(job.id)}", file=sys.stderr)
        if refused or not args.wait:
            return 1 if refused else 0
        if isinstance(storage, EmbeddedS3Storage) and storage.started_here:
            # Its server stops with this command, and no worker can serve the store meanwhile.
            print(
                "comfys3: no worker serves the embedded S3 now, so nothing runs these jobs "
                "yet: start `comfys3 run` in this folder, and they run; follow them with "
                "`comfys3 status JOB_ID` (or submit with --wait while it runs)",
                file=sys.stderr,
            )
            return 1
        stale = {job_id: status for job_id, status in before.items() if status is not None}
        statuses = await follow(
            storage, layout, jobs, stale, args.timeout, args.interval, manifests=waiting
        )
    return report(jobs, statuses, args.timeout)


async def follow(
    storage: Storage,
    layout: Layout,
    job_ids: list[str],
    stale: dict[str, JobStatus],
    timeout: float | None,
    interval: float,
    hint_after: float = NOBODY_HINT_SECONDS,
    manifests: list[str] | None = None,
) -> dict[str, JobStatus]:
    """Poll the jobs' statuses until each is final (or the time is up), printing each change
    to stderr (progress is a message; :func:`report` prints the outcome, the data).

    A status counts once it differs from the ``stale`` one read before submitting. Comparing
    documents, not clocks, keeps this right when the worker's clock is off from ours. While no
    job has been touched, it says so after ``hint_after`` seconds, and again after twice as long
    each time (at most every :data:`NOBODY_HINT_MAX_SECONDS`), naming where the ``manifests``
    wait: with no ``--timeout`` that wait could otherwise be silent forever.
    """
    start = time.monotonic()
    deadline = None if timeout is None else start + timeout
    hints = nobody_hint_times(hint_after, NOBODY_HINT_MAX_SECONDS)
    hint_at: float | None = start + next(hints)
    shown: dict[str, str] = {}
    latest: dict[str, JobStatus] = {}
    print(
        f"waiting for {len(job_ids)} job(s); Ctrl-C stops waiting, not the jobs",
        file=sys.stderr,
        flush=True,
    )
    book = StatusBook(storage, layout)
    while True:
        # Only the jobs still open are read again, and at once: a big batch costs one round
        # trip a poll, not one per job, and a finished job costs nothing.
        open_ids = [j for j in job_ids if j not in latest or latest[j].state not in FINAL]
        fresh = await book.read_many(open_ids)
        for job_id, status in zip(open_ids, fresh, strict=True):
            if status is None or status == stale.get(job_id):
                continue
            latest[job_id] = status
            line = _progress_line(status)
            if shown.get(job_id) != line:
                shown[job_id] = line
                print(line, file=sys.stderr, flush=True)
        if all(s in latest and latest[s].state in FINAL for s in job_ids):
            return latest
        now = time.monotonic()
        if latest:
            hint_at = None
        elif hint_at is not None and now >= hint_at:
            hint_at = start + next(hints)
            print(nobody_hint(storage, layout, manifests, now - start), file=sys.stderr, flush=True)
        if deadline is not None and now >= deadline:
            return latest
        await asyncio.sleep(interval)


def nobody_hint_times(first: float, most: float) -> Iterator[float]:
    """Seconds after the start at which to say that no worker has the jobs: ``first``, then
    gaps that double, up to ``most``: 15, 45, 105, 225, 465, 945, 1545, ..."""
    at, gap = first, first
    while True:
        yield at
        gap = min(gap * 2, most)
        at += gap


def nobody_hint(
    storage: Storage, layout: Layout, manifests: list[str] | None, waited: float
) -> str:
    """Where the jobs wait, and what would pick them up."""
    keys = manifests or [f"{layout.input_dir}/"]
    shown = ", ".join(storage.location(key) for key in keys[:3])
    more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
    if isinstance(storage, LocalStorage):
        runs = f"is `comfys3 run --local {storage.root}` running?"
    else:
        runs = (
            "is a worker running on this bucket with the same input prefix "
            f"(COMFYS3_S3_INPUT_DIR={layout.input_dir})?"
        )
    return (
        f"no worker has started these jobs after {waited:.0f} s; they wait at {shown}{more}: {runs}"
    )


def _progress_line(status: JobStatus) -> str:
    if status.state is JobState.running:
        node = f" at {status.progress.node}" if status.progress.node else ""
        return f"{status.id}: running {int(status.progress.fraction * 10) * 10}%{node}"
    if status.state is JobState.queued and status.error is not None:
        return f"{status.id}: queued again after {status.error.type}: {status.error.message}"
    return f"{status.id}: {status.state.value}"


def report(job_ids: list[str], statuses: dict[str, JobStatus], timeout: float | None) -> int:
    """The outcome per job on stdout (its final state and outputs; the error goes to stderr),
    and the exit code a script checks."""
    unfinished = [j for j in job_ids if j not in statuses or statuses[j].state not in FINAL]
    # Failed or cancelled: anything final but a success makes the exit code 1.
    failed = [
        j
        for j in job_ids
        if j in statuses
        and statuses[j].state in FINAL
        and statuses[j].state is not JobState.succeeded
    ]
    for job_id in job_ids:
        status = statuses.get(job_id)
        if status is None or status.state not in FINAL:
            continue
        print(f"{job_id}: {status.state.value}")
        if status.state is JobState.succeeded:
            for output in status.outputs:
                print(f"  {job_id}: {output.key}")
        elif status.error is not None:
            print(f"  {job_id}: {status.error.type}:", file=sys.stderr)
            for line in status.error.message.splitlines():
                print(f"    {line}", file=sys.stderr)
    if unfinished:
        print(
            f"comfys3: {len(unfinished)} job(s) not finished after {timeout:g} s: "
            f"{', '.join(unfinished)} (they keep running; see `comfys3 status JOB_ID`)",
            file=sys.stderr,
        )
    return 1 if failed or unfinished else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    submit = subparsers.add_parser(
        "submit",
        help="check manifests and drop them into the intake prefix",
        description="""
            Check each manifest the way a worker will (template, payload, ids, and that its
            input files are where the worker will read them: keys in the bucket, or paths under
            DIR with --local DIR), then upload it to COMFYS3_S3_INPUT_DIR/<file name>.json,
            where workers pick it up. If any manifest fails the check, nothing is submitted. A
            manifest of the same name that is still waiting is never replaced. With --wait,
            follow the jobs until they end (saying so when no worker has picked them up): exit 0
            when all succeeded, 1 when any failed or --timeout ran out. The check uses this
            machine's COMFYS3_WORKFLOWS_DIR and COMFYS3_ALLOW_RAW_WORKFLOWS: set them as your
            workers do.
        """,
    )
    submit.add_argument("manifests", nargs="+", type=Path, metavar="MANIFEST", help="JSON files")
    submit.add_argument(
        "--wait", action="store_true", help="follow the jobs until they succeed or fail"
    )
    submit.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="with --wait: stop waiting after this long (default: no limit)",
    )
    submit.add_argument(
        "--interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="with --wait: seconds between status reads (default 1)",
    )
    submit.add_argument(
        "--local", type=Path, metavar="DIR", help="submit to a local folder (DIR/input)"
    )
    submit.set_defaults(handler=cmd_submit)


__all__ = ["already_succeeded", "check", "check_manifest", "follow", "register", "report"]
