"""The commands as a user runs them: ``comfys3 run`` serving the jobs API beside its worker
(SeaweedFS and the fake ComfyUI, each a process of its own), and ``comfys3 serve`` alone."""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from processor.settings import S3Settings
from tests.s3_servers import free_port
from tests.workers import ROOT, comfys3, fake_comfy_process, s3_env, wait_until

pytestmark = pytest.mark.timeout(240)

TOKEN = "a-token-for-the-serve-tests"


def call(
    url: str, method: str = "GET", body: Any = None, token: str | None = TOKEN
) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def answering(url: str, process: subprocess.Popen[bytes], log: Path) -> bool:
    if process.poll() is not None:
        raise AssertionError(f"exited {process.returncode}:\n{log.read_text()[-3000:]}")
    try:
        return call(f"{url}/healthz", token=None)[0] == 200
    except OSError:
        return False


def succeeded(url: str) -> tuple[int, Any] | None:
    answer = call(url)
    return answer if answer[1].get("state") == "succeeded" else None


@contextmanager
def running(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        process = subprocess.Popen(
            comfys3(*args), env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_run_serves_the_api_beside_its_worker(
    seaweed_s3_settings: S3Settings, tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "run.log"
    with fake_comfy_process(tmp_path / "comfy") as fake:
        env = s3_env(
            seaweed_s3_settings,
            comfyui_url=fake.url,
            api_port=port,
            api_token=TOKEN,
            worker_id="api-run",
            poll_max_interval=0.5,
        )
        with running(["run"], env, log) as process:
            wait_until(lambda: answering(url, process, log), 60, "the jobs API to answer")
            job = {"id": "by-http", "workflow": "solid", "payload": {"color": 255}}
            refused = call(f"{url}/jobs", "POST", job, token=None)
            created = call(f"{url}/jobs", "POST", job)
            done = wait_until(lambda: succeeded(f"{url}/jobs/by-http"), 60, "the job to succeed")
            _, openapi = call(f"{url}/openapi.json", token=None)
        assert process.returncode == 0, log.read_text()[-3000:]

    assert refused[0] == 401 and "bearer token" in refused[1]["error"]
    assert created == (201, {"jobs": [{"id": "by-http", "manifest_key": "input/by-http.json"}],
                             "warnings": []})  # fmt: skip
    status, document = done
    assert status == 200 and document["worker"] == "api-run"
    assert [o["key"] for o in document["outputs"]] == ["output/by-http/3_SaveImage_001.png"]
    assert "/jobs" in openapi["paths"]
    text = log.read_text()
    assert f"jobs API at {url}" in text and "Traceback" not in text


def test_serve_alone_on_a_local_folder(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"PATH": "/usr/bin:/bin", "COMFYS3_API_ALLOW_NO_TOKEN": "1"}
    args = ["serve", "--local", str(tmp_path / "jobs"), "--port", str(port)]
    with running(args, env, tmp_path / "serve.log") as process:
        wait_until(lambda: answering(url, process, tmp_path / "serve.log"), 60, "serve")
        created = call(f"{url}/jobs", "POST", {"id": "here", "workflow": "solid"}, token=None)
        view = call(f"{url}/jobs/here", token=None)
    assert process.returncode == 0
    assert created[0] == 201 and (tmp_path / "jobs" / "input" / "here.json").is_file()
    assert view == (200, {"id": "here", "state": "waiting", "manifest_key": "input/here.json"})


def test_serve_without_a_token_exits_2_saying_what_to_set(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "COMFYS3_API_ALLOW_NO_TOKEN": "1"}
    result = subprocess.run(
        comfys3("serve", "--local", str(tmp_path), "--host", "0.0.0.0", "--port", "1"),
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().endswith(
        "comfys3: COMFYS3_API_ALLOW_NO_TOKEN is honoured only on a loopback address, not "
        "0.0.0.0: set COMFYS3_API_TOKEN, or listen on 127.0.0.1"
    )
    assert "Traceback" not in result.stderr
