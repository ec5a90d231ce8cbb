"""Completion webhooks: a finished job's status, POSTed and signed per Standard Webhooks.

A webhook is a place where a manifest (untrusted, written by whoever can put an object in the
bucket) makes the worker open a connection to an address of its choosing, so it passes the fetch
guard (:mod:`processor.ops.fetch_guard`) that model and input URLs pass too. A URL is checked
twice. When the manifest is validated, :meth:`WebhookPolicy.refusal` looks at the URL alone
(scheme, host allowlist, literal addresses), so a bad URL fails the manifest with a readable
problem. At delivery, every address the host resolves to is checked again, and the connection
goes to exactly the addresses that were checked (aiohttp is given a resolver that checks what it
returns), so a name that resolved to a public address for the first check and to 169.254.169.254
a second later (DNS rebinding) never reaches the metadata service.

Signing follows the Standard Webhooks specification (https://www.standardwebhooks.com/):
``webhook-id`` (the same for every attempt of one message, so receivers can drop duplicates),
``webhook-timestamp`` (Unix seconds of this attempt) and ``webhook-signature`` =
``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`` keyed with the decoded ``whsec_``
secret. Any Standard Webhooks library verifies it.

:class:`Notifier` runs deliveries in the background: ``submit`` never waits, so a receiver that
never answers costs the GPU lane nothing; its outcome arrives later as a :class:`NotifyRecord`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import aiohttp
from yarl import URL

from processor.errors import Comfys3Error
from processor.job.status import NotifyRecord
from processor.ops.fetch_guard import (
    Lookup,
    UrlRules,
    clean_note,
    connection_note,
    guarded_session,
    host_allowed,
    unwrap_refusal,
)
from processor.ops.version import package_version

log = logging.getLogger("comfys3.notify")


@dataclass(frozen=True)
class WebhookPolicy:
    """Where webhooks may go: the worker's default URL and what manifests may name."""

    allow: tuple[str, ...] = ()
    allow_http: bool = False
    allow_private: bool = False
    default_url: str | None = None
    # COMFYS3_FETCH_ALLOW_HOSTS: the allowlist of every URL a manifest names, webhooks too.
    fetch_hosts: tuple[str, ...] = ()

    def refusal(self, url: object, *, from_manifest: bool = True) -> str | None:
        """Why ``url`` may not be used, for a person, or None. No DNS: it runs when a manifest
        is validated. Never raises, whatever ``url`` is."""
        try:
            return self._refusal(url, from_manifest)
        except Exception as error:  # a parser surprise is a refusal, never a crash
            return f"not a usable URL ({type(error).__name__})"

    @property
    def rules(self) -> UrlRules:
        """The fetch guard's URL rules, with the webhook opt-ins named in its messages."""
        return UrlRules(
            allow_http=self.allow_http,
            allow_private=self.allow_private,
            http_opt_in="COMFYS3_WEBHOOK_ALLOW_HTTP=true",
            private_opt_in="COMFYS3_WEBHOOK_ALLOW_PRIVATE=true",
        )

    def _refusal(self, url: object, from_manifest: bool) -> str | None:
        if not isinstance(url, str):
            return f"must be a URL string, not {type(url).__name__}"
        if from_manifest and not self.allow:
            return (
                "this worker takes no webhook URL from manifests (COMFYS3_WEBHOOK_ALLOW is "
                "empty); leave notify.url out to use the worker's default"
            )
        rules = self.rules
        problem = rules.problem(url)
        if problem:
            return problem
        host = rules.host(url)
        if from_manifest and not host_allowed(host, self.allow):
            return f"host {host!r} is not allowed (COMFYS3_WEBHOOK_ALLOW: {', '.join(self.allow)})"
        if from_manifest and self.fetch_hosts and not host_allowed(host, self.fetch_hosts):
            return (
                f"host {host!r} is not allowed (COMFYS3_FETCH_ALLOW_HOSTS: "
                f"{', '.join(self.fetch_hosts)})"
            )
        return rules.address_problem(host)

    def choose(self, manifest_url: str | None) -> str | None:
        """The URL a job's webhook goes to: its manifest's (already checked) or the default."""
        return manifest_url or self.default_url


