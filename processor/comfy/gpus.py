"""Which GPUs a worker serves, one ComfyUI each (``comfys3 run --gpus``, ``COMFYS3_GPUS``).

ComfyUI uses one GPU per process, so a machine with several is served by one ComfyUI per GPU,
each seeing only its own (``CUDA_VISIBLE_DEVICES``), on its own port, with its own input,
output and temp folders and log, and one lane of the worker feeding it. The lanes share one
intake, one claim store and one status book: N GPUs behave as N workers that share one listing
and one process.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from processor.errors import SettingsError
from processor.settings import WorkerSettings, parse_gpus

NVIDIA_SMI_TIMEOUT = 20.0


@dataclass(frozen=True)
class Gpu:
    """One GPU a ComfyUI is started for: its place among them, and its id."""

    index: int  # 0, 1, ...: the port is COMFYS3_COMFYUI_PORT + index
    device: str  # what CUDA_VISIBLE_DEVICES gets

    @property
    def name(self) -> str:
        return f"gpu{self.device}"

    def folder(self, root: Path) -> Path:
        """This GPU's ComfyUI folders (input, output, temp) under ``root``."""
        return root / "comfys3-gpus" / self.name


def count_gpus(nvidia_smi: str | None = None) -> list[str]:
    """The GPU ids ``nvidia-smi -L`` lists; a readable error where there is none."""
    binary = nvidia_smi or shutil.which("nvidia-smi")
    if binary is None:
        raise SettingsError(
            "--gpus all counts GPUs with nvidia-smi, which is not on this machine: give the "
            "GPU ids (--gpus 0,1), or leave --gpus out to run one ComfyUI"
        )
    try:
        listed = subprocess.run(
            [binary, "-L"], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise SettingsError(f"--gpus all: nvidia-smi -L failed: {error}") from None
    lines = [line for line in listed.stdout.splitlines() if line.startswith("GPU ")]
    if listed.returncode != 0 or not lines:
        why = (listed.stderr or listed.stdout).strip().splitlines()[:1] or ["no GPU listed"]
        raise SettingsError(f"--gpus all: nvidia-smi -L found no GPU ({why[0]})")
    return [line.split(":", 1)[0].removeprefix("GPU ").strip() for line in lines]


def gpus_of(settings: WorkerSettings) -> list[Gpu]:
    """The GPUs to serve (none: one ComfyUI, as without ``--gpus``, also when ``all`` finds
    just one)."""
    if settings.host.gpus is None:
        return []
    if settings.comfyui.url:
        raise SettingsError(
            "COMFYS3_GPUS (--gpus) starts one ComfyUI per GPU, and COMFYS3_COMFYUI_URL attaches "
            "to a running one: leave one of them out"
        )
    if settings.comfyui.path is None:
        raise SettingsError(
            "COMFYS3_GPUS (--gpus) starts one ComfyUI per GPU: set COMFYS3_COMFYUI_PATH to the "
            "ComfyUI checkout to start"
        )
    ids = parse_gpus(settings.host.gpus)
    if ids is None:
        ids = count_gpus()
        if len(ids) == 1:
            return []  # all of one GPU: one ComfyUI, exactly as without --gpus
    return [Gpu(index, device) for index, device in enumerate(ids)]
