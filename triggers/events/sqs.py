"""S3 event notifications through SQS: manifests announced the moment they land.

:class:`SqsEvents` long-polls the queue a bucket's event notifications feed, turns each message
into manifest keys (:mod:`triggers.events.notifications`) and hands every key to a callback
together with an ``ack``. Claims stay the only source of truth: a message only says "look at
this key now".
So a message is deleted once the key's fate is decided (the manifest was run to its end, another
worker holds it, it is gone, it is not ours) and is left in the queue when the run was given
back for a retry, so that some worker looks again. While a key is undecided its message is kept
hidden (ChangeMessageVisibility), for at most ``max_hold`` seconds: a worker that dies stops
renewing, and the message comes back for another worker.

What is never trusted: message bodies. One that is none of the shapes S3 sends is logged once
as a warning and deleted: it can never become readable, and leaving it would bring it back
every visibility timeout forever (a redrive policy would also do, but not every queue has one,
and the fallback listing finds any manifest a dropped message named). Test events and records
for other keys are deleted with a debug line. A message received more than ``max_receives``
times is deleted too, so no message loops for ever (the fallback listing still sees its key).

Idle cost: one ReceiveMessage per 20 s long poll (3 a minute), plus the loop's fallback listing
every ``fallback_interval`` seconds (give or take a tenth, so that workers started together do
not list together) with one GetQueueAttributes before it; :meth:`SqsEvents.wait_for_work` paces
that listing. While the queue holds messages nobody has received yet, or messages workers hold
undecided, the events are flowing and the listing waits (up to ``MAX_PUT_OFF`` intervals in a
row): a sweep then only claims, in key order, manifests whose events are still coming, and
each of those events then costs a claim wasted (bench/fleet.py, 50 workers on a backlog of
2,000, a listing due every 20 s: 32.1% of claims wasted when it always ran, 0.4% put off).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

import aiohttp
from aiobotocore.session import AioSession, get_session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from processor import Layout, S3Settings, SqsSettings, StorageError
from triggers.events.notifications import EventError, parse_message

log = logging.getLogger("comfys3.events")

WAIT_SECONDS = 20  # SQS's longest long poll: the fewest requests for an idle queue
MAX_BATCH = 10  # SQS's largest receive and batch
# Fallback listings put off in a row while the queue holds a backlog; the next one runs anyway,
# so a lost event's manifest waits at most this many intervals more under a backlog that lasts.
MAX_PUT_OFF = 4
# Messages waiting at start that make a backlog the first sweep gives way to: more than one
# receive's worth. S3's test event, or a few strays, do not: the sweep then finds at once the
# manifests older than the queue.
BACKLOG_AT_START = MAX_BATCH
_TRANSPORT_ERRORS = (BotoCoreError, aiohttp.ClientError, OSError, asyncio.TimeoutError)
_MISSING_QUEUE = {"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"}
_REFUSED = {
    "AccessDenied",
    "AccessDeniedException",
    "InvalidClientTokenId",
    "SignatureDoesNotMatch",
    "UnrecognizedClientException",
    "InvalidAccessKeyId",
}


class KeyOutcome(StrEnum):
    """What became of an announced key; the worker's ``HintOutcome`` has the same values."""

    settled = "settled"  # run by us, to its end
    taken = "taken"  # another worker holds it
    gone = "gone"  # no pending manifest at that key
    released = "released"  # run by us and given back for a retry
    ignored = "ignored"  # not a manifest key of this intake


Ack = Callable[[Any], Awaitable[None]]
"""``await ack(outcome)``: a :class:`KeyOutcome`, or any enum (or string) with the same values."""
OnKey = Callable[[str, Ack], Awaitable[None] | None]
"""``on_key(key, ack)``: called once per announced key. It should return as soon as the key is
queued for a claim (``worker.hint``), not when the run ends: receiving waits for it."""


class QueueError(StorageError):
    """The queue cannot be used (missing, refused, unreachable); the text says which and why."""


def outcome_of(value: Any) -> KeyOutcome:
    """Accept the worker's own enum as long as its values match ours."""
    raw = getattr(value, "value", value)
    try:
        return KeyOutcome(str(raw))
    except ValueError:
        raise ValueError(f"unknown outcome {value!r}; expected one of {list(KeyOutcome)}") from None


