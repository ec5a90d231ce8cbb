"""Which ComfyUI a worker uses when no setting names one.

With neither ``COMFYS3_COMFYUI_URL`` nor ``COMFYS3_COMFYUI_PATH`` (and no ``COMFYS3_MODE``: the
image names its own), a fresh machine should still work: a ComfyUI that answers on
127.0.0.1 at ``COMFYS3_COMFYUI_PORT`` (8188, ComfyUI's own default) is attached to; else one
installed by comfy-cli is started, from the workspace comfy-cli records in its config
(``default_workspace``, else ``recent_workspace``, else its default folder); else the worker
stops with the commands that install one and the settings that name an existing one.
"""

from __future__ import annotations

import configparser
import contextlib
import json
import os
import platform
import shutil
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from processor.errors import SettingsError
from processor.settings import WorkerSettings

PROBE_TIMEOUT = 2.0
MODE_VARIABLE = "COMFYS3_MODE"


@dataclass(frozen=True)
class Located:
    """The settings to run with, and a line that says what was chosen (None: nothing was)."""

    settings: WorkerSettings
    notice: str | None = None


def comfy_cli_config(home: Path) -> Path:
    """Where comfy-cli keeps config.ini (its constants.DEFAULT_CONFIG, per system)."""
    if platform.system() == "Darwin":
        return home / "Library" / "Application Support" / "comfy-cli" / "config.ini"
    if platform.system() == "Windows":
        return home / "AppData" / "Local" / "comfy-cli" / "config.ini"
    return home / ".config" / "comfy-cli" / "config.ini"


def comfy_cli_default_workspace(home: Path) -> Path:
    """The folder ``comfy install`` uses when told none (its DEFAULT_COMFY_WORKSPACE)."""
    if platform.system() in {"Darwin", "Windows"}:
        return home / "Documents" / "comfy" / "ComfyUI"
    return home / "comfy" / "ComfyUI"


def comfy_cli_workspace(home: Path) -> tuple[Path, str] | None:
    """A ComfyUI comfy-cli installed (a folder with main.py), and its launch extras."""
    config = configparser.ConfigParser()
    # An unreadable config names no workspace; the default folder may still hold one.
    with contextlib.suppress(configparser.Error, OSError, UnicodeDecodeError):
        config.read(comfy_cli_config(home))
    section = config["DEFAULT"]
    extras = section.get("default_launch_extras", "").strip()
    for value in (section.get("default_workspace"), section.get("recent_workspace")):
        if value and (Path(value) / "main.py").is_file():
            return Path(value), extras
    default = comfy_cli_default_workspace(home)
    if (default / "main.py").is_file():
        return default, extras
    return None


def workspace_python(workspace: Path) -> str:
    """The Python that has ComfyUI's packages: the workspace's own venv when it has one (as
    comfy-cli makes for a system Python), else this one (comfy-cli installed into the venv it
    runs from, which is the usual ``pip install comfy-cli`` beside comfys3)."""
    for venv in (".venv", "venv"):
        python = workspace / venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
        if python.is_file():
            return str(python)
    return sys.executable


def answers(url: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """A ComfyUI answers at ``url``: /system_stats is JSON with a "system" object."""
    try:
        with urllib.request.urlopen(f"{url}/system_stats", timeout=timeout) as response:
            document = json.loads(response.read(1_000_000))
    except (OSError, ValueError, urllib.error.URLError):
        return False
    return isinstance(document, dict) and isinstance(document.get("system"), dict)


def _no_gpu_tools() -> bool:
    """Linux with neither NVIDIA's nor AMD's tools: a CPU-only machine, where ComfyUI must be
    told --cpu."""
    return platform.system() == "Linux" and not (
        shutil.which("nvidia-smi") or shutil.which("rocm-smi")
    )


def locate_comfyui(settings: WorkerSettings, *, home: Path | None = None) -> Located:
    """``settings`` with a ComfyUI to use; :class:`SettingsError` with the way to get one."""
    comfyui = settings.comfyui
    if comfyui.url or comfyui.path is not None or os.environ.get(MODE_VARIABLE, "").strip():
        return Located(settings)
    url = f"http://127.0.0.1:{comfyui.port}"
    # --gpus starts one ComfyUI per GPU: a running one cannot be attached to, only a checkout
    # started (gpus_of refuses a URL), so only comfy-cli's workspace can serve.
    per_gpu = settings.host.gpus is not None
    if not per_gpu and answers(url):
        return Located(
            settings.replace(comfyui_url=url),
            f"no COMFYS3_COMFYUI_URL or COMFYS3_COMFYUI_PATH was given: using the ComfyUI that "
            f"answers at {url}",
        )
    home = home if home is not None else Path.home()
    found = comfy_cli_workspace(home)
    if found is None:
        raise SettingsError(_install_message(url, home, per_gpu=per_gpu))
    workspace, extras = found
    changes: dict[str, object] = {"comfyui_path": workspace}
    if "python" not in comfyui.model_fields_set:
        changes["comfyui_python"] = workspace_python(workspace)
    if "args" not in comfyui.model_fields_set:
        args = extras or ("--cpu" if _no_gpu_tools() else "")
        changes["comfyui_args"] = args
    located = settings.replace(**changes)
    args_said = f" {located.comfyui.args}" if located.comfyui.args else ""
    why = "--gpus starts one per GPU" if per_gpu else f"nothing answers at {url}"
    return Located(
        located,
        f"no COMFYS3_COMFYUI_URL or COMFYS3_COMFYUI_PATH was given and {why}: starting the "
        f"ComfyUI comfy-cli installed in {workspace} (with "
        f"{located.comfyui.python}{args_said}; set COMFYS3_COMFYUI_PYTHON or "
        "COMFYS3_COMFYUI_ARGS to change that)",
    )


def _install_message(url: str, home: Path, *, per_gpu: bool = False) -> str:
    if per_gpu:  # a running ComfyUI is of no use: --gpus starts its own, one per GPU
        return (
            "no ComfyUI: --gpus starts one ComfyUI per GPU from a checkout, no "
            "COMFYS3_COMFYUI_PATH was given, and comfy-cli has installed none "
            f"({comfy_cli_config(home)} names no workspace, and "
            f"{comfy_cli_default_workspace(home)} has no main.py). Install one:\n"
            "    pip install comfy-cli\n"
            "    comfy --skip-prompt install --nvidia\n"
            "or name the checkout you have: COMFYS3_COMFYUI_PATH=/path/to/ComfyUI"
        )
    return (
        f"no ComfyUI: no COMFYS3_COMFYUI_URL or COMFYS3_COMFYUI_PATH was given, nothing "
        f"answers at {url}, and comfy-cli has installed none ({comfy_cli_config(home)} names "
        f"no workspace, and {comfy_cli_default_workspace(home)} has no main.py). Install one "
        "(it is started by the worker from then on):\n"
        "    pip install comfy-cli\n"
        "    comfy --skip-prompt install --cpu      # or --nvidia for an NVIDIA GPU\n"
        "or name one you have: COMFYS3_COMFYUI_URL=http://127.0.0.1:8188 (a ComfyUI that "
        "runs) or COMFYS3_COMFYUI_PATH=/path/to/ComfyUI (a checkout the worker starts)"
    )
