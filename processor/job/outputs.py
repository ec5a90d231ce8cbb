"""Turning ComfyUI's output files into what the user asked for: format, content type, digest."""

from __future__ import annotations

import hashlib
import io
import mimetypes
from dataclasses import dataclass
from pathlib import PurePosixPath

from PIL import Image

from processor.job.manifest import OutputOptions

CONVERTIBLE = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
FORMAT_EXT = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
CONTENT_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".mp4": "video/mp4",
    ".webm": "video/webm",
    ".flac": "audio/flac",
    ".wav": "audio/wav",
    ".mp3": "audio/mpeg",
    ".opus": "audio/ogg",
    ".txt": "text/plain",
    ".json": "application/json",
    ".glb": "model/gltf-binary",
}


@dataclass(frozen=True)
class PreparedOutput:
    data: bytes
    ext: str
    content_type: str
    sha256: str


def content_type_for(ext: str) -> str:
    return CONTENT_TYPES.get(ext) or mimetypes.types_map.get(ext, "application/octet-stream")


def prepare_output(data: bytes, filename: str, kind: str, options: OutputOptions) -> PreparedOutput:
    """Convert still images to the requested format; pass every other kind through as made."""
    ext = PurePosixPath(filename).suffix.lower() or ".bin"
    if kind == "images" and ext in CONVERTIBLE and FORMAT_EXT[options.format] != ext:
        data, ext = convert_image(data, options), FORMAT_EXT[options.format]
    return PreparedOutput(data, ext, content_type_for(ext), hashlib.sha256(data).hexdigest())


def convert_image(data: bytes, options: OutputOptions) -> bytes:
    with Image.open(io.BytesIO(data)) as opened:
        opened.load()
        image: Image.Image = opened
        if options.format == "jpeg" and image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        buffer = io.BytesIO()
        if options.format == "png":
            image.save(buffer, format="PNG")
        else:
            image.save(buffer, format=options.format.upper(), quality=options.quality)
        return buffer.getvalue()
