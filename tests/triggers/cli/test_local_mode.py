"""`comfys3 run --local DIR`: a folder instead of S3, with dropped manifests picked up at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
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
            lambda: (
                status_path.exists()
                and json.loads(status_path.read_text())["state"] == "succeeded"
                and json.loads(status_path.read_text())
            ),
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
    lines = [json.loads(line) for line in err.strip().splitlines()]  # every line is JSON
    assert all(isinstance(line, dict) for line in lines)
    # What an operator follows: the worker ready, each claim, each job's end; no library noise.
    ready = [line for line in lines if "ready" in line["message"]]
    assert ready and ready[0]["comfyui"] == fake_comfyui.url, ready
    assert "templates: img2img, scale, solid, txt2img" in ready[0]["message"]
    claimed = [line for line in lines if line.get("manifest") == "input/dropped.json"]
    assert claimed and claimed[0]["attempt"] == 1
    done = [line for line in lines if line.get("job_id") == "dropped"]
    assert done and done[-1]["state"] == "succeeded" and done[-1]["outputs"] == 1, done
    assert not [line for line in lines if line["logger"].startswith("watchfiles")]


def start_local_worker(
    root: Path, fake: Any, **settings: str
) -> tuple[subprocess.Popen[str], Path]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMFYS3_")}
    env["COMFYS3_COMFYUI_URL"] = fake.url
    env.update({f"COMFYS3_{k.upper()}": v for k, v in settings.items()})
    log = root / "worker.log"
    worker = subprocess.Popen(
        comfys3("run", "--local", str(root)),
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log.open("w"), text=True,
    )  # fmt: skip
    return worker, log


def read_status(root: Path, job_id: str) -> dict[str, Any] | None:
    path = root / "output" / job_id / "status.json"
    try:
        return json.loads(path.read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


def start_busy_worker(
    root: Path, fake: Any, job_id: str, seconds: float, **settings: str
) -> tuple[subprocess.Popen[str], Path]:
    """A worker running one job that takes ``seconds`` on ComfyUI, once its status says so."""
    fake.state.exec_delay = seconds
    (root / "input").mkdir()
    (root / "input" / f"{job_id}.json").write_text(json.dumps({"workflow": "solid"}))
    worker, log = start_local_worker(root, fake, **settings)
    wait_until(lambda: (read_status(root, job_id) or {}).get("state") == "running", 30, "running")
    return worker, log


def test_sigterm_lets_the_running_job_finish(tmp_path: Path, fake_comfyui: Any) -> None:
    worker, log = start_busy_worker(tmp_path, fake_comfyui, "slow", 1.5)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=60) == 0, log.read_text()[-2000:]
    status = read_status(tmp_path, "slow")
    assert status is not None and status["state"] == "succeeded"
    assert not list((tmp_path / "input" / "_claims").glob("*.json"))
    text = log.read_text()  # the operator sees the stop asked for, and what the worker did
    assert "SIGTERM: no new claims; running jobs get up to 25 s to finish" in text
    assert "stopped: 1 job(s): 1 succeeded, 0 failed" in text


def test_sigterm_past_the_grace_gives_the_job_back(tmp_path: Path, fake_comfyui: Any) -> None:
    # A short lease renews every 0.3 s, so the claim's first ETag is stale when the job is
    # given back: the release must use the newest lease.
    worker, log = start_busy_worker(
        tmp_path, fake_comfyui, "long", 30, shutdown_grace="0.5", lease_seconds="0.9"
    )
    time.sleep(1.5)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0, log.read_text()[-2000:]
    status = read_status(tmp_path, "long")
    assert status is not None and status["state"] == "queued"
    assert any("given back" in note for note in status["notes"])
    claim = json.loads((tmp_path / "input" / "_claims" / "long.json").read_text())
    assert claim["state"] == "released" and claim["last_error"] == "worker stopped"
    assert claim["attempt"] == 0  # being stopped is not the job's fault: the try does not count
    assert (tmp_path / "input" / "long.json").exists()  # still pending for the next worker
    assert fake_comfyui.stats()["interrupted"]  # the prompt did not keep the GPU busy


def test_a_second_ctrl_c_stops_a_busy_worker_at_once_and_hands_the_job_back(
    tmp_path: Path, fake_comfyui: Any
) -> None:
    """The first SIGINT lets the running job finish (up to the 25 s grace) and says how to
    stop now; the second stops now: the job handed back, its claim released, nothing lost."""
    worker, log = start_busy_worker(tmp_path, fake_comfyui, "long", 60)
    worker.send_signal(signal.SIGINT)
    wait_until(lambda: "press Ctrl-C again" in log.read_text(), 10, "the first stop's message")
    time.sleep(1)
    assert worker.poll() is None  # still finishing the job, as the first Ctrl-C promised
    worker.send_signal(signal.SIGINT)
    began = time.monotonic()
    code = worker.wait(timeout=30)
    took = time.monotonic() - began
    text = log.read_text()
    assert code == 0, text[-2000:]
    assert took < 5, f"{took:.1f} s after the second Ctrl-C"
    assert "SIGINT: no new claims; running jobs get up to 25 s to finish" in text
    assert "press Ctrl-C again to stop now (running jobs are handed back)" in text
    assert "SIGINT again: stopping now" in text
    status = read_status(tmp_path, "long")
    assert status is not None and status["state"] == "queued"
    claim = json.loads((tmp_path / "input" / "_claims" / "long.json").read_text())
    assert claim["state"] == "released" and claim["attempt"] == 0
    assert (tmp_path / "input" / "long.json").exists()  # still waiting for the next worker
    # The summary counts the job it handed back (it said "0 jobs" before).
    assert "stopped: 1 job(s): 0 succeeded, 0 failed, 0 to retry, 0 skipped, 1 handed back" in text
    assert fake_comfyui.stats()["interrupted"]


def test_status_command_reads_a_job_for_a_person(tmp_path: Path, fake_comfyui: Any) -> None:
    (tmp_path / "input").mkdir()
    (tmp_path / "input" / "shown.json").write_text(
        json.dumps({"workflow": "solid", "metadata": {"who": "me"}})
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMFYS3_")}
    env["COMFYS3_COMFYUI_URL"] = fake_comfyui.url
    done = subprocess.run(
        comfys3("run", "--once", "--local", str(tmp_path)),
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0 and "1 succeeded" in done.stdout, done.stderr

    def status(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            comfys3("status", *args, "--local", str(tmp_path)),
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    shown = status("shown")
    assert shown.returncode == 0  # succeeded
    assert shown.stdout.startswith("job shown: succeeded (attempt 1)")
    assert "output/shown/3_SaveImage_001.png (image/png" in shown.stdout
    raw = status("shown", "--json")
    assert raw.returncode == 0 and json.loads(raw.stdout)["metadata"] == {"who": "me"}
    missing = status("nobody")
    assert missing.returncode == 4 and "no status for job 'nobody'" in missing.stdout
    unknown = json.loads(status("nobody", "--json").stdout)
    assert unknown["state"] == "unknown" and unknown["status_key"] == "output/nobody/status.json"
    (tmp_path / "input" / "later.json").write_text(json.dumps({"workflow": "solid"}))
    waiting = status("later")
    assert waiting.returncode == 3  # not finished
    assert waiting.stdout.startswith("job later: waiting: input/later.json has not been claimed")
    waiting_json = status("later", "--json")
    assert waiting_json.returncode == 3 and waiting_json.stderr == ""
    assert json.loads(waiting_json.stdout) == {
        "id": "later",
        "state": "waiting",
        "status_key": "output/later/status.json",
        "manifest_key": "input/later.json",
        "problem": None,
    }
    # A failed job exits 1, and a broken status document is "unknown" (4), as JSON too.
    failed = tmp_path / "output" / "broke" / "status.json"
    failed.parent.mkdir(parents=True)
    document = json.loads((tmp_path / "output" / "shown" / "status.json").read_text())
    document.update({"id": "broke", "state": "failed", "outputs": []})
    failed.write_text(json.dumps(document))
    assert status("broke").returncode == 1
    assert json.loads(status("broke", "--json").stdout)["state"] == "failed"
    failed.write_text("{not json")
    unreadable = status("broke", "--json")
    assert unreadable.returncode == 4
    assert json.loads(unreadable.stdout)["problem"] == "not valid JSON"
    assert status("../x").returncode == 2  # a name no job can have: usage


def test_status_of_a_job_submitted_with_a_priority_says_waiting(tmp_path: Path) -> None:
    """submit puts a priority into the manifest's name (input/!995.urgent.json); status finds
    it there: waiting (3), with that key, not unknown (4)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMFYS3_")}
    (tmp_path / "urgent.json").write_text(json.dumps({"workflow": "solid", "priority": 5}))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            comfys3(*args, "--local", str(tmp_path / "jobs")),
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    submitted = cli("submit", "urgent.json")
    assert submitted.returncode == 0, submitted.stderr
    assert (tmp_path / "jobs" / "input" / "!995.urgent.json").is_file()
    shown = cli("status", "urgent")
    assert shown.returncode == 3, shown.stdout + shown.stderr
    assert shown.stdout.startswith("job urgent: waiting: input/!995.urgent.json has not been")
    as_json = cli("status", "urgent", "--json")
    assert as_json.returncode == 3
    assert json.loads(as_json.stdout)["manifest_key"] == "input/!995.urgent.json"