@dataclass(eq=False)
class _Message:
    message_id: str
    receipt: str
    received_at: float
    undecided: set[str]
    retry: bool = False
    finished: bool = False


@dataclass(eq=False)
class _KeyWait:
    """One hand-over of a key; every message that named it while it was undecided rides on it."""

    key: str
    messages: list[_Message] = field(default_factory=list)
    decided: bool = False


@functools.cache
def _session() -> AioSession:
    """One botocore session per process: a session's service models and endpoint data cost
    ~8 MB and a tenth of a second to load, once per session, not per client (bench/fleet.py:
    50 listeners in one process held 400 MB more than 50 pollers)."""
    return get_session()


@contextlib.asynccontextmanager
async def open_sqs_client(
    sqs: SqsSettings, s3: S3Settings, read_timeout: float = 60.0
) -> AsyncIterator[Any]:
    """An aiobotocore SQS client: the S3 credentials, the queue's own endpoint and region
    unless COMFYS3_SQS_ENDPOINT_URL / COMFYS3_SQS_REGION say otherwise. The read timeout must
    outlast a long poll."""
    region = sqs.region or s3.region
    config = Config(
        region_name=region,
        retries={"mode": "standard", "max_attempts": sqs.retry_attempts},
        connect_timeout=10,
        read_timeout=read_timeout,
    )
    async with contextlib.AsyncExitStack() as stack:
        try:
            client = await stack.enter_async_context(
                _session().create_client(
                    "sqs",
                    endpoint_url=sqs.resolved_endpoint(),
                    region_name=region,
                    aws_access_key_id=s3.access_key.get_secret_value(),
                    aws_secret_access_key=s3.secret_key.get_secret_value(),
                    config=config,
                )
            )
        except (*_TRANSPORT_ERRORS, ValueError) as error:
            raise QueueError(
                f"cannot open an SQS client for {sqs.resolved_endpoint()}: {error}"
            ) from None
        yield client


def explain_queue_error(error: Exception, queue_url: str, operation: str) -> QueueError:
    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        message = str(error.response.get("Error", {}).get("Message", ""))
        if code in _MISSING_QUEUE:
            return QueueError(f"SQS {operation}: queue {queue_url} does not exist")
        if code in _REFUSED or "AccessDenied" in code:
            return QueueError(
                f"SQS {operation} on {queue_url} was refused ({code}); check the credentials "
                "(COMFYS3_S3_ACCESS_KEY/SECRET_KEY) and the queue's access policy"
            )
        return QueueError(f"SQS {operation} on {queue_url} failed: {code}: {message}"[:500])
    return QueueError(f"SQS {operation} on {queue_url} failed: {error}"[:500])


