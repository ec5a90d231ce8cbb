"""`comfys3 run` started while S3 is down waits for it, saying so, and then runs jobs; one whose
S3 refuses it (wrong secret, no such bucket) stops at once with the reason; SIGTERM during the
wait stops it cleanly. Real processes: the worker, and SeaweedFS started late on its port."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from processor.settings import S3Settings
from tests.s3_servers import S3Server, WeedMini, free_port, s3_settings_for
from tests.workers import ROOT, comfys3, get_json, put_manifest, s3_env, wait_until

pytestmark = pytest.mark.timeout(120)


def start_worker(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            comfys3("run", *args), env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )


def stop(worker: subprocess.Popen[bytes]) -> int:
    worker.send_signal(signal.SIGTERM)
    try:
        return worker.wait(30)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)


def test_a_worker_started_while_s3_is_down_waits_then_runs_jobs(
    tmp_path: Path, fake_comfyui: Any
) -> None:
    weed = WeedMini(tmp_path / "weed")
    server = weed.start()  # once, for a bucket and a manifest; then S3 goes away
    settings = s3_settings_for(server)
    put_manifest(server.client(), settings, "late", {"workflow": "solid"})
    weed.stop()

    log = tmp_path / "worker.log"
    worker = start_worker(s3_env(settings, comfyui_url=fake_comfyui.url), log)
    try:
        wait_until(lambda: "not reachable" in log.read_text(), 30, "the wait to be logged")
        assert worker.poll() is None  # waiting, not given up
        weed.start()  # the same ports and data: S3 is back where the worker looks
        status = wait_until(lambda: _status(server, settings, "late"), 60, "the manifest to be run")
        assert status["state"] == "succeeded"
        assert stop(worker) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
        weed.stop()
    text = log.read_text()
    assert f"S3 at {settings.endpoint_url} not reachable (connection refused); trying again in" in (
        text
    )
    assert "answers after" in text
    assert "Traceback" not in text


def _status(server: S3Server, settings: S3Settings, job_id: str) -> dict[str, Any] | None:
    try:
        status: dict[str, Any] = get_json(
            server.client(), settings, f"{settings.output_dir}/{job_id}/status.json"
        )
    except Exception:
        return None
    return status if status.get("state") in {"succeeded", "failed"} else None


@pytest.mark.parametrize(
    ("wrong", "said"),
    [
        ({"secret_key": SecretStr("not-the-secret")}, "COMFYS3_S3_SECRET_KEY"),
        ({"bucket_name": "no-such-bucket-here"}, "bucket does not exist"),
    ],
)
def test_a_worker_that_s3_refuses_stops_at_once_with_the_reason(
    tmp_path: Path, seaweedfs: S3Server, fake_comfyui: Any, wrong: dict[str, Any], said: str
) -> None:
    settings = s3_settings_for(seaweedfs).model_copy(update=wrong)
    log = tmp_path / "worker.log"
    worker = start_worker(s3_env(settings, comfyui_url=fake_comfyui.url), log)
    try:
        code = worker.wait(60)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
    text = log.read_text()
    assert code == 1, text
    assert said in text
    assert "not reachable" not in text and "trying again" not in text  # not one wait
    assert "not-the-secret" not in text


def test_sigterm_while_waiting_for_s3_stops_cleanly(tmp_path: Path, fake_comfyui: Any) -> None:
    settings = S3Settings(
        region="us-east-1",
        access_key=SecretStr("a"),
        secret_key=SecretStr("b"),
        bucket_name="bucket",
        endpoint_url=f"http://127.0.0.1:{free_port()}",
    )
    log = tmp_path / "worker.log"
    worker = start_worker(s3_env(settings, comfyui_url=fake_comfyui.url), log)
    try:
        wait_until(lambda: "not reachable" in log.read_text(), 30, "the wait to be logged")
        assert stop(worker) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
    text = log.read_text()
    assert "stopped before the worker was ready" in text
    assert "Traceback" not in text
