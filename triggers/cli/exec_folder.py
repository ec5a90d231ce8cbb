"""The ``--out DIR`` of ``comfys3 exec``, standing in for a worker's output prefix.

``exec`` runs the worker's own job code, which names results by key: ``output/<job id>/...``.
Files go to ``DIR/<job id>/...`` as the user asked, and the keys in status.json read exactly as
a worker writes them (docs/manifests.md), so a status from ``exec`` and one from the bucket
compare line for line.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Self, Unpack

from processor import (
    ClosedOnExit,
    LocalStorage,
    ObjectInfo,
    Page,
    PutOptions,
    StorageError,
    StoredObject,
)

OUTPUT_PREFIX = "output"


class OutputFolder(ClosedOnExit):
    """A :class:`processor.storage.Storage` whose keys ``output/<path>`` are ``DIR/<path>``."""

    def __init__(self, folder: Path, prefix: str = OUTPUT_PREFIX) -> None:
        self._folder = LocalStorage(folder)
        self.prefix = prefix

    @property
    def root(self) -> Path:
        return self._folder.root

    def path_of(self, key: str) -> Path:
        """Where the file of an output key is on disk."""
        return self.root / self._inner(key)

    def _inner(self, key: str) -> str:
        head, slash, rest = key.partition("/")
        if head != self.prefix or not slash:
            raise StorageError(f"key {key!r} is not under {self.prefix}/ (exec writes only there)")
        return rest

    def _outer(self, info: ObjectInfo) -> ObjectInfo:
        return ObjectInfo(f"{self.prefix}/{info.key}", info.size, info.etag, info.last_modified)

    async def get(self, key: str, *, max_bytes: int | None = None) -> StoredObject:
        found = await self._folder.get(self._inner(key), max_bytes=max_bytes)
        return StoredObject(key, found.data, found.etag, found.content_type, found.last_modified)

    async def head(self, key: str) -> ObjectInfo | None:
        info = await self._folder.head(self._inner(key))
        return None if info is None else self._outer(info)

    async def put(self, key: str, data: bytes, **options: Unpack[PutOptions]) -> str:
        return await self._folder.put(self._inner(key), data, **options)

    async def list(
        self, prefix: str, *, recursive: bool = False, limit: int | None = None
    ) -> list[ObjectInfo]:
        inner = self._inner(prefix.rstrip("/") + "/") if prefix.strip("/") != self.prefix else ""
        found = await self._folder.list(inner, recursive=recursive, limit=limit)
        return [self._outer(info) for info in found]

    async def list_page(
        self, prefix: str, *, start_after: str | None = None, limit: int = 1000
    ) -> Page:
        inner = self._inner(prefix.rstrip("/") + "/") if prefix.strip("/") != self.prefix else ""
        after = None if start_after is None else self._inner(start_after)
        page = await self._folder.list_page(inner, start_after=after, limit=limit)
        return Page([self._outer(info) for info in page.items], page.truncated)

    async def delete(self, key: str) -> None:
        await self._folder.delete(self._inner(key))

    async def delete_many(self, keys: Sequence[str]) -> None:
        await self._folder.delete_many([self._inner(key) for key in keys])

    async def copy(self, src: str, dst: str) -> None:
        await self._folder.copy(self._inner(src), self._inner(dst))

    def location(self, key: str) -> str:
        return str(self.path_of(key))

    def clock_offset(self) -> float:
        return 0.0

    async def move(self, src: str, dst: str, *, lenient: bool = False) -> None:
        await self._folder.move(self._inner(src), self._inner(dst), lenient=lenient)

    async def presign_get(self, key: str, expires_in: int) -> str:
        return await self._folder.presign_get(self._inner(key), expires_in)

    async def aclose(self) -> None:
        await self._folder.aclose()

    async def __aenter__(self) -> Self:
        await self._folder.__aenter__()
        return self

    def __repr__(self) -> str:
        return f"OutputFolder({str(self.root)!r}, prefix={self.prefix!r})"
