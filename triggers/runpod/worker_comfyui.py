"""worker-comfyui's request and answer, served by comfys3, so its clients switch unchanged.

worker-comfyui 5.x (the RunPod ComfyUI worker) takes ``{"workflow": <API graph>, "images":
[{"name", "image"}]}`` and answers ``{"images": [{"filename", "type", "data"}], "errors":
[...]}``. Here such a request becomes an ordinary raw-graph manifest, under the same gate and
limits as one dropped into the bucket (``COMFYS3_ALLOW_RAW_WORKFLOWS``, the manifest size cap):

- each image is decoded and checked (header, pixel count, every pixel of its first frame)
  before anything is written, so a broken one is a sentence back, not a failed prompt;
- it is kept beside the job's outputs (``<output>/<job id>/inputs/<name>``) and named in the
  manifest's ``graph_inputs``, so the worker stages it into ComfyUI like any input file and the
  graph's LoadImage (any node input whose value is the name) receives it;
- an image the graph never names is not kept, and the answer says so in ``errors``, where
  worker-comfyui puts its own non-fatal problems.

The answer adds comfys3's ``job_id`` and ``status_key``, and lists non-image outputs under
``files`` (worker-comfyui drops them) and text outputs under ``texts``.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Literal

from PIL import Image

from processor import (
    InputInvalid,
    JobState,
    JobStatus,
    Layout,
    OutputRecord,
    Storage,
    StorageError,
    check_image,
    file_targets,
    validate_key,
)
from triggers.runpod.request import MANIFEST_FIELDS, InputError, inline_job_id

ImageMode = Literal["base64", "s3_url"]
IMAGE_MODES: tuple[ImageMode, ...] = ("base64", "s3_url")
# What worker-comfyui reads from `input`, and what comfys3 adds to it.
KNOWN_FIELDS = frozenset({"workflow", "images", "comfy_org_api_key", "images_as"})
# worker-comfyui's switch: with this variable set it uploads images and answers with URLs.
BUCKET_SWITCH = "BUCKET_ENDPOINT_URL"
# RunPod refuses a job result over 20 MB; base64 beyond this many characters goes as a URL.
BASE64_BUDGET = 18_000_000
DATA_URI = re.compile(r"^data:[^,]{0,200};base64,", re.IGNORECASE)


@dataclass(frozen=True)
class SentImage:
    """An image as the request carried it: its name in the graph, its base64 text."""

    name: str
    encoded: str


@dataclass(frozen=True)
class CheckedImage:
    name: str
    data: bytes
    content_type: str


@dataclass(frozen=True)
class WorkerComfyuiJob:
    """A worker-comfyui request, its shape checked; its images are decoded later, with the
    worker's limits. ``notes`` are non-fatal problems for the answer's ``errors``."""

    graph: dict[str, Any]
    images: tuple[SentImage, ...]
    job_id: str
    images_as: ImageMode | None
    notes: tuple[str, ...]

    def used_images(self) -> list[SentImage]:
        return [image for image in self.images if file_targets(self.graph, image.name)]

    def unused_notes(self) -> list[str]:
        return [
            f"image {image.name!r} is not used by any node of the workflow; it was not uploaded"
            for image in self.images
            if not file_targets(self.graph, image.name)
        ]

    def manifest(self, layout: Layout) -> dict[str, Any]:
        """The raw-graph manifest this request runs as."""
        document: dict[str, Any] = {"id": self.job_id, "graph": self.graph}
        used = self.used_images()
        if used:
            document["graph_inputs"] = {
                image.name: layout.upload_key(self.job_id, image.name) for image in used
            }
        return document


def is_worker_comfyui(job_input: Any) -> bool:
    """worker-comfyui's shape: ``workflow`` is the graph itself, not a template's name."""
    return isinstance(job_input, dict) and isinstance(job_input.get("workflow"), dict)


def parse(job_input: dict[str, Any], runpod_job_id: str) -> WorkerComfyuiJob:
    """A worker-comfyui ``input`` -> the job, or an :class:`InputError` naming what to change."""
    clashing = sorted((set(job_input) & MANIFEST_FIELDS) - KNOWN_FIELDS)
    if clashing:
        raise InputError(
            "a worker-comfyui request ('workflow' given as a graph) takes 'images' besides, not "
            f"{', '.join(repr(k) for k in clashing)}; for a comfys3 manifest name a template in "
            "'workflow', or give the graph as 'graph'"
        )
    notes: list[str] = []
    ignored = sorted(set(job_input) - KNOWN_FIELDS)
    if ignored:
        notes.append(f"ignored unknown key(s) of the input: {', '.join(ignored)}")
    if job_input.get("comfy_org_api_key") is not None:
        notes.append("comfy_org_api_key was ignored: comfys3 does not pass API keys to ComfyUI")
    images_as = job_input.get("images_as")
    if images_as is not None and images_as not in IMAGE_MODES:
        raise InputError(f'\'images_as\' must be "base64" or "s3_url", not {images_as!r}')
    return WorkerComfyuiJob(
        graph=job_input["workflow"],
        images=_images(job_input.get("images")),
        job_id=inline_job_id(runpod_job_id),
        images_as=images_as,
        notes=tuple(notes),
    )


def _images(value: Any) -> tuple[SentImage, ...]:
    if value is None:
        return ()
    shape = "'images' must be a list of objects with 'name' and 'image' keys"
    if not isinstance(value, list):
        raise InputError(f"{shape}, not {type(value).__name__}")
    images: list[SentImage] = []
    seen: set[str] = set()
    for index, item in enumerate(value):
        where = f"images[{index}]"
        if not isinstance(item, dict) or not {"name", "image"} <= set(item):
            raise InputError(f"{shape}; {where} is not")
        name, encoded = item["name"], item["image"]
        if not isinstance(name, str) or not name:
            raise InputError(f'{where}.name must be a file name, e.g. "input.png"')
        if not isinstance(encoded, str):
            raise InputError(f"{where}.image ({name!r}) must be a base64 string")
        try:
            validate_key(name)
        except StorageError as error:
            reason = str(error).removeprefix(f"invalid storage key {name!r}: ")
            raise InputError(
                f"{where}.name {name!r} cannot name an input file: {reason} (a relative path: "
                "no '..', no leading '/', no URL)"
            ) from None
        if name in seen:
            raise InputError(f"{where}.name {name!r} is given twice; names must be unique")
        seen.add(name)
        images.append(SentImage(name, DATA_URI.sub("", encoded, count=1)))
    return tuple(images)


def decode_images(
    images: list[SentImage], *, max_bytes: int, max_pixels: int
) -> list[CheckedImage]:
    """Each image's bytes, checked as the worker checks any input file and decoded in full,
    or an :class:`InputError` naming the image. CPU work: call it off the event loop."""
    checked: list[CheckedImage] = []
    for image in images:
        text = "".join(image.encoded.split())
        if len(text) // 4 * 3 > max_bytes:
            raise InputError(
                f"image {image.name!r} is about {len(text) // 4 * 3:,} bytes; the limit is "
                f"{max_bytes:,} (COMFYS3_MAX_INPUT_BYTES)"
            )
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise InputError(
                f"image {image.name!r} is not valid base64 (a data: URI prefix is fine)"
            ) from None
        try:
            kind, _, _ = check_image(data, image.name, max_pixels=max_pixels, decode=True)
        except InputInvalid as error:
            raise InputError(str(error)) from None
        content_type = Image.MIME.get(kind, "application/octet-stream")
        checked.append(CheckedImage(image.name, data, content_type))
    return checked


def image_mode(
    requested: ImageMode | None, setting: str, environ: Mapping[str, str] = os.environ
) -> ImageMode:
    """base64 or s3_url: the caller's ``images_as``, else ``COMFYS3_RUNPOD_IMAGES``, whose
    ``auto`` decides as worker-comfyui does (URLs when ``BUCKET_ENDPOINT_URL`` is set)."""
    if requested is not None:
        return requested
    if setting in IMAGE_MODES:
        return setting
    return "s3_url" if environ.get(BUCKET_SWITCH) else "base64"


async def answer(
    storage: Storage,
    layout: Layout,
    status: JobStatus,
    *,
    mode: ImageMode,
    presign_seconds: int,
    notes: list[str],
) -> dict[str, Any]:
    """worker-comfyui's ``output`` for a finished job, with comfys3's job id and status key.

    Outputs past :data:`BASE64_BUDGET` go as URLs, with a note: an answer RunPod would refuse
    helps nobody.
    """
    errors = list(notes)
    budget = BASE64_BUDGET
    images: list[dict[str, Any]] = []
    files: list[dict[str, Any]] = []
    for output in status.outputs:
        entry: dict[str, Any] = {"filename": PurePosixPath(output.key).name}
        if mode == "base64" and _base64_size(output) <= budget:
            stored = await storage.get(output.key)
            entry.update(type="base64", data=base64.b64encode(stored.data).decode("ascii"))
            budget -= len(entry["data"])
        else:
            if mode == "base64":
                errors.append(
                    f"{entry['filename']} is given as an s3_url: as base64 it would take the "
                    "answer past RunPod's 20 MB limit"
                )
            entry.update(type="s3_url", data=await storage.presign_get(output.key, presign_seconds))
        if output.content_type.startswith("image/"):
            images.append(entry)
        else:
            files.append({**entry, "content_type": output.content_type})
    result: dict[str, Any] = {"images": images}
    if status.state is JobState.succeeded and not images:
        result["status"] = "success_no_images"  # as worker-comfyui says it
    if files:
        result["files"] = files
    if status.texts:
        result["texts"] = status.texts
    if errors:
        result["errors"] = errors
    result["job_id"] = status.id
    result["status_key"] = layout.status_key(status.id)
    return result


def _base64_size(output: OutputRecord) -> int:
    return (output.bytes + 2) // 3 * 4
