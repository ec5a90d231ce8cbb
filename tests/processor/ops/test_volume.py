"""On a network volume a worker leaves its log and its ComfyUI's log under logs/ (one file per
worker, rotated) and gives ComfyUI the Hugging Face cache in huggingface/."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from processor.comfy.process import ComfyEngine
from processor.ops import volume
from processor.settings import WorkerSettings
from tests.s3_servers import free_port
from tests.workers import ROOT
from triggers.cli import logs

FAKE_COMFYUI = ROOT / "tests" / "fake_comfyui"


def test_the_volume_is_the_setting_else_runpod_volume_if_mounted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mine = tmp_path / "mine"
    assert volume.volume_dir(WorkerSettings(volume_dir=mine)) == mine
    monkeypatch.setattr(volume, "RUNPOD_VOLUME", tmp_path / "runpod-volume")
    assert volume.volume_dir(WorkerSettings()) is None
    (tmp_path / "runpod-volume").mkdir()
    assert volume.volume_dir(WorkerSettings()) == tmp_path / "runpod-volume"
    monkeypatch.setenv("COMFYS3_VOLUME_DIR", str(mine))
    assert volume.volume_dir(WorkerSettings()) == mine


def test_log_files_are_named_by_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(volume, "RUNPOD_VOLUME", tmp_path / "absent")
    settings = WorkerSettings(volume_dir=tmp_path, worker_id="pod 7/a")
    assert volume.worker_log(settings) == tmp_path / "logs" / "worker-pod-7-a.log"
    assert volume.comfyui_log(settings) == tmp_path / "logs" / "comfyui-pod-7-a.log"
    chosen = tmp_path / "mine.log"
    assert volume.comfyui_log(settings.replace(comfyui_log_file=chosen)) == chosen
    assert volume.worker_log(WorkerSettings()) is None
    assert volume.comfyui_log(WorkerSettings()) is None  # ComfyProcess's temp-folder default


def test_rotation_keeps_a_few_old_logs(tmp_path: Path) -> None:
    path = tmp_path / "comfyui.log"
    for run in range(5):
        path.write_text(f"run {run}\n" * 50)
        volume.rotate_if_large(path, max_bytes=100)
    volume.rotate_if_large(path, max_bytes=100)
    assert not path.exists()
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept == [f"comfyui.log.{n}" for n in range(1, volume.LOG_BACKUPS + 1)]
    assert (tmp_path / "comfyui.log.1").read_text().startswith("run 4")
    small = tmp_path / "small.log"
    small.write_text("short")
    volume.rotate_if_large(small, max_bytes=100)
    assert small.read_text() == "short"


@pytest.fixture
def root_logging() -> Iterator[None]:
    """logs.configure replaces the root logger's handlers; put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:], root.level = handlers, level


def test_the_worker_log_goes_to_the_volume_and_rotates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, root_logging: None
) -> None:
    monkeypatch.setattr(volume, "LOG_MAX_BYTES", 2000)
    settings = WorkerSettings(volume_dir=tmp_path, worker_id="w1")
    logs.configure("text")
    path = logs.to_volume(settings)
    assert path == tmp_path / "logs" / "worker-w1.log"
    assert logs.to_volume(settings) == path  # a second call does not log every line twice
    for n in range(100):
        logging.getLogger("comfys3.worker").info("claimed input/job-%03d.json", n)
    text = path.read_text()
    assert "INFO comfys3.worker: claimed input/job-099.json" in text
    assert text.count("job-099") == 1
    assert (tmp_path / "logs" / "worker-w1.log.1").exists()
    assert len(list((tmp_path / "logs").iterdir())) == 1 + volume.LOG_BACKUPS


async def test_a_started_comfyui_logs_to_the_volume_and_caches_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_HOME", raising=False)
    vol = tmp_path / "volume"
    settings = WorkerSettings(
        volume_dir=vol,
        worker_id="w2",
        comfyui_path=FAKE_COMFYUI,
        comfyui_python=sys.executable,
        comfyui_port=free_port(),
        comfyui_args=f"--base-directory {tmp_path / 'comfyui'}",
    )
    engine = ComfyEngine(settings)
    async with engine:
        assert engine.process is not None and engine.process.pid is not None
        environ = Path(f"/proc/{engine.process.pid}/environ").read_bytes().split(b"\0")
    log_text = (vol / "logs" / "comfyui-w2.log").read_text()
    assert "main.py --listen 127.0.0.1" in log_text and "Starting server" in log_text
    assert f"HF_HOME={vol / 'huggingface'}".encode() in environ
    assert (vol / "huggingface").is_dir()
