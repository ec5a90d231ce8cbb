"""Job manifests dropped where no worker runs them, found so the worker can say so.

Workers run only files named ``*.json`` directly in the intake prefix (``input/``). A near miss
is ignored without a word, and its author waits for nothing. Five kinds are looked for, each
on a local folder and on S3, cheaply enough to run at start and once per idle period:

- outside: one level too high (``DIR/job.json`` instead of ``DIR/input/job.json``, or at the
  bucket root or the parent prefix);
- a folder like the intake: ``inputs/``, ``Input/`` beside ``input/``;
- a sub-folder of the intake: ``input/batch1/job.json``;
- the name's case: ``input/job.JSON``;
- YAML: ``input/job.yaml`` (or ``.yml``), which workers do not read.

The looks are bounded: one page of the folder above the intake and one of the intake itself
(a non-recursive listing, whose sub-folders come back as one entry each, so the intake's
history in ``_done/`` costs nothing), then a bounded listing of each suspect folder. Only
documents that look like manifests count (a JSON object, or YAML, with a ``workflow`` or
``graph`` key), so an unrelated ``package.json`` stays quiet. Each kind found is said in one
sentence per look, naming its files; a file is named once per worker (again if it changes).
"""

from __future__ import annotations

import enum
import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import PurePosixPath

from processor import (
    CLAIMS,
    DONE,
    FAILED,
    Layout,
    ObjectInfo,
    ObjectNotFound,
    Storage,
    StorageError,
)

log = logging.getLogger("comfys3.worker")

WORKER_FOLDERS = frozenset({CLAIMS, DONE, FAILED})
MANIFEST_KEYS = ("workflow", "graph")
YAML_SUFFIXES = (".yaml", ".yml")
SHOWN = 5  # files named per sentence; the rest are counted
YAML_MANIFEST = re.compile(rb"^(workflow|graph)\s*:", re.MULTILINE)


class Kind(enum.Enum):
    """Why a manifest-like file is not run, in the order the warnings come."""

    outside = "outside"
    near_folder = "near_folder"
    nested = "nested"
    case = "case"
    yaml = "yaml"


def looks_like_manifest(data: bytes) -> bool:
    """A JSON object with a ``workflow`` or ``graph`` key; anything else (not JSON, too deep,
    another kind of document) is not, and never an error."""
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):
        return False
    return isinstance(document, dict) and any(key in document for key in MANIFEST_KEYS)


def looks_like_yaml_manifest(data: bytes) -> bool:
    """A YAML document with a top-level ``workflow:`` or ``graph:`` line."""
    return YAML_MANIFEST.search(data) is not None


def _name(key: str) -> str:
    return key.rsplit("/", 1)[-1]


def _is_yaml(name: str) -> bool:
    return name.lower().endswith(YAML_SUFFIXES)


def _is_json_any_case(name: str) -> bool:
    return name.lower().endswith(".json")


@dataclass(frozen=True)
class Candidate:
    """A file near the intake that may be a manifest, and why no worker would run it."""

    key: str
    marker: str  # changes when the file does: a changed file is judged again
    size: int
    kind: Kind


