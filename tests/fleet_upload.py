"""The fleet bench's producer, in a process of its own: PUT the manifests (and, with events,
send the notification S3 would send after each PUT), then print when each PUT returned.

Its own process, so the upload runs at its own pace rather than in the gaps of hundreds of
workers' event loop, as a user's producer would. S3 and SQS settings come from the COMFYS3_*
variables, the plan as JSON in the first argument::

    python -m tests.fleet_upload '{"manifests": 100, "rate": 0, "uploaders": 16, ...}'

Prints one JSON document: ``uploaded`` ([key, time.time() when its PUT returned], ...) and
``requests`` (the S3 requests it sent, by operation, retries included).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import sys
import time
import uuid
from typing import Any

from processor.settings import load_s3_settings, load_sqs_settings
from processor.storage.layout import Layout
from processor.storage.s3 import S3Storage
from tests.event_shapes import s3_notification
from triggers.events.sqs import open_sqs_client

MANIFEST = json.dumps({"workflow": "solid", "payload": {}}).encode()


def manifest_name(n: int, names: str) -> str:
    """``counter``: job0000042, what most producers write; ``hash``: a short hash first."""
    if names == "hash":
        return f"{uuid.uuid5(uuid.NAMESPACE_OID, str(n)).hex[:6]}-job{n:07d}"
    return f"job{n:07d}"


async def upload(plan: dict[str, Any]) -> dict[str, Any]:
    s3 = load_s3_settings()
    layout = Layout(s3.input_dir, s3.output_dir)
    sqs_settings = load_sqs_settings() if plan.get("events") else None
    uploaded: list[tuple[str, float]] = []
    requests: collections.Counter[str] = collections.Counter()
    rate = float(plan.get("rate", 0.0))
    duplicates = float(plan.get("duplicate_events", 0.0))
    duplicate_every = round(1 / duplicates) if duplicates > 0 else 0
    names = iter(range(int(plan["manifests"])))
    started = time.monotonic()

    def count(event_name: str = "", **_: Any) -> None:
        requests[event_name.rsplit(".", 1)[-1]] += 1

    async with contextlib.AsyncExitStack() as stack:
        storage = await stack.enter_async_context(S3Storage(s3))
        storage._client.meta.events.register("before-send.s3", count)
        sqs = None
        if sqs_settings is not None:
            sqs = await stack.enter_async_context(open_sqs_client(sqs_settings, s3))

        # What S3 would send: one message per object, one record per message. Sent in
        # batches of ten (the producer's economy; every message is still one key).
        announced: asyncio.Queue[str | None] = asyncio.Queue()

        async def announcer() -> None:
            done = False
            while not done:
                batch = [await announced.get()]
                while len(batch) < 10 and not announced.empty():
                    batch.append(announced.get_nowait())
                done = None in batch
                keys = [key for key in batch if key is not None]
                if sqs is None or sqs_settings is None or not keys:
                    continue
                entries = [
                    {"Id": str(n), "MessageBody": s3_notification(s3.bucket_name, key)}
                    for n, key in enumerate(keys)
                ]
                await sqs.send_message_batch(QueueUrl=sqs_settings.queue_url, Entries=entries)

        async def uploader() -> None:
            for n in names:
                if rate > 0:
                    await asyncio.sleep(max(0.0, started + n / rate - time.monotonic()))
                key = layout.manifest_key(manifest_name(n, plan.get("names", "counter")))
                await storage.put(key, MANIFEST, content_type="application/json")
                uploaded.append((key, time.time()))
                twice = duplicate_every and n % duplicate_every == 0
                for _ in range(2 if twice else 1):
                    announced.put_nowait(key)

        sending = asyncio.create_task(announcer())
        await asyncio.gather(*(uploader() for _ in range(int(plan.get("uploaders", 16)))))
        for name in plan.get("ghosts", []):
            announced.put_nowait(layout.manifest_key(name))
        announced.put_nowait(None)
        await sending
    return {"uploaded": uploaded, "requests": dict(requests)}


def main() -> None:
    print(json.dumps(asyncio.run(upload(json.loads(sys.argv[1])))))


if __name__ == "__main__":
    main()
