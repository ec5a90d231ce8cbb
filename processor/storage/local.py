"""A folder that behaves like a bucket, so the worker runs the same code with or without S3.

Several worker processes may share one folder, so conditional writes must be as atomic as on S3:
every write takes an exclusive ``flock`` on ``<root>/.comfys3/lock`` (per open file, so it also
serialises threads of one process), files are written to a temp file and ``os.replace``-d into
place (readers see the old or the new bytes, never half), and ETags are the content's MD5 quoted
like S3's. The ``.comfys3`` folder is the backend's own and never listed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import mimetypes
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Self, TypeVar, Unpack

from processor.aio import ClosedOnExit
from processor.errors import (
    InvalidKey,
    ObjectNotFound,
    ObjectTooLarge,
    PreconditionFailed,
    StorageError,
)
from processor.storage.base import (
    ObjectInfo,
    Page,
    Put,
    PutOptions,
    StoredObject,
    folder_prefix,
    validate_key,
)

PRIVATE_DIR = ".comfys3"
_ETAG_CACHE_SIZE = 4096
_T = TypeVar("_T")


def _etag(data: bytes) -> str:
    return f'"{hashlib.md5(data, usedforsecurity=False).hexdigest()}"'


class LocalStorage(ClosedOnExit):
    """Keys are paths relative to ``root``; see the module docstring for the guarantees."""

    def __init__(self, root: Path) -> None:
        self._root = Path(root).resolve()
        self._private = self._root / PRIVATE_DIR
        self._tmp = self._private / "tmp"
        self._lock_path = self._private / "lock"
        # (inode, size, mtime_ns) -> etag: listing a folder of large outputs must not re-hash them.
        self._etags: dict[tuple[str, int, int, int], str] = {}

    @property
    def root(self) -> Path:
        return self._root

    def __repr__(self) -> str:
        return f"LocalStorage({str(self._root)!r})"

    async def __aenter__(self) -> Self:
        return self

    async def aclose(self) -> None:
        return None

    def clock_offset(self) -> float:
        return 0.0  # the folder is on this machine: its clock is ours

    # -- helpers --------------------------------------------------------------------------

    def _path(self, key: str, *, lenient: bool = False) -> Path:
        validate_key(key, lenient=lenient)
        if key.split("/", 1)[0] == PRIVATE_DIR:
            raise InvalidKey(f"invalid storage key {key!r}: {PRIVATE_DIR}/ is reserved")
        return self._root / key

    def _where(self, key: str) -> str:
        return f"{self._root}/{key}"

    async def _run(self, operation: str, key: str, func: Callable[[], _T]) -> _T:
        try:
            return await asyncio.to_thread(func)
        except StorageError:
            raise
        except OSError as error:
            reason = error.strerror or str(error)
            where = self._where(key)
            raise StorageError(f"local {operation} of {where} failed: {reason}") from None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self._tmp.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def _write_tmp(self, data: bytes) -> Path:
        self._tmp.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self._tmp, prefix="put-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(name, 0o644)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(name)
            raise
        return Path(name)

    def _create(self, tmp: Path, path: Path, key: str) -> None:
        """Create-if-absent: a hard link is atomic even against writers that skip our lock."""
        exists = PreconditionFailed(
            f"local put of {self._where(key)}: precondition failed (object exists)"
        )
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise exists from None
        except OSError:
            # No hard links on this filesystem (some network or FUSE mounts): the lock we hold
            # still makes check-then-replace atomic among comfys3 processes.
            if path.exists():
                raise exists from None
            os.replace(tmp, path)

    def _file_etag(self, path: Path, stat: os.stat_result) -> str:
        marker = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
        cached = self._etags.get(marker)
        if cached is not None:
            return cached
        etag = _etag(path.read_bytes())
        if len(self._etags) >= _ETAG_CACHE_SIZE:
            self._etags.clear()
        self._etags[marker] = etag
        return etag

    def _current_etag(self, path: Path) -> str | None:
        try:
            return _etag(path.read_bytes())
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def _info(self, key: str, path: Path, stat: os.stat_result) -> ObjectInfo:
        return ObjectInfo(
            key=key,
            size=stat.st_size,
            etag=self._file_etag(path, stat),
            last_modified=datetime.fromtimestamp(stat.st_mtime, tz=UTC),
        )

    def location(self, key: str) -> str:
        """Where ``key`` is, for a person: the file's path."""
        return self._where(key)

    # -- Storage --------------------------------------------------------------------------

    async def get(self, key: str, *, max_bytes: int | None = None) -> StoredObject:
        path = self._path(key)

        def read() -> tuple[bytes, float]:
            try:
                with path.open("rb") as handle:
                    stat = os.fstat(handle.fileno())
                    if max_bytes is not None and stat.st_size > max_bytes:
                        raise ObjectTooLarge(
                            f"{self._where(key)} is {stat.st_size} bytes; the limit is {max_bytes}"
                        )
                    return handle.read(), stat.st_mtime
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                raise ObjectNotFound(f"local get: no object at {self._where(key)}") from None

        data, mtime = await self._run("get", key, read)
        content_type, _ = mimetypes.guess_type(key, strict=False)
        return StoredObject(
            key=key,
            data=data,
            etag=_etag(data),
            content_type=content_type,
            last_modified=datetime.fromtimestamp(mtime, tz=UTC),
            served_at=datetime.now(UTC),  # the file's time is this machine's clock too
        )

    async def head(self, key: str) -> ObjectInfo | None:
        path = self._path(key)

        def stat() -> ObjectInfo | None:
            try:
                result = path.stat()
            except (FileNotFoundError, NotADirectoryError):
                return None
            if not path.is_file():
                return None
            try:
                return self._info(key, path, result)
            except (FileNotFoundError, IsADirectoryError):
                return None  # replaced or removed between stat and read

        return await self._run("head", key, stat)

    async def put(self, key: str, data: bytes, **options: Unpack[PutOptions]) -> str:
        path = self._path(key)
        put = Put.of(self._where(key), options)

        def write() -> str:
            tmp = self._write_tmp(data)
            try:
                with self._locked():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    if path.is_dir():
                        raise StorageError(
                            f"local put of {self._where(key)} failed: a folder has that name"
                        )
                    if put.if_match is not None and self._current_etag(path) != put.if_match:
                        raise PreconditionFailed(
                            f"local put of {self._where(key)}: precondition failed "
                            "(object changed or is gone)"
                        )
                    if put.if_none_match:
                        self._create(tmp, path, key)
                    else:
                        os.replace(tmp, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            return _etag(data)

        return await self._run("put", key, write)

    async def list(
        self, prefix: str, *, recursive: bool = False, limit: int | None = None
    ) -> list[ObjectInfo]:
        folder = folder_prefix(prefix)
        base = self._root / folder if folder else self._root

        def scan() -> list[ObjectInfo]:
            entries: list[tuple[str, Path]] = []
            if recursive:
                for dirpath, dirnames, filenames in os.walk(base):
                    if Path(dirpath) == self._root and PRIVATE_DIR in dirnames:
                        dirnames.remove(PRIVATE_DIR)
                    relative = Path(dirpath).relative_to(self._root).as_posix()
                    for name in filenames:
                        key = name if relative == "." else f"{relative}/{name}"
                        entries.append((key, Path(dirpath) / name))
            else:
                try:
                    with os.scandir(base) as scanner:
                        for entry in scanner:
                            if entry.is_file():
                                entries.append((folder + entry.name, Path(entry.path)))
                except (FileNotFoundError, NotADirectoryError):
                    return []
            entries.sort(key=lambda item: item[0].encode("utf-8", "surrogateescape"))
            found: list[ObjectInfo] = []
            for key, path in entries:
                if limit is not None and len(found) >= limit:
                    break
                try:
                    found.append(self._info(key, path, path.stat()))
                except (FileNotFoundError, IsADirectoryError):
                    continue  # removed while listing: S3 would not show it either
            return found

        return await self._run("list", folder or ".", scan)

    async def list_page(
        self, prefix: str, *, start_after: str | None = None, limit: int = 1000
    ) -> Page:
        """Files directly in the folder, in S3's key order, after ``start_after``. A folder has
        no continuation token, so each page is a fresh scan: cheap next to the job it feeds."""
        folder = folder_prefix(prefix)
        base = self._root / folder if folder else self._root
        after = (start_after or "").encode("utf-8", "surrogateescape")

        def scan() -> Page:
            names: list[tuple[bytes, str]] = []
            try:
                with os.scandir(base) as scanner:
                    for entry in scanner:
                        key = folder + entry.name
                        encoded = key.encode("utf-8", "surrogateescape")
                        if encoded > after and entry.is_file():
                            names.append((encoded, key))
            except (FileNotFoundError, NotADirectoryError):
                return Page([], truncated=False)
            names.sort()
            found: list[ObjectInfo] = []
            for _, key in names[:limit]:
                path = self._root / key
                try:
                    stat = path.stat()
                except (FileNotFoundError, NotADirectoryError):
                    continue  # removed while listing: S3 would not show it either
                found.append(
                    ObjectInfo(
                        key=key,
                        size=stat.st_size,
                        # Listing never reads file contents: an ETag here would hash every
                        # pending manifest on every poll. Readers that need one use get().
                        etag="",
                        last_modified=datetime.fromtimestamp(stat.st_mtime, tz=UTC),
                    )
                )
            return Page(found, truncated=len(names) > limit)

        return await self._run("list", folder or ".", scan)

    async def delete_many(self, keys: Sequence[str]) -> None:
        paths = [self._path(key) for key in keys]

        def remove() -> None:
            with self._locked():
                for path in paths:
                    with contextlib.suppress(
                        FileNotFoundError, NotADirectoryError, IsADirectoryError
                    ):
                        path.unlink()

        await self._run("delete", keys[0] if keys else ".", remove)

    async def delete(self, key: str) -> None:
        path = self._path(key)

        def remove() -> None:
            with self._locked():
                try:
                    path.unlink()
                except (FileNotFoundError, NotADirectoryError):
                    pass
                except IsADirectoryError:
                    pass  # a folder is not an object; S3 deletes of such keys are no-ops too

        await self._run("delete", key, remove)

    async def copy(self, src: str, dst: str) -> None:
        source = self._path(src)
        target = self._path(dst)

        def duplicate() -> None:
            try:
                data = source.read_bytes()
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                raise ObjectNotFound(f"local copy: no object at {self._where(src)}") from None
            tmp = self._write_tmp(data)
            try:
                with self._locked():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(tmp, target)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)

        await self._run("copy", src, duplicate)

    async def move(self, src: str, dst: str, *, lenient: bool = False) -> None:
        source = self._path(src, lenient=lenient)
        target = self._path(dst)

        def rename() -> None:
            with self._locked():
                if not source.is_file():
                    raise ObjectNotFound(f"local move: no object at {self._where(src)}")
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(source, target)

        await self._run("move", src, rename)

    async def presign_get(self, key: str, expires_in: int) -> str:
        return self._path(key).as_uri()
