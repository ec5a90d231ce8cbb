"""SqsEvents against moto in server mode: the bucket notifies a queue, the listener hands keys
over and deletes, keeps or returns each message according to what became of its key."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from pydantic import SecretStr

from processor.settings import S3Settings, SqsSettings
from processor.storage.layout import Layout
from tests.event_shapes import s3_notification
from tests.s3_servers import S3Server, s3_settings_for
from tests.sqs_queues import EventQueue, notifying_queue, sqs_client
from triggers.events.sqs import (
    BACKLOG_AT_START,
    MAX_PUT_OFF,
    KeyOutcome,
    QueueError,
    SqsEvents,
    open_sqs_client,
)

pytestmark = pytest.mark.timeout(120)


class Recorder:
    """An ``on_key`` that remembers each key and its ack; the test decides the outcome."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.acks: dict[str, Callable[[Any], Awaitable[None]]] = {}
        self.arrived = asyncio.Event()

    async def __call__(self, key: str, ack: Callable[[Any], Awaitable[None]]) -> None:
        self.keys.append(key)
        self.acks[key] = ack
        self.arrived.set()

    async def wait_for(self, count: int, timeout: float = 15.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while len(self.keys) < count:
            self.arrived.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"only {self.keys} arrived, expected {count} keys")
            try:
                await asyncio.wait_for(self.arrived.wait(), remaining)
            except TimeoutError:
                continue
        return self.keys


@pytest.fixture
def queue(moto_server: S3Server) -> EventQueue:
    return notifying_queue(moto_server, s3_settings_for(moto_server))


def listener(queue: EventQueue, on_key: Any, stop: asyncio.Event, **knobs: Any) -> SqsEvents:
    return SqsEvents(
        sqs=queue.sqs,
        s3=queue.s3,
        layout=Layout(queue.s3.input_dir, queue.s3.output_dir),
        on_key=on_key,
        stop=stop,
        **knobs,
    )


