"""The storage contract every backend honours, and the key rules they share.

The pipeline and the claims code are written once against :class:`Storage`; the S3 backend and
the local-folder backend must therefore agree on every edge (missing keys, conditional writes,
what a non-recursive listing shows), not only on the happy path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, Self, TypedDict, TypeVar, Unpack, runtime_checkable

from processor.errors import InvalidKey, StorageError

MAX_KEY_BYTES = 1024


@dataclass(frozen=True)
class StoredObject:
    key: str
    data: bytes
    etag: str
    content_type: str | None
    last_modified: datetime | None = None
    # When the storage served it, by the storage's own clock (S3's Date header), so an age
    # (served_at - last_modified) needs no clock of this machine; None when unknown.
    served_at: datetime | None = None

    @property
    def version(self) -> str:
        """Which upload this is: a re-upload of the same bytes has the same ETag but a new
        modification time, so the pair tells a resubmitted manifest from a leftover."""
        stamp = self.last_modified.isoformat() if self.last_modified else "?"
        return f"{self.etag}@{stamp}"


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    last_modified: datetime


@dataclass(frozen=True)
class Page:
    """One page of a non-recursive listing, in key order; ``truncated`` when more follow.
    ``folders``: the sub-folders met on the page, as prefixes ending in ``/`` (S3's
    CommonPrefixes), so a look for misplaced files need not list a folder's whole history."""

    items: list[ObjectInfo]
    truncated: bool
    folders: list[str] = field(default_factory=list)


T = TypeVar("T")


class PutOptions(TypedDict, total=False):
    """How an object is written: its content type, and the condition the write depends on
    (``if_none_match``: only if the key is free; ``if_match``: only if it still has that
    ETag). Conditions are how claims are refereed, with no lock service."""

    content_type: str
    if_none_match: bool
    if_match: str | None


@dataclass(frozen=True)
class Put:
    """A write's options, checked and with their defaults, for a backend to carry out."""

    content_type: str
    if_none_match: bool
    if_match: str | None

    @classmethod
    def of(cls, where: str, options: PutOptions) -> Put:
        put = cls(
            options.get("content_type", "application/octet-stream"),
            options.get("if_none_match", False),
            options.get("if_match"),
        )
        if put.if_none_match and put.if_match is not None:
            raise StorageError(f"put of {where}: if_none_match and if_match exclude each other")
        return put

    @property
    def conditional(self) -> bool:
        return self.if_none_match or self.if_match is not None


class ObjectStore(Protocol):
    """Reading and writing single objects: all a job's results and status documents need (a
    seam for tests, which stand in with a dict)."""

    async def get(self, key: str, *, max_bytes: int | None = None) -> StoredObject: ...

    async def put(self, key: str, data: bytes, **options: Unpack[PutOptions]) -> str: ...


class Storage(ObjectStore, Protocol):
    """What the processor needs from a bucket or a folder; both backends share these semantics.

    Prefixes passed to :meth:`list` name a folder: ``"input"`` and ``"input/"`` are the same, and
    ``"input"`` never matches ``"inputs/x"``. ETags are quoted strings, as S3 sends them.
    """

    async def head(self, key: str) -> ObjectInfo | None: ...

    async def list(
        self, prefix: str, *, recursive: bool = False, limit: int | None = None
    ) -> list[ObjectInfo]: ...

    async def list_page(
        self, prefix: str, *, start_after: str | None = None, limit: int = 1000
    ) -> Page: ...

    async def delete(self, key: str) -> None: ...

    async def delete_many(self, keys: Sequence[str]) -> None: ...

    async def move(self, src: str, dst: str, *, lenient: bool = False) -> None: ...

    async def presign_get(self, key: str, expires_in: int) -> str: ...

    def location(self, key: str) -> str: ...

    def clock_offset(self) -> float | None:
        """Seconds the store's clock runs ahead of this machine's, if known (for people:
        leases do not depend on it)."""
        ...

    async def copy(self, src: str, dst: str) -> None: ...

    async def aclose(self) -> None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, *exc_info: object) -> None: ...


@runtime_checkable
class SingleTry(Protocol):
    """A storage that can give a copy of itself whose requests are tried once: the start-up
    wait on S3 makes its own tries, one log line each (see :mod:`processor.storage.reachable`)."""

    def single_try(self) -> Storage: ...


def _key_problem(key: str, *, lenient: bool = False) -> str | None:
    if not key:
        return "it is empty"
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        return f"it is longer than {MAX_KEY_BYTES} bytes"
    if "://" in key:
        return "it looks like a URL; give a key inside the bucket or folder"
    if key.startswith("/"):
        return "it starts with '/'"
    if not lenient and "\\" in key:
        return "it contains a backslash"
    if not lenient and any(ord(ch) < 32 or ord(ch) == 127 for ch in key):
        return "it contains a control character"
    for part in key.split("/"):
        if part == "":
            return "it has an empty path segment ('//' or a trailing '/')"
        if part in {".", ".."}:
            return f"it has a '{part}' path segment"
    return None


def validate_key(key: str, *, lenient: bool = False) -> str:
    """Refuse keys that could escape a local root or mean different objects on different backends.

    ``..`` and a leading ``/`` would leave the local folder; empty segments and backslashes are
    legal on S3 but map to a different (or no) file locally, so a key valid here means the same
    object everywhere. ``lenient`` admits control characters and backslashes, for the one use
    that must reach such a key anyway: moving a badly named object out of the intake.
    """
    if not isinstance(key, str):
        raise InvalidKey(f"invalid storage key {key!r}: it is not a string")
    problem = _key_problem(key, lenient=lenient)
    if problem:
        raise InvalidKey(f"invalid storage key {key!r}: {problem}")
    return key


def folder_prefix(prefix: str) -> str:
    """``"input"`` / ``"input/"`` -> ``"input/"``; ``""`` / ``"/"`` -> ``""`` (the root).

    Listing is by folder on both backends, so a prefix is validated like a key and always ends
    with exactly one slash.
    """
    trimmed = prefix.rstrip("/") if prefix != "/" else ""
    if not trimmed:
        return ""
    problem = _key_problem(trimmed)
    if problem:
        raise InvalidKey(f"invalid storage prefix {prefix!r}: {problem}")
    return trimmed + "/"


def require_open(handle: T | None, bucket: str, owner: str) -> T:
    """A backend's client, or the error that says how to open it (``owner``: its class)."""
    if handle is None:
        raise StorageError(
            f"S3 storage for bucket {bucket!r} is not open; use 'async with {owner}(...)'"
        )
    return handle
