"""``GET /jobs?state=...``: the manifests in one state, a page at a time, from listings alone.

A manifest's place is its state (see :mod:`triggers.cli.backlog`, which counts them the same
way): ``waiting`` in the intake with no claim, ``running`` or ``retrying`` in ``_claims/`` by how
recently its claim was renewed, ``succeeded`` in ``_done/``, ``failed`` in ``_failed/``. Nothing is
read, so a page costs one LIST request (``waiting`` also lists the claims, work in flight).
Names are manifests', which are their jobs' ids unless a manifest sets ``id`` or is a batch.
"""

from __future__ import annotations

import time

from processor import DONE, FAILED, PROBE_PREFIX, Layout, ObjectInfo, Storage
from triggers.api.models import ApiError, BacklogState, JobList, ManifestEntry

MAX_PAGE = 1000
MAX_CLAIMS = 10_000  # claims are work in flight; more than this is not a backlog to page


async def list_state(
    storage: Storage,
    layout: Layout,
    state: BacklogState,
    *,
    limit: int,
    after: str | None,
    lease_seconds: float,
) -> JobList:
    if state in ("succeeded", "failed"):
        folder = DONE if state == "succeeded" else FAILED
        return await _page(storage, f"{layout.input_dir}/{folder}", state, limit, after)
    if state == "waiting":
        claimed = {info.key.rsplit("/", 1)[-1] for info in await _claims(storage, layout)}
        return await _page(storage, layout.input_dir, state, limit, after, skip=claimed)
    # Claims are dated by the store's clock, so "now" is the store's too (as in summarise).
    fresh_since = time.time() + (storage.clock_offset() or 0.0) - lease_seconds
    claims = [
        info
        for info in await _claims(storage, layout)
        if (info.last_modified.timestamp() >= fresh_since) == (state == "running")
    ]
    claims.sort(key=lambda info: info.key)
    if after is not None:
        claims = [info for info in claims if _name(info) > after]
    page = claims[:limit]
    more = len(claims) > limit
    return JobList(
        state=state,
        manifests=[_entry(info) for info in page],
        next=_name(page[-1]) if more and page else None,
    )


async def _claims(storage: Storage, layout: Layout) -> list[ObjectInfo]:
    found: list[ObjectInfo] = []
    after: str | None = None
    while len(found) < MAX_CLAIMS:
        page = await storage.list_page(layout.claims_prefix, start_after=after, limit=MAX_PAGE)
        found += [info for info in page.items if _is_manifest(info)]
        if not page.truncated or not page.items:
            return found
        after = page.items[-1].key
    raise ApiError(
        503, f"more than {MAX_CLAIMS:,} claims are in flight; list succeeded or failed instead"
    )


async def _page(
    storage: Storage,
    prefix: str,
    state: BacklogState,
    limit: int,
    after: str | None,
    skip: frozenset[str] | set[str] = frozenset(),
) -> JobList:
    """Up to ``limit`` manifests after ``after``. A full LIST page is asked for whatever the
    limit: sub-folders (``_claims/`` ...) take places in a page too, and must not fill it."""
    start = None if after is None else f"{prefix}/{after}.json"
    page = await storage.list_page(prefix, start_after=start, limit=MAX_PAGE)
    found = [
        info
        for info in page.items
        if _is_manifest(info) and info.key.rsplit("/", 1)[-1] not in skip
    ]
    shown = found[:limit]
    cursor: str | None = None
    if len(found) > limit or (page.truncated and shown):
        cursor = _name(shown[-1])
    elif page.truncated and page.items:  # a page of claimed manifests only: go on past it
        cursor = _name(page.items[-1])
    return JobList(state=state, manifests=[_entry(info) for info in shown], next=cursor)


def _name(info: ObjectInfo) -> str:
    return info.key.rsplit("/", 1)[-1].removesuffix(".json")


def _is_manifest(info: ObjectInfo) -> bool:
    name = info.key.rsplit("/", 1)[-1]
    return name.endswith(".json") and not name.startswith(PROBE_PREFIX)


def _entry(info: ObjectInfo) -> ManifestEntry:
    return ManifestEntry(name=_name(info), key=info.key, last_modified=info.last_modified)
