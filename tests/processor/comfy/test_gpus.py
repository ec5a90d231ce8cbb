"""One ComfyUI per GPU (``--gpus``), each the fake as a process of its own: what each is given
(GPU, port, folders, log), both fed by one worker, and one restarted without the other."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from processor.comfy.gpus import Gpu, count_gpus, gpus_of
from processor.errors import SettingsError
from processor.job.status import JobState, JobStatus
from processor.settings import WorkerSettings
from processor.storage.layout import Layout
from processor.storage.local import LocalStorage
from processor.worker.assembly import open_worker
from tests.paths import FAKE_COMFYUI
from tests.processor.comfy.test_process import free_port  # with free neighbours: port + n

LAYOUT = Layout("input", "output")


def gpu_settings(tmp_path: Path, gpus: str, **extra: Any) -> WorkerSettings:
    args = f"--cpu --output-directory {tmp_path / 'out'}"  # input and temp: the defaults
    return WorkerSettings(
        comfyui_path=FAKE_COMFYUI,
        comfyui_python=sys.executable,
        comfyui_port=free_port(),
        comfyui_args=args,
        comfyui_startup_timeout=30,
        comfyui_log_file=tmp_path / "logs" / "comfyui.log",
        comfyui_env=["FAKE_COMFYUI_*"],
        gpus=gpus,
        worker_id="gpus",
        job_timeout=30,
        **extra,
    )


def fake_nvidia_smi(tmp_path: Path, listing: str, code: int = 0) -> str:
    path = tmp_path / "nvidia-smi"
    path.write_text(f"#!/bin/sh\ncat <<'EOF'\n{listing}\nEOF\nexit {code}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_all_counts_the_gpus_nvidia_smi_lists(tmp_path: Path) -> None:
    listing = "GPU 0: NVIDIA A100 (UUID: GPU-1)\nGPU 1: NVIDIA A100 (UUID: GPU-2)"
    assert count_gpus(fake_nvidia_smi(tmp_path, listing)) == ["0", "1"]
    with pytest.raises(SettingsError, match="found no GPU"):
        count_gpus(fake_nvidia_smi(tmp_path, "NVIDIA-SMI has failed", code=9))


def test_all_of_one_gpu_is_one_comfyui_as_without_gpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image's default (COMFYS3_GPUS=all) on a one-GPU pod changes nothing."""
    fake_nvidia_smi(tmp_path, "GPU 0: NVIDIA L4 (UUID: GPU-1)")
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert gpus_of(WorkerSettings(comfyui_path=FAKE_COMFYUI, gpus="all")) == []
    fake_nvidia_smi(tmp_path, "GPU 0: L4 (UUID: GPU-1)\nGPU 1: L4 (UUID: GPU-2)")
    assert len(gpus_of(WorkerSettings(comfyui_path=FAKE_COMFYUI, gpus="all"))) == 2


def test_no_nvidia_smi_is_a_readable_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    settings = WorkerSettings(comfyui_path=FAKE_COMFYUI, gpus="all")
    with pytest.raises(SettingsError, match="nvidia-smi, which is not on this machine"):
        gpus_of(settings)


def test_gpus_need_a_comfyui_to_start_and_not_an_attached_one() -> None:
    assert gpus_of(WorkerSettings(comfyui_path=FAKE_COMFYUI)) == []
    assert gpus_of(WorkerSettings(comfyui_path=FAKE_COMFYUI, gpus="3, 1")) == [
        Gpu(0, "3"),
        Gpu(1, "1"),
    ]
    with pytest.raises(SettingsError, match="COMFYS3_COMFYUI_URL"):
        gpus_of(WorkerSettings(comfyui_url="http://127.0.0.1:8188", gpus="0,1"))
    with pytest.raises(SettingsError, match="COMFYS3_COMFYUI_PATH"):
        gpus_of(WorkerSettings(gpus="0"))
    for bad in ("0,0", "one", "0;1", ""):
        with pytest.raises(ValueError):
            WorkerSettings(comfyui_path=FAKE_COMFYUI, gpus=bad or " , ")


async def test_each_gpu_gets_its_comfyui_and_both_run_one_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_COMFYUI_EXEC_DELAY", "0.4")  # both busy at once
    settings = gpu_settings(tmp_path, "0,1")
    jobs = tmp_path / "jobs"
    (jobs / "input").mkdir(parents=True)
    batch = {"workflow": "solid", "batch": [{"color": n} for n in range(8)]}
    (jobs / "input" / "batch.json").write_text(json.dumps(batch))

    async with open_worker(storage=LocalStorage(jobs), layout=LAYOUT, settings=settings) as worker:
        engines = [runner.comfy for runner in worker._runner_of.values()]
        counts = await worker.run()
        ports = sorted(int(client.base_url.rsplit(":", 1)[1]) for client in engines)
        executed = {port: await _get(f"http://127.0.0.1:{port}/fake/stats") for port in ports}

    assert counts.succeeded == 8
    base = settings.comfyui.port
    assert ports == [base, base + 1]  # one port each, in GPU order
    ran = {port: sum(stats["executed"].values()) for port, stats in executed.items()}
    assert sum(ran.values()) == 8 and all(n > 0 for n in ran.values()), ran  # both worked
    for gpu in ("0", "1"):  # own folders, own log
        assert (tmp_path / "out" / f"gpu{gpu}").is_dir()
        assert (tmp_path / "logs" / f"comfyui-gpu{gpu}.log").is_file()
    for job in (f"batch-{n}" for n in range(1, 9)):
        status = JobStatus.model_validate_json((jobs / "output" / job / "status.json").read_bytes())
        assert status.state is JobState.succeeded


async def test_each_comfyui_sees_only_its_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_COMFYUI_ENV_REPORT", str(tmp_path / "env-{port}.json"))
    settings = gpu_settings(tmp_path, "2,5")
    async with open_worker(
        storage=LocalStorage(tmp_path / "jobs"), layout=LAYOUT, settings=settings
    ):
        pass
    base = settings.comfyui.port
    seen = {
        json.loads((tmp_path / f"env-{base + index}.json").read_text())["CUDA_VISIBLE_DEVICES"]
        for index in (0, 1)
    }
    assert seen == {"2", "5"}


async def test_a_dead_comfyui_is_restarted_while_the_other_keeps_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = gpu_settings(tmp_path, "0,1")
    async with open_worker(
        storage=LocalStorage(tmp_path / "jobs"), layout=LAYOUT, settings=settings
    ) as worker:
        runners = list(worker._runner_of.values())
        clients = [runner.comfy for runner in runners]
        first, second = (client.base_url for client in clients)
        pid = (await _get(f"{first}/fake/stats"))["pid"]
        os.kill(int(pid), signal.SIGKILL)
        await asyncio.sleep(0.5)
        assert (await _get(f"{second}/system_stats"))["system"]  # the other never stopped
        for _ in range(300):
            now = await _try(f"{first}/fake/stats")
            if clients[0].connected and now is not None and now["pid"] != pid:
                break
            await asyncio.sleep(0.1)
        assert (await _get(f"{first}/fake/stats"))["pid"] != pid  # a new process
        readiness = worker.ops.health.readiness()
        assert readiness.ready, readiness.reason
        assert "2 of 2 answer" in readiness.checks["comfyui"].detail


async def _get(url: str) -> Any:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return await response.json()


async def _try(url: str) -> Any:
    try:
        return await _get(url)
    except Exception:
        return None
