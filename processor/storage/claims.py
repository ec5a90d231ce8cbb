"""Claims: which worker runs which job, decided by conditional writes on the storage itself.

A claim is a small JSON document at ``<prefix>/<name>.json`` with ``name``, ``holder``,
``attempt`` (tries the job was to blame for), ``tries`` (every try, counted or not),
``state`` (held/released), ``last_error``, ``expires_at`` and a per-write ``token``. Creating
it with ``If-None-Match: *`` and replacing it with ``If-Match: <etag>`` makes the storage the
referee: of many workers racing for one job, exactly one write succeeds, with no lock service.

**Leases trust no worker's clock.** A holder renews its claim every third of a lease; each
renewal is a new document with a new ETag and a new LastModified. Another worker may take a
held claim over (with ``If-Match`` on the ETag it read, so of many only one wins) when either
says that three renewals were missed:

- **watching**: it has seen the same ETag for a whole lease on its own monotonic clock
  (:class:`ClaimWatch`): no clock is compared with another's at all;
- **the store's clock**: the claim's LastModified is more than a lease (and a margin for
  whole-second timestamps) behind the store's present time, which the worker reads from the
  ``Date`` of the store's own answers. Both times are the store's, so a worker's skew cancels
  out; this is how a worker that has just started (``run --once``, a drain) can tell a dead
  worker's claim from a live one without first watching it for a lease.

Nobody compares ``expires_at`` with a clock: it is written for people, in the writer's time.
So two workers whose clocks are minutes apart agree on who holds what, and a worker whose clock
jumps (NTP, a resumed VM) neither steals live claims nor loses its own.

``tries`` grows by one at every acquisition (a takeover, a claim after a give-back): it is the
**fencing token** of an attempt. What an attempt writes carries it (outputs go to keys of the
try, the status says which try wrote it), so a later try's writes cannot be buried by an
earlier one that wakes up late; see :mod:`processor.job.status_book`.

Only PutObject conditions are used: moto ignores conditions on CopyObject, and a copy-based
claim would quietly stop being exclusive there.

A claim is read from the bucket, so it is untrusted input: whatever is in it (NaN, ``1e400``,
deep nesting, a string where a number goes) is read as "no usable claim" field by field.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from datetime import datetime

from processor.errors import (
    JsonLimitError,
    LeaseLost,
    ObjectNotFound,
    PreconditionFailed,
    StorageError,
)
from processor.safejson import load_json
from processor.settings import normalise_prefix
from processor.storage.base import Storage, StoredObject, validate_key

log = logging.getLogger(__name__)

HELD = "held"
RELEASED = "released"
MAX_COUNT = 1_000_000  # attempts and tries read from a claim are clamped to this
MAX_ERROR_CHARS = 2000
RENEW_RETRY = 1.0  # seconds between renewals while they fail
MAX_WATCHED = 10_000  # claims a watch remembers; the oldest sightings are forgotten first
# A holder may write for its attempt while its last renewal is younger than this share of a
# lease: nobody can take the claim over before a whole lease has passed since then, and the
# rest is the margin for the write itself to land. Older, it renews first (a conditional
# write that fails if the claim was taken over): that is the fence.
FRESH_SHARE = 0.5


def boot_clock() -> float:
    """Seconds on a clock that never goes back and keeps counting while the machine or VM is
    suspended (CLOCK_BOOTTIME where there is one): a frozen worker must see the time it lost."""
    if hasattr(time, "CLOCK_BOOTTIME"):
        return time.clock_gettime(time.CLOCK_BOOTTIME)
    return time.monotonic()  # pragma: no cover - not Linux


# Whole-second LastModified and Date stamps, and the time a request takes: the store-clock rule
# waits this much past a lease before it calls a claim stale.
STORE_CLOCK_MARGIN = 2.0


def age_by_store(storage: Storage, last_modified: datetime | None) -> float | None:
    """Seconds since ``last_modified`` by the store's own clock (estimated from its answers'
    ``Date``), or None while the store's clock (or the time of the write) is unknown."""
    offset = storage.clock_offset()
    if offset is None or last_modified is None:
        return None
    return time.time() + offset - last_modified.timestamp()


