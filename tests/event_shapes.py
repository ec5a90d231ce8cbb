"""Event messages shaped as AWS documents them, for tests that cannot get them from moto.

The S3 notification follows the "Event message structure" page of the Amazon S3 user guide
(version 2.1 records; the object key URL-encoded, a space as ``+``); the EventBridge event
follows "EventBridge event message structure"; the SNS envelope is what a queue subscribed to a
topic receives without raw message delivery.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote_plus


def s3_record(
    bucket: str, key: str, event_name: str = "ObjectCreated:Put", region: str = "us-east-1"
) -> dict[str, Any]:
    return {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": region,
        "eventTime": "2024-05-01T12:00:00.000Z",
        "eventName": event_name,
        "userIdentity": {"principalId": "AWS:AIDAEXAMPLE"},
        "requestParameters": {"sourceIPAddress": "203.0.113.7"},
        "responseElements": {
            "x-amz-request-id": "C3D13FE58DE4C810",
            "x-amz-id-2": "FMyUVURIY8/IgAtTv8xRjskZQpcIZ9KG4V5Wp6S7S/JRWeUWerMUE5JgHvANOjpD",
        },
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "comfys3-manifests",
            "bucket": {
                "name": bucket,
                "ownerIdentity": {"principalId": "A3NL1KOZZKExample"},
                "arn": f"arn:aws:s3:::{bucket}",
            },
            "object": {
                "key": quote_plus(key, safe="/"),
                "size": 1024,
                "eTag": "d41d8cd98f00b204e9800998ecf8427e",
                "versionId": "096fKKXTRTtl3on89fVO.nfljtsv6qko",
                "sequencer": "0055AED6DCD90281E5",
            },
        },
    }


def s3_notification(bucket: str, *keys: str, event_name: str = "ObjectCreated:Put") -> str:
    return json.dumps({"Records": [s3_record(bucket, key, event_name) for key in keys]})


def s3_test_event(bucket: str) -> str:
    return json.dumps(
        {
            "Service": "Amazon S3",
            "Event": "s3:TestEvent",
            "Time": "2024-05-01T12:00:00.000Z",
            "Bucket": bucket,
            "RequestId": "5582815E1AEA5ADF",
            "HostId": "8cLeGAmw098X5cv4Zkwcmo8vvZa3eH3eKxsPzbB9wrR+YstdA6Knx4Ip8EXAMPLE",
        }
    )


def eventbridge_created(bucket: str, key: str, detail_type: str = "Object Created") -> str:
    return json.dumps(
        {
            "version": "0",
            "id": "17793124-05d4-b198-2fde-7ededc63b103",
            "detail-type": detail_type,
            "source": "aws.s3",
            "account": "111122223333",
            "time": "2024-05-01T12:00:00Z",
            "region": "us-east-1",
            "resources": [f"arn:aws:s3:::{bucket}"],
            "detail": {
                "version": "0",
                "bucket": {"name": bucket},
                "object": {
                    "key": quote_plus(key, safe="/"),
                    "size": 5,
                    "etag": "b1946ac92492d2347c6235b4d2611184",
                    "sequencer": "617f08299329d189",
                },
                "request-id": "N4N7GDK58NMKJ12R",
                "requester": "123456789012",
                "source-ip-address": "1.2.3.4",
                "reason": "PutObject",
            },
        }
    )


def sns_envelope(message: str) -> str:
    return json.dumps(
        {
            "Type": "Notification",
            "MessageId": "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324",
            "TopicArn": "arn:aws:sns:us-east-1:123456789012:comfys3-manifests",
            "Subject": "Amazon S3 Notification",
            "Message": message,
            "Timestamp": "2024-05-01T12:00:00.000Z",
            "SignatureVersion": "1",
        }
    )


def lambda_s3_event(bucket: str, *keys: str) -> dict[str, Any]:
    """The ``event`` a Lambda subscribed to the bucket receives: the notification itself."""
    return json.loads(s3_notification(bucket, *keys))


def lambda_sqs_event(*bodies: str) -> dict[str, Any]:
    """The ``event`` of a Lambda fed by an SQS queue: each record carries a message body."""
    return {
        "Records": [
            {
                "messageId": f"059f36b4-87a3-44ab-83d2-66197560000{n}",
                "receiptHandle": "AQEBwJnKyrHigUMZj6rYigCgxlaS3SLy0a...",
                "body": body,
                "attributes": {"ApproximateReceiveCount": "1"},
                "messageAttributes": {},
                "md5OfBody": "e4e68fb7bd0e697a0ae8f1bb342846b3",
                "eventSource": "aws:sqs",
                "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:comfys3-manifests",
                "awsRegion": "us-east-1",
            }
            for n, body in enumerate(bodies)
        ]
    }