def display_url(url: str, *, origin_only: bool = False) -> str:
    """A URL fit for a status document: no credentials, no query (tokens live there), and for
    the worker's own default URL no path either (a worker's secrets stay with the worker)."""
    try:
        parsed = URL(url)
        if parsed.raw_host is None:
            return "(invalid URL)"
        origin = str(parsed.origin())
    except (ValueError, TypeError):
        return "(invalid URL)"
    if origin_only:
        return origin
    return origin + (parsed.raw_path if parsed.raw_path not in ("", "/") else "")


# ---------------------------------------------------------------------------------------------
# Signing


class Signer:
    """Standard Webhooks signatures, with the key decoded from a ``whsec_`` secret."""

    def __init__(self, key: bytes) -> None:
        if not key:
            raise ValueError("a webhook key must not be empty")
        self._key = key

    def signature(self, message_id: str, timestamp: int, body: bytes) -> str:
        signed = message_id.encode() + b"." + str(timestamp).encode() + b"." + body
        digest = hmac.new(self._key, signed, hashlib.sha256).digest()
        return "v1," + base64.b64encode(digest).decode()

    def headers(self, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
        return {
            "webhook-id": message_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": self.signature(message_id, timestamp, body),
        }


# ---------------------------------------------------------------------------------------------
# One delivery, with retries


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries: 5 attempts wait about 2 + 4 + 8 + 16 s (jittered), so a receiver that
    is down for a deploy still gets the message, and a dead one costs about a minute."""

    attempts: int = 5
    timeout: float = 10.0
    base_delay: float = 2.0
    max_delay: float = 30.0

    def delay(self, failed_attempts: int, rng: random.Random, retry_after: float | None) -> float:
        backoff = min(self.max_delay, self.base_delay * 2 ** (failed_attempts - 1))
        delay = backoff * rng.uniform(0.5, 1.0)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_delay))
        return delay


class _Attempt(Comfys3Error):
    """One attempt's failure: ``note`` for the record, ``retry`` whether another may help."""

    def __init__(
        self,
        note: str,
        *,
        retry: bool,
        retry_after: float | None = None,
        refused: bool = False,
    ) -> None:
        super().__init__(note)
        self.note = note
        self.retry = retry
        self.retry_after = retry_after
        self.refused = refused


def _retry_after(value: str | None) -> float | None:
    if value and value.strip().isdigit():
        return float(value.strip())
    return None


@dataclass
class Delivery:
    """One message on its way; updated as attempts are made, so a delivery abandoned at
    shutdown can still say how far it got."""

    url: str
    message_id: str
    body: bytes
    shown_url: str
    attempts: int = 0
    last_error: str | None = None
    delivered_at: datetime | None = None
    outcome: str = "pending"  # delivered | failed | refused | dropped | abandoned

    def record(self) -> NotifyRecord:
        return NotifyRecord(
            url=self.shown_url,
            message_id=self.message_id,
            delivered_at=self.delivered_at,
            attempts=self.attempts,
            last_error=self.last_error,
        )


async def _post_once(
    session: aiohttp.ClientSession,
    delivery: Delivery,
    signer: Signer,
    retry: RetryPolicy,
    clock: Callable[[], float],
) -> None:
    headers = {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        **signer.headers(delivery.message_id, int(clock()), delivery.body),
    }
    try:
        async with session.post(
            delivery.url,
            data=delivery.body,
            headers=headers,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=retry.timeout),
        ) as response:
            status, reason = response.status, clean_note(response.reason or "")
            if 200 <= status < 300:
                return
            answer = f"HTTP {status}{' ' + reason if reason else ''}"
            if 300 <= status < 400:
                target = clean_note(response.headers.get("location", "")) or "nowhere"
                raise _Attempt(
                    f"{answer}: a redirect to {target}; redirects are not followed, "
                    "so point notify.url at the final address",
                    retry=False,
                )
            if status == 429 or 500 <= status < 600:
                raise _Attempt(
                    answer,
                    retry=True,
                    retry_after=_retry_after(response.headers.get("retry-after")),
                )
            raise _Attempt(f"{answer}; not retried (the receiver refused it)", retry=False)
    except _Attempt:
        raise
    except TimeoutError:
        raise _Attempt(f"no answer within {retry.timeout:g} s", retry=True) from None
    except (aiohttp.ClientError, OSError) as error:
        refused = unwrap_refusal(error)
        if refused is not None:
            raise _Attempt(f"refused: {refused}", retry=False, refused=True) from None
        raise _Attempt(connection_note(error), retry=True) from None