class ClaimWatch:
    """Sightings of other workers' claims: since when (this worker's monotonic clock) each
    claim has shown the same ETag. A claim whose ETag stays the same for a lease is dead.

    Fed by every read of a claim (a claim attempt, a HEAD) and by every listing of the claims
    prefix, which carries ETags for free. Bounded: the oldest sightings go first.
    """

    def __init__(self, clock: Callable[[], float] = boot_clock) -> None:
        self._clock = clock
        self._seen: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def unchanged_for(self, key: str, etag: str) -> float:
        """Record a sighting of ``key`` with ``etag``; seconds it has shown that ETag (0 when
        it is new or changed since the last sighting)."""
        now = self._clock()
        seen = self._seen.get(key)
        if seen is None or seen[0] != etag:
            self._seen[key] = (etag, now)
            self._seen.move_to_end(key)
            while len(self._seen) > MAX_WATCHED:
                self._seen.popitem(last=False)
            return 0.0
        return max(0.0, now - seen[1])

    def forget(self, key: str) -> None:
        self._seen.pop(key, None)


@dataclass(frozen=True)
class Lease:
    """Proof of holding a claim: the etag is what the next conditional write must match.
    ``tries`` is the attempt's fencing token; ``expires_at`` is for people (writer's clock)."""

    name: str
    key: str
    holder: str
    attempt: int
    expires_at: float
    etag: str
    last_error: str | None
    tries: int = 1
    took_over: bool = False  # the previous holder stopped renewing: it died or hung
    renewed_at: float = 0.0  # boot_clock() when this lease was last written by its holder


