"""SQS queues fed by a bucket's event notifications, on the moto server the S3 tests use.

moto's server delivers S3 notifications to SQS itself (``moto/s3/notifications.py``: every
PutObject, CopyObject and CompleteMultipartUpload that matches a QueueConfiguration's events
and prefix/suffix filter becomes a message, its key URL-encoded with ``quote_plus``, and
setting the configuration sends S3's ``s3:TestEvent``), so these tests see what S3 would send.
"""

from __future__ import annotations

import functools
import json
import uuid
from dataclasses import dataclass
from typing import Any

import boto3
from botocore.config import Config

from processor.settings import S3Settings, SqsSettings
from tests.s3_servers import S3Server


@functools.cache
def sqs_client(server: S3Server) -> Any:
    return boto3.client(
        "sqs",
        endpoint_url=server.endpoint_url,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        region_name=server.region,
        config=Config(retries={"max_attempts": 2}),
    )


@dataclass(frozen=True)
class EventQueue:
    server: S3Server
    s3: S3Settings
    sqs: SqsSettings

    @property
    def url(self) -> str:
        return self.sqs.queue_url

    def send(self, body: str) -> None:
        """A message as S3 (or someone else with access to the queue) would send it."""
        sqs_client(self.server).send_message(QueueUrl=self.url, MessageBody=body)

    def counts(self) -> tuple[int, int]:
        """(visible, in flight) messages, as SQS reports them."""
        attributes = sqs_client(self.server).get_queue_attributes(
            QueueUrl=self.url,
            AttributeNames=[
                "ApproximateNumberOfMessages",
                "ApproximateNumberOfMessagesNotVisible",
            ],
        )["Attributes"]
        return (
            int(attributes["ApproximateNumberOfMessages"]),
            int(attributes["ApproximateNumberOfMessagesNotVisible"]),
        )

    def receive_bodies(self, wait: int = 0) -> list[str]:
        answer = sqs_client(self.server).receive_message(
            QueueUrl=self.url, MaxNumberOfMessages=10, WaitTimeSeconds=wait
        )
        return [message["Body"] for message in answer.get("Messages", [])]

    def put(self, key: str, body: bytes = b"{}") -> None:
        self.server.client().put_object(Bucket=self.s3.bucket_name, Key=key, Body=body)


def notifying_queue(
    server: S3Server, s3: S3Settings, *, prefix: str | None = None, **sqs_overrides: Any
) -> EventQueue:
    """A fresh queue, and the bucket's ObjectCreated notifications for ``<input>/*.json``
    pointed at it (the configuration docs/events.md tells users to set)."""
    client = sqs_client(server)
    name = f"comfys3-events-{uuid.uuid4().hex[:12]}"
    url = client.create_queue(QueueName=name)["QueueUrl"]
    arn = client.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    rules = [
        {"Name": "prefix", "Value": f"{prefix if prefix is not None else s3.input_dir}/"},
        {"Name": "suffix", "Value": ".json"},
    ]
    server.client().put_bucket_notification_configuration(
        Bucket=s3.bucket_name,
        NotificationConfiguration={
            "QueueConfigurations": [
                {
                    "Id": "comfys3-manifests",
                    "QueueArn": arn,
                    "Events": ["s3:ObjectCreated:*"],
                    "Filter": {"Key": {"FilterRules": rules}},
                }
            ]
        },
    )
    values: dict[str, Any] = {"queue_url": url, "endpoint_url": server.endpoint_url}
    values.update(sqs_overrides)
    return EventQueue(server, s3, SqsSettings(**values))


def message_keys(body: str) -> list[str]:
    document = json.loads(body)
    return [record["s3"]["object"]["key"] for record in document.get("Records", [])]
