"""``comfys3 dispatch`` as an AWS Lambda handler: S3 event in, RunPod requests out.

Subscribe the function to the bucket's ``s3:ObjectCreated:*`` events under the intake prefix
(or to the SQS queue they feed), and optionally to an EventBridge schedule for the full sweep
that catches lost events and removes the markers of finished manifests. Handler:
``triggers.events.lambda_dispatch.handler``; the settings are the same environment variables as the
command's (COMFYS3_S3_*, COMFYS3_RUNPOD_ENDPOINT_ID, RUNPOD_API_KEY, ...). See docs/events.md.

The event decides what runs:

- an S3 notification (``Records[].s3``): each manifest it names is dispatched;
- an SQS batch (``Records[].body``): each body is parsed as the worker's listener does;
- a scheduled event (``"source": "aws.events"``, ``"detail-type": "Scheduled Event"``):
  a full sweep.

When a RunPod request fails for good the handler raises, so Lambda retries the event (or SQS
redelivers the batch); the markers keep the manifests already sent from being sent twice.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from typing import Any

from processor import Comfys3Error, Layout, load_dispatch_settings, load_s3_settings
from triggers.events.dispatch import Dispatch, Verdict, open_dispatcher, summarise
from triggers.events.notifications import EventError, parse_document, parse_message

log = logging.getLogger("comfys3.dispatch")


class DispatchFailed(Comfys3Error):
    """Some manifests could not be sent; raising makes Lambda try the event again."""


def event_keys(event: Any, *, bucket: str, layout: Layout) -> tuple[list[str], bool]:
    """(manifest keys, whether a full sweep is asked for) from a Lambda event."""
    if isinstance(event, Mapping) and event.get("source") == "aws.events":
        return [], True
    records = event.get("Records") if isinstance(event, Mapping) else None
    keys: list[str] = []
    if (
        isinstance(records, list)
        and records
        and all(isinstance(r, Mapping) and r.get("eventSource") == "aws:sqs" for r in records)
    ):
        for record in records:  # one bad message must not hide the others
            body = record.get("body")
            for key in _keys(body if isinstance(body, str) else "", bucket, layout):
                if key not in keys:
                    keys.append(key)
    else:
        keys = _keys(event, bucket, layout)
    return keys, False


def _keys(message: Any, bucket: str, layout: Layout) -> list[str]:
    """An SQS body (text) or a Lambda S3 event (an object) -> its manifest keys."""
    try:
        if isinstance(message, str):
            parsed = parse_message(message, bucket=bucket, layout=layout)
        else:
            parsed = parse_document(message, bucket=bucket, layout=layout)
    except EventError as error:
        log.warning("ignoring a message that is not an S3 notification: %s", error)
        return []
    _log_ignored(parsed.ignored)
    return list(parsed.keys)


def _log_ignored(reasons: tuple[str, ...]) -> None:
    for reason in reasons:
        log.debug("event ignored: %s", reason)


async def handle(event: Any) -> dict[str, Any]:
    s3 = load_s3_settings()
    settings = load_dispatch_settings()
    layout = Layout(s3.input_dir, s3.output_dir)
    keys, sweep = event_keys(event, bucket=s3.bucket_name, layout=layout)
    if not keys and not sweep:
        return summarise([])
    name = f"lambda-{os.environ.get('AWS_LAMBDA_FUNCTION_NAME', 'dispatch')}"
    async with open_dispatcher(s3, settings, name) as dispatcher:
        results: list[Dispatch]
        if sweep:
            results = await dispatcher.sweep(full=True)
        else:
            results = list(await asyncio.gather(*(dispatcher.dispatch(k) for k in keys)))
    summary = summarise(results)
    failed = [r for r in results if r.verdict is Verdict.failed]
    if failed:
        raise DispatchFailed(
            "could not dispatch " + "; ".join(f"{r.key}: {r.detail}" for r in failed)[:2000]
        )
    return summary


def handler(event: Any, context: Any) -> dict[str, Any]:
    """The Lambda entry point: one ``asyncio.run`` per invocation."""
    logging.getLogger().setLevel(logging.INFO)  # Lambda's own handler starts at WARNING
    return asyncio.run(handle(event))
