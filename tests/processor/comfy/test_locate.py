"""The ComfyUI a worker uses when no setting names one: one answering on 127.0.0.1 at
COMFYS3_COMFYUI_PORT, else the one comfy-cli installed (its config's workspace), else an error
with the commands that install one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from processor.comfy import locate
from processor.comfy.locate import comfy_cli_config, locate_comfyui
from processor.errors import SettingsError
from processor.settings import WorkerSettings
from tests.paths import FAKE_COMFYUI
from tests.s3_servers import free_port

COMFYS3 = Path(sys.executable).parent / "comfys3"


@pytest.fixture(autouse=True)
def no_comfys3_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("COMFYS3_"):
            monkeypatch.delenv(name)


def workspace(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "main.py").write_text("# ComfyUI\n")
    return folder


def comfy_cli_knows(home: Path, **values: str) -> None:
    config = comfy_cli_config(home)
    config.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(f"{key} = {value}\n" for key, value in values.items())
    config.write_text(f"[DEFAULT]\n{lines}")


def test_a_comfyui_answering_on_the_port_is_attached_to(fake_comfyui: Any, tmp_path: Path) -> None:
    port = int(fake_comfyui.url.rsplit(":", 1)[1])
    located = locate_comfyui(WorkerSettings(comfyui_port=port), home=tmp_path)
    assert located.settings.comfyui.url == fake_comfyui.url
    assert located.notice == (
        "no COMFYS3_COMFYUI_URL or COMFYS3_COMFYUI_PATH was given: using the ComfyUI that "
        f"answers at {fake_comfyui.url}"
    )


def test_else_comfy_clis_default_workspace_is_started_with_its_launch_extras(
    tmp_path: Path,
) -> None:
    home, ws = tmp_path / "home", workspace(tmp_path / "ComfyUI")
    venv_python = ws / ".venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text("")
    comfy_cli_knows(home, default_workspace=str(ws), default_launch_extras="--lowvram")
    located = locate_comfyui(WorkerSettings(comfyui_port=free_port()), home=home)
    comfyui = located.settings.comfyui
    assert (comfyui.url, comfyui.path) == (None, ws)
    assert comfyui.python == str(venv_python)  # the workspace's own venv has its packages
    assert comfyui.args == "--lowvram"
    assert located.notice is not None and f"comfy-cli installed in {ws}" in located.notice


def test_the_recent_workspace_and_then_the_default_folder_count_too(tmp_path: Path) -> None:
    home = tmp_path / "home"
    recent = workspace(tmp_path / "recent")
    comfy_cli_knows(home, default_workspace=str(tmp_path / "gone"), recent_workspace=str(recent))
    settings = WorkerSettings(comfyui_port=free_port(), comfyui_args="--cpu")
    located = locate_comfyui(settings, home=home)
    assert located.settings.comfyui.path == recent
    assert located.settings.comfyui.python == sys.executable  # no venv of its own
    assert located.settings.comfyui.args == "--cpu"  # set by the user: kept

    comfy_cli_knows(home)  # a config that names nothing: comfy-cli's own default folder
    default = workspace(locate.comfy_cli_default_workspace(home))
    assert locate_comfyui(settings, home=home).settings.comfyui.path == default


def test_with_gpus_a_comfyui_answering_on_the_port_is_passed_over(
    fake_comfyui: Any, tmp_path: Path
) -> None:
    """--gpus starts one ComfyUI per GPU, which a running one cannot be: comfy-cli's checkout
    is used, and without one the error asks for a checkout, not for a URL."""
    port = int(fake_comfyui.url.rsplit(":", 1)[1])
    settings = WorkerSettings(comfyui_port=port, gpus="all")
    with pytest.raises(SettingsError) as caught:
        locate_comfyui(settings, home=tmp_path)
    assert str(caught.value).startswith("no ComfyUI: --gpus starts one ComfyUI per GPU")
    assert "COMFYS3_COMFYUI_PATH=/path/to/ComfyUI" in str(caught.value)
    assert "COMFYS3_COMFYUI_URL" not in str(caught.value)

    home, ws = tmp_path / "home", workspace(tmp_path / "ComfyUI")
    comfy_cli_knows(home, default_workspace=str(ws))
    located = locate_comfyui(settings, home=home)
    assert (located.settings.comfyui.url, located.settings.comfyui.path) == (None, ws)
    assert located.notice is not None and "--gpus starts one per GPU" in located.notice


def test_settings_that_name_a_comfyui_are_left_alone(tmp_path: Path) -> None:
    for settings in (
        WorkerSettings(comfyui_url="http://127.0.0.1:1"),
        WorkerSettings(comfyui_path=tmp_path),
    ):
        assert locate_comfyui(settings, home=tmp_path) == locate.Located(settings)


def test_with_none_anywhere_the_error_gives_the_commands_that_install_one(
    tmp_path: Path,
) -> None:
    port = free_port()
    with pytest.raises(SettingsError) as caught:
        locate_comfyui(WorkerSettings(comfyui_port=port), home=tmp_path)
    message = str(caught.value)
    assert f"nothing answers at http://127.0.0.1:{port}" in message
    assert "\n    pip install comfy-cli\n" in message
    assert "\n    comfy --skip-prompt install --cpu      # or --nvidia" in message
    assert "COMFYS3_COMFYUI_URL=" in message and "COMFYS3_COMFYUI_PATH=" in message


def clean_env(home: Path, **settings: str) -> dict[str, str]:
    return {"PATH": os.environ["PATH"], "HOME": str(home), **settings}


def test_run_with_no_comfyui_anywhere_stops_with_the_install_commands(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(COMFYS3), "run", "--once", "--local", "jobs"],
        cwd=tmp_path,
        env=clean_env(tmp_path, COMFYS3_COMFYUI_PORT=str(free_port())),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("comfys3: no ComfyUI: no COMFYS3_COMFYUI_URL")
    assert "pip install comfy-cli" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "jobs").exists()  # nothing started, nothing made


def test_run_starts_the_comfyui_comfy_cli_installed(tmp_path: Path) -> None:
    """The fake ComfyUI's folder stands for a comfy-cli workspace (it has a main.py)."""
    home = tmp_path / "home"
    comfy_cli_knows(home, default_workspace=str(FAKE_COMFYUI))
    (tmp_path / "jobs" / "input").mkdir(parents=True)
    (tmp_path / "jobs" / "input" / "job.json").write_text('{"workflow": "solid"}')
    result = subprocess.run(
        [str(COMFYS3), "run", "--once", "--local", "jobs"],
        cwd=tmp_path,
        env=clean_env(
            home,
            COMFYS3_COMFYUI_PORT=str(free_port()),
            # Where the fake keeps its files (not in the checkout), as ComfyUI's flag says.
            COMFYS3_COMFYUI_ARGS=f"--base-directory {tmp_path / 'comfyui'}",
        ),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"starting the ComfyUI comfy-cli installed in {FAKE_COMFYUI}" in result.stderr
    assert "done: 1 job(s): 1 succeeded" in result.stdout
