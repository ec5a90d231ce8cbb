"""Which manifest to try next, without ever reading the whole backlog.

A poll used to list the whole intake prefix before claiming anything, then walk that list while
other workers emptied it: the first claim waited for a listing that grows with the backlog, and
most claims of a shared backlog went to manifests another worker had already finished. Here a
worker reads one page at a time:

- **hints** first: keys an event named (S3 notifications, a RunPod request), claimed at once;
- **due** keys next: this worker's own retries once their delay is over, and manifests it found
  claimed by another worker, once that claim's lease has run out and if they are still there;
- **stale claims**: every so often the claims prefix (it holds only work in flight, so it stays
  small) is read, and a claim nobody has renewed for a while is tried, so a dead worker's job is
  taken over soon after its lease expires however large the backlog;
- **the listing**: one page of the intake prefix at a time, starting at a point of the key space
  picked at random once the first page shows what the names look like, so workers sharing a
  backlog read different pages (a point past the last name is drawn again below it, so the
  start is spread over the names that exist, however few of the guessed range they fill). A
  page is shuffled, used until it is empty or older than ``page_max_age`` (then read again from
  the same point), and the next page starts where it ended, wrapping round at the end of the
  prefix. A key of the page that another worker turns out to hold or to have finished means
  two workers share the page: this one leaves it for another random point. And a key this
  worker finished after its page was listed is not offered from that page again.

**Priority** is in the names (:func:`processor.storage.layout.priority_name`): a manifest of
priority above 0 is named ``!<ppp>.<name>.json`` and so sorts at the head of the prefix, one
below 0 ``~<ppp>.<name>.json``, at its tail. So a page that starts at the head shows them first,
and the head is listed on its own, at most once per ``page_max_age`` and only while the page in
use starts elsewhere, to offer them before anything of the page: highest priority first, ties
oldest first (their listing dates). Within any page, low-priority names come last. No manifest
is read to learn its priority; a busy worker pays at most one more LIST per ``page_max_age``.

A **sweep** is one pass over the whole key space from where it began. :meth:`Intake.next`
answers ``None`` once per completed sweep, which is how a drain (``--once``, RunPod) knows that
it has seen everything: its cost is a pass of pages, never a full listing per claim.
"""

from __future__ import annotations

import asyncio
import bisect
import enum
import heapq
import random
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import PurePosixPath

from processor.logsafe import printable_logger
from processor.storage.base import ObjectInfo, Storage
from processor.storage.claims import STORE_CLOCK_MARGIN, ClaimWatch, age_by_store
from processor.storage.layout import Layout, split_priority

log = printable_logger("comfys3.intake")

MAX_PAGE = 1000
MIN_PAGE = 50
MAX_DRAWS = 20  # random start points tried before starting at the first page
MAX_REMEMBERED = 10_000  # due keys and pending hints kept in memory; beyond, the listing finds them
# A claim seen unchanged for this share of a lease missed a renewal (holders renew every third).
STALE_SHARE = 2 / 3
HEAD_PAGE = 100  # keys read from the head for prioritised manifests
CONTESTED_FOR = 10.0  # seconds after a key was found taken that a worker claims sparingly


def priority_of(key: str) -> int:
    """The priority a manifest's key carries (0 for a plain name)."""
    return split_priority(PurePosixPath(key).stem)[0]


class HintOutcome(enum.Enum):
    """What became of a hinted key, so whoever sent the hint knows when to forget it."""

    settled = "settled"  # this worker ran it and it reached its end
    taken = "taken"  # another worker holds it and will see it through
    gone = "gone"  # no pending manifest at that key
    released = "released"  # this worker ran it and gave it back for another try
    ignored = "ignored"  # not a manifest key of this intake


HintCallback = Callable[[HintOutcome], Awaitable[None]]


@dataclass(frozen=True)
class Candidate:
    key: str
    source: str  # hint | due | claims | priority | listing | request


