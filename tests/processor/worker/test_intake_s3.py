"""The S3 intake as users run it: `comfys3 run` processes against moto and a real S3 server."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from processor.settings import S3Settings
from tests.workers import (
    ROOT,
    comfys3,
    fake_comfy_process,
    get_json,
    keys,
    put_manifest,
    s3_client,
    s3_env,
    wait_until,
)


def status_or_none(client: Any, settings: S3Settings, job_id: str) -> Any:
    try:
        return get_json(client, settings, f"{settings.output_dir}/{job_id}/status.json")
    except ClientError:
        return None


def test_run_once_on_moto_writes_outputs_and_status(
    moto_s3_settings: S3Settings, fake_comfyui: Any
) -> None:
    client = s3_client(moto_s3_settings)
    put_manifest(
        client, moto_s3_settings, "job1", {"workflow": "txt2img", "payload": {"seed": 123}}
    )
    put_manifest(client, moto_s3_settings, "junk", {"workflow": "txt2img", "payload": "x"})

    result = subprocess.run(
        comfys3("run", "--once"),
        env=s3_env(moto_s3_settings, comfyui_url=fake_comfyui.url),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr
    assert "1 succeeded, 1 failed" in result.stdout
    status = get_json(client, moto_s3_settings, "output/job1/status.json")
    assert status["state"] == "succeeded" and status["payload"]["seed"] == 123
    image = client.get_object(Bucket=moto_s3_settings.bucket_name, Key=status["outputs"][0]["key"])
    assert image["ContentType"] == "image/png" and image["Body"].read().startswith(b"\x89PNG")
    junk = get_json(client, moto_s3_settings, "output/junk/status.json")
    assert junk["state"] == "failed" and "payload" in junk["error"]["message"]
    assert keys(client, moto_s3_settings, "input/", delimiter="/") == []
    assert "Traceback" not in result.stderr


def test_three_workers_share_sixty_manifests_on_seaweedfs(
    seaweed_s3_settings: S3Settings, tmp_path: Path
) -> None:
    settings = seaweed_s3_settings
    client = s3_client(settings)
    for n in range(60):
        put_manifest(client, settings, f"job{n:02d}", {"workflow": "solid", "payload": {}})

    with fake_comfy_process(tmp_path / "fake", exec_delay=0.05) as fake:
        env = s3_env(settings, comfyui_url=fake.url, lease_seconds=30)
        workers = [
            subprocess.Popen(
                comfys3("run", "--once"),
                env={**env, "COMFYS3_WORKER_ID": f"w{i}"},
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(3)
        ]
        outputs = [worker.communicate(timeout=240) for worker in workers]
        stats = fake.stats()

    assert [w.returncode for w in workers] == [0, 0, 0], [err[-2000:] for _, err in outputs]
    statuses = [get_json(client, settings, f"output/job{n:02d}/status.json") for n in range(60)]
    assert [s["state"] for s in statuses] == ["succeeded"] * 60
    executed = stats["executed"]
    assert len(executed) == 60 and set(executed.values()) == {1}
    assert keys(client, settings, "input/", delimiter="/") == []
    assert len(keys(client, settings, "input/_done/")) == 60
    assert keys(client, settings, "input/_claims/") == []
    # the work was really shared
    assert len({s["worker"] for s in statuses}) >= 2


def test_killed_worker_job_is_taken_over_after_lease(
    seaweed_s3_settings: S3Settings, tmp_path: Path
) -> None:
    settings = seaweed_s3_settings
    client = s3_client(settings)
    put_manifest(client, settings, "orphan", {"workflow": "txt2img", "payload": {"steps": 4}})

    with fake_comfy_process(tmp_path / "fake", exec_delay=3.0) as fake:
        env = s3_env(settings, comfyui_url=fake.url, lease_seconds=2, poll_max_interval=0.5)
        first = subprocess.Popen(
            comfys3("run"), env={**env, "COMFYS3_WORKER_ID": "doomed"}, cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_until(
            lambda: (status_or_none(client, settings, "orphan") or {}).get("state") == "running",
            30,
            "the first worker to start the job",
        )
        first.send_signal(signal.SIGKILL)
        first.wait(10)

        second = subprocess.Popen(
            comfys3("run"), env={**env, "COMFYS3_WORKER_ID": "rescuer"}, cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            final = wait_until(
                lambda: (
                    (s := status_or_none(client, settings, "orphan"))
                    and s["state"] == "succeeded"
                    and s
                ),
                60,
                "the second worker to finish the job",
            )
        finally:
            second.send_signal(signal.SIGTERM)
            _, err = second.communicate(timeout=60)

    assert second.returncode == 0, err[-2000:]
    assert final["attempt"] == 2 and final["worker"] == "rescuer"
    assert any("did not finish" in note for note in final["notes"])
    assert keys(client, settings, "input/_claims/") == []
    assert keys(client, settings, "input/", delimiter="/") == []


def test_run_once_with_unreachable_s3_fails_readably(
    moto_s3_settings: S3Settings, fake_comfyui: Any
) -> None:
    env = s3_env(moto_s3_settings, comfyui_url=fake_comfyui.url)
    env.update({"COMFYS3_S3_ENDPOINT_URL": "http://127.0.0.1:9", "COMFYS3_S3_RETRY_ATTEMPTS": "1"})
    result = subprocess.run(
        comfys3("run", "--once"), env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert result.stderr.startswith("comfys3: ")
    assert moto_s3_settings.bucket_name in result.stderr
    assert "Traceback" not in result.stderr
    assert moto_s3_settings.secret_key.get_secret_value() not in result.stderr