async def run_delivery(
    session: aiohttp.ClientSession,
    delivery: Delivery,
    *,
    policy: WebhookPolicy,
    signer: Signer,
    retry: RetryPolicy,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    clock: Callable[[], float] = time.time,
    rng: random.Random | None = None,
) -> Delivery:
    """POST ``delivery`` until a receiver takes it or the retries run out; never raises
    (except when cancelled). The URL is checked again first: a literal address never reaches
    the resolver, and the caller may have skipped the manifest check."""
    rng = rng or random.Random()
    # Any URL but the worker's own default must pass the manifest rules here too, so a caller
    # that forgot to validate a manifest's URL still cannot send anywhere.
    from_manifest = delivery.url != policy.default_url
    reason = policy.refusal(delivery.url, from_manifest=from_manifest)
    if reason:
        delivery.last_error, delivery.outcome = f"refused: {reason}", "refused"
        return delivery
    while delivery.attempts < retry.attempts:
        delivery.attempts += 1
        try:
            await _post_once(session, delivery, signer, retry, clock)
        except _Attempt as failure:
            delivery.last_error = failure.note
            if failure.refused:
                delivery.outcome = "refused"
                return delivery
            if not failure.retry or delivery.attempts >= retry.attempts:
                delivery.outcome = "failed"
                return delivery
            await sleep(retry.delay(delivery.attempts, rng, failure.retry_after))
            continue
        delivery.delivered_at = datetime.now(UTC)
        delivery.outcome = "delivered"
        return delivery
    delivery.outcome = "failed"
    return delivery


USER_AGENT = f"comfys3/{package_version()} (webhook)"


def webhook_session(
    policy: WebhookPolicy, *, lookup: Lookup | None = None, limit: int = 8
) -> aiohttp.ClientSession:
    """An HTTP session that can only reach addresses the policy allows (the fetch guard's)."""
    return guarded_session(
        allow_private=policy.allow_private,
        lookup=lookup,
        limit=limit,
        hint=policy.rules.private_hint,
    )


# ---------------------------------------------------------------------------------------------
# The background service

OnDone = Callable[[NotifyRecord], Awaitable[None]]
Observe = Callable[[str], None]


@dataclass
class _Item:
    delivery: Delivery
    on_done: OnDone


@dataclass
class NotifierStats:
    outcomes: dict[str, int] = field(default_factory=dict)


