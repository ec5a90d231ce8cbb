"""Helpers for tests that run real worker processes: the `comfys3` command with S3 settings in
its environment, and the fake ComfyUI as a process of its own that several workers share."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from processor.settings import S3Settings
from tests.s3_servers import free_port

ROOT = Path(__file__).resolve().parent.parent


def s3_env(settings: S3Settings, **extra: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMFYS3_")}
    env.update(
        {
            "COMFYS3_S3_REGION": settings.region,
            "COMFYS3_S3_ACCESS_KEY": settings.access_key.get_secret_value(),
            "COMFYS3_S3_SECRET_KEY": settings.secret_key.get_secret_value(),
            "COMFYS3_S3_BUCKET_NAME": settings.bucket_name,
            "COMFYS3_S3_ENDPOINT_URL": settings.endpoint_url,
            "COMFYS3_S3_INPUT_DIR": settings.input_dir,
            "COMFYS3_S3_OUTPUT_DIR": settings.output_dir,
        }
    )
    env.update({f"COMFYS3_{k.upper()}": str(v) for k, v in extra.items()})
    return env


def comfys3(*args: str) -> list[str]:
    return [sys.executable, "-m", "triggers.cli", *args]


def s3_client(settings: S3Settings) -> Any:
    return boto3.client(
        "s3",
        region_name=settings.region,
        endpoint_url=settings.endpoint_url,
        aws_access_key_id=settings.access_key.get_secret_value(),
        aws_secret_access_key=settings.secret_key.get_secret_value(),
        config=Config(s3={"addressing_style": "path"}, retries={"mode": "standard"}),
    )


def put_manifest(client: Any, settings: S3Settings, name: str, document: Any) -> None:
    client.put_object(
        Bucket=settings.bucket_name,
        Key=f"{settings.input_dir}/{name}.json",
        Body=json.dumps(document).encode(),
    )


def get_json(client: Any, settings: S3Settings, key: str) -> Any:
    body = client.get_object(Bucket=settings.bucket_name, Key=key)["Body"].read()
    return json.loads(body)


def keys(client: Any, settings: S3Settings, prefix: str, delimiter: str | None = None) -> list[str]:
    params: dict[str, Any] = {"Bucket": settings.bucket_name, "Prefix": prefix}
    if delimiter:
        params["Delimiter"] = delimiter
    found: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(**params):
        found += [item["Key"] for item in page.get("Contents", [])]
    return found


class FakeComfyProcess:
    """The fake ComfyUI in its own process, so worker processes can share it."""

    def __init__(self, base: Path, **knobs: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        env.update({f"FAKE_COMFYUI_{k.upper()}": str(v) for k, v in knobs.items()})
        base.mkdir(parents=True, exist_ok=True)
        self.log = base / "fake.log"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.fake_comfyui", "--port", str(self.port),
             "--base-directory", str(base)],
            cwd=ROOT, env=env, stdout=self.log.open("wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/system_stats", timeout=1).read()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"fake ComfyUI did not start: {self.log.read_text()[-2000:]}")

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/fake/stats", timeout=5) as response:
            return json.loads(response.read())  # type: ignore[no-any-return]

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


@contextmanager
def fake_comfy_process(base: Path, **knobs: Any) -> Iterator[FakeComfyProcess]:
    fake = FakeComfyProcess(base, **knobs)
    try:
        yield fake
    finally:
        fake.stop()


def wait_until(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")
