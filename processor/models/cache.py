"""The model cache: models fetched at run time, in ComfyUI's folder layout, shared by every job
of this worker (and by every worker that mounts the same volume).

```
<cache>/checkpoints/my-model.safetensors       the models, where ComfyUI looks (extra model path)
<cache>/.comfys3/meta/checkpoints/my-model.safetensors.json   sha256, bytes, source, last use
<cache>/.comfys3/locks/checkpoints/my-model.safetensors.lock  held while one worker downloads
<cache>/.comfys3/tmp/<random>.part              downloads in progress (never in a model folder)
```

The rules:

- **One download per file.** Jobs of this worker that want the same model at once wait for one
  download (an in-process task per file). Workers sharing a volume take a lock file, created
  exclusively; the holder touches it while it downloads, and a waiter that sees it unchanged for
  :data:`LOCK_STALE` seconds (its own clock, never comparing clocks) takes it over.
- **Nothing half-written is ever visible.** A download streams to ``.comfys3/tmp/``, is hashed as
  it arrives, checked (sha256 when the manifest gives one, the size cap always), then renamed
  into its folder. A failed or wrong download is deleted.
- **Least recently used goes first.** Past the size limit, the models whose last use (kept in
  their meta file by the cache itself, not the file system's atime, which many mounts do not
  update) is oldest are deleted, except a model in use by a job of this worker, or used by any
  worker within ``recent_guard`` seconds (a job on another worker of the volume may be loading
  it). Only models the cache fetched itself are ever deleted: files put there by hand stay.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from processor.errors import (
    FetchError,
    FetchRefused,
    ModelDownloadFailed,
    ModelInvalid,
)
from processor.job.status import ModelRecord
from processor.logsafe import printable_logger
from processor.models.sources import source_of
from processor.models.spec import MODEL_FOLDERS, ModelSpec
from processor.ops.fetch_guard import Fetcher, display_url

log = printable_logger("comfys3.models")

STATE = ".comfys3"
LOCK_STALE = 120.0  # seconds a download lock may stay untouched before a waiter takes it over
LOCK_TOUCH = 10.0  # seconds between touches of a held lock
LOCK_POLL = 0.5  # seconds between looks at a lock someone else holds
MAX_LOCK_WAIT = 6 * 3600.0  # the longest any one wait for another worker's download lasts
PROGRESS_EVERY = 5.0  # seconds between progress lines in the log
HASH_CHUNK = 8 * 1024 * 1024

Key = tuple[str, str]  # (folder, name)
# What obtaining a model came to: (cached | fetched, bytes, seconds, sha256 if known).
Obtained = tuple[Literal["cached", "fetched"], int, float, str | None]


@dataclass
class Entry:
    """One model the cache fetched, as its meta file describes it."""

    folder: str
    name: str
    path: Path
    bytes: int
    used_at: float
    sha256: str | None


class ModelCache:
    """Fetches the models jobs name into ``root``, at most ``max_bytes`` of them in all."""

    def __init__(
        self,
        root: Path,
        *,
        max_bytes: int,
        fetcher: Fetcher,
        recent_guard: float = 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.fetcher = fetcher
        self.recent_guard = recent_guard
        self.clock = clock
        self._downloads: dict[Key, asyncio.Task[Obtained]] = {}
        self._pins: Counter[Key] = Counter()
        self._evicting = asyncio.Lock()
        self.state = self.root / STATE
        for folder in (*MODEL_FOLDERS, f"{STATE}/meta", f"{STATE}/locks", f"{STATE}/tmp"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        self._clear_leftovers()

    # -- what jobs use --------------------------------------------------------------------

    @contextlib.contextmanager
    def pinned(self, specs: Iterable[ModelSpec]) -> Iterator[None]:
        """Models in use for the block: never evicted meanwhile (a job pins its models from
        before they are fetched until its prompt has run)."""
        keys = [(spec.folder, spec.file_name) for spec in specs]
        self._pins.update(keys)
        try:
            yield
        finally:
            self._pins.subtract(keys)
            self._pins += Counter()  # drop zero counts

    async def ensure_all(
        self, specs: Iterable[ModelSpec], *, on_fetch: Callable[[], None] | None = None
    ) -> list[ModelRecord]:
        """Every model of a job, present and checked, fetched concurrently; ``on_fetch`` is
        called once, when the first of them has to be downloaded rather than found (so the
        caller can step out of the GPU lane). Raises :class:`ModelInvalid` or
        :class:`ModelDownloadFailed`, naming the model; pin the models first (:meth:`pinned`).
        """
        told = False

        def fetching() -> None:
            nonlocal told
            if not told and on_fetch is not None:
                told = True
                on_fetch()

        return list(await asyncio.gather(*(self.ensure(spec, fetching) for spec in specs)))

    def has(self, name: str) -> bool:
        """Whether a model of that file name is in the cache, in any folder."""
        return any((self.root / folder / name).is_file() for folder in MODEL_FOLDERS)

    async def ensure(
        self, spec: ModelSpec, on_fetch: Callable[[], None] | None = None
    ) -> ModelRecord:
        """One model, present and checked: found in the cache or fetched now."""
        started = time.monotonic()
        key = (spec.folder, spec.file_name)
        path = self.root / spec.folder / spec.file_name
        task = self._downloads.get(key)
        if task is None and not path.is_file():
            task = asyncio.create_task(self._obtain(spec, on_fetch), name=f"model {spec.label}")
            self._downloads[key] = task
            task.add_done_callback(lambda _: self._downloads.pop(key, None))
        if task is not None:
            if on_fetch is not None:
                on_fetch()
            try:
                state, size, _seconds, recorded = await asyncio.shield(task)
            except FetchRefused as error:
                hint = " (COMFYS3_MODEL_CACHE_MAX_GB)" if "limit" in error.details else ""
                raise ModelInvalid(f"model {spec.label}: {error}{hint}", error.details) from None
            except FetchError as error:
                raise ModelDownloadFailed(f"model {spec.label}: {error}", error.details) from None
        else:
            state, size = "cached", path.stat().st_size
            recorded = self._meta(key).get("sha256")
        sha256 = await self._verified(spec, path, recorded)
        self._touch(key, spec)
        return ModelRecord(
            folder=spec.folder,
            name=spec.file_name,
            source=self._shown(spec),
            state=state,
            bytes=size,
            seconds=round(time.monotonic() - started, 3),
            sha256=sha256,
        )

    # -- fetching -------------------------------------------------------------------------

    async def _obtain(self, spec: ModelSpec, on_fetch: Callable[[], None] | None) -> Obtained:
        """(state, bytes, seconds, sha256) of one model, fetched under the volume's lock unless
        another worker fetched it meanwhile."""
        key = (spec.folder, spec.file_name)
        path = self.root / spec.folder / spec.file_name
        lock = self._lock_path(key)
        lock.parent.mkdir(parents=True, exist_ok=True)
        async with self._volume_lock(lock, spec):
            if path.is_file():  # another worker fetched it while we waited
                return "cached", path.stat().st_size, 0.0, self._meta(key).get("sha256")
            if on_fetch is not None:
                on_fetch()
            return await self._download(spec, path, lock)

    async def _download(self, spec: ModelSpec, path: Path, lock: Path) -> Obtained:
        source = source_of(spec)
        shown = self._shown(spec)
        started = time.monotonic()
        part = self.state / "tmp" / f"{uuid.uuid4().hex}.part"
        digest = hashlib.sha256()
        received = 0
        last_note = last_touch = started
        log.info("model %s: fetching from %s", spec.label, shown, extra={"model": spec.label})
        try:
            async with self.fetcher.open(
                source.url, max_bytes=self.max_bytes, headers=source.headers
            ) as (answer, chunks):
                if answer.length is not None:
                    await self._make_room(answer.length)
                    free = shutil.disk_usage(self.root).free
                    if answer.length > free:
                        raise ModelDownloadFailed(
                            f"model {spec.label} is {_mb(answer.length)}; the cache's disk "
                            f"has {_mb(free)} free"
                        )
                handle = await asyncio.to_thread(part.open, "wb")
                try:
                    async for chunk in chunks:
                        await asyncio.to_thread(_write, handle, digest, chunk)
                        received += len(chunk)
                        now = time.monotonic()
                        if now - last_touch >= LOCK_TOUCH:
                            last_touch = now
                            with contextlib.suppress(OSError):
                                os.utime(lock)
                        if now - last_note >= PROGRESS_EVERY:
                            last_note = now
                            _progress(spec, received, answer.length, now - started)
                finally:
                    await asyncio.to_thread(_close, handle)
            sha256 = digest.hexdigest()
            if spec.sha256 is not None and sha256 != spec.sha256:
                raise ModelInvalid(
                    f"model {spec.label}: the file from {shown} has sha256 {sha256}, not the "
                    f"sha256 {spec.sha256} the manifest gives; it was deleted",
                    {"expected_sha256": spec.sha256, "sha256": sha256, "bytes": received},
                )
            await self._make_room(received, exclude=(spec.folder, spec.file_name))
            os.replace(part, path)
        except BaseException:
            with contextlib.suppress(OSError):
                part.unlink()
            raise
        seconds = time.monotonic() - started
        self._write_meta(
            (spec.folder, spec.file_name),
            {
                "sha256": sha256,
                "bytes": received,
                "source": shown,
                "fetched_at": self.clock(),
                "used_at": self.clock(),
            },
        )
        log.info(
            "model %s: fetched %s in %.1f s (%s/s)",
            spec.label,
            _mb(received),
            seconds,
            _mb(int(received / max(seconds, 1e-3))),
            extra={"model": spec.label, "bytes": received, "seconds": round(seconds, 3)},
        )
        return "fetched", received, seconds, sha256

    @contextlib.asynccontextmanager
    async def _volume_lock(self, lock: Path, spec: ModelSpec) -> AsyncIterator[None]:
        """Hold ``lock`` (created exclusively) for the block. A lock another worker holds is
        waited for; one that nobody touched for :data:`LOCK_STALE` seconds, as measured here
        (never by comparing this machine's clock with the file's time), is taken over."""
        deadline = time.monotonic() + MAX_LOCK_WAIT
        seen: tuple[float, float] | None = None  # (lock's mtime, when we saw it change)
        waited = False
        while True:
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "w") as handle:
                    handle.write(json.dumps({"pid": os.getpid(), "host": os.uname().nodename}))
                break
            if not waited:
                waited = True
                log.info("model %s: another worker is fetching it; waiting", spec.label)
            try:
                mtime = lock.stat().st_mtime
            except FileNotFoundError:
                continue  # released just now: try again at once
            now = time.monotonic()
            if seen is None or seen[0] != mtime:
                seen = (mtime, now)
            elif now - seen[1] >= LOCK_STALE:
                log.warning(
                    "model %s: the download lock was not touched for %.0f s; taking it over",
                    spec.label,
                    now - seen[1],
                )
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()
                seen = None
                continue
            if now >= deadline:
                raise ModelDownloadFailed(
                    f"model {spec.label}: another worker has been fetching it for "
                    f"{MAX_LOCK_WAIT / 3600:g} h"
                )
            await asyncio.sleep(LOCK_POLL)
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()

    async def _verified(self, spec: ModelSpec, path: Path, recorded: str | None) -> str | None:
        """The file's sha256, checked against the manifest's when it gives one. A file fetched
        without a hash (or put there by hand) is hashed once, when a manifest first asks."""
        if spec.sha256 is None:
            return recorded
        key = (spec.folder, spec.file_name)
        if recorded is None:
            recorded = await asyncio.to_thread(_hash_file, path)
            meta = self._meta(key)
            if meta:
                self._write_meta(key, {**meta, "sha256": recorded})
        if recorded != spec.sha256:
            raise ModelInvalid(
                f"model {spec.label}: the cached file has sha256 {recorded}, not the sha256 "
                f"{spec.sha256} the manifest gives (another manifest fetched a different file "
                "under this name; give this one another name)",
                {"expected_sha256": spec.sha256, "sha256": recorded},
            )
        return recorded

    # -- eviction -------------------------------------------------------------------------

    def entries(self) -> list[Entry]:
        """Every model the cache fetched (it has a meta file) and that is still there."""
        found = []
        meta_root = self.state / "meta"
        for folder in MODEL_FOLDERS:
            for meta_path in (meta_root / folder).glob("*.json"):
                name = meta_path.name.removesuffix(".json")
                path = self.root / folder / name
                try:
                    size = path.stat().st_size
                    meta = json.loads(meta_path.read_text())
                except (OSError, ValueError):
                    continue
                used = meta.get("used_at")
                found.append(
                    Entry(
                        folder,
                        name,
                        path,
                        size,
                        float(used) if isinstance(used, int | float) else 0.0,
                        meta.get("sha256") if isinstance(meta.get("sha256"), str) else None,
                    )
                )
        return found

    async def _make_room(self, incoming: int, *, exclude: Key | None = None) -> None:
        """Evict least recently used models until ``incoming`` more bytes fit the limit."""
        async with self._evicting:
            entries = sorted(self.entries(), key=lambda entry: entry.used_at)
            total = sum(entry.bytes for entry in entries)
            if total + incoming <= self.max_bytes:
                return
            recent = self.clock() - self.recent_guard
            for entry in entries:
                if total + incoming <= self.max_bytes:
                    return
                key = (entry.folder, entry.name)
                if key == exclude or self._pins[key] > 0 or entry.used_at > recent:
                    continue
                if self._lock_path(key).exists():
                    continue
                log.info(
                    "model cache: evicting %s/%s (%s, unused for %.0f s)",
                    entry.folder,
                    entry.name,
                    _mb(entry.bytes),
                    self.clock() - entry.used_at,
                )
                with contextlib.suppress(FileNotFoundError):
                    entry.path.unlink()
                with contextlib.suppress(FileNotFoundError):
                    self._meta_path(key).unlink()
                total -= entry.bytes
            if total + incoming > self.max_bytes:
                log.warning(
                    "model cache: %s in use or used recently, over the limit of %s; "
                    "nothing more can be evicted now",
                    _mb(total + incoming),
                    _mb(self.max_bytes),
                )

    # -- bookkeeping ----------------------------------------------------------------------

    def _lock_path(self, key: Key) -> Path:
        return self.state / "locks" / key[0] / f"{key[1]}.lock"

    def _meta_path(self, key: Key) -> Path:
        return self.state / "meta" / key[0] / f"{key[1]}.json"

    def _meta(self, key: Key) -> dict[str, Any]:
        try:
            value = json.loads(self._meta_path(key).read_text())
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    def _write_meta(self, key: Key, meta: dict[str, Any]) -> None:
        path = self._meta_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        temporary.write_text(json.dumps(meta))
        os.replace(temporary, path)

    def _touch(self, key: Key, spec: ModelSpec) -> None:
        """Record a use: the time eviction goes by."""
        meta = self._meta(key)
        if not meta:
            return  # not fetched by the cache (put there by hand): never evicted anyway
        with contextlib.suppress(OSError):
            self._write_meta(key, {**meta, "used_at": self.clock()})

    def _clear_leftovers(self) -> None:
        """Partial downloads of a worker that died; a live worker's is at most LOCK_STALE old."""
        cutoff = time.time() - 24 * 3600
        for part in (self.state / "tmp").glob("*.part"):
            with contextlib.suppress(OSError):
                if part.stat().st_mtime < cutoff:
                    part.unlink()

    @staticmethod
    def _shown(spec: ModelSpec) -> str:
        if spec.hf is not None:
            return f"hf:{spec.hf}" + (f"@{spec.revision}" if spec.revision else "")
        assert spec.url is not None
        return display_url(spec.url)


def _write(handle: BinaryIO, digest: Any, chunk: bytes) -> None:
    handle.write(chunk)
    digest.update(chunk)


def _close(handle: BinaryIO) -> None:
    handle.flush()
    os.fsync(handle.fileno())
    handle.close()


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _mb(size: int) -> str:
    return f"{size / 1e6:,.1f} MB"


def _progress(spec: ModelSpec, received: int, total: int | None, seconds: float) -> None:
    rate = _mb(int(received / max(seconds, 1e-3)))
    if total:
        log.info(
            "model %s: %s of %s (%.0f%%), %s/s",
            spec.label,
            _mb(received),
            _mb(total),
            100 * received / total,
            rate,
            extra={"model": spec.label, "bytes": received},
        )
    else:
        log.info("model %s: %s, %s/s", spec.label, _mb(received), rate)
