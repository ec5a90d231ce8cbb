"""``comfys3 status --summary``: how a backlog stands, from listings alone.

Someone who dropped 100,000 manifests wants to know how many wait, run, succeeded and failed,
every minute if they like. Reading 100,000 status documents for that would cost 100,000 GETs
and minutes; the layout already answers it, because a manifest's place *is* its state:

- **waiting**: ``<input>/<name>.json`` with no claim beside it;
- **running**: a claim in ``<input>/_claims/`` written within the last lease (a holder renews
  it every third of a lease, so a live claim is never older than that);
- **retrying**: a claim quiet for longer: given back for another try, or its worker died (any
  worker takes it over once the lease has run out);
- **succeeded**: ``<input>/_done/`` (every job of the manifest succeeded, or was a duplicate);
- **failed**: ``<input>/_failed/`` (a job failed for good, or the name was unusable).

So the cost is one LIST request per 1,000 keys of each prefix, whatever is in the objects, and
nothing is ever read: names and listing dates only, so no bucket content can make it fail.
Counts are of manifests, not jobs (a ``batch`` manifest counts once). The claims prefix is
listed first (it holds only work in flight, a few pages at most), so that a pending manifest is
known to be claimed or not without a request of its own; the other three prefixes are then
counted at the same time.

A prefix is counted up to ``max_keys`` keys and then shown as "at least": a history of ten
million finished manifests would otherwise cost ten thousand requests a minute to re-count. The
default, 100,000, counts a 100,000-manifest drop exactly at no more than 100 requests per prefix.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Container
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from processor import (
    DONE,
    FAILED,
    PROBE_PREFIX,
    Layout,
    LocalStorage,
    Storage,
    StorageError,
    load_worker_settings,
    storage_from_env,
)
from triggers.cli import logs

DEFAULT_MAX_KEYS = 100_000
LIST_PAGE = 1000  # ListObjectsV2 answers at most this many keys a request


@dataclass
class Listing:
    """What one prefix holds directly, counted as it is listed (a history of millions is
    never held in memory); ``complete`` is false when counting stopped at the cap."""

    keys: int = 0
    manifests: int = 0  # ``*.json`` not skipped
    others: int = 0  # anything else (never run)
    skipped: int = 0  # manifests named in ``skip``: claimed, so not waiting
    kept: dict[str, float] = field(default_factory=dict)  # name -> last modified, if asked
    complete: bool = True

    def add(self, name: str, stamp: float | None, skip: Container[str], keep: bool) -> None:
        self.keys += 1
        if not name.endswith(".json"):
            self.others += 1
        elif name in skip:
            self.skipped += 1
        else:
            self.manifests += 1
        if keep and stamp is not None:
            self.kept[name] = stamp


@dataclass
class Summary:
    location: str
    waiting: int
    running: int
    retrying: int
    succeeded: int
    failed: int
    not_manifests: int
    # Counts that are not exact, and which way: "at least" (counting stopped at max_keys),
    # "at most" (some claims were not counted, so some claimed manifests count as waiting).
    inexact: dict[str, str]
    max_keys: int | None
    lease_seconds: float
    requests: int
    request_kind: str  # "LIST requests" on S3, "folder scans" on a local folder
    seconds: float
    counted_at: str

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    def describe(self) -> str:
        """The counts for a person, then what they cost."""
        marks = {"at least": "≥", "at most": "≤", "about": "~"}

        def number(name: str) -> str:
            return marks.get(self.inexact.get(name, ""), "") + f"{getattr(self, name):,}"

        lease = f"{self.lease_seconds:g} s"
        rows = [
            ("waiting", "manifests in the intake that no worker has claimed"),
            ("running", f"claims renewed within the last {lease} (COMFYS3_LEASE_SECONDS)"),
            ("retrying", "claims quiet for longer: given back for a retry, or their worker died"),
            ("succeeded", f"manifests in {DONE}/"),
            ("failed", f"manifests in {FAILED}/"),
        ]
        if self.not_manifests:
            rows.append(("not_manifests", "other files directly in the intake (never run)"))
        width = max(len(number(name)) for name, _ in rows)
        lines = [f"backlog of {self.location} (manifests, a batch counts once)"]
        for name, meaning in rows:
            label = name.replace("_", " ")
            lines.append(f"  {label:<13} {number(name):>{width}}  {meaning}")
        if self.inexact:
            lines.append(
                f"  (counting stopped at {self.max_keys or 0:,} keys in a prefix; "
                "--max-keys 0 counts everything)"
            )
        lines.append(f"counted with {self.requests} {self.request_kind} in {self.seconds:.2f} s")
        return "\n".join(lines)


class _Lister:
    """Lists prefixes up to a cap, counting the requests it makes."""

    def __init__(self, storage: Storage, max_keys: int | None) -> None:
        self.storage = storage
        self.max_keys = max_keys
        self.requests = 0

    async def names(
        self, prefix: str, *, skip: Container[str] = frozenset(), keep: bool = False
    ) -> Listing:
        """Count the objects directly under ``prefix``, at most ``max_keys``; ``keep`` keeps
        each name with its date (for the claims prefix, which holds only work in flight)."""
        if isinstance(self.storage, LocalStorage):
            self.requests += 1
            folder = self.storage.root / prefix
            return await asyncio.to_thread(self._scan, folder, skip, keep)
        listing = Listing()
        after: str | None = None
        while True:
            limit = LIST_PAGE
            if self.max_keys is not None:
                limit = max(1, min(limit, self.max_keys - listing.keys))
            page = await self.storage.list_page(prefix, start_after=after, limit=limit)
            self.requests += 1
            for item in page.items:
                name = item.key.rsplit("/", 1)[-1]
                listing.add(name, item.last_modified.timestamp(), skip, keep)
            if not page.truncated:
                return listing
            last = page.items[-1].key if page.items else None
            if last is None or (after is not None and last <= after) or self._full(listing):
                # At the cap; or a page of sub-folders only (or a server that does not move
                # on), after which StartAfter cannot reach: either way the count is a floor.
                listing.complete = False
                return listing
            after = last

    def _full(self, listing: Listing) -> bool:
        return self.max_keys is not None and listing.keys >= self.max_keys

    def _scan(self, folder: Path, skip: Container[str], keep: bool) -> Listing:
        """One scan of a local folder: the local twin of a run of LIST pages."""
        listing = Listing()
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    try:
                        if not entry.is_file():
                            continue
                        if self._full(listing):
                            listing.complete = False
                            break
                        stamp = entry.stat().st_mtime if keep else None
                        listing.add(entry.name, stamp, skip, keep)
                    except FileNotFoundError:
                        continue  # retired or released while scanning
        except (FileNotFoundError, NotADirectoryError):
            pass
        return listing


def _is_manifest(name: str) -> bool:
    return name.endswith(".json") and not name.startswith(PROBE_PREFIX)


async def summarise(
    storage: Storage,
    layout: Layout,
    *,
    max_keys: int | None = DEFAULT_MAX_KEYS,
    lease_seconds: float = 120.0,
) -> Summary:
    """Count the backlog under ``layout.input_dir``; ``storage`` must be open."""
    started = time.monotonic()
    now = time.time()
    lister = _Lister(storage, max_keys)
    # Claims first: they say which pending manifests are not waiting but running.
    claims = await lister.names(layout.claims_prefix, keep=True)
    # LastModified is the store's clock: compared with the store's present time (read from its
    # answers), a clock minutes off here does not move claims between running and retrying.
    fresh_since = now + (storage.clock_offset() or 0.0) - lease_seconds
    claimed = {
        name: stamp >= fresh_since for name, stamp in claims.kept.items() if _is_manifest(name)
    }
    intake, done, failed = await asyncio.gather(
        lister.names(layout.input_dir, skip=claimed),
        lister.names(f"{layout.input_dir}/{DONE}"),
        lister.names(f"{layout.input_dir}/{FAILED}"),
    )
    running = sum(1 for fresh in claimed.values() if fresh)
    inexact: dict[str, str] = {}
    if not claims.complete:
        inexact.update({"running": "at least", "retrying": "at least", "waiting": "at most"})
    for names, listing in (("waiting", intake), ("succeeded", done), ("failed", failed)):
        if not listing.complete:
            # A capped intake with uncounted claims could be off either way.
            inexact[names] = "about" if names in inexact else "at least"
    if not intake.complete:
        inexact["not_manifests"] = "at least"
    return Summary(
        location=storage.location(layout.input_dir + "/"),
        waiting=intake.manifests,
        running=running,
        retrying=len(claimed) - running,
        succeeded=done.manifests,
        failed=failed.manifests,
        not_manifests=intake.others,
        inexact=inexact,
        max_keys=max_keys,
        lease_seconds=lease_seconds,
        requests=lister.requests,
        request_kind="folder scans" if isinstance(storage, LocalStorage) else "LIST requests",
        seconds=round(time.monotonic() - started, 3),
        counted_at=datetime.fromtimestamp(now, tz=UTC).isoformat(timespec="seconds"),
    )


def register_options(parser: argparse.ArgumentParser) -> None:
    """The options ``comfys3 status`` gains for the backlog summary."""
    parser.add_argument(
        "--summary",
        action="store_true",
        help="instead of one job: how many manifests wait, run, succeeded and failed, "
        "counted by listing (one request per 1,000 keys; cheap enough to run every minute)",
    )
    parser.add_argument(
        "--max-keys",
        type=_max_keys,
        default=DEFAULT_MAX_KEYS,
        metavar="N",
        help=f"with --summary: stop counting a prefix at N keys and show '≥N' (default "
        f"{DEFAULT_MAX_KEYS:,}, about {DEFAULT_MAX_KEYS // LIST_PAGE} requests; 0 counts all)",
    )


def _max_keys(text: str) -> int:
    try:
        value = int(text.replace(",", "").replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("give 0 (no limit) or more")
    return value


def cmd_summary(args: argparse.Namespace) -> int:
    if not args.summary:
        print("comfys3 status: give a JOB_ID, or --summary for the whole backlog", file=sys.stderr)
        return 2
    if args.job_id is not None:
        print("comfys3 status: give a JOB_ID or --summary, not both", file=sys.stderr)
        return 2
    lease_seconds = load_worker_settings().lane.lease_seconds
    storage, layout = storage_from_env(args.local, say=logs.to_stderr)

    async def count() -> Summary:
        async with storage:
            return await summarise(
                storage, layout, max_keys=args.max_keys or None, lease_seconds=lease_seconds
            )

    try:
        result = asyncio.run(count())
    except StorageError as error:
        print(f"comfys3: cannot count the backlog: {error}", file=sys.stderr)
        return 2
    print(result.to_json() if args.json else result.describe())
    return 0
