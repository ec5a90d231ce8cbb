"""What one SQS message (or one Lambda event) says about the bucket: which manifests arrived.

Pure parsing, no I/O, so the SQS listener, the dispatcher and the Lambda handler share it and it
can be tested on arbitrary input. Everything here is untrusted: anyone allowed to send to the
queue can put anything in it. A message is one of

- an S3 event notification (``{"Records": [{"eventName": "ObjectCreated:Put", "s3": ...}]}``),
  whose object keys are URL-encoded with ``+`` for a space, as S3 documents; they are decoded
  with :func:`urllib.parse.unquote_plus`, exactly as S3's documentation says to;
- S3's test event (``{"Event": "s3:TestEvent", ...}``), sent once when a notification is set up;
- an EventBridge ``Object Created`` event delivered to SQS by a rule (its key is decoded the
  same way: AWS tools treat both shapes alike);
- any of these wrapped once in an SNS notification (``{"Type": "Notification", "Message":
  "<json>"}``), which is what a queue subscribed to a topic receives when several consumers
  share the bucket's events.

A record that is valid but not for us (another bucket, another prefix, a bookkeeping object
such as ``<input>/_claims/x.json``, a deletion) is *ignored* with a reason the caller logs at
debug level. A message that is not one of the shapes above raises :class:`EventError`, with a
sentence a person can read; nothing else ever escapes (no RecursionError, no ValueError).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus

from processor import Comfys3Error, Layout, StorageError, validate_key

# SQS accepts messages up to 1 MiB; an S3 notification is about 1 KiB.
MAX_MESSAGE_BYTES = 1_048_576
# S3 notifications nest 4 levels deep, EventBridge 3, plus one for an SNS envelope.
MAX_DEPTH = 16
# S3 puts one record in a message; a few more are tolerated, thousands are refused.
MAX_RECORDS = 100
# An S3 key is at most 1024 bytes; URL-encoding can triple that.
MAX_ENCODED_KEY = 3 * 1024 + 16
_SHOWN = 80  # how much of an untrusted string a message quotes


class EventError(Comfys3Error):
    """A message that is none of the shapes an S3 bucket sends; the text says what is wrong."""


@dataclass(frozen=True)
class ParsedEvent:
    """What a message announced.

    ``keys``: manifest keys (decoded, in order, each once) of this intake. ``ignored``: one
    reason per record that named no manifest of this intake. ``test_event``: S3's set-up check.
    """

    keys: tuple[str, ...] = ()
    ignored: tuple[str, ...] = field(default_factory=tuple)
    test_event: bool = False
    shape: str = "s3"


def parse_message(body: str | bytes, *, bucket: str, layout: Layout) -> ParsedEvent:
    """One SQS message body -> the manifest keys it announces, or :class:`EventError`."""
    data = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    if not isinstance(data, bytes | bytearray):
        raise EventError(f"the message body is {type(body).__name__}, not text")
    if len(data) > MAX_MESSAGE_BYTES:
        raise EventError(f"the message is {len(data)} bytes, more than {MAX_MESSAGE_BYTES}")
    document = _load_json(bytes(data))
    return parse_document(document, bucket=bucket, layout=layout)


def parse_document(document: Any, *, bucket: str, layout: Layout) -> ParsedEvent:
    """An already-decoded event (a Lambda ``event``, or a parsed message body)."""
    try:
        depth = _depth(document)
    except RecursionError:  # a Python object nested deeper than the interpreter allows
        raise EventError("the event is nested too deeply") from None
    if depth > MAX_DEPTH:
        raise EventError(f"the event is nested {depth} levels deep, more than {MAX_DEPTH}")
    return _parse(document, bucket=bucket, layout=layout, wrapped=False)


def _parse(document: Any, *, bucket: str, layout: Layout, wrapped: bool) -> ParsedEvent:
    if not isinstance(document, Mapping):
        raise EventError(f"the message is {_kind(document)}, not a JSON object")
    if document.get("Type") == "Notification" and "Message" in document:
        if wrapped:
            raise EventError("an SNS notification wraps another SNS notification")
        inner = document["Message"]
        if not isinstance(inner, str):
            raise EventError("the SNS notification's 'Message' is not a string")
        parsed = _parse(
            _load_json(inner.encode("utf-8", "surrogatepass")),
            bucket=bucket,
            layout=layout,
            wrapped=True,
        )
        return ParsedEvent(parsed.keys, parsed.ignored, parsed.test_event, f"sns/{parsed.shape}")
    if document.get("Event") == "s3:TestEvent":
        return ParsedEvent(test_event=True, shape="s3-test")
    if "Records" in document:
        return _notification(document["Records"], bucket=bucket, layout=layout)
    if "detail-type" in document and "detail" in document:
        return _eventbridge(document, bucket=bucket, layout=layout)
    present = ", ".join(repr(_short(str(k))) for k in list(document)[:5]) or "no keys"
    raise EventError(
        "the message is not an S3 event notification, an S3 test event or an EventBridge "
        f"S3 event (it has {present})"
    )


def _notification(records: Any, *, bucket: str, layout: Layout) -> ParsedEvent:
    if not isinstance(records, list):
        raise EventError(f"'Records' is {_kind(records)}, not an array")
    if len(records) > MAX_RECORDS:
        raise EventError(f"the message has {len(records)} records, more than {MAX_RECORDS}")
    keys: list[str] = []
    ignored: list[str] = []
    for index, record in enumerate(records):
        where = f"Records[{index}]"
        if not isinstance(record, Mapping):
            raise EventError(f"{where} is {_kind(record)}, not an object")
        name = _text(record.get("eventName"), f"{where}.eventName")
        s3 = _object(record.get("s3"), f"{where}.s3")
        record_bucket = _text(
            _object(s3.get("bucket"), f"{where}.s3.bucket").get("name"), f"{where}.s3.bucket.name"
        )
        encoded = _text(
            _object(s3.get("object"), f"{where}.s3.object").get("key"), f"{where}.s3.object.key"
        )
        # S3 names them "ObjectCreated:Put"; some S3-compatible servers add the "s3:" prefix.
        created = name.removeprefix("s3:").startswith("ObjectCreated:")
        _classify(created, name, record_bucket, encoded, bucket, layout, keys, ignored)
    return ParsedEvent(tuple(keys), tuple(ignored), shape="s3")


def _eventbridge(document: Mapping[str, Any], *, bucket: str, layout: Layout) -> ParsedEvent:
    source = document.get("source")
    kind = _text(document.get("detail-type"), "detail-type")
    if source != "aws.s3":
        return ParsedEvent(
            ignored=(f"an EventBridge event from {_short(str(source))!r}, not aws.s3",),
            shape="eventbridge",
        )
    detail = _object(document.get("detail"), "detail")
    record_bucket = _text(
        _object(detail.get("bucket"), "detail.bucket").get("name"), "detail.bucket.name"
    )
    encoded = _text(_object(detail.get("object"), "detail.object").get("key"), "detail.object.key")
    keys: list[str] = []
    ignored: list[str] = []
    _classify(kind == "Object Created", kind, record_bucket, encoded, bucket, layout, keys, ignored)
    return ParsedEvent(tuple(keys), tuple(ignored), shape="eventbridge")


def _classify(
    created: bool,
    event_name: str,
    record_bucket: str,
    encoded_key: str,
    bucket: str,
    layout: Layout,
    keys: list[str],
    ignored: list[str],
) -> None:
    if not created:
        ignored.append(f"{_short(event_name)!r} is not an object creation")
        return
    if record_bucket != bucket:
        ignored.append(f"bucket {_short(record_bucket)!r} is not {bucket!r}")
        return
    if len(encoded_key) > MAX_ENCODED_KEY:
        ignored.append(f"a key of {len(encoded_key)} characters is too long to be an S3 key")
        return
    try:
        key = unquote_plus(encoded_key, encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        ignored.append(f"key {_short(encoded_key)!r} does not decode to UTF-8")
        return
    try:
        validate_key(key)
    except StorageError as error:
        ignored.append(str(error))
        return
    if not layout.is_manifest(key):
        ignored.append(f"{_short(key)!r} is not a manifest directly under {layout.input_dir}/")
        return
    if key not in keys:
        keys.append(key)


def _load_json(data: bytes) -> Any:
    """JSON with the limits the standard parser lacks: depth (checked before parsing, so no
    RecursionError), and no NaN/Infinity; every failure becomes an :class:`EventError`."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise EventError(f"the message is not UTF-8 text (byte {error.start})") from None
    depth = _text_depth(text)
    if depth > MAX_DEPTH:
        raise EventError(f"the message is nested {depth} levels deep, more than {MAX_DEPTH}")
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except EventError:
        raise
    except (ValueError, RecursionError) as error:  # JSONDecodeError, huge integers
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise EventError(f"the message is not valid JSON: {_short(detail)}") from None


def _refuse_constant(name: str) -> Any:
    raise EventError(f"the message contains {name}, which is not JSON")


def _text_depth(text: str) -> int:
    """The deepest nesting of ``[``/``{`` outside strings; stops counting past the limit."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_DEPTH:
                    return deepest
        elif char in "]}":
            depth -= 1
    return deepest


def _depth(value: Any, level: int = 0) -> int:
    """Nesting of containers in a decoded event (a scalar is 0); stops past the limit."""
    if isinstance(value, Mapping):
        children: Any = value.values()
    elif isinstance(value, list | tuple):
        children = value
    else:
        return level
    if level >= MAX_DEPTH:
        return level + 1
    return max((_depth(child, level + 1) for child in children), default=level + 1)


def _object(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise EventError(f"{where} is {_kind(value)}, not an object")
    return value


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise EventError(f"{where} is {_kind(value)}, not a string")
    return value


def _kind(value: Any) -> str:
    if value is None:
        return "missing or null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number" if not isinstance(value, float) or math.isfinite(value) else "NaN"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def _short(text: str) -> str:
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."