class Intake:
    def __init__(
        self,
        storage: Storage,
        layout: Layout,
        *,
        lease_seconds: float,
        page_max_age: float = 2.0,
        claims_scan_interval: float | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        watch: ClaimWatch | None = None,
    ) -> None:
        self.storage = storage
        self.layout = layout
        self.lease_seconds = lease_seconds
        self.page_max_age = page_max_age
        self.claims_scan_interval = claims_scan_interval or max(1.0, lease_seconds / 3)
        self._rng = rng or random.Random()
        self._clock = clock
        self.watch = watch or ClaimWatch(clock)
        self._hints: OrderedDict[str, list[HintCallback]] = OrderedDict()  # not yet offered
        self._hint_waiting: dict[str, list[HintCallback]] = {}  # offered, outcome to come
        self._due: list[tuple[float, str]] = []  # heap of (monotonic time, key)
        self._due_at: dict[str, float] = {}
        self._retries: set[str] = set()  # due keys that are this worker's own retries
        self._stale_claims: deque[tuple[str, str]] = deque()  # (manifest, claim)
        self._next_claims_scan = self._clock()
        # The listing: the page in use, where it started, where the next one starts.
        self._page: list[ObjectInfo] = []
        self._page_start: str | None = None
        self._page_end: str | None = None  # last key of the page in use
        self._page_truncated = False
        self._page_listed_at = float("-inf")
        self._page_sent_at = float("-inf")  # when the request for the page in use was sent
        self._cursor: str | None = None
        self._spread_done = False
        # The names' shape, guessed from the first page, and the value below which no key
        # was found (a random point is drawn under it): see :class:`KeySpace`.
        self._space: KeySpace | None = None
        self._ceiling: int | None = None
        self._leave_page = False  # another worker shares this page: go elsewhere
        self._met_others_at = float("-inf")  # when a key was last found taken by another
        self._from_listing_offered: set[str] = set()  # offered from a page, outcome to come
        self._settled: OrderedDict[str, float] = OrderedDict()  # key -> when it ended here
        # The sweep in progress: where it began, and whether it has wrapped round.
        self._origin: str | None = None
        self._wrapped = False
        self._page_size = 100
        self._taken_per_page: deque[int] = deque(maxlen=8)
        self._taken_this_page = 0
        # Prioritised manifests from the head of the prefix, highest first, and when that
        # was listed (by a page that starts there, or on its own).
        self._head: deque[ObjectInfo] = deque()
        self._head_sent_at = float("-inf")
        self._head_offered: set[str] = set()
        self.hinted = asyncio.Event()
        self.lists = 0  # LIST requests made, for benchmarks and the ops page
        self.seen_pending = 0  # manifests in the latest page: at least this many wait

    # -- what others tell the intake ------------------------------------------------------

    def hint(self, key: str, on_outcome: HintCallback | None = None) -> None:
        """Try ``key`` ahead of anything listed; ``on_outcome`` hears what became of it."""
        callbacks = [on_outcome] if on_outcome is not None else []
        if key in self._hint_waiting:  # already being tried: hear the same outcome
            self._hint_waiting[key] += callbacks
            return
        self._hints.setdefault(key, []).extend(callbacks)
        if len(self._hints) > MAX_REMEMBERED:
            # Too many at once: the oldest waits for the listing, and its sender hears that
            # it was not settled here (an SQS message then comes back later).
            dropped, dropped_callbacks = self._hints.popitem(last=False)
            self._hint_waiting[dropped] = dropped_callbacks
            asyncio.get_running_loop().create_task(self.report(dropped, HintOutcome.released))
        self.hinted.set()

    def retry_at(self, key: str, delay: float) -> None:
        """This worker gave ``key`` back; offer it again after ``delay`` seconds."""
        self._schedule(key, self._clock() + max(0.0, delay))
        if key in self._due_at:
            self._retries.add(key)

    def put_off(self, key: str, delay: float) -> None:
        """Offer ``key`` again only after ``delay`` seconds, and not as this worker's own retry
        (a drain does not wait for it): it was left for other workers."""
        self._schedule(key, self._clock() + max(0.0, delay))
        self._retries.discard(key)

    def held(self, key: str, recheck_in: float) -> None:
        """Another worker holds ``key``; look again in ``recheck_in`` seconds, when its claim
        will have been watched unchanged for a lease if that worker stopped renewing it. A hold
        that has already ended (a claim lost in a race, or deleted as its manifest was
        retired) is not scheduled: the listing offers the key again if it is still pending."""
        if recheck_in <= 0:
            self.forget(key)
            return
        self._schedule(key, self._clock() + min(recheck_in, 10 * self.lease_seconds) + 0.05)
        self._retries.discard(key)

    def forget(self, key: str) -> None:
        self._due_at.pop(key, None)
        self._retries.discard(key)

    def contested(self) -> bool:
        """Whether another worker took a key this one tried, within :data:`CONTESTED_FOR`
        seconds. A worker fills its lane with several claims at once, all from one page;
        where others list the same keys (the end of a backlog, or a fleet keeping up with
        arrivals, where every idle worker sees each new manifest), many workers each firing
        a lane's worth of claims at the same few keys waste most of them, and one that wins
        several holds them from idle workers (bench/fleet.py). While contested, the worker
        loop claims one key at a time and holds no more than one claim ahead per lane."""
        return self._clock() - self._met_others_at < CONTESTED_FOR

    def retry_due(self) -> float | None:
        """When the earliest of this worker's own retries is due (monotonic), if any. Keys
        held by other workers are not counted: a drain does not wait for their leases."""
        return min((self._due_at[key] for key in self._retries), default=None)

    def _schedule(self, key: str, at: float) -> None:
        if key not in self._due_at and len(self._due_at) >= MAX_REMEMBERED:
            return
        self._due_at[key] = at
        heapq.heappush(self._due, (at, key))

    # -- what the worker asks -------------------------------------------------------------

    async def next(self, busy: Callable[[str], bool], *, listing: bool = True) -> Candidate | None:
        """The next key worth a claim, or ``None`` when a sweep of the whole prefix is done.

        ``listing=False`` offers only hints, due keys and stale claims: with S3 events the
        trigger names the keys, and the prefix is listed only when its fallback is due."""
        while self._hints:
            key, callbacks = self._hints.popitem(last=False)
            self._hint_waiting.setdefault(key, []).extend(callbacks)
            if busy(key):
                continue  # already in flight here; its outcome is reported when it ends
            if not self.layout.is_manifest(key):
                await self.report(key, HintOutcome.ignored)
                continue
            return Candidate(key, "hint")
        self.hinted.clear()
        now = self._clock()
        while self._due and self._due[0][0] <= now:
            at, key = heapq.heappop(self._due)
            if self._due_at.get(key) != at:
                continue  # rescheduled or forgotten since
            del self._due_at[key]
            self._retries.discard(key)
            if busy(key):
                continue
            # Time has passed since the key was put off (another worker held it, or storage
            # refused us): that worker may well have finished it. A HEAD says so for one
            # request; claiming would cost three (create, read, delete) and be a claim wasted
            # on a finished manifest.
            if await self.storage.head(key) is None:
                continue
            return Candidate(key, "due")
        # Also while the intake is empty: a claim whose manifest is gone (its holder died while
        # retiring it) is found here and removed.
        if now >= self._next_claims_scan:
            self._next_claims_scan = now + self.claims_scan_interval
            await self._scan_claims()
        while self._stale_claims:
            key, claim_key = self._stale_claims.popleft()
            if busy(key) or key in self._due_at:
                continue
            # Its job may have ended since the scan (right after an outage, many claims look
            # stale and are settled moments later): a HEAD of the claim costs one request, a
            # claim on a finished manifest three, and counts as wasted.
            if await self.storage.head(claim_key) is not None:
                return Candidate(key, "claims")
        if not listing:
            return None
        head = await self._from_head(busy)
        if head is not None:
            return head
        return await self._from_listing(busy)

    async def report(self, key: str, outcome: HintOutcome) -> None:
        """Tell whoever hinted ``key`` what became of it; a no-op for keys nobody hinted.

        A listed key found taken or gone says the page in use is stale: other workers are
        finishing what it lists, so it is read again before the next pick rather than walked
        on (each wasted claim costs requests; a fresh page costs one). If the key was of the
        page in use, another worker is reading that very page: this one leaves it for another
        random point (see :meth:`_leave`) rather than try, one by one, the keys the other is
        taking. A key this worker ran to its end (``settled``) is not offered again by a page
        listed before that.
        """
        if outcome is HintOutcome.taken:
            self._met_others_at = self._clock()
        from_head = key in self._head_offered
        self._head_offered.discard(key)
        if (
            outcome in (HintOutcome.taken, HintOutcome.gone)
            and not from_head
            and self._page_listed_at > float("-inf")
        ):
            self._page_listed_at = min(
                self._page_listed_at, self._clock() - self.page_max_age - 1.0
            )
        if key in self._from_listing_offered:
            self._from_listing_offered.discard(key)
            if outcome in (HintOutcome.taken, HintOutcome.gone) and self._in_page(key):
                self._leave_page = True
        if outcome is HintOutcome.settled:
            self._settled[key] = self._clock()
            self._settled.move_to_end(key)
            while len(self._settled) > MAX_REMEMBERED:
                self._settled.popitem(last=False)
        for callback in self._hint_waiting.pop(key, []):
            try:
                await callback(outcome)
            except Exception as error:  # a hint source's trouble is its own
                log.warning("hint callback for %s failed: %s", key, error)

    # -- internals ------------------------------------------------------------------------

    async def _scan_claims(self) -> None:
        """Claims that missed a renewal: their holder may be dead, or gave the job back. One
        page of the claims prefix, which holds only work in flight; its ETags feed the claim
        watch, so no clock is compared with another's (see :mod:`processor.storage.claims`)."""
        page = await self.storage.list_page(self.layout.claims_prefix, limit=MAX_PAGE)
        self.lists += 1
        for item in page.items:
            if not item.key.endswith(".json"):
                continue
            quiet = self.watch.unchanged_for(item.key, item.etag)
            age = age_by_store(self.storage, item.last_modified)
            if quiet >= STALE_SHARE * self.lease_seconds or (
                age is not None and age >= STALE_SHARE * self.lease_seconds + STORE_CLOCK_MARGIN
            ):
                name = self.layout.manifest_name(item.key)
                self._stale_claims.append((self.layout.manifest_key(name), item.key))

    async def _from_head(self, busy: Callable[[str], bool]) -> Candidate | None:
        """A prioritised manifest, if the head of the prefix holds one. The head is listed on
        its own only when the page in use starts elsewhere and the head's view is older than
        ``page_max_age``; before the first page (which starts at the head) it waits for it."""
        stale = self._clock() - self._head_sent_at > self.page_max_age
        if stale and self._page_listed_at > float("-inf") and self._page_start is not None:
            self._head_sent_at = self._clock()
            page = await self.storage.list_page(self.layout.input_dir, limit=HEAD_PAGE)
            self.lists += 1
            self._take_head(page.items)
        return self._pop_head(busy)

    def _pop_head(self, busy: Callable[[str], bool]) -> Candidate | None:
        while self._head:
            item = self._head.popleft()
            if (
                not busy(item.key)
                and item.key not in self._due_at
                and self._settled.get(item.key, float("-inf")) < self._head_sent_at
            ):
                if len(self._head_offered) >= MAX_REMEMBERED:
                    self._head_offered.clear()
                self._head_offered.add(item.key)
                return Candidate(item.key, "priority")
        return None

    def _take_head(self, items: list[ObjectInfo]) -> None:
        """The prioritised manifests of a listing of the head, in claim order."""
        raised = [
            item
            for item in items
            if self.layout.is_manifest(item.key) and priority_of(item.key) > 0
        ]
        raised.sort(key=_claim_order, reverse=True)
        self._head = deque(raised)

    async def _from_listing(self, busy: Callable[[str], bool]) -> Candidate | None:
        while True:
            if self._leave_page:
                self._leave_page = False
                await self._leave()
            elif self._page and self._clock() - self._page_listed_at > self.page_max_age:
                await self._list(self._page_start)  # same place again: see what is left
            head = self._pop_head(busy)  # a page that starts at the head found some
            if head is not None:
                return head
            while self._page:
                item = self._page.pop()
                if (
                    self.layout.is_manifest(item.key)
                    and not busy(item.key)
                    and item.key not in self._due_at
                    and self._settled.get(item.key, float("-inf")) < self._page_sent_at
                ):
                    self._taken_this_page += 1
                    if len(self._from_listing_offered) >= MAX_REMEMBERED:
                        self._from_listing_offered.clear()
                    self._from_listing_offered.add(item.key)
                    return Candidate(item.key, "listing")
            if self._page_listed_at > float("-inf") and self._advance():
                return None  # a sweep is complete
            await self._list(self._cursor)
            # Spread once the intake first holds more than a page, not at the first listing:
            # a fleet that starts idle would otherwise never spread, and every worker would
            # claim from the first page of the backlog when it comes.
            if not self._spread_done and self._page_truncated:
                plain = sorted(item.key for item in self._page if priority_of(item.key) == 0)
                if len(plain) >= 2:
                    self._spread_done = True
                    self._space = KeySpace.guess(plain)
                    await self._list_from_random_point()

    def _in_page(self, key: str) -> bool:
        return (self._page_start is None or key > self._page_start) and (
            self._page_end is not None and key <= self._page_end
        )

    async def _list_from_random_point(self) -> bool:
        """Start a sweep at a random point of the names' range; True if one was found.

        The first page shows where names start, not where they end: ``job0000000`` ..
        ``job0000099`` may begin a thousand names or ten million. A point with nothing after
        it lowers the ceiling and another is drawn under it, so the point found is uniform over
        the names that exist, for about ln(guessed range / real range) empty LISTs, once.
        When every draw misses, the sweep starts past the last key and so wraps round to the
        first page: the same pass, from the start.
        """
        if self._space is None:
            return False
        for _ in range(MAX_DRAWS):
            drawn = self._space.draw(self._rng, below=self._ceiling)
            if drawn is None:
                return False
            value, start = drawn
            self._origin = self._cursor = start
            self._wrapped = False
            await self._list(start)
            if self._page or self._page_truncated:
                return True
            self._ceiling = value  # nothing at or after it
        return False

    async def _leave(self) -> None:
        """Another worker is on this page. Both trying its keys in their own random order
        wastes a claim on almost every key, and two workers on one page stay together page
        after page. So this one starts a new sweep at another random point; one LIST, and the
        sweep is whole again from there (a drain still ends only after a clean pass)."""
        self._taken_per_page.append(self._taken_this_page)
        self._taken_this_page = 0
        if not await self._list_from_random_point():
            await self._list(self._page_start)

    def _advance(self) -> bool:
        """Move past the page just used up; True when that completes a sweep."""
        self._taken_per_page.append(self._taken_this_page)
        self._taken_this_page = 0
        self._page_listed_at = float("-inf")
        if not self._page_truncated:
            self._cursor = None
            if self._origin is None or self._wrapped:
                self._new_sweep()
                return True
            self._wrapped = True
            return False
        self._cursor = self._page_end
        if self._wrapped and self._origin is not None and (self._page_end or "") >= self._origin:
            self._new_sweep()
            return True
        return False

    def _new_sweep(self) -> None:
        self._origin = self._cursor
        self._wrapped = False

    async def _list(self, start_after: str | None) -> None:
        self._resize_page()
        self._page_sent_at = self._clock()
        listing = self.storage.list_page(
            self.layout.input_dir, start_after=start_after, limit=self._page_size
        )
        held: set[str] = set()
        if self._clock() - self._met_others_at < self.lease_seconds:
            page, held = await asyncio.gather(listing, self._held_from(start_after))
        else:
            page = await listing
        self.lists += 1
        if start_after is None:  # this page is the head: its prioritised ones go first
            self._head_sent_at = self._page_sent_at
            self._take_head([item for item in page.items if item.key not in held])
        items = list(page.items)
        self.seen_pending = sum(1 for item in items if self.layout.is_manifest(item.key))
        self._page_start = start_after
        self._page_end = items[-1].key if items else start_after
        self._page_truncated = page.truncated
        self._page_listed_at = self._clock()
        if not page.truncated and items and self._space is not None:
            self._ceiling = self._space.ceiling_for(items[-1].key)
        if self._wrapped and self._origin is not None:
            # Keys past the origin were offered at the start of this sweep: the page that
            # crosses it would offer them again.
            items = [item for item in items if item.key <= self._origin]
        if start_after is None:  # offered from the head instead
            items = [item for item in items if not (priority_of(item.key) > 0)]
        self._rng.shuffle(items)
        items.sort(key=_claim_order)  # stable: plain names stay shuffled
        self._page = [item for item in items if item.key not in held]

    async def _held_from(self, start_after: str | None) -> set[str]:
        """Manifests from ``start_after`` on that other workers hold: the claims of the same
        names, one page of the claims prefix (it holds only work in flight), read while this
        worker meets others. A page of the intake lists the manifests in flight as well as
        those waiting; where the fleet keeps up, most of it is in flight, and trying each of
        those is a claim wasted (bench/fleet.py). A claim written within the share of a lease
        the claims scan waits for counts as held (also one just given back for a retry: its
        holder retries it, or, if it does not, the scan or a later page offers it); an older
        one is left to be tried."""
        claims = self.layout.claims_prefix
        start = None
        if start_after is not None:
            start = f"{claims}/{start_after.removeprefix(self.layout.input_dir + '/')}"
        page = await self.storage.list_page(claims, start_after=start, limit=self._page_size)
        self.lists += 1
        fresh = STALE_SHARE * self.lease_seconds + STORE_CLOCK_MARGIN
        held = set()
        for item in page.items:
            age = age_by_store(self.storage, item.last_modified)
            if age is None or age < fresh:
                held.add(self.layout.manifest_key(self.layout.manifest_name(item.key)))
        return held

    def _resize_page(self) -> None:
        """Big enough to last ``page_max_age`` at the recent claim rate, no bigger: a smaller
        page is a faster first claim and a fresher view of what other workers took."""
        if self._taken_per_page:
            recent = max(self._taken_per_page)
            self._page_size = max(MIN_PAGE, min(MAX_PAGE, 2 * recent))


