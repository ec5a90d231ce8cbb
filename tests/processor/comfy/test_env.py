"""processor.comfy.process.comfyui_environment: what a ComfyUI the worker starts may see.

Custom nodes run inside ComfyUI with its environment, so the worker's own credentials (the
bucket's keys, AWS and RunPod variables, the webhook signing secret) must never reach it,
whatever the operator adds; what ComfyUI and torch need (PATH, HOME, CUDA, HF ...) must.
The last test starts the fake ComfyUI as a worker does and reads its real environment.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from processor.comfy.process import ComfyEngine, comfyui_environment
from processor.settings import WorkerSettings
from processor.storage.layout import Layout
from processor.storage.local import LocalStorage
from processor.worker.assembly import open_worker
from tests.processor.comfy.test_owned_by_worker import owned_comfyui
from tests.processor.comfy.test_process import local_settings

SECRETS = {
    "COMFYS3_S3_ACCESS_KEY": "AKIAEXAMPLE",
    "COMFYS3_S3_SECRET_KEY": "s3-secret-value",
    "COMFYS3_S3_ENDPOINT_URL": "https://s3.example.com",
    "COMFYS3_WEBHOOK_SECRET": "whsec_c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0",
    "COMFYS3_SQS_QUEUE_URL": "https://sqs.example.com/1/q",
    "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-value",
    "AWS_SESSION_TOKEN": "aws-session-value",
    "AWS_PROFILE": "prod",
    "RUNPOD_API_KEY": "runpod-secret-value",
    "RUNPOD_WEBHOOK_GET_JOB": "https://api.runpod.ai/v2/x/job-take?token=secret",
}
NEEDED = {
    "PATH": "/usr/bin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "TZ": "UTC",
    "PYTHONPATH": "/app",
    "VIRTUAL_ENV": "/venv",
    "LD_LIBRARY_PATH": "/usr/local/cuda/lib64",
    "CUDA_VISIBLE_DEVICES": "0",
    "CUDA_HOME": "/usr/local/cuda",
    "NVIDIA_VISIBLE_DEVICES": "all",
    "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
    "TORCH_HOME": "/cache/torch",
    "HF_HOME": "/cache/hf",
    "HF_HUB_OFFLINE": "1",
    "HUGGINGFACE_HUB_CACHE": "/cache/hf/hub",
    "TRANSFORMERS_CACHE": "/cache/tf",
    "XDG_CACHE_HOME": "/cache",
    "SSL_CERT_FILE": "/etc/ssl/cert.pem",
    "https_proxy": "http://proxy:3128",
    "NO_PROXY": "localhost",
}
UNLISTED = {
    "DATABASE_URL": "postgres://user:pw@db/x",
    "MY_NODE_TOKEN": "node-token",
    "CIVITAI_API_KEY": "civitai",
    "PATHEXT": ".py",  # a name that starts like an allowed one is not that one
    "HOMEDIR": "/x",
}
WORLD = {**SECRETS, **NEEDED, **UNLISTED}


def test_credentials_never_pass_and_what_comfyui_needs_does() -> None:
    env = comfyui_environment(environ=WORLD)
    assert env == NEEDED


def test_names_the_operator_adds_pass_by_name_or_prefix() -> None:
    env = comfyui_environment(["MY_NODE_TOKEN", "CIVITAI_*"], environ=WORLD)
    assert env == {**NEEDED, "MY_NODE_TOKEN": "node-token", "CIVITAI_API_KEY": "civitai"}


@pytest.mark.parametrize(
    "extra",
    [
        ["COMFYS3_S3_SECRET_KEY", "AWS_SECRET_ACCESS_KEY", "RUNPOD_API_KEY"],
        ["COMFYS3_*", "AWS_*", "RUNPOD_*"],
        ["*"],
        ["COMFYS3_WEBHOOK_SECRET"],
    ],
)
def test_credentials_stay_out_even_when_named(extra: list[str]) -> None:
    env = comfyui_environment(extra, environ=WORLD)
    assert not set(SECRETS) & set(env)
    assert set(NEEDED) <= set(env)


def test_empty_names_add_nothing() -> None:
    assert comfyui_environment(["", " "], environ=WORLD) == NEEDED


def test_the_setting_is_a_comma_separated_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMFYS3_COMFYUI_ENV", "MY_NODE_TOKEN, CIVITAI_*,,")
    settings = WorkerSettings()
    assert settings.comfyui.env == ["MY_NODE_TOKEN", "CIVITAI_*"]
    env = comfyui_environment(settings.comfyui.env, environ=WORLD)
    assert {"MY_NODE_TOKEN", "CIVITAI_API_KEY"} <= set(env) and "DATABASE_URL" not in env


def test_the_engine_gives_its_comfyui_the_cut_down_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = local_settings(tmp_path, comfyui_env=["MY_NODE_*"])
    for name, value in WORLD.items():
        monkeypatch.setenv(name, value)

    engine = ComfyEngine(settings)

    assert engine.process is not None and engine.process.env is not None
    assert not set(SECRETS) & set(engine.process.env)
    assert engine.process.env["CUDA_VISIBLE_DEVICES"] == "0"
    assert engine.process.env["MY_NODE_TOKEN"] == "node-token"
    assert "DATABASE_URL" not in engine.process.env


async def test_a_comfyui_the_worker_starts_does_not_see_its_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """End to end: the fake ComfyUI, started by a worker as a real ComfyUI is, writes the
    environment it really got (FAKE_COMFYUI_ENV_REPORT, passed because the test names
    FAKE_COMFYUI_* in COMFYS3_COMFYUI_ENV)."""
    report = tmp_path / "comfyui-env.json"
    settings = owned_comfyui(tmp_path)
    settings = settings.replace(comfyui_env=[*settings.comfyui.env, "MY_NODE_*"])
    for name, value in WORLD.items():
        if name not in {"PATH", "HOME", "PYTHONPATH", "VIRTUAL_ENV", "LD_LIBRARY_PATH"}:
            monkeypatch.setenv(name, value)  # the worker's own PATH etc. must stay usable
    monkeypatch.setenv("FAKE_COMFYUI_ENV_REPORT", str(report))

    async with open_worker(
        storage=LocalStorage(tmp_path / "jobs"), layout=Layout(), settings=settings
    ):
        seen = json.loads(report.read_text())

    assert not set(SECRETS) & set(seen), sorted(set(SECRETS) & set(seen))
    for value in SECRETS.values():
        assert value not in json.dumps(seen)
    assert seen["CUDA_VISIBLE_DEVICES"] == "0" and seen["HF_HOME"] == "/cache/hf"
    assert seen["MY_NODE_TOKEN"] == "node-token"  # named in COMFYS3_COMFYUI_ENV
    assert "PATH" in seen and "HOME" in seen
    assert "DATABASE_URL" not in seen and "CIVITAI_API_KEY" not in seen
