"""Parsing SQS messages into manifest keys: the shapes S3 sends, and anything else at all."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processor.storage.layout import Layout
from tests.event_shapes import (
    eventbridge_created,
    lambda_s3_event,
    s3_notification,
    s3_test_event,
    sns_envelope,
)
from triggers.events.notifications import MAX_DEPTH, EventError, parse_document, parse_message

BUCKET = "jobs"
LAYOUT = Layout("input", "output")


def parse(body: str | bytes) -> object:
    return parse_message(body, bucket=BUCKET, layout=LAYOUT)


def test_a_created_manifest_is_announced() -> None:
    parsed = parse_message(s3_notification(BUCKET, "input/job1.json"), bucket=BUCKET, layout=LAYOUT)
    assert parsed.keys == ("input/job1.json",)
    assert parsed.ignored == ()
    assert not parsed.test_event


@pytest.mark.parametrize(
    "key",
    ["input/my job é.json", "input/a+b.json", "input/100%.json", "input/x?y=z&w.json"],
)
def test_keys_are_decoded_as_s3_documents(key: str) -> None:
    # S3 URL-encodes keys with "+" for a space; a literal "+" arrives as %2B.
    parsed = parse_message(s3_notification(BUCKET, key), bucket=BUCKET, layout=LAYOUT)
    assert parsed.keys == (key,)


def test_a_plus_in_the_message_is_a_space() -> None:
    body = s3_notification(BUCKET, "input/placeholder.json").replace(
        "input/placeholder.json", "input/my+job+%C3%A9.json"
    )
    assert parse_message(body, bucket=BUCKET, layout=LAYOUT).keys == ("input/my job é.json",)


def test_the_s3_test_event_is_recognised() -> None:
    parsed = parse_message(s3_test_event(BUCKET), bucket=BUCKET, layout=LAYOUT)
    assert parsed.test_event and parsed.keys == ()


@pytest.mark.parametrize(
    ("key", "bucket", "event", "reason"),
    [
        ("input/_claims/job1.json", BUCKET, "ObjectCreated:Put", "not a manifest directly"),
        ("input/_dispatched/job1.json", BUCKET, "ObjectCreated:Put", "not a manifest directly"),
        ("other/job1.json", BUCKET, "ObjectCreated:Put", "not a manifest directly"),
        ("input/job1.txt", BUCKET, "ObjectCreated:Put", "not a manifest directly"),
        ("input/job1.json", "someone-else", "ObjectCreated:Put", "bucket 'someone-else'"),
        ("input/job1.json", BUCKET, "ObjectRemoved:Delete", "not an object creation"),
        ("input/../x.json", BUCKET, "ObjectCreated:Put", "'..' path segment"),
    ],
)
def test_records_for_other_things_are_ignored_with_a_reason(
    key: str, bucket: str, event: str, reason: str
) -> None:
    parsed = parse_message(
        s3_notification(bucket, key, event_name=event), bucket=BUCKET, layout=LAYOUT
    )
    assert parsed.keys == ()
    assert len(parsed.ignored) == 1 and reason in parsed.ignored[0]


def test_several_records_keep_their_order_and_each_key_once() -> None:
    body = s3_notification(
        BUCKET, "input/b.json", "input/_claims/b.json", "input/a.json", "input/b.json"
    )
    parsed = parse_message(body, bucket=BUCKET, layout=LAYOUT)
    assert parsed.keys == ("input/b.json", "input/a.json")
    assert len(parsed.ignored) == 1


def test_eventbridge_and_sns_wrapped_events() -> None:
    bridge = parse_message(
        eventbridge_created(BUCKET, "input/my job.json"), bucket=BUCKET, layout=LAYOUT
    )
    assert bridge.keys == ("input/my job.json",) and bridge.shape == "eventbridge"
    deleted = parse_message(
        eventbridge_created(BUCKET, "input/x.json", "Object Deleted"), bucket=BUCKET, layout=LAYOUT
    )
    assert deleted.keys == () and "not an object creation" in deleted.ignored[0]
    wrapped = parse_message(
        sns_envelope(s3_notification(BUCKET, "input/j.json")), bucket=BUCKET, layout=LAYOUT
    )
    assert wrapped.keys == ("input/j.json",) and wrapped.shape == "sns/s3"
    test = parse_message(sns_envelope(s3_test_event(BUCKET)), bucket=BUCKET, layout=LAYOUT)
    assert test.test_event


def test_a_lambda_event_is_parsed_from_the_object() -> None:
    event = lambda_s3_event(BUCKET, "input/job1.json")
    assert parse_document(event, bucket=BUCKET, layout=LAYOUT).keys == ("input/job1.json",)


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"\xff\xfe", "not UTF-8"),
        ("not json", "not valid JSON"),
        ("[1, 2]", "an array, not a JSON object"),
        ('{"hello": 1}', "not an S3 event notification"),
        ('{"Records": {}}', "'Records' is an object, not an array"),
        ('{"Records": [{"eventName": "ObjectCreated:Put"}]}', "Records[0].s3 is missing"),
        ('{"Records": [1]}', "Records[0] is a number"),
        ('{"Records": [], "x": NaN}', "NaN"),
        ("[" * 100_000, "nested"),
        ('{"a":' * 50_000 + "1" + "}" * 50_000, "nested"),
        ("1" * 5000, "not valid JSON"),  # more digits than Python converts
        (json.dumps({"Records": [{}] * 101}), "more than 100"),
        ("x" * 1_100_000, "bytes, more than"),
        (json.dumps({"Type": "Notification", "Message": sns_envelope("{}")}), "wraps another"),
    ],
)
def test_malformed_messages_give_a_readable_error(body: str | bytes, says: str) -> None:
    with pytest.raises(EventError) as raised:
        parse_message(body, bucket=BUCKET, layout=LAYOUT)
    assert says in str(raised.value)
    assert len(str(raised.value)) < 400


def test_a_deep_python_object_is_refused_without_recursion_error() -> None:
    event: object = {}
    for _ in range(100_000):
        event = {"a": event}
    with pytest.raises(EventError, match="nested"):
        parse_document(event, bucket=BUCKET, layout=LAYOUT)
    shallow: object = {}
    for _ in range(MAX_DEPTH - 1):
        shallow = {"a": shallow}
    with pytest.raises(EventError, match="not an S3 event"):
        parse_document(shallow, bucket=BUCKET, layout=LAYOUT)


PROPERTY = settings(
    max_examples=300,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=30,
)

# Values shaped almost like S3 records, so the property reaches the record checks too.
record_like = st.fixed_dictionaries(
    {
        "eventName": st.sampled_from(["ObjectCreated:Put", "ObjectRemoved:Delete", 3, None]),
        "s3": st.fixed_dictionaries(
            {
                "bucket": st.fixed_dictionaries(
                    {"name": st.sampled_from([BUCKET, "other", 7, None])}
                ),
                "object": st.fixed_dictionaries(
                    {"key": st.text(max_size=40) | st.sampled_from(["input/a.json", "%FF"])}
                ),
            }
        )
        | json_values,
    }
)


@PROPERTY
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_escape_as_anything_but_event_error(body: bytes) -> None:
    with contextlib.suppress(EventError):
        parse_message(body, bucket=BUCKET, layout=LAYOUT)


@PROPERTY
@given(json_values | st.fixed_dictionaries({"Records": st.lists(record_like, max_size=3)}))
def test_arbitrary_json_never_escapes_as_anything_but_event_error(value: object) -> None:
    for body in (
        json.dumps(value),
        json.dumps({"Type": "Notification", "Message": json.dumps(value)}),
    ):
        try:
            parsed = parse_message(body, bucket=BUCKET, layout=LAYOUT)
        except EventError:
            continue
        for key in parsed.keys:
            assert LAYOUT.is_manifest(key)