def _claim_order(item: ObjectInfo) -> tuple[int, float]:
    """Sorts the last to claim first (a page is used from its end): lower priority before
    higher, and within a priority other than 0 newer before older; plain names all equal."""
    priority = priority_of(item.key)
    return (priority, -item.last_modified.timestamp() if priority else 0.0)


@dataclass(frozen=True)
class KeySpace:
    """The names a first page suggests: a fixed ``head``, then ``length`` characters from
    ``alphabet``, read as a number in that base so that a point can be drawn between two.
    ``job0000000.json`` .. ``job0000099.json`` suggests ``job`` + 7 digits: ``job0000000`` ..
    ``job9999999``, of which the first page shows only where they start (``low``).

    Positions from the first one where the names differ vary over the characters seen there;
    positions before it that hold one of those characters are assumed to vary too (a counter's
    leading zeros), back to the first one that does not.
    """

    head: str
    alphabet: str
    length: int
    low: int = 0

    @classmethod
    def guess(cls, keys: list[str]) -> KeySpace | None:
        """From sorted manifest ``keys``; None unless there are two names to compare."""
        names = [key.removesuffix(".json") for key in keys if key.endswith(".json")]
        if len(names) < 2:
            return None
        first, last = names[0], names[-1]
        differ = next(
            (i for i, (a, b) in enumerate(zip(first, last, strict=False)) if a != b),
            min(len(first), len(last)),
        )
        alphabet = "".join(sorted({char for name in names for char in name[differ:]} - {"/"}))
        if not alphabet:
            return None
        start = differ
        while start > 0 and first[start - 1] in alphabet:
            start -= 1
        space = cls(first[:start], alphabet, max(len(last) - start, 1))
        return replace(space, low=space.value(first) or 0)

    @property
    def size(self) -> int:
        return len(self.alphabet) ** self.length

    def value(self, key: str) -> int | None:
        """Where ``key`` lies (at or below its true place: a character outside the alphabet
        counts as the one below it, a short name is padded with the lowest); None when it
        does not start with the head."""
        name = key.removesuffix(".json")
        if not name.startswith(self.head):
            return None
        tail = name[len(self.head) :]
        total = 0
        for index in range(self.length):
            digit = 0
            if index < len(tail):
                digit = max(0, bisect.bisect_right(self.alphabet, tail[index]) - 1)
            total = total * len(self.alphabet) + digit
        return total

    def key(self, value: int) -> str:
        chars = []
        for _ in range(self.length):
            value, digit = divmod(value, len(self.alphabet))
            chars.append(self.alphabet[digit])
        return self.head + "".join(reversed(chars))

    def draw(self, rng: random.Random, *, below: int | None = None) -> tuple[int, str] | None:
        """A point uniform between the first name and ``below`` (the whole range without it)."""
        high = self.size if below is None else min(below, self.size)
        if high <= self.low:
            return None
        value = rng.randrange(self.low, high)
        return value, self.key(value)

    def ceiling_for(self, last_key: str) -> int | None:
        """The ceiling once ``last_key`` is known to be the last name."""
        value = self.value(last_key)
        return None if value is None else value + 1


def spread_key(keys: list[str], rng: random.Random) -> str | None:
    """A random key in the range the sorted manifest ``keys`` suggest: ``job000000.json`` ..
    ``job000999.json`` suggests ``job000000`` .. ``job999999`` and gives, say, ``job583121``
    (see :class:`KeySpace`)."""
    space = KeySpace.guess(keys)
    drawn = space.draw(rng) if space is not None else None
    return drawn[1] if drawn is not None else None