class MisplacedManifests:
    """``await finder.new_warnings()`` -> a sentence per kind of near miss found since the
    last call, each naming its files.

    Never raises for storage trouble: a look that cannot list says nothing this time.
    """

    def __init__(
        self,
        storage: Storage,
        layout: Layout,
        *,
        limit: int = 100,
        max_bytes: int = 1_048_576,
        max_folders: int = 10,
    ) -> None:
        self.storage = storage
        self.layout = layout
        self.limit = limit  # objects listed per listing, and candidates read, per look
        self.max_bytes = max_bytes  # larger files are not read: a manifest is smaller
        self.max_folders = max_folders  # suspect folders listed per look
        self._seen: dict[str, str] = {}  # key -> marker of every file already judged

    async def new_warnings(self) -> list[str]:
        try:
            candidates = await self._candidates()
        except StorageError as error:
            log.debug("looking for misplaced manifests: %s", error)
            return []
        found: dict[Kind, list[Candidate]] = {}
        for candidate in candidates[: self.limit]:
            if self._seen.get(candidate.key) == candidate.marker:
                continue
            self._seen[candidate.key] = candidate.marker
            if await self._looks_like_manifest(candidate):
                found.setdefault(candidate.kind, []).append(candidate)
        return [self._sentence(kind, found[kind]) for kind in Kind if kind in found]

    # -- where to look ----------------------------------------------------------------------

    async def _candidates(self) -> list[Candidate]:
        intake = PurePosixPath(self.layout.input_dir)
        parent = "" if str(intake.parent) == "." else str(intake.parent)
        above = await self.storage.list_page(parent, limit=self.limit)
        here = await self.storage.list_page(self.layout.input_dir, limit=self.limit)
        found = [
            Candidate(*self._marked(info), Kind.yaml if _is_yaml(name) else Kind.outside)
            for info in above.items
            if _is_json_any_case(name := _name(info.key)) or _is_yaml(name)
        ]
        for info in here.items:
            name = _name(info.key)
            if name.endswith(".json"):
                continue  # work, run by the intake
            if _is_json_any_case(name):
                found.append(Candidate(*self._marked(info), Kind.case))
            elif _is_yaml(name):
                found.append(Candidate(*self._marked(info), Kind.yaml))
        near = [f for f in above.folders if self._near_intake(f.rstrip("/").rsplit("/", 1)[-1])]
        nested = [f for f in here.folders if self._users_folder(f)]
        suspects = [(f, Kind.near_folder) for f in near] + [(f, Kind.nested) for f in nested]
        for folder, kind in suspects[: self.max_folders]:
            room = self.limit - len(found)
            if room <= 0:
                break
            for info in await self.storage.list(folder, recursive=True, limit=room):
                name = _name(info.key)
                if _is_yaml(name):
                    found.append(Candidate(*self._marked(info), Kind.yaml))
                elif _is_json_any_case(name):
                    found.append(Candidate(*self._marked(info), kind))
        return found

    def _near_intake(self, name: str) -> bool:
        """``inputs``, ``Input``, ``INPUTS`` beside ``input``; not ``input`` itself."""
        intake = PurePosixPath(self.layout.input_dir).name
        return name != intake and name.lower() in {intake.lower(), f"{intake.lower()}s"}

    @staticmethod
    def _users_folder(folder: str) -> bool:
        name = folder.rstrip("/").rsplit("/", 1)[-1]
        return name not in WORKER_FOLDERS and not name.startswith(".")

    @staticmethod
    def _marked(info: ObjectInfo) -> tuple[str, str, int]:
        # A folder's listing has no ETag: size and time stand for one.
        marker = f"{info.etag}-{info.size}-{info.last_modified.timestamp()}"
        return info.key, marker, info.size

    # -- what counts ------------------------------------------------------------------------

    async def _looks_like_manifest(self, candidate: Candidate) -> bool:
        if candidate.size > self.max_bytes:
            return False
        try:
            data = (await self.storage.get(candidate.key, max_bytes=self.max_bytes)).data
        except (ObjectNotFound, StorageError):
            return False
        if candidate.kind is Kind.yaml:
            return looks_like_yaml_manifest(data)
        return looks_like_manifest(data)

    # -- what is said -----------------------------------------------------------------------

    def _sentence(self, kind: Kind, candidates: list[Candidate]) -> str:
        intake = self.layout.input_dir
        one = len(candidates) == 1
        it, they_are = ("it", "it is") if one else ("them", "they are")
        first = candidates[0].key
        target = self.storage.location(f"{intake}/{PurePosixPath(first).stem}.json")
        reason, fix = {
            Kind.outside: (f"{they_are} outside {intake}/", f"move {it} to {target}"),
            Kind.near_folder: (
                f"{they_are} in {PurePosixPath(first).parent}/, not in {intake}/",
                f"move {it} to {target}",
            ),
            Kind.nested: (f"{they_are} in a sub-folder of {intake}/", f"move {it} to {target}"),
            Kind.case: (
                f"{'its name ends' if one else 'their names end'} in "
                f"{PurePosixPath(first).suffix!r}, not '.json'",
                f"rename {it} to {target}",
            ),
            Kind.yaml: (f"{they_are} YAML", f"write {it} as JSON, e.g. {target}"),
        }[kind]
        if not one:
            fix += " (the others likewise)"
        looks = "looks like a job manifest" if one else "look like job manifests"
        return (
            f"{_listed(self.storage.location(c.key) for c in candidates)} {looks}, but {reason}, "
            f"so no worker runs {it}: workers run only *.json files directly in {intake}/; "
            f"{fix} to run {it}"
        )


def _listed(names: Iterable[str]) -> str:
    shown = list(names)
    more = len(shown) - SHOWN
    return ", ".join(shown[:SHOWN]) + (f" and {more} more" if more > 0 else "")
