"""`comfys3 exec`: one manifest against a ComfyUI with no S3, as a user first tries it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from processor.errors import StorageError
from tests.workers import comfys3
from triggers.cli.exec_folder import OutputFolder


def run_exec(
    tmp_path: Path, manifest: dict[str, Any], url: str, **settings: str
) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "job.json"
    path.write_text(json.dumps(manifest))
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMFYS3_")}
    env.update(settings)
    return subprocess.run(
        comfys3("exec", str(path), "--out", str(tmp_path / "out"), "--comfyui-url", url),
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_exec_seed_example_writes_image_and_status(tmp_path: Path, fake_comfyui: Any) -> None:
    result = run_exec(tmp_path, {"workflow": "txt2img", "payload": {"seed": 123}}, fake_comfyui.url)

    assert result.returncode == 0, result.stderr
    folder = tmp_path / "out" / "job"
    status = json.loads((folder / "status.json").read_text())
    assert status["state"] == "succeeded" and status["payload"]["seed"] == 123
    assert (folder / "9_SaveImage_001.png").read_bytes().startswith(b"\x89PNG")
    # Keys in the documented form (docs/manifests.md), as a worker writes them.
    assert [o["key"] for o in status["outputs"]] == ["output/job/9_SaveImage_001.png"]
    assert sorted(p.name for p in folder.iterdir()) == ["9_SaveImage_001.png", "status.json"]
    assert "job: succeeded" in result.stdout and "9_SaveImage_001.png" in result.stdout
    assert "100%" in result.stderr  # the progress bar reached the end


def test_exec_reads_inputs_relative_to_the_current_folder(
    tmp_path: Path, fake_comfyui: Any
) -> None:
    from PIL import Image

    Image.new("RGB", (10, 6), "green").save(tmp_path / "small.png")
    result = run_exec(
        tmp_path, {"workflow": "scale", "payload": {"image": "small.png"}}, fake_comfyui.url
    )
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "out" / "job" / "3_SaveImage_001.png") as image:
        assert image.size == (20, 12)


@pytest.mark.parametrize(
    ("setting", "value", "says"),
    [
        ("COMFYS3_MAX_INPUT_PIXELS", "100", "COMFYS3_MAX_INPUT_PIXELS"),
        ("COMFYS3_MAX_INPUT_BYTES", "50", "COMFYS3_MAX_INPUT_BYTES"),
    ],
)
def test_exec_honours_the_input_limits_a_worker_has(
    tmp_path: Path, fake_comfyui: Any, setting: str, value: str, says: str
) -> None:
    """exec builds its worker through the same assembly as `comfys3 run`, so the input limits
    apply to it too (it once built its own runner and dropped them)."""
    from PIL import Image

    Image.new("RGB", (64, 64), "green").save(tmp_path / "big.png")
    manifest = {"workflow": "scale", "payload": {"image": "big.png"}}
    result = run_exec(tmp_path, manifest, fake_comfyui.url, **{setting: value})

    assert result.returncode == 1, result.stdout
    assert "job: failed (input_invalid)" in result.stderr
    assert says in result.stderr
    status = json.loads((tmp_path / "out" / "job" / "status.json").read_text())
    assert status["state"] == "failed" and status["error"]["type"] == "input_invalid"
    assert fake_comfyui.stats()["queued"] == 0  # refused before anything reached ComfyUI


def test_exec_failure_exits_1_with_a_readable_error(tmp_path: Path, fake_comfyui: Any) -> None:
    manifest = {"workflow": "txt2img", "payload": {"ckpt_name": "nope.safetensors"}}
    result = run_exec(tmp_path, manifest, fake_comfyui.url)

    assert result.returncode == 1
    assert "job: failed (validation)" in result.stderr
    assert "node 4 (CheckpointLoaderSimple) ckpt_name" in result.stderr
    assert "Traceback" not in result.stderr
    status = json.loads((tmp_path / "out" / "job" / "status.json").read_text())
    assert status["state"] == "failed" and status["error"]["type"] == "validation"


def test_exec_invalid_manifest_lists_problems(tmp_path: Path, fake_comfyui: Any) -> None:
    result = run_exec(tmp_path, {"workflow": "txt2img", "payload": {"stpes": 3}}, fake_comfyui.url)
    assert result.returncode == 1
    assert "did you mean 'steps'" in result.stderr and "Traceback" not in result.stderr


async def test_the_out_folder_stands_for_the_output_prefix(tmp_path: Path) -> None:
    async with OutputFolder(tmp_path / "results") as folder:
        await folder.put("output/job/status.json", b"{}", content_type="application/json")
        assert (tmp_path / "results" / "job" / "status.json").read_bytes() == b"{}"
        assert (await folder.get("output/job/status.json")).key == "output/job/status.json"
        listed = await folder.list("output/job")
        assert [info.key for info in listed] == ["output/job/status.json"]
        assert folder.path_of("output/job/a.png") == (tmp_path / "results/job/a.png").resolve()
        with pytest.raises(StorageError, match="is not under output/"):
            await folder.put("input/job.json", b"{}")


def test_an_input_path_no_worker_reads_is_refused_alike_by_validate_exec_and_the_worker(
    tmp_path: Path, fake_comfyui: Any
) -> None:
    """/etc/passwd was "invalid" for validate and input_missing for exec: one rule, one
    message, and the worker fails such a job as input_invalid with that message too."""
    manifest = {"workflow": "scale", "payload": {"image": "/etc/passwd"}}
    said = "payload.image: input file '/etc/passwd' cannot be read: it starts with '/'"
    executed = run_exec(tmp_path, manifest, fake_comfyui.url)
    checked = subprocess.run(
        comfys3("validate", "job.json"), cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert executed.returncode == checked.returncode == 1
    [by_exec] = [line for line in executed.stderr.splitlines() if "payload.image" in line]
    [by_validate] = [line for line in checked.stdout.splitlines() if "payload.image" in line]
    assert by_exec == by_validate and by_exec.startswith(f"  {said} (an input file is a path")
    assert fake_comfyui.stats()["queued"] == 0 and not (tmp_path / "out" / "job").exists()