class SqsEvents:
    """The queue, as a source of manifest keys for one intake.

    ``async with SqsEvents(...) as events:`` checks the queue (a missing or refused queue fails
    here, readably), then receives in the background until ``stop`` is set or the block ends;
    undecided messages are then made visible at once for other workers.

    ``max_in_flight`` bounds the messages held undecided: a busy worker stops receiving, so the
    messages stay visible to idle ones instead of waiting behind its running jobs.
    """

    def __init__(
        self,
        *,
        sqs: SqsSettings,
        s3: S3Settings,
        layout: Layout,
        on_key: OnKey,
        stop: asyncio.Event,
        fallback_interval: float = 180.0,
        max_in_flight: int = MAX_BATCH,
        retry_visibility: int = 5,
        max_receives: int = 10,
        wait_seconds: int = WAIT_SECONDS,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self._sqs = sqs
        self._s3 = s3
        self._layout = layout
        self._on_key = on_key
        self._stop = stop
        self._fallback = fallback_interval
        self._max_in_flight = max_in_flight
        self._retry_visibility = max(0, retry_visibility)
        self._max_receives = max_receives
        self._wait_seconds = max(0, min(WAIT_SECONDS, wait_seconds))
        self._client: Any = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._messages: dict[str, _Message] = {}
        self._waiting: dict[str, _KeyWait] = {}
        self._room = asyncio.Event()
        self._hinted = asyncio.Event()
        self._next_listing: float | None = None
        self._listing_owed = True  # the first sweep: manifests older than the queue
        self._put_off = 0  # fallback listings put off in a row (a backlog in the queue)
        self.last_wake: Literal["hint", "fallback", "backlog", "stop", "work"] | None = None
        self.requests = 0  # SQS HTTP requests sent, for benchmarks and tests

    @property
    def queue_url(self) -> str:
        return self._sqs.queue_url

    @property
    def held(self) -> int:
        """Messages received and not yet decided."""
        return len(self._messages)

    # -- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> SqsEvents:
        stack = contextlib.AsyncExitStack()
        try:
            self._client = await stack.enter_async_context(
                open_sqs_client(self._sqs, self._s3, read_timeout=self._wait_seconds + 20)
            )
            self._client.meta.events.register("before-send.sqs", self._count_request)
            try:
                answer = await self._client.get_queue_attributes(
                    QueueUrl=self.queue_url,
                    AttributeNames=["VisibilityTimeout", "ApproximateNumberOfMessages"],
                )
            except (ClientError, *_TRANSPORT_ERRORS) as error:
                raise explain_queue_error(error, self.queue_url, "check") from None
            waiting = _waiting(answer)
            if waiting >= BACKLOG_AT_START:  # a fleet scaled up on the queue's depth
                self._listing_owed = False
                self._put_off = 1
                log.info(
                    "%d message(s) wait in the queue: the first full listing waits for the "
                    "fallback interval",
                    waiting,
                )
        except BaseException:
            await stack.aclose()
            self._client = None
            raise
        self._stack = stack
        self._tasks = [
            asyncio.create_task(self._receive_loop(), name="sqs receive"),
            asyncio.create_task(self._keep_hidden(), name="sqs visibility"),
        ]
        log.info("listening for S3 events on %s", self.queue_url)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._return_undecided(), 10)
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()
        self._client = None

    def _count_request(self, **_: Any) -> None:
        self.requests += 1

    # -- the loop's idle wait ---------------------------------------------------------------

    async def wait_for_work(self, found_work: bool) -> None:
        """The worker loop's ``wait_for_work``: returns at once after work, else when a key
        was handed over, when the fallback listing is due (``fallback``) or was due but the
        queue still holds messages nobody received (``backlog``: it waits another interval,
        at most :data:`MAX_PUT_OFF` times in a row), or on stop. ``last_wake`` says which.
        The fallback is paced on its own clock, so a steady stream of events that the
        workers keep up with never starves it."""
        now = time.monotonic()
        if self._next_listing is None:  # the loop listed just before its first wait
            self._next_listing = now + self._interval()
        if self._stop.is_set():
            self.last_wake = "stop"
            return
        if found_work:
            self.last_wake = "work"
            return
        if self._hinted.is_set():
            self._hinted.clear()
            self.last_wake = "hint"
            return
        remaining = self._next_listing - now
        if remaining > 0 and not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake(), remaining)
        if self._stop.is_set():
            self.last_wake = "stop"
        elif self._hinted.is_set():
            self._hinted.clear()
            self.last_wake = "hint"
            return
        elif self._put_off < MAX_PUT_OFF and await self._backlogged():
            self.last_wake = "backlog"
            self._put_off += 1
        else:
            self.last_wake = "fallback"
            self._listing_owed = True
            self._put_off = 0
        self._next_listing = time.monotonic() + self._interval()

    def _interval(self) -> float:
        """The fallback interval, give or take a tenth: workers started together (a rollout,
        a scale-up) drift apart instead of sweeping the intake together for ever."""
        return self._fallback * random.uniform(0.9, 1.1)

    async def _backlogged(self) -> bool:
        """Whether the events are flowing: messages wait that nobody has received, or are
        held by workers that have not decided them yet (a fleet holds as many as its lanes
        take, so under a backlog few stay visible). A sweep then only races them. Unknown
        (the queue did not answer) counts as no."""
        try:
            answer = await self._client.get_queue_attributes(
                QueueUrl=self.queue_url,
                AttributeNames=[
                    "ApproximateNumberOfMessages",
                    "ApproximateNumberOfMessagesNotVisible",
                ],
            )
        except (ClientError, *_TRANSPORT_ERRORS) as error:
            log.debug("%s", explain_queue_error(error, self.queue_url, "depth"))
            return False
        return _waiting(answer) + _waiting(answer, "ApproximateNumberOfMessagesNotVisible") > 0

    def listing_due(self) -> bool:
        """The worker loop's ``may_list``: True once at start and once per fallback wake, so
        the intake prefix is swept for lost events and never between them."""
        owed, self._listing_owed = self._listing_owed, False
        return owed

    async def _wake(self) -> None:
        stopped = asyncio.ensure_future(self._stop.wait())
        hinted = asyncio.ensure_future(self._hinted.wait())
        try:
            await asyncio.wait({stopped, hinted}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            hinted.cancel()

    # -- receiving --------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            room = self._max_in_flight - len(self._messages)
            if room <= 0:
                self._room.clear()
                await self._until_stop_or(self._room.wait())
                continue
            try:
                answer = await self._until_stop_or(
                    self._client.receive_message(
                        QueueUrl=self.queue_url,
                        MaxNumberOfMessages=min(MAX_BATCH, room),
                        WaitTimeSeconds=self._wait_seconds,
                        VisibilityTimeout=self._sqs.visibility_timeout,
                        MessageSystemAttributeNames=["ApproximateReceiveCount"],
                    )
                )
            except (ClientError, *_TRANSPORT_ERRORS) as error:
                problem = explain_queue_error(error, self.queue_url, "receive")
                log.warning("%s; trying again in %.0f s", problem, backoff)
                await self._until_stop_or(asyncio.sleep(backoff))
                backoff = min(backoff * 2, 60.0)
                continue
            backoff = 1.0
            if answer is None:  # stopped
                return
            messages = answer.get("Messages") if isinstance(answer, dict) else None
            for message in messages or []:
                await self._take(message)

    async def _until_stop_or(self, awaitable: Awaitable[Any]) -> Any:
        """``awaitable``'s result, or None as soon as ``stop`` is set (the long poll is
        abandoned: a message it would have returned comes back after its visibility)."""
        work = asyncio.ensure_future(awaitable)
        stopped = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if work.done():
            return work.result()
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError, *_TRANSPORT_ERRORS, ClientError):
            await work
        return None

    async def _take(self, message: Any) -> None:
        if not isinstance(message, dict):
            return
        message_id = str(message.get("MessageId", ""))
        receipt = message.get("ReceiptHandle")
        if not isinstance(receipt, str) or not receipt:
            return
        known = self._messages.get(message_id)
        if known is not None:  # SQS delivered it again: only the newest receipt handle works
            known.receipt = receipt
            return
        try:
            parsed = parse_message(
                message.get("Body", ""), bucket=self._s3.bucket_name, layout=self._layout
            )
        except EventError as error:
            log.warning("dropping SQS message %s: %s", message_id, error)
            await self._delete(receipt, message_id)
            return
        for reason in parsed.ignored:
            log.debug("event ignored: %s", reason)
        if parsed.test_event:
            log.debug(
                "S3 test event on %s: the bucket's notifications reach the queue", self.queue_url
            )
        if not parsed.keys:
            await self._delete(receipt, message_id)
            return
        receives = _receive_count(message)
        if receives > self._max_receives:
            log.warning(
                "dropping SQS message %s for %s: received %d times (the fallback listing "
                "still finds the manifest)",
                message_id,
                ", ".join(parsed.keys),
                receives,
            )
            await self._delete(receipt, message_id)
            return
        entry = _Message(message_id, receipt, time.monotonic(), set(parsed.keys))
        self._messages[message_id] = entry
        for key in parsed.keys:
            wait = self._waiting.get(key)
            if wait is not None:
                wait.messages.append(entry)
                log.debug("%s announced again while undecided (message %s)", key, message_id)
                continue
            wait = _KeyWait(key, [entry])
            self._waiting[key] = wait
            self._hinted.set()
            await self._hand_over(wait)

    async def _hand_over(self, wait: _KeyWait) -> None:
        async def ack(outcome: Any) -> None:
            await self._decide(wait, outcome_of(outcome))

        try:
            result = self._on_key(wait.key, ack)
            if inspect.isawaitable(result):
                await result
        except Exception as error:  # the worker's trouble must not stop the listener
            log.warning(
                "handing %s to the worker failed: %r; the event comes back", wait.key, error
            )
            await self._decide(wait, KeyOutcome.released)

    async def _decide(self, wait: _KeyWait, outcome: KeyOutcome) -> None:
        if wait.decided:
            return
        wait.decided = True
        if self._waiting.get(wait.key) is wait:
            del self._waiting[wait.key]
        log.debug("%s: %s", wait.key, outcome.value)
        for message in wait.messages:
            message.undecided.discard(wait.key)
            if outcome is KeyOutcome.released:
                message.retry = True
            if not message.undecided and not message.finished:
                await self._finish(message)

    async def _finish(self, message: _Message) -> None:
        message.finished = True
        if self._messages.get(message.message_id) is message:
            del self._messages[message.message_id]
        self._room.set()
        if message.retry:
            await self._change_visibility(message, self._retry_visibility)
        else:
            await self._delete(message.receipt, message.message_id)

    # -- SQS calls that must never stop the listener ---------------------------------------

    async def _delete(self, receipt: str, message_id: str) -> None:
        if self._client is None:  # decided after the listener closed: the message comes back
            log.debug("SQS message %s decided after the listener closed", message_id)
            return
        try:
            await self._client.delete_message(QueueUrl=self.queue_url, ReceiptHandle=receipt)
        except (ClientError, *_TRANSPORT_ERRORS) as error:
            log.warning(
                "could not delete SQS message %s (%s); it comes back and is decided again",
                message_id,
                explain_queue_error(error, self.queue_url, "delete"),
            )

    async def _change_visibility(self, message: _Message, seconds: int) -> None:
        if self._client is None:
            return
        try:
            await self._client.change_message_visibility(
                QueueUrl=self.queue_url, ReceiptHandle=message.receipt, VisibilityTimeout=seconds
            )
        except (ClientError, *_TRANSPORT_ERRORS) as error:
            log.debug("visibility of message %s not changed: %s", message.message_id, error)

    async def _keep_hidden(self) -> None:
        """Renew the visibility of undecided messages every third of the timeout, in batches,
        until ``max_hold``; past it a message is let go (the claim still protects the job)."""
        interval = max(0.5, self._sqs.visibility_timeout / 3)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            renew: list[_Message] = []
            for message in list(self._messages.values()):
                if now - message.received_at >= self._sqs.max_hold:
                    log.info(
                        "SQS message %s held %.0f s (COMFYS3_SQS_MAX_HOLD); letting it go",
                        message.message_id,
                        now - message.received_at,
                    )
                    message.finished = True
                    del self._messages[message.message_id]
                    self._room.set()
                else:
                    renew.append(message)
            for start in range(0, len(renew), MAX_BATCH):
                batch = renew[start : start + MAX_BATCH]
                entries = [
                    {
                        "Id": str(n),
                        "ReceiptHandle": m.receipt,
                        "VisibilityTimeout": self._sqs.visibility_timeout,
                    }
                    for n, m in enumerate(batch)
                ]
                try:
                    await self._client.change_message_visibility_batch(
                        QueueUrl=self.queue_url, Entries=entries
                    )
                except (ClientError, *_TRANSPORT_ERRORS) as error:
                    log.warning(
                        "%s", explain_queue_error(error, self.queue_url, "visibility renewal")
                    )

    async def _return_undecided(self) -> None:
        """On the way out: undecided messages become visible now, for the other workers."""
        for message in list(self._messages.values()):
            message.finished = True
            await self._change_visibility(message, 0)
        self._messages.clear()


def _waiting(answer: Any, name: str = "ApproximateNumberOfMessages") -> int:
    """A message count from a GetQueueAttributes answer; 0 if unreadable."""
    attributes = answer.get("Attributes") if isinstance(answer, dict) else None
    if not isinstance(attributes, dict):
        return 0
    try:
        return max(0, int(attributes.get(name, 0)))
    except (TypeError, ValueError):
        return 0


def _receive_count(message: dict[str, Any]) -> int:
    attributes = message.get("Attributes")
    if not isinstance(attributes, dict):
        return 1
    try:
        return int(attributes.get("ApproximateReceiveCount", 1))
    except (TypeError, ValueError):
        return 1