def test_unreachable_comfyui_is_one_readable_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMFYS3_")}
    env.update(
        {"COMFYS3_COMFYUI_URL": "http://127.0.0.1:9", "COMFYS3_COMFYUI_STARTUP_TIMEOUT": "1"}
    )
    result = subprocess.run(
        comfys3("run", "--once", "--local", str(tmp_path)),
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert "ComfyUI at http://127.0.0.1:9 was not ready within 1 s" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_warns_once_about_misplaced_manifests_and_logs_to_the_volume(
    tmp_path: Path, fake_comfyui: Any
) -> None:
    """A manifest dropped beside input/ instead of in it is named once, not on every poll, and
    so is each other kind of near miss (a folder like input/, a sub-folder, the name's case,
    YAML); with a network volume the same lines land in the worker's own log file there."""
    jobs, volume = tmp_path / "jobs", tmp_path / "volume"
    (jobs / "input").mkdir(parents=True)
    (jobs / "misplaced.json").write_text(json.dumps({"workflow": "solid"}))
    near_misses = ["inputs/plural.json", "input/sub/nested.json", "input/upper.JSON"]
    for relative in near_misses:
        (jobs / relative).parent.mkdir(parents=True, exist_ok=True)
        (jobs / relative).write_text(json.dumps({"workflow": "solid"}))
    (jobs / "input" / "yam.yml").write_text("workflow: solid\n")
    near_misses.append("input/yam.yml")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMFYS3_")}
    env.update(
        {
            "COMFYS3_COMFYUI_URL": fake_comfyui.url,
            "COMFYS3_POLL_MAX_INTERVAL": "0.2",
            "COMFYS3_VOLUME_DIR": str(volume),
            "COMFYS3_WORKER_ID": "vol-1",
        }
    )
    log = tmp_path / "worker.log"
    worker = subprocess.Popen(
        comfys3("run", "--local", str(jobs)),
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log.open("w"), text=True,
    )  # fmt: skip
    try:
        wait_until(lambda: "misplaced.json" in log.read_text(), 30, "the misplaced warning")
        # Work in between starts a new idle period; the same file is not named again.
        (jobs / "input" / "real.json").write_text(json.dumps({"workflow": "solid"}))
        wait_until(lambda: (jobs / "output" / "real" / "status.json").exists(), 30, "the real job")
        wait_until(lambda: log.read_text().count("idle: nothing to claim") >= 2, 30, "idling")
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
    err = log.read_text()
    assert worker.returncode == 0, err[-2000:]
    warnings = [line for line in err.splitlines() if "misplaced.json" in line]
    assert len(warnings) == 1, err
    assert "move it to" in warnings[0] and "input/misplaced.json" in warnings[0]
    for relative in near_misses:  # each kind named once, in a warning of its own
        named = [line for line in err.splitlines() if str(jobs / relative) in line]
        assert len(named) == 1 and " WARNING " in named[0], (relative, err)
        assert "so no worker runs it" in named[0]
    on_volume = (volume / "logs" / "worker-vol-1.log").read_text()
    assert "misplaced.json" in on_volume and "stopped:" in on_volume