@dataclass(frozen=True)
class Taken:
    """Another worker holds a live claim; worth trying again in ``recheck_in`` seconds (when
    it will have been watched unchanged for a lease, if its holder stops renewing)."""

    holder: str
    recheck_in: float


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
    """What :meth:`ClaimStore.heartbeat` yields: call it for the latest lease, and
    ``await ensure()`` before a write of the attempt to make sure the claim is still ours.

    Losing the lease does not cancel the job (a half-written output is worse than a duplicate
    run); the caller looks at :attr:`lost` after the block and decides, and every write of the
    attempt is fenced by :meth:`ensure`.
    """

    def __init__(self, lease: Lease, store: ClaimStore) -> None:
        self._lease = lease
        self._store = store
        self.lost: LeaseLost | None = None
        self.renewals = 0
        self._renewing = asyncio.Lock()  # one renewal at a time: two would fail each other
        self._stop: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    def __call__(self) -> Lease:
        return self._lease

    @property
    def tries(self) -> int:
        """The attempt's fencing token: what its writes carry."""
        return self._lease.tries

    def check(self) -> Lease:
        """The latest lease, or :class:`LeaseLost` if it was taken from us."""
        if self.lost is not None:
            raise self.lost
        return self._lease

    def fresh(self) -> bool:
        """Renewed recently enough that nobody can take the claim over before a write started
        now has landed (see :data:`FRESH_SHARE`)."""
        age = self._store.clock() - self._lease.renewed_at
        return age < FRESH_SHARE * self._store.lease_seconds

    async def ensure(self) -> Lease:
        """Before a write of this attempt: the lease, renewed first unless it is fresh; raises
        :class:`LeaseLost` (and remembers it) if another worker took the claim over. A worker
        that was frozen past its lease finds out here, before it publishes anything."""
        self.check()
        if not self.fresh():
            await self.renew(unless_fresh=True)
        return self.check()

    async def renew(self, *, unless_fresh: bool = False) -> None:
        """Renew now; LeaseLost (remembered) if the claim was taken over. ``unless_fresh``:
        not if a renewal that landed while this one waited its turn made the lease fresh."""
        async with self._renewing:
            self.check()
            if unless_fresh and self.fresh():
                return
            try:
                self._lease = await self._store.renew(self._lease)
            except LeaseLost as lost:
                self.lost = lost
                raise
            self.renewals += 1
            self._store.renewed()

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
        clock: Callable[[], float] = boot_clock,
        wall_clock: Callable[[], float] = time.time,
        watch: ClaimWatch | None = None,
        on_renewed: Callable[[], None] | None = None,
    ) -> None:
        """``clock`` times leases (how long a claim was seen unchanged, how fresh our own is);
        ``wall_clock`` only writes the informational ``expires_at``."""
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be positive")
        self._storage = storage
        self._prefix = normalise_prefix(prefix)
        self._holder = holder
        self._lease_seconds = lease_seconds
        self._clock = clock
        self._wall = wall_clock
        self.watch = watch or ClaimWatch(clock)
        self._on_renewed = on_renewed  # storage answered: for health checks

    @property
    def lease_seconds(self) -> float:
        return self._lease_seconds

    def clock(self) -> float:
        return self._clock()

    def renewed(self) -> None:
        """A renewal landed: storage answers (for health checks)."""
        if self._on_renewed is not None:
            self._on_renewed()

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
        expires_at = self._wall() + self._lease_seconds
        written = self._clock()
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
            return Lease(name, key, self._holder, 1, expires_at, etag, None, 1, renewed_at=written)
        except PreconditionFailed:
            pass
        try:
            current = await self._storage.get(key)
        except ObjectNotFound:
            # Held a moment ago and deleted since: its holder retired the manifest (a claim is
            # deleted last). Creating it again would only find the manifest gone; a listing
            # offers the name again if it is still there.
            self.watch.forget(key)
            return Taken("?", 0.0)
        return await self._take_over(name, key, current)

    def _stale(self, key: str, holder: str, current: StoredObject) -> float:
        """0 when the held claim ``current`` missed its renewals (see the module's docstring),
        else seconds until it will have, if its holder stops renewing now."""
        lease = self._lease_seconds
        quiet = self.watch.unchanged_for(key, current.etag)
        age = age_by_store(self._storage, current.last_modified)
        if quiet >= lease:
            why = f"has not changed for {quiet:.0f} s here"
        elif age is not None and age >= lease + STORE_CLOCK_MARGIN:
            why = f"was last written {age:.0f} s ago by the store's clock"
        else:
            wait = lease - quiet
            if age is not None:
                wait = min(wait, lease + STORE_CLOCK_MARGIN - age)
            return max(wait, 0.05)
        log.warning("claim %s of %s %s (a lease is %g s): taking it over", key, holder, why, lease)
        return 0.0

    async def _take_over(self, name: str, key: str, current: StoredObject) -> Lease | Taken:
        previous = ClaimState.parse(current.data)
        etag = current.etag
        if previous.state == HELD:
            wait = self._stale(key, previous.holder, current)
            if wait > 0:
                return Taken(previous.holder, wait)
        attempt = min(previous.attempt, MAX_COUNT) + 1
        tries = min(max(previous.tries, previous.attempt), MAX_COUNT) + 1
        expires_at = self._wall() + self._lease_seconds
        written = self._clock()
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
            return Taken(previous.holder, 0.0)  # another watcher won the race
        self.watch.forget(key)
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
            renewed_at=written,
        )

    async def renew(self, lease: Lease) -> Lease:
        expires_at = self._wall() + self._lease_seconds
        written = self._clock()  # before the write: the lease runs from no later than this
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
        return replace(lease, expires_at=expires_at, etag=etag, renewed_at=written)

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
                expires_at=self._wall(),
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
        beat = Heartbeat(lease, self)
        stop = asyncio.Event()
        interval = self._lease_seconds / 3

        async def run() -> None:
            failing = False
            while not stop.is_set():
                wait = RENEW_RETRY if failing else beat().renewed_at + interval - self.clock()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), min(interval, max(0.0, wait)))
                    return
                if not failing and beat().renewed_at + interval > self.clock():
                    continue  # renewed meanwhile (a write of the attempt ensured it)
                try:
                    await beat.renew()
                    failing = False
                except LeaseLost as lost:
                    log.warning("%s", lost)
                    return
                except Exception as error:
                    # Transient: the lease is still ours until a lease passes unrenewed. Try
                    # again soon, not a tick later: a storage outage longer than a third of a
                    # lease spans two ticks, the third comes as the lease runs out, and another
                    # worker would take over (and run again) a job this one is still running.
                    if not failing:  # the first failure of a run of them is enough to say
                        log.warning("renewing claim %s failed: %s", lease.key, error)
                    failing = True

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
