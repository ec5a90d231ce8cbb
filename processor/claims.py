"""Claims: which worker runs which job, decided by conditional writes on the storage itself.

A claim is a small JSON document at ``<prefix>/<name>.json`` with ``name``, ``holder``,
``attempt``, ``expires_at`` (epoch seconds), ``state`` (held/released), ``last_error`` and a
per-write ``token``. Creating it with
``If-None-Match: *`` and replacing it with ``If-Match: <etag>`` makes the storage the referee:
of many workers racing for one job, exactly one write succeeds, with no lock service. A lease
that is not renewed expires, so a job whose worker died is taken over, with its attempt count
carried on so the caller can stop retrying a job that keeps failing.

Only PutObject conditions are used: moto ignores conditions on CopyObject, and a copy-based
claim would quietly stop being exclusive there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

from processor.settings import normalise_prefix
from processor.storage_base import (
    ObjectNotFound,
    PreconditionFailed,
    Storage,
    StorageError,
    validate_key,
)

log = logging.getLogger(__name__)

HELD = "held"
RELEASED = "released"


@dataclass(frozen=True)
class Lease:
    """Proof of holding a claim: the etag is what the next conditional write must match."""

    name: str
    key: str
    holder: str
    attempt: int
    expires_at: float
    etag: str
    last_error: str | None


class LeaseLost(Exception):
    """Someone else replaced or removed our claim; the job is no longer ours to report on."""


class Heartbeat:
    """What :meth:`ClaimStore.heartbeat` yields: call it for the latest lease.

    Losing the lease does not cancel the job (a half-written output is worse than a duplicate
    run); the caller looks at :attr:`lost` after the block and decides.
    """

    def __init__(self, lease: Lease) -> None:
        self._lease = lease
        self.lost: LeaseLost | None = None
        self.renewals = 0

    def __call__(self) -> Lease:
        return self._lease

    def check(self) -> Lease:
        """The latest lease, or :class:`LeaseLost` if it was taken from us."""
        if self.lost is not None:
            raise self.lost
        return self._lease


class ClaimStore:
    def __init__(
        self,
        storage: Storage,
        prefix: str,
        holder: str,
        lease_seconds: float,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be positive")
        self._storage = storage
        self._prefix = normalise_prefix(prefix)
        self._holder = holder
        self._lease_seconds = lease_seconds
        self._clock = clock

    @property
    def holder(self) -> str:
        return self._holder

    def key_for(self, name: str) -> str:
        if not name or "/" in name:
            raise StorageError(f"invalid claim name {name!r}: give the manifest's file stem")
        key = f"{self._prefix}/{name}.json" if self._prefix else f"{name}.json"
        return validate_key(key)

    def _document(
        self,
        name: str,
        attempt: int,
        expires_at: float,
        state: str,
        last_error: str | None,
        token: str,
    ) -> bytes:
        body = {
            "name": name,
            "holder": self._holder,
            "attempt": attempt,
            "expires_at": expires_at,
            "state": state,
            "last_error": last_error,
            # Every write gets a fresh token, so its etag (a content hash on most servers) is
            # new too: a stale etag can never match a later document by coincidence, even when
            # two workers share a name and a clock reading.
            "token": token,
        }
        return json.dumps(body, sort_keys=True).encode()

    async def _write(
        self,
        name: str,
        key: str,
        *,
        attempt: int,
        expires_at: float,
        state: str,
        last_error: str | None,
        if_none_match: bool = False,
        if_match: str | None = None,
    ) -> str:
        token = uuid.uuid4().hex
        try:
            return await self._storage.put(
                key,
                self._document(name, attempt, expires_at, state, last_error, token),
                content_type="application/json",
                if_none_match=if_none_match,
                if_match=if_match,
            )
        except PreconditionFailed:
            # A retried request whose first try landed fails its own precondition. If the
            # claim now carries our token, the write is ours after all.
            try:
                current = await self._storage.get(key)
            except ObjectNotFound:
                raise PreconditionFailed(f"claim {key} is gone") from None
            if _parse(current.data).get("token") == token:
                return current.etag
            raise

    async def acquire(self, name: str) -> Lease | None:
        """Take the job if nobody holds a live claim on it; ``None`` if someone does or won."""
        key = self.key_for(name)
        expires_at = self._clock() + self._lease_seconds
        try:
            current = await self._storage.get(key)
        except ObjectNotFound:
            try:
                etag = await self._write(
                    name,
                    key,
                    attempt=1,
                    expires_at=expires_at,
                    state=HELD,
                    last_error=None,
                    if_none_match=True,
                )
            except PreconditionFailed:
                return None
            return Lease(name, key, self._holder, 1, expires_at, etag, None)

        previous = _parse(current.data)
        if previous.get("state") == HELD and _number(previous.get("expires_at")) > self._clock():
            return None
        attempt = int(_number(previous.get("attempt"))) + 1
        last_error = previous.get("last_error")
        if last_error is not None and not isinstance(last_error, str):
            last_error = str(last_error)
        try:
            etag = await self._write(
                name,
                key,
                attempt=attempt,
                expires_at=expires_at,
                state=HELD,
                last_error=last_error,
                if_match=current.etag,
            )
        except PreconditionFailed:
            return None
        return Lease(name, key, self._holder, attempt, expires_at, etag, last_error)

    async def renew(self, lease: Lease) -> Lease:
        expires_at = self._clock() + self._lease_seconds
        try:
            etag = await self._write(
                lease.name,
                lease.key,
                attempt=lease.attempt,
                expires_at=expires_at,
                state=HELD,
                last_error=lease.last_error,
                if_match=lease.etag,
            )
        except PreconditionFailed:
            raise LeaseLost(
                f"claim {lease.key} (attempt {lease.attempt}) was taken over by another worker"
            ) from None
        return replace(lease, expires_at=expires_at, etag=etag)

    async def release(self, lease: Lease, *, error: str | None, charge: bool = True) -> None:
        """Give the job back (e.g. after a failure) so any worker may retry it at once.

        The attempt count stays, so the next holder knows how many tries went before, unless
        ``charge`` is false: a try the job was not to blame for (its worker stopped, ComfyUI
        died running another job) is taken back. A release without an error keeps the
        previous one.
        """
        last_error = error if error is not None else lease.last_error
        try:
            await self._write(
                lease.name,
                lease.key,
                attempt=lease.attempt if charge else lease.attempt - 1,
                expires_at=self._clock(),
                state=RELEASED,
                last_error=last_error,
                if_match=lease.etag,
            )
        except PreconditionFailed:
            raise LeaseLost(
                f"claim {lease.key} (attempt {lease.attempt}) was taken over before release"
            ) from None

    async def finish(self, lease: Lease) -> None:
        """The job is done for good: the claim goes, and with it the listing cost."""
        await self._storage.delete(lease.key)

    def heartbeat(self, lease: Lease) -> contextlib.AbstractAsyncContextManager[Heartbeat]:
        """Renew every ``lease_seconds / 3`` while the block runs (three chances per lease)."""
        return self._heartbeat(lease)

    @contextlib.asynccontextmanager
    async def _heartbeat(self, lease: Lease) -> AsyncIterator[Heartbeat]:
        beat = Heartbeat(lease)
        stop = asyncio.Event()
        interval = self._lease_seconds / 3

        async def run() -> None:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), interval)
                    return
                try:
                    beat._lease = await self.renew(beat._lease)
                    beat.renewals += 1
                except LeaseLost as lost:
                    log.warning("%s", lost)
                    beat.lost = lost
                    return
                except Exception as error:
                    # Transient: the lease is still ours until it expires; try again next tick.
                    log.warning("renewing claim %s failed: %s", lease.key, error)

        task = asyncio.create_task(run(), name=f"heartbeat {lease.key}")
        try:
            yield beat
        finally:
            stop.set()
            # Let an in-flight renewal finish: cancelling it could leave a new etag on the
            # server that we never learn, and our own release would then look like a loss.
            await task


def _parse(data: bytes) -> dict[str, Any]:
    """A claim we cannot read is treated as expired rather than blocking its job forever."""
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _number(value: object) -> float:
    if isinstance(value, bool):
        return 0.0
    if isinstance(value, int | float):
        return float(value)
    return 0.0