async def settled_queue(queue: EventQueue, expect: tuple[int, int], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (counts := await asyncio.to_thread(queue.counts)) != expect:
        if time.monotonic() > deadline:
            raise AssertionError(f"queue has {counts} (visible, in flight), expected {expect}")
        await asyncio.sleep(0.1)


async def test_uploaded_manifests_arrive_decoded_and_settled_messages_are_deleted(
    queue: EventQueue, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="comfys3.events")
    stop = asyncio.Event()
    recorder = Recorder()
    async with listener(queue, recorder, stop):
        await asyncio.to_thread(queue.put, "input/job1.json")
        await asyncio.to_thread(queue.put, "input/my job é.json")
        await asyncio.to_thread(queue.put, "input/_claims/job1.json")  # a worker's own claim
        await asyncio.to_thread(queue.put, "elsewhere/job2.json")  # outside the filter
        keys = await recorder.wait_for(2)
        assert sorted(keys) == ["input/job1.json", "input/my job é.json"]
        await settled_queue(queue, (0, 2))  # test event and the claim's event are gone
        for key in keys:
            await recorder.acks[key](KeyOutcome.settled)
        await settled_queue(queue, (0, 0))
    assert recorder.keys == keys  # nothing else was handed over
    text = caplog.text
    assert "S3 test event" in text
    assert "'input/_claims/job1.json' is not a manifest directly under input/" in text


async def test_a_duplicated_event_is_handed_over_once_and_both_messages_deleted(
    queue: EventQueue,
) -> None:
    stop = asyncio.Event()
    recorder = Recorder()
    async with listener(queue, recorder, stop):
        await asyncio.to_thread(queue.put, "input/dup.json")
        await recorder.wait_for(1)
        # S3 delivers at least once: the same notification again, while the first is undecided
        await asyncio.to_thread(queue.send, s3_notification(queue.s3.bucket_name, "input/dup.json"))
        await settled_queue(queue, (0, 2))
        assert recorder.keys == ["input/dup.json"]
        await recorder.acks["input/dup.json"](KeyOutcome.settled)
        await settled_queue(queue, (0, 0))
        # and once decided, a late duplicate is a new hand-over (the claim says "done")
        await asyncio.to_thread(queue.send, s3_notification(queue.s3.bucket_name, "input/dup.json"))
        await recorder.wait_for(2)
        await recorder.acks["input/dup.json"]("taken")  # the worker's own enum values work too
        await settled_queue(queue, (0, 0))


async def test_an_event_for_a_key_that_no_longer_exists_is_parsed_and_gone_deletes_it(
    queue: EventQueue,
) -> None:
    await asyncio.to_thread(queue.put, "input/vanished.json")
    queue.server.client().delete_object(Bucket=queue.s3.bucket_name, Key="input/vanished.json")
    stop = asyncio.Event()
    recorder = Recorder()
    async with listener(queue, recorder, stop):
        assert await recorder.wait_for(1) == ["input/vanished.json"]
        await recorder.acks["input/vanished.json"](KeyOutcome.gone)
        await settled_queue(queue, (0, 0))


async def test_released_leaves_the_message_to_come_back(queue: EventQueue) -> None:
    stop = asyncio.Event()
    recorder = Recorder()
    async with listener(queue, recorder, stop, retry_visibility=1):
        await asyncio.to_thread(queue.put, "input/retry.json")
        await recorder.wait_for(1)
        await recorder.acks["input/retry.json"](KeyOutcome.released)
        assert await recorder.wait_for(2) == ["input/retry.json", "input/retry.json"]
        await recorder.acks["input/retry.json"](KeyOutcome.settled)
        await settled_queue(queue, (0, 0))


async def test_unparseable_and_foreign_messages_are_deleted_after_one_warning(
    queue: EventQueue, caplog: pytest.LogCaptureFixture
) -> None:
    # WARNING from the events logger, whatever an earlier test in this process configured.
    caplog.set_level(logging.WARNING, logger="comfys3.events")
    stop = asyncio.Event()
    recorder = Recorder()
    async with listener(queue, recorder, stop):
        await asyncio.to_thread(queue.send, "{not json")
        await asyncio.to_thread(queue.send, '{"hello": "world"}')
        await asyncio.to_thread(queue.send, s3_notification("another-bucket", "input/x.json"))
        await settled_queue(queue, (0, 0))
    assert recorder.keys == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("not valid JSON" in w for w in warnings) == 1
    assert sum("not an S3 event notification" in w for w in warnings) == 1


async def test_an_undecided_message_stays_hidden_until_max_hold(
    queue: EventQueue, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="comfys3.events")
    queue = EventQueue(
        queue.server,
        queue.s3,
        queue.sqs.model_copy(update={"visibility_timeout": 2, "max_hold": 6.0}),
    )
    stop = asyncio.Event()
    recorder = Recorder()
    async with listener(queue, recorder, stop) as events:
        await asyncio.to_thread(queue.put, "input/long.json")
        await recorder.wait_for(1)
        await asyncio.sleep(4.5)  # more than twice the visibility timeout: it was renewed
        assert await asyncio.to_thread(queue.counts) == (0, 1)
        deadline = time.monotonic() + 15
        while "letting it go" not in caplog.text:
            assert time.monotonic() < deadline, "the message was held past max_hold"
            await asyncio.sleep(0.2)
        # it comes back; the key is still undecided here, so it rides on the same hand-over
        deadline = time.monotonic() + 15
        while events.held != 1 or await asyncio.to_thread(queue.counts) != (0, 1):
            assert time.monotonic() < deadline, "the let-go message was not received again"
            await asyncio.sleep(0.2)
        assert recorder.keys == ["input/long.json"]
        await recorder.acks["input/long.json"](KeyOutcome.settled)
        await settled_queue(queue, (0, 0))


async def test_a_busy_listener_stops_receiving(queue: EventQueue) -> None:
    stop = asyncio.Event()
    recorder = Recorder()
    async with listener(queue, recorder, stop, max_in_flight=1) as events:
        await asyncio.to_thread(queue.put, "input/a.json")
        await asyncio.to_thread(queue.put, "input/b.json")
        first = (await recorder.wait_for(1))[0]
        await asyncio.sleep(1.0)
        assert recorder.keys == [first] and events.held == 1
        await settled_queue(queue, (1, 1))  # the other one waits, visible to idle workers
        await recorder.acks[first](KeyOutcome.taken)
        await recorder.wait_for(2)
        await recorder.acks[recorder.keys[1]](KeyOutcome.ignored)
        await settled_queue(queue, (0, 0))


async def test_stop_ends_the_long_poll_at_once_and_returns_undecided_messages(
    queue: EventQueue,
) -> None:
    stop = asyncio.Event()
    recorder = Recorder()
    events = listener(queue, recorder, stop)
    async with events:
        await asyncio.to_thread(queue.put, "input/held.json")
        await recorder.wait_for(1)
        await asyncio.sleep(0.3)  # a fresh long poll is under way
        began = time.monotonic()
        stop.set()
        await events.wait_for_work(False)
        assert events.last_wake == "stop"
    assert time.monotonic() - began < 5
    # the undecided message is visible again for another worker
    assert await asyncio.to_thread(queue.receive_bodies, 2)
    # a job that ends after the listener closed may still ack: nothing breaks
    await recorder.acks["input/held.json"](KeyOutcome.settled)


async def test_wait_for_work_wakes_on_a_key_and_on_the_fallback_listing(
    queue: EventQueue,
) -> None:
    stop = asyncio.Event()
    recorder = Recorder()
    async with listener(queue, recorder, stop, fallback_interval=1.5) as events:
        began = time.monotonic()
        await events.wait_for_work(True)
        assert events.last_wake == "work" and time.monotonic() - began < 0.2
        await events.wait_for_work(False)  # nothing arrives: the fallback listing is due
        assert events.last_wake == "fallback"
        assert 1.2 < time.monotonic() - began < 4
        waiting = asyncio.create_task(events.wait_for_work(False))
        await asyncio.sleep(0.2)
        began = time.monotonic()
        await asyncio.to_thread(queue.put, "input/wake.json")
        await waiting
        assert events.last_wake == "hint"
        assert time.monotonic() - began < 1.4
        await recorder.acks["input/wake.json"](KeyOutcome.settled)
        # idle: long polls only, a handful of requests
        before = events.requests
        await asyncio.sleep(1.0)
        assert events.requests - before <= 2


async def purged(queue: EventQueue) -> None:
    """Receive and delete every visible message (moto allows one PurgeQueue a minute)."""

    def drain() -> None:
        client = sqs_client(queue.server)
        while messages := client.receive_message(
            QueueUrl=queue.url, MaxNumberOfMessages=10, WaitTimeSeconds=0
        ).get("Messages"):
            for message in messages:
                client.delete_message(QueueUrl=queue.url, ReceiptHandle=message["ReceiptHandle"])

    await asyncio.to_thread(drain)


async def test_a_backlog_in_the_queue_puts_off_the_full_listing(queue: EventQueue) -> None:
    """While messages wait that nobody received, the events name the work: a full listing
    would only claim, in key order, manifests whose events are still coming (each such event
    is then a wasted claim). A listener started on a backlog (a fleet scaled up on the
    queue's depth) skips its first sweep; a due fallback waits while the backlog lasts,
    and while a message is held undecided (in flight: an event being handled)."""
    await purged(queue)  # S3's test event
    names = [f"n{n:02d}" for n in range(BACKLOG_AT_START)]
    for name in names:
        await asyncio.to_thread(queue.put, f"input/{name}.json")
    await settled_queue(queue, (len(names), 0))
    stop = asyncio.Event()
    recorder = Recorder()  # decides only when told: the listener holds one, the rest wait
    async with listener(queue, recorder, stop, max_in_flight=1, fallback_interval=1.0) as events:
        assert not events.listing_due()
        (held,) = await recorder.wait_for(1)
        await events.wait_for_work(False)
        assert events.last_wake == "hint"
        await events.wait_for_work(False)
        assert events.last_wake == "backlog" and not events.listing_due()

        await purged(queue)  # nothing visible: the held message is an event still flowing
        await settled_queue(queue, (0, 1))
        await events.wait_for_work(False)
        assert events.last_wake == "backlog" and not events.listing_due()

        await recorder.acks[held](KeyOutcome.settled)
        await settled_queue(queue, (0, 0))
        await events.wait_for_work(False)
        assert events.last_wake == "fallback" and events.listing_due()


async def test_a_backlog_that_lasts_puts_the_listing_off_only_so_many_times(
    queue: EventQueue,
) -> None:
    """A fleet that never catches up still sweeps now and then, for manifests whose events
    were lost: after MAX_PUT_OFF intervals put off in a row (the start counts as one)."""
    await purged(queue)
    names = [f"n{n:02d}" for n in range(BACKLOG_AT_START)]
    for name in names:
        await asyncio.to_thread(queue.put, f"input/{name}.json")
    await settled_queue(queue, (len(names), 0))
    stop = asyncio.Event()
    recorder = Recorder()  # holds one message, never decides: two stay visible throughout
    async with listener(queue, recorder, stop, max_in_flight=1, fallback_interval=0.5) as events:
        await recorder.wait_for(1)
        wakes = []
        while len(wakes) < 2 * MAX_PUT_OFF + 1:
            await events.wait_for_work(False)
            if events.last_wake != "hint":
                wakes.append(events.last_wake)
                assert events.listing_due() is (events.last_wake == "fallback")
    first = ["backlog"] * (MAX_PUT_OFF - 1) + ["fallback"]
    assert wakes == first + ["backlog"] * MAX_PUT_OFF + ["fallback"]


async def test_an_empty_queue_at_start_owes_the_first_sweep(queue: EventQueue) -> None:
    await purged(queue)
    stop = asyncio.Event()
    async with listener(queue, Recorder(), stop) as events:
        assert events.listing_due()  # manifests older than the queue are found at once
        assert not events.listing_due()


async def test_a_few_messages_at_start_are_no_backlog_and_the_first_sweep_runs(
    queue: EventQueue,
) -> None:
    """S3's test event (sent when notifications are set up) or a few strays are not a fleet
    scaled up on a backlog: the manifests older than the queue are still found at once."""
    await purged(queue)
    for name in ("a", "b", "c"):
        await asyncio.to_thread(queue.put, f"input/{name}.json")
    await settled_queue(queue, (3, 0))
    stop = asyncio.Event()
    async with listener(queue, Recorder(), stop) as events:
        assert events.listing_due()


async def test_fallback_intervals_vary_so_workers_started_together_drift_apart(
    queue: EventQueue,
) -> None:
    stop = asyncio.Event()
    async with listener(queue, Recorder(), stop, fallback_interval=100.0) as events:
        intervals = [events._interval() for _ in range(50)]
    assert all(90.0 <= interval <= 110.0 for interval in intervals)
    assert len(set(intervals)) > 40


async def test_a_missing_queue_fails_at_start_with_a_readable_error(
    moto_server: S3Server,
) -> None:
    s3 = s3_settings_for(moto_server)
    sqs = SqsSettings(
        queue_url=f"{moto_server.endpoint_url}/123456789012/no-such-queue",
        endpoint_url=moto_server.endpoint_url,
    )
    events = SqsEvents(sqs=sqs, s3=s3, layout=Layout(), on_key=Recorder(), stop=asyncio.Event())
    with pytest.raises(QueueError, match="no-such-queue does not exist"):
        async with events:
            pass


async def test_an_unreachable_endpoint_fails_at_start(moto_server: S3Server) -> None:
    s3: S3Settings = s3_settings_for(moto_server).model_copy(update={"access_key": SecretStr("x")})
    sqs = SqsSettings(queue_url="http://127.0.0.1:9/123/q", retry_attempts=1)
    events = SqsEvents(sqs=sqs, s3=s3, layout=Layout(), on_key=Recorder(), stop=asyncio.Event())
    with pytest.raises(QueueError, match=r"127\.0\.0\.1:9"):
        async with events:
            pass


async def test_listeners_in_one_process_load_the_service_model_once(
    moto_server: S3Server,
) -> None:
    """A botocore session loads SQS's model and the endpoint data (~8 MB, a tenth of a second)
    for itself: clients of one process share one session, so a second client loads nothing."""
    s3 = s3_settings_for(moto_server)
    sqs = SqsSettings(queue_url=f"{moto_server.endpoint_url}/1/q", endpoint_url=s3.endpoint_url)
    async with open_sqs_client(sqs, s3) as one, open_sqs_client(sqs, s3) as two:
        assert one is not two
        assert one._loader is two._loader
