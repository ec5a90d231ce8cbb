"""The RunPod network volume, when one is mounted: where a worker leaves what outlives it.

RunPod mounts a network volume at ``/runpod-volume`` on every worker of an endpoint; a worker's
own disk goes with it. So, as on the seed image, the volume holds:

```
<volume>/ComfyUI/models/     models too large to bake (comfyui/extra_model_paths.yaml)
<volume>/huggingface/        the Hugging Face cache (HF_HOME) of ComfyUI and its custom nodes
<volume>/logs/               worker-<worker id>.log, comfyui-<worker id>.log, rotated
```

and an operator can read what a dead worker did. ``COMFYS3_VOLUME_DIR`` names the volume;
unset, it is ``/runpod-volume`` when that folder exists (docker-compose mounts
``.storage/runpod-volume`` there), and there is no volume otherwise.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path

from processor.settings import WorkerSettings

RUNPOD_VOLUME = Path("/runpod-volume")
LOG_MAX_BYTES = 20 * 1024 * 1024
LOG_BACKUPS = 3


def volume_dir(settings: WorkerSettings) -> Path | None:
    """The mounted volume, or None when there is none."""
    if settings.host.volume_dir is not None:
        return settings.host.volume_dir
    return RUNPOD_VOLUME if RUNPOD_VOLUME.is_dir() else None


def worker_name(settings: WorkerSettings) -> str:
    """This worker's name in claims, statuses and log file names (default: host-pid)."""
    return settings.host.worker_id or f"{socket.gethostname()}-{os.getpid()}"


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", name).strip(".-") or "worker"


def logs_dir(settings: WorkerSettings) -> Path | None:
    volume = volume_dir(settings)
    if volume is None:
        return None
    folder = volume / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def worker_log(settings: WorkerSettings) -> Path | None:
    """``<volume>/logs/worker-<worker id>.log``: the worker's name in a status finds its log."""
    folder = logs_dir(settings)
    return None if folder is None else folder / f"worker-{_file_safe(worker_name(settings))}.log"


def comfyui_log(settings: WorkerSettings) -> Path | None:
    """Where the log of a ComfyUI the worker starts goes: COMFYS3_COMFYUI_LOG_FILE, else
    ``<volume>/logs/comfyui-<worker id>.log``, else None (the temp folder)."""
    if settings.comfyui.log_file is not None:
        return settings.comfyui.log_file
    folder = logs_dir(settings)
    return None if folder is None else folder / f"comfyui-{_file_safe(worker_name(settings))}.log"


def comfyui_environment(
    settings: WorkerSettings, env: Mapping[str, str] | None
) -> Mapping[str, str] | None:
    """``env`` (None: the worker's own environment) with HF_HOME on the volume, unless the
    operator set HF_HOME already: a model a custom node downloads is then downloaded once per
    endpoint, not once per worker."""
    volume = volume_dir(settings)
    base = os.environ if env is None else env
    if volume is None or "HF_HOME" in base:
        return env
    cache = volume / "huggingface"
    cache.mkdir(parents=True, exist_ok=True)
    return {**base, "HF_HOME": str(cache)}


def rotate_if_large(path: Path, max_bytes: int = LOG_MAX_BYTES) -> None:
    """Roll ``path`` over as a RotatingFileHandler would (``.1`` ... ``.N``) once it has grown
    past ``max_bytes``. For a file a child process writes itself (ComfyUI's log), this runs
    before each start, so the log is bounded per run."""
    try:
        if path.stat().st_size < max_bytes:
            return
    except OSError:
        return
    handler = logging.handlers.RotatingFileHandler(
        path, maxBytes=max_bytes, backupCount=LOG_BACKUPS, delay=True
    )
    try:
        handler.doRollover()
    finally:
        handler.close()


class VolumeLogHandler(logging.handlers.RotatingFileHandler):
    """The worker's log file on the network volume (one per worker, rotated)."""


def worker_log_handler(settings: WorkerSettings) -> VolumeLogHandler | None:
    """A handler that writes ``<volume>/logs/worker-<worker id>.log``, or None without a
    volume; the file is rotated at :data:`LOG_MAX_BYTES`, :data:`LOG_BACKUPS` kept."""
    path = worker_log(settings)
    if path is None:
        return None
    return VolumeLogHandler(path, maxBytes=LOG_MAX_BYTES, backupCount=LOG_BACKUPS, encoding="utf-8")
