"""Job manifests dropped where no worker looks, found so the worker can say so.

Workers run only ``*.json`` directly in the intake prefix (``input/``). A manifest dropped one
level too high (``DIR/job.json`` instead of ``DIR/input/job.json``, or at the bucket root) or
one level too deep (``input/batch1/job.json``) is ignored without a word, and its author waits
for nothing. This finds such files, cheaply enough to run at start and once per idle period:

- the folder above the intake prefix, one non-recursive listing (``DIR/`` for ``--local DIR``,
  the bucket root or the parent prefix on S3), bounded;
- for a local folder only, the sub-folders of ``input/`` other than the worker's own
  (``_claims``, ``_done``, ``_failed``), walked on disk with a bound. On S3 that would need a
  recursive listing of ``input/``, whose cost grows with history, so it is left out.

Only JSON objects with a ``workflow`` or ``graph`` key count, so an unrelated ``package.json``
stays quiet; each file is warned about once per worker.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from processor import (
    CLAIMS,
    DONE,
    FAILED,
    Layout,
    LocalStorage,
    ObjectNotFound,
    Storage,
    StorageError,
)

log = logging.getLogger("comfys3.worker")

WORKER_FOLDERS = frozenset({CLAIMS, DONE, FAILED})
MANIFEST_KEYS = ("workflow", "graph")


def looks_like_manifest(data: bytes) -> bool:
    """A JSON object with a ``workflow`` or ``graph`` key; anything else (not JSON, too deep,
    another kind of document) is not, and never an error."""
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):
        return False
    return isinstance(document, dict) and any(key in document for key in MANIFEST_KEYS)


@dataclass(frozen=True)
class Candidate:
    """A ``*.json`` outside the intake: its key in storage and why it is not work."""

    key: str
    etag: str
    size: int
    nested: bool  # in a sub-folder of the intake (else above it)


class MisplacedManifests:
    """``await finder.new_warnings()`` -> a sentence per manifest found since the last call.

    Never raises for storage trouble: a check that cannot list says nothing this time.
    """

    def __init__(
        self,
        storage: Storage,
        layout: Layout,
        *,
        limit: int = 100,
        max_bytes: int = 1_048_576,
        max_walk: int = 5_000,
    ) -> None:
        self.storage = storage
        self.layout = layout
        self.limit = limit  # objects listed above the intake, and candidates read, per check
        self.max_bytes = max_bytes  # larger files are not read: a manifest is smaller
        self.max_walk = max_walk  # directory entries looked at under input/, per check
        self._seen: dict[str, str] = {}  # key -> etag of every file already judged

    async def new_warnings(self) -> list[str]:
        try:
            candidates = await self._above() + await self._nested()
        except StorageError as error:
            log.debug("looking for misplaced manifests: %s", error)
            return []
        warnings = []
        for candidate in candidates[: self.limit]:
            if self._seen.get(candidate.key) == candidate.etag:
                continue
            self._seen[candidate.key] = candidate.etag
            if await self._looks_like_manifest(candidate):
                warnings.append(self._sentence(candidate))
        return warnings

    # -- where to look ----------------------------------------------------------------------

    async def _above(self) -> list[Candidate]:
        parent = str(PurePosixPath(self.layout.input_dir).parent)
        listed = await self.storage.list(
            "" if parent == "." else parent, recursive=False, limit=self.limit
        )
        return [
            Candidate(info.key, info.etag, info.size, nested=False)
            for info in listed
            if info.key.endswith(".json")
        ]

    async def _nested(self) -> list[Candidate]:
        if not isinstance(self.storage, LocalStorage):
            return []
        root, intake = self.storage.root, self.storage.root / self.layout.input_dir
        paths = await asyncio.to_thread(self._walk, intake)
        found = []
        for path in paths:
            try:
                stat = path.stat()
            except OSError:
                continue
            key = path.relative_to(root).as_posix()
            # Size and mtime stand for an ETag: a file that changes is judged again.
            found.append(Candidate(key, f"{stat.st_size}-{stat.st_mtime_ns}", stat.st_size, True))
        return found

    def _walk(self, intake: Path) -> list[Path]:
        found: list[Path] = []
        visited = 0
        try:
            with os.scandir(intake) as entries:
                tops = sorted(
                    entry.path
                    for entry in entries
                    if entry.is_dir(follow_symlinks=False)
                    and entry.name not in WORKER_FOLDERS
                    and not entry.name.startswith(".")
                )
        except OSError:
            return found
        for top in tops:
            for folder, dirs, files in os.walk(top):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                visited += len(dirs) + len(files)
                found += [Path(folder) / f for f in sorted(files) if f.endswith(".json")]
                if visited >= self.max_walk or len(found) >= self.limit:
                    return found
        return found

    # -- what counts ------------------------------------------------------------------------

    async def _looks_like_manifest(self, candidate: Candidate) -> bool:
        if candidate.size > self.max_bytes:
            return False
        try:
            data = (await self.storage.get(candidate.key)).data
        except (ObjectNotFound, StorageError):
            return False
        return looks_like_manifest(data)

    def _sentence(self, candidate: Candidate) -> str:
        name = PurePosixPath(candidate.key).name
        intake = self.layout.input_dir
        here = self.storage.location(candidate.key)
        there = self.storage.location(f"{intake}/{name}")
        place = f"in a sub-folder of {intake}/" if candidate.nested else f"outside {intake}/"
        return (
            f"{here} looks like a job manifest, but it is {place}, where no worker looks: "
            f"workers run only the manifests directly in {intake}/; move it to {there} to run it"
        )
