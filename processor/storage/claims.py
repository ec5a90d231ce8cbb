"""Claims: which worker runs which job, decided by conditional writes on the storage itself.

A claim is a small JSON document at ``<prefix>/<name>.json`` with ``name``, ``holder``,
``attempt`` (tries the job was to blame for), ``tries`` (every try, counted or not),
``expires_at`` (epoch seconds), ``state`` (held/released), ``last_error`` and a per-write
``token``. Creating it with
``If-None-Match: *`` and replacing it with ``If-Match: <etag>`` makes the storage the referee:
of many workers racing for one job, exactly one write succeeds, with no lock service. A lease
that is not renewed expires, so a job whose worker died is taken over, with its attempt count
carried on so the caller can stop retrying a job that keeps failing.

Only PutObject conditions are used: moto ignores conditions on CopyObject, and a copy-based
claim would quietly stop being exclusive there.

A claim is read from the bucket, so it is untrusted input: whatever is in it (NaN, ``1e400``,
deep nesting, a string where a number goes) is read as "no usable claim" field by field, and
an expiry too far in the future to be real is treated as expired rather than blocking its job.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

from processor.errors import (
    JsonLimitError,
    LeaseLost,
    ObjectNotFound,
    PreconditionFailed,
    StorageError,
)
from processor.safejson import load_json
from processor.settings import normalise_prefix
from processor.storage.base import Storage, validate_key

log = logging.getLogger(__name__)

HELD = "held"
RELEASED = "released"
MAX_COUNT = 1_000_000  # attempts and tries read from a claim are clamped to this
# A live claim expires at most this many of our own leases from now; a later expiry cannot have
# been written by a worker renewing a lease, so it is treated as expired, not as a lock forever.
PLAUSIBLE_LEASES = 10
MAX_ERROR_CHARS = 2000
RENEW_RETRY = 1.0  # seconds between renewals while they fail


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
    tries: int = 1
    took_over: bool = False  # the previous holder's lease had run out: it died or hung


@dataclass(frozen=True)
class Taken:
    """Another worker holds a live claim; it may be worth trying again after ``expires_at``."""

    holder: str
    expires_at: float


@dataclass(frozen=True)
class ClaimState:
    """What a stored claim says, each field already made safe to use."""

    holder: str
    attempt: int
    tries: int
    expires_at: float
    state: str
    last_error: str | None

    @classmethod
    def parse(cls, data: bytes) -> ClaimState:
        """A claim we cannot read at all is treated as expired rather than blocking its job."""
        try:
            value = load_json(data, max_depth=4)
        except JsonLimitError:
            value = {}
        document = value if isinstance(value, dict) else {}
        last_error = document.get("last_error")
        if last_error is not None:
            last_error = str(last_error)[:MAX_ERROR_CHARS] if _is_scalar(last_error) else None
        holder = document.get("holder")
        state = document.get("state")
        return cls(
            holder=holder[:200] if isinstance(holder, str) else "?",
            attempt=_count(document.get("attempt")),
            tries=_count(document.get("tries", document.get("attempt"))),
            expires_at=_number(document.get("expires_at")),
            state=state if state in (HELD, RELEASED) else "",
            last_error=last_error,
        )


class Heartbeat:
    """What :meth:`ClaimStore.heartbeat` yields: call it for the latest lease.

    Losing the lease does not cancel the job (a half-written output is worse than a duplicate
    run); the caller looks at :attr:`lost` after the block and decides.
    """

    def __init__(self, lease: Lease) -> None:
        self._lease = lease
        self.lost: LeaseLost | None = None
        self.renewals = 0
        self._stop: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    def __call__(self) -> Lease:
        return self._lease

    def check(self) -> Lease:
        """The latest lease, or :class:`LeaseLost` if it was taken from us."""
        if self.lost is not None:
            raise self.lost
        return self._lease

    async def halt(self) -> None:
        """Stop renewing, and let a renewal in flight land first: after this, calling the
        heartbeat gives the lease as stored, which is what a release must match. Without it a
        release could race a renewal (likely just after an outage, when both were retrying),
        fail on the renewal's new etag, and leave the claim held for a whole lease."""
        if self._stop is not None and self._task is not None:
            self._stop.set()
            await self._task


