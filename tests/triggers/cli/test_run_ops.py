"""What an operator sees of a running worker: `comfys3 run` with its metrics and health server
and its own ComfyUI (the fake, started as ComfyUI would be), and webhooks sent by a worker
that keeps running jobs while a receiver hangs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from processor.job.status import JobState, JobStatus
from processor.settings import WorkerSettings
from processor.storage.layout import Layout
from processor.storage.local import LocalStorage
from processor.worker.assembly import open_worker
from tests.processor.comfy.test_process import FAKE_DIR
from tests.s3_servers import free_port
from tests.workers import ROOT, comfys3, wait_until

pytestmark = pytest.mark.timeout(240)

LAYOUT = Layout("input", "output")
SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def drop(root: Path, name: str, document: dict[str, Any]) -> None:
    (root / "input").mkdir(parents=True, exist_ok=True)
    (root / "input" / f"{name}.json").write_text(json.dumps(document))


def status_of(root: Path, job_id: str) -> JobStatus | None:
    path = root / "output" / job_id / "status.json"
    return JobStatus.model_validate_json(path.read_bytes()) if path.exists() else None


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError:
        return 0, ""


def samples(metrics_text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample of one metric, by its labels."""
    found = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def test_metrics_move_during_a_run_and_health_follows_comfyui(tmp_path: Path) -> None:
    jobs, comfy = tmp_path / "jobs", tmp_path / "comfy"
    (jobs / "input").mkdir(parents=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMFYS3_")}
    env.update(
        {
            "COMFYS3_COMFYUI_PATH": str(FAKE_DIR),
            "COMFYS3_COMFYUI_PYTHON": sys.executable,
            "COMFYS3_COMFYUI_PORT": str(free_port()),
            "COMFYS3_COMFYUI_ARGS": f"--cpu --input-directory {comfy / 'in'} "
            f"--output-directory {comfy / 'out'} --temp-directory {comfy / 'tmp'}",
            "COMFYS3_COMFYUI_LOG_FILE": str(comfy / "comfyui.log"),
            "COMFYS3_COMFYUI_ENV": "FAKE_COMFYUI_*",
            "FAKE_COMFYUI_EXEC_DELAY": "0.3",
            "COMFYS3_METRICS_PORT": str(port),
            "COMFYS3_RETRY_DELAY": "0.1",
        }
    )
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen(
            comfys3("run", "--local", str(jobs)), env=env, cwd=ROOT, stdout=out, stderr=out
        )
        try:
            wait_until(lambda: get(f"{base}/healthz")[0] == 200, 60, "the worker to be ready")
            assert get(f"{base}/livez")[0] == 200
            before = get(f"{base}/metrics")[1]
            assert samples(before, "comfys3_jobs_total") == {}

            for n in range(3):
                drop(jobs, f"job{n}", {"workflow": "solid"})
            # Scraped while the jobs run: the counters move with them.
            seen: list[float] = []

            def all_counted() -> bool:
                counted = samples(get(f"{base}/metrics")[1], "comfys3_jobs_total")
                seen.append(sum(counted.values()))
                return sum(counted.values()) == 3

            wait_until(all_counted, 60, "three jobs in comfys3_jobs_total")
            after = get(f"{base}/metrics")[1]
            jobs_total = samples(after, "comfys3_jobs_total")
            assert jobs_total == {(("state", "succeeded"), ("workflow", "solid")): 3.0}
            assert samples(after, "comfys3_ready") == {(): 1.0}
            assert seen == sorted(seen) and seen[-1] == 3  # counters only grow

            # ComfyUI killed: not ready while it is down, ready again once restarted.
            comfyui = children(worker.pid)
            assert len(comfyui) == 1, comfyui
            os.kill(comfyui[0], signal.SIGKILL)
            wait_until(lambda: get(f"{base}/healthz")[0] == 503, 30, "/healthz to turn unready")
            body = json.loads(get(f"{base}/healthz")[1])
            assert body["checks"]["comfyui"]["ok"] is False
            wait_until(lambda: get(f"{base}/healthz")[0] == 200, 60, "/healthz ready again")
            assert children(worker.pid) and children(worker.pid) != comfyui

            drop(jobs, "after-restart", {"workflow": "solid"})
            wait_until(
                lambda: (s := status_of(jobs, "after-restart")) and s.state is JobState.succeeded,
                60,
                "a job on the restarted ComfyUI",
            )
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(60) == 0
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait(10)
    assert "Traceback" not in log.read_text()


# -- webhooks through the worker ----------------------------------------------------------------


class HangingReceiver:
    """Accepts webhook POSTs and never answers them."""

    def __init__(self) -> None:
        self.received = 0
        self.open = 0
        self.release = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.received += 1
        self.open += 1
        try:
            await self.release.wait()
        finally:
            self.open -= 1
        return web.Response(status=204)


@pytest.fixture
async def hanging() -> AsyncIterator[tuple[HangingReceiver, str]]:
    receiver = HangingReceiver()
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield receiver, f"http://127.0.0.1:{port}/hook"
    finally:
        receiver.release.set()
        await runner.cleanup()


def webhook_settings(fake: Any, **overrides: Any) -> WorkerSettings:
    values: dict[str, Any] = {
        "comfyui_url": fake.url,
        "worker_id": "hooked",
        "webhook_secret": SECRET,
        "webhook_allow_http": True,
        "webhook_timeout": 60,
        "shutdown_grace": 1,
        **overrides,
    }
    return WorkerSettings(**values)


async def test_a_receiver_that_never_answers_does_not_hold_up_the_next_jobs(
    tmp_path: Path, fake_comfyui: Any, hanging: tuple[HangingReceiver, str]
) -> None:
    receiver, url = hanging
    settings = webhook_settings(fake_comfyui, webhook_url=url, webhook_allow_private=True)
    for n in range(6):
        drop(tmp_path, f"job{n}", {"workflow": "solid"})
    async with open_worker(
        storage=LocalStorage(tmp_path), layout=LAYOUT, settings=settings
    ) as worker:
        counts = await worker.run()
        # Every job ran to its end while the receiver still holds the first POSTs open.
        assert counts.succeeded == 6
        assert receiver.received >= 1 and receiver.open == receiver.received
        lane = worker.lane.depth.target()
    statuses = [status_of(tmp_path, f"job{n}") for n in range(6)]
    assert all(s is not None and s.state is JobState.succeeded for s in statuses)
    assert lane >= 1


async def test_manifest_urls_are_judged_by_the_worker_policy(
    tmp_path: Path, fake_comfyui: Any, hanging: tuple[HangingReceiver, str]
) -> None:
    receiver, url = hanging
    port = url.split(":")[2].split("/")[0]
    settings = webhook_settings(fake_comfyui, webhook_allow="localhost")
    # Off the allowlist: the manifest is refused, saying why.
    drop(tmp_path, "elsewhere", {"workflow": "solid", "notify": {"url": "http://example.org/x"}})
    # On the allowlist, but the name resolves to loopback: the job runs, the webhook is refused.
    drop(
        tmp_path,
        "loopback",
        {"workflow": "solid", "notify": {"url": f"http://localhost:{port}/hook"}},
    )
    async with open_worker(
        storage=LocalStorage(tmp_path), layout=LAYOUT, settings=settings
    ) as worker:
        await worker.run()
        recorded = await asyncio.to_thread(
            wait_until,
            lambda: (s := status_of(tmp_path, "loopback")) and s.notify is not None and s,
            20,
            "the refused webhook to be recorded",
        )

    refused = status_of(tmp_path, "elsewhere")
    assert refused is not None and refused.state is JobState.failed
    assert refused.error is not None and refused.error.type == "invalid_manifest"
    assert "notify.url" in refused.error.message and "example.org" in refused.error.message
    assert recorded.state is JobState.succeeded
    assert recorded.notify.delivered_at is None
    assert "refused" in (recorded.notify.last_error or "")
    assert "loopback" in (recorded.notify.last_error or "")
    assert receiver.received == 0
