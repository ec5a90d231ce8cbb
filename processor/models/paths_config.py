"""Where the model cache lives, and the ComfyUI configuration that makes it an extra model path.

The cache is ``COMFYS3_MODEL_CACHE``, else ``model-cache/`` on the network volume when there is
one (so a model is fetched once per endpoint, not once per worker), else there is none and a
manifest that names models is left for a worker that has one. A ComfyUI the worker starts gets
``--extra-model-paths-config <cache>/.comfys3/extra_model_paths.yaml``, written here, with the
cache's folders first (``is_default``: a cached model wins over one of the same name elsewhere).
For a ComfyUI attached by URL, add the same section to its own ``extra_model_paths.yaml``
(:func:`paths_yaml` prints it).
"""

from __future__ import annotations

import json
from pathlib import Path

from processor.models.spec import MODEL_FOLDERS
from processor.ops.volume import volume_dir
from processor.settings import WorkerSettings

SECTION = "comfys3_model_cache"
CONFIG_NAME = "extra_model_paths.yaml"


def cache_dir(settings: WorkerSettings) -> Path | None:
    """The model cache folder, or None when this worker keeps none."""
    if settings.models.cache is not None:
        return settings.models.cache
    volume = volume_dir(settings)
    return None if volume is None else volume / "model-cache"


def paths_yaml(cache: Path) -> str:
    """ComfyUI's extra_model_paths.yaml for the cache. JSON is YAML, so it is written as JSON
    (no YAML writer needed, and no quoting surprises in a path)."""
    section = {"base_path": str(cache.resolve()), "is_default": True}
    section.update({folder: f"{folder}/" for folder in MODEL_FOLDERS})
    return (
        "# Written by comfys3: the model cache (COMFYS3_MODEL_CACHE) as an extra model path.\n"
        + json.dumps({SECTION: section}, indent=2)
        + "\n"
    )


def write_paths_config(cache: Path) -> Path:
    """Write the cache's extra_model_paths.yaml (once per start) and return its path."""
    folder = cache / ".comfys3"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CONFIG_NAME
    text = paths_yaml(cache)
    if not path.is_file() or path.read_text() != text:
        temporary = path.with_suffix(".tmp")
        temporary.write_text(text)
        temporary.replace(path)
    return path


def comfyui_args(settings: WorkerSettings) -> list[str]:
    """The arguments a started ComfyUI needs to see the model cache (none without one)."""
    cache = cache_dir(settings)
    if cache is None:
        return []
    cache.mkdir(parents=True, exist_ok=True)
    return ["--extra-model-paths-config", str(write_paths_config(cache))]
