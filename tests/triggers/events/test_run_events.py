"""`comfys3 run --events sqs` as users run it: a worker process, moto's S3 notifying a queue
(moto in server mode sends real S3 event messages), and the fake ComfyUI.

The fallback listing is set far beyond the test's length, so a manifest uploaded while the
worker idles can only have been claimed because its event arrived; the last test shortens it
and drops the events to show the listing still finds what the queue never announced.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from processor.settings import S3Settings
from tests.event_shapes import s3_notification, s3_test_event
from tests.s3_servers import S3Server, s3_settings_for
from tests.sqs_queues import EventQueue, notifying_queue, sqs_client
from tests.workers import (
    ROOT,
    FakeComfyProcess,
    comfys3,
    fake_comfy_process,
    get_json,
    keys,
    put_manifest,
    s3_client,
    s3_env,
    wait_until,
)

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def queue(moto_server: S3Server) -> EventQueue:
    return notifying_queue(moto_server, s3_settings_for(moto_server))


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeComfyProcess]:
    with fake_comfy_process(tmp_path / "fake", exec_delay=0.05) as process:
        yield process


@contextmanager
def events_worker(
    queue: EventQueue, fake: FakeComfyProcess, log: Path, **settings: Any
) -> Iterator[subprocess.Popen[bytes]]:
    env = s3_env(
        queue.s3,
        comfyui_url=fake.url,
        poll_max_interval=1,
        **{"events_fallback_interval": 600, **settings},
    )
    env["COMFYS3_SQS_QUEUE_URL"] = queue.url
    env["COMFYS3_SQS_ENDPOINT_URL"] = queue.server.endpoint_url
    with log.open("wb") as out:
        worker = subprocess.Popen(
            comfys3("run", "--events", "sqs"), env=env, cwd=ROOT, stdout=out, stderr=out
        )
        try:
            wait_until(
                lambda: "idle: nothing to claim" in log.read_text() or worker.poll() is not None,
                60,
                "the worker to start and go idle",
            )
            assert worker.poll() is None, log.read_text()
            yield worker
        finally:
            worker.terminate()
            worker.wait(30)


def status_of(settings: S3Settings, job_id: str) -> dict[str, Any] | None:
    try:
        key = f"{settings.output_dir}/{job_id}/status.json"
        return get_json(s3_client(settings), settings, key)  # type: ignore[no-any-return]
    except ClientError:
        return None


def final(settings: S3Settings, job_id: str) -> dict[str, Any]:
    return wait_until(  # type: ignore[no-any-return]
        lambda: (s := status_of(settings, job_id)) and s["state"] in ("succeeded", "failed") and s,
        30,
        f"job {job_id} to end",
    )


def queue_empty(queue: EventQueue) -> bool:
    attributes = sqs_client(queue.server).get_queue_attributes(
        QueueUrl=queue.url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return all(int(value) == 0 for value in attributes.values())


def test_uploads_are_claimed_from_their_events_and_odd_messages_are_harmless(
    queue: EventQueue, fake: FakeComfyProcess, tmp_path: Path
) -> None:
    s3 = queue.s3
    client = s3_client(s3)
    log = tmp_path / "worker.log"
    with events_worker(queue, fake, log):
        # Claimed long before the fallback listing (600 s): only the event can have named it.
        put_manifest(client, s3, "first", {"workflow": "solid", "payload": {}})
        assert final(s3, "first")["state"] == "succeeded"

        # A key with a space and non-ASCII letters arrives URL-encoded (`+` for the space).
        client.put_object(
            Bucket=s3.bucket_name,
            Key=f"{s3.input_dir}/a cat é.json",
            Body=json.dumps({"id": "spaced", "workflow": "solid", "payload": {}}).encode(),
        )
        assert final(s3, "spaced")["state"] == "succeeded"

        # The same event again (S3 delivers at least once), an event for a key that never
        # existed, and S3's test event: each is taken in, judged and deleted; nothing runs.
        queue.send(s3_notification(s3.bucket_name, f"{s3.input_dir}/first.json"))
        queue.send(s3_notification(s3.bucket_name, f"{s3.input_dir}/never-there.json"))
        queue.send(s3_test_event(s3.bucket_name))
        wait_until(lambda: queue_empty(queue), 30, "every message to be deleted")

        # ... and the worker still claims the next upload at once.
        put_manifest(client, s3, "after", {"workflow": "solid", "payload": {}})
        assert final(s3, "after")["state"] == "succeeded"
        wait_until(lambda: queue_empty(queue), 30, "the last message to be deleted")

    executed = fake.stats()["executed"]
    assert sorted(executed.values()) == [1, 1, 1], executed  # nothing ran twice
    assert keys(client, s3, f"{s3.input_dir}/", delimiter="/") == []
    assert keys(client, s3, f"{s3.input_dir}/_claims/") == []
    text = log.read_text()
    assert "listening for S3 events" in text and "Traceback" not in text
    assert status_of(s3, "never-there") is None


def test_the_fallback_listing_finds_what_no_event_announced(
    queue: EventQueue, fake: FakeComfyProcess, tmp_path: Path
) -> None:
    s3 = queue.s3
    client = s3_client(s3)
    log = tmp_path / "worker.log"
    with events_worker(queue, fake, log, events_fallback_interval=2):
        # Events dropped on purpose: the bucket stops notifying.
        queue.server.client().put_bucket_notification_configuration(
            Bucket=s3.bucket_name, NotificationConfiguration={}
        )
        put_manifest(client, s3, "unannounced", {"workflow": "solid", "payload": {}})
        assert final(s3, "unannounced")["state"] == "succeeded"
    assert queue_empty(queue)
    assert keys(client, s3, f"{s3.input_dir}/", delimiter="/") == []


def test_events_and_a_local_folder_do_not_mix(tmp_path: Path) -> None:
    result = subprocess.run(
        comfys3("run", "--events", "sqs", "--local", str(tmp_path)),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--events sqs" in result.stderr and "--local" in result.stderr
    assert "Traceback" not in result.stderr