class ClaimStore:
    def __init__(
        self,
        storage: Storage,
        prefix: str,
        holder: str,
        lease_seconds: float,
        *,
        clock: Callable[[], float] = time.time,
        on_renewed: Callable[[], None] | None = None,
    ) -> None:
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be positive")
        self._storage = storage
        self._prefix = normalise_prefix(prefix)
        self._holder = holder
        self._lease_seconds = lease_seconds
        self._clock = clock
        self._on_renewed = on_renewed  # storage answered: for health checks

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
        tries: int,
        expires_at: float,
        state: str,
        last_error: str | None,
        token: str,
    ) -> bytes:
        body = {
            "name": name,
            "holder": self._holder,
            "attempt": attempt,
            "tries": tries,
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
        tries: int,
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
                self._document(name, attempt, tries, expires_at, state, last_error, token),
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
            if _token(current.data) == token:
                return current.etag
            raise

    async def acquire(self, name: str) -> Lease | Taken:
        """Take the job unless someone holds a live claim on it.

        The create is tried first: for a job nobody has claimed yet (nearly every job) that is
        the only request. Only when a claim exists is it read, to see whether it expired or was
        given back.
        """
        key = self.key_for(name)
        expires_at = self._clock() + self._lease_seconds
        try:
            etag = await self._write(
                name,
                key,
                attempt=1,
                tries=1,
                expires_at=expires_at,
                state=HELD,
                last_error=None,
                if_none_match=True,
            )
            return Lease(name, key, self._holder, 1, expires_at, etag, None, 1)
        except PreconditionFailed:
            pass
        try:
            current = await self._storage.get(key)
        except ObjectNotFound:
            # Held a moment ago and deleted since: its holder retired the manifest (a claim is
            # deleted last). Creating it again would only find the manifest gone; a listing
            # offers the name again if it is still there.
            return Taken("?", self._clock())
        return await self._take_over(name, key, current.data, current.etag)

    async def _take_over(self, name: str, key: str, data: bytes, etag: str) -> Lease | Taken:
        previous = ClaimState.parse(data)
        now = self._clock()
        horizon = now + PLAUSIBLE_LEASES * self._lease_seconds
        if previous.state == HELD and now < previous.expires_at:
            if previous.expires_at <= horizon:
                return Taken(previous.holder, previous.expires_at)
            log.warning(
                "claim %s expires at %s, further ahead than any lease; treating it as expired",
                key,
                previous.expires_at,
            )
        attempt = min(previous.attempt, MAX_COUNT) + 1
        tries = min(max(previous.tries, previous.attempt), MAX_COUNT) + 1
        expires_at = now + self._lease_seconds
        try:
            new_etag = await self._write(
                name,
                key,
                attempt=attempt,
                tries=tries,
                expires_at=expires_at,
                state=HELD,
                last_error=previous.last_error,
                if_match=etag,
            )
        except PreconditionFailed:
            return Taken(previous.holder, now)
        return Lease(
            name,
            key,
            self._holder,
            attempt,
            expires_at,
            new_etag,
            previous.last_error,
            tries,
            took_over=previous.state == HELD,
        )

    async def renew(self, lease: Lease) -> Lease:
        expires_at = self._clock() + self._lease_seconds
        try:
            etag = await self._write(
                lease.name,
                lease.key,
                attempt=lease.attempt,
                tries=lease.tries,
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

    async def release(
        self, lease: Lease, *, error: str | None, charge: bool = True, count_try: bool = True
    ) -> None:
        """Give the job back (e.g. after a failure) so any worker may retry it at once.

        The attempt count stays, so the next holder knows how many tries went before, unless
        ``charge`` is false: a try the job was not to blame for (its worker stopped, ComfyUI
        died running another job) is taken back. ``count_try`` false takes the try back too
        (a worker that cannot run the job at all left it for another; a time limit bounds
        that instead). A release without an error keeps the previous one.
        """
        last_error = error[:MAX_ERROR_CHARS] if error is not None else lease.last_error
        try:
            await self._write(
                lease.name,
                lease.key,
                attempt=lease.attempt if charge else lease.attempt - 1,
                tries=lease.tries if count_try else lease.tries - 1,
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
            wait = interval
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), wait)
                    return
                try:
                    beat._lease = await self.renew(beat._lease)
                    beat.renewals += 1
                    wait = interval
                    if self._on_renewed is not None:
                        self._on_renewed()
                except LeaseLost as lost:
                    log.warning("%s", lost)
                    beat.lost = lost
                    return
                except Exception as error:
                    # Transient: the lease is still ours until it expires. Try again soon, not
                    # a tick later: a storage outage longer than a third of a lease spans two
                    # ticks, the third comes as the lease runs out, and another worker would
                    # take over (and run again) a job this one is still running.
                    if wait == interval:  # the first failure of a run of them is enough to say
                        log.warning("renewing claim %s failed: %s", lease.key, error)
                    wait = min(interval, RENEW_RETRY)

        task = asyncio.create_task(run(), name=f"heartbeat {lease.key}")
        beat._stop, beat._task = stop, task
        try:
            yield beat
        finally:
            stop.set()
            # Let an in-flight renewal finish: cancelling it could leave a new etag on the
            # server that we never learn, and our own release would then look like a loss.
            await task


def _token(data: bytes) -> object:
    try:
        value = load_json(data, max_depth=4)
    except JsonLimitError:
        return None
    return value.get("token") if isinstance(value, dict) else None


def _is_scalar(value: object) -> bool:
    return isinstance(value, str | int | float | bool)


def _number(value: object) -> float:
    """A finite float, or 0.0 (long expired) for anything else."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    number = float(value) if abs(value) < 1e300 else 0.0
    return number if math.isfinite(number) else 0.0


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    number = _number(value)
    return int(max(0.0, min(number, float(MAX_COUNT))))
