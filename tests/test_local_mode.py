"""`comfys3 run --local DIR`: a folder instead of S3, with dropped manifests picked up at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

from tests.workers import ROOT, comfys3, wait_until


def test_dropped_manifest_is_picked_up_by_the_folder_watch(
    tmp_path: Path, fake_comfyui: Any
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMFYS3_")}
    # The fallback poll is an hour away: only the watch can pick the manifest up in time.
    env.update({"COMFYS3_COMFYUI_URL": fake_comfyui.url, "COMFYS3_POLL_MAX_INTERVAL": "3600"})
    log = tmp_path / "worker.log"
    worker = subprocess.Popen(
        comfys3("run", "--local", str(tmp_path), "--log-format", "json"),
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log.open("w"), text=True,
    )  # fmt: skip
    try:
        # Drop the manifest only after the first, empty listing: then only the watch can see it.
        wait_until(lambda: log.exists() and "idle" in log.read_text(), 30, "the worker to idle")
        status_path = tmp_path / "output" / "dropped" / "status.json"
        (tmp_path / "input" / "dropped.json").write_text(json.dumps({"workflow": "solid"}))
        status = wait_until(
            lambda: status_path.exists()
            and json.loads(status_path.read_text())["state"] == "succeeded"
            and json.loads(status_path.read_text()),
            20,
            "the dropped manifest to run",
        )
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
    err = log.read_text()
    assert worker.returncode == 0, err[-2000:]
    assert status["outputs"][0]["key"] == "output/dropped/3_SaveImage_001.png"
    assert (tmp_path / status["outputs"][0]["key"]).read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "input" / "_done" / "dropped.json").exists()
    for line in err.strip().splitlines():  # --log-format json: every line is a JSON object
        assert isinstance(json.loads(line), dict)