class Notifier:
    """Delivers webhooks beside the lane: ``submit`` returns at once, deliveries run
    concurrently (at most ``concurrency``), and each outcome goes to its ``on_done``.

    ``async with Notifier(...)`` starts it; leaving (or :meth:`aclose`) lets pending deliveries
    finish for a while, then abandons the rest, still telling their ``on_done`` what happened.
    """

    def __init__(
        self,
        policy: WebhookPolicy,
        signer: Signer,
        *,
        retry: RetryPolicy | None = None,
        concurrency: int = 8,
        queue_size: int = 1000,
        lookup: Lookup | None = None,
        observe: Observe | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.policy = policy
        self.signer = signer
        self.retry = retry or RetryPolicy()
        self.concurrency = max(1, concurrency)
        self.queue_size = max(1, queue_size)
        self.lookup = lookup
        self.observe = observe
        self.sleep = sleep
        self.stats = NotifierStats()
        self._queue: asyncio.Queue[_Item] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._active: dict[int, _Item] = {}
        self._callbacks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._rng = random.Random()

    async def __aenter__(self) -> Notifier:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        if self._queue is not None:
            return
        self._queue = asyncio.Queue(self.queue_size)
        self._session = webhook_session(self.policy, lookup=self.lookup, limit=self.concurrency)
        self._workers = [
            asyncio.create_task(self._work(index), name=f"webhook sender {index}")
            for index in range(self.concurrency)
        ]

    def submit(self, url: str, message_id: str, body: bytes, on_done: OnDone) -> None:
        """Queue one webhook and return at once; ``on_done(record)`` runs when it ends.

        A full queue or a closed notifier does not block or raise: the message is dropped and
        ``on_done`` is told so.
        """
        shown = display_url(url, origin_only=url == self.policy.default_url)
        item = _Item(Delivery(url, message_id, body, shown), on_done)
        if self._queue is None or self._closed:
            self._drop(item, "not sent: the webhook sender is not running (worker stopping)")
            return
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            self._drop(
                item,
                f"not sent: {self.queue_size} webhooks were already waiting; "
                "the receivers are too slow or down",
            )

    @property
    def pending(self) -> int:
        """Messages waiting or being delivered."""
        return (self._queue.qsize() if self._queue else 0) + len(self._active)

    async def aclose(self, timeout: float = 10.0, *, record_timeout: float = 2.0) -> None:
        """Stop taking messages; wait up to ``timeout`` s for pending ones, abandon the rest
        (their ``on_done`` still runs, for up to ``record_timeout`` s), close the session."""
        if self._closed:
            return
        self._closed = True
        queue = self._queue
        if queue is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(queue.join(), timeout)
            abandoned = [*self._active.values()]
            for worker in self._workers:
                worker.cancel()
            await asyncio.gather(*self._workers, return_exceptions=True)
            while not queue.empty():
                abandoned.append(queue.get_nowait())
            for item in abandoned:
                done = item.delivery
                note = "not delivered: the worker stopped"
                if done.attempts:
                    note += f" after {done.attempts} attempt(s)"
                    if done.last_error:
                        note += f" (last: {done.last_error})"
                done.last_error, done.outcome = note, "abandoned"
                self._finish(item)
        if self._callbacks:
            _, late = await asyncio.wait(self._callbacks, timeout=record_timeout)
            for task in late:
                task.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- internals --------------------------------------------------------------------------

    def _drop(self, item: _Item, note: str) -> None:
        item.delivery.last_error, item.delivery.outcome = note, "dropped"
        log.warning("webhook to %s %s", item.delivery.shown_url, note)
        self._finish(item)

    def _finish(self, item: _Item) -> None:
        outcome = item.delivery.outcome
        self.stats.outcomes[outcome] = self.stats.outcomes.get(outcome, 0) + 1
        if self.observe is not None:
            with contextlib.suppress(Exception):
                self.observe(outcome)
        task = asyncio.create_task(self._report(item), name="webhook record")
        self._callbacks.add(task)
        task.add_done_callback(self._callbacks.discard)

    async def _report(self, item: _Item) -> None:
        try:
            await item.on_done(item.delivery.record())
        except Exception:
            log.exception("recording the webhook outcome of %s failed", item.delivery.message_id)

    async def _work(self, index: int) -> None:
        assert self._queue is not None and self._session is not None
        while True:
            item = await self._queue.get()
            self._active[index] = item
            try:
                await run_delivery(
                    self._session,
                    item.delivery,
                    policy=self.policy,
                    signer=self.signer,
                    retry=self.retry,
                    sleep=self.sleep,
                    rng=self._rng,
                )
            except asyncio.CancelledError:
                raise  # aclose() records it as abandoned
            except Exception as error:  # a bug here must not kill the sender
                log.exception("webhook %s crashed", item.delivery.message_id)
                item.delivery.last_error = f"internal error: {type(error).__name__}: {error}"
                item.delivery.outcome = "failed"
            else:
                self._log(item.delivery)
            del self._active[index]
            self._queue.task_done()
            self._finish(item)

    @staticmethod
    def _log(delivery: Delivery) -> None:
        extra = {"webhook_id": delivery.message_id, "attempts": delivery.attempts}
        if delivery.outcome == "delivered":
            log.info(
                "webhook %s delivered to %s (attempt %d)",
                delivery.message_id,
                delivery.shown_url,
                delivery.attempts,
                extra=extra,
            )
        else:
            log.warning(
                "webhook %s to %s %s after %d attempt(s): %s",
                delivery.message_id,
                delivery.shown_url,
                delivery.outcome,
                delivery.attempts,
                delivery.last_error,
                extra=extra,
            )
