"""Turning ComfyUI's output files into what the user asked for: format, content type, digest.

Still images are converted to the manifest's ``output.format``; everything else (video, audio,
animations, 3-D models, text files) is stored as ComfyUI made it, with the content type its
extension says, or, for an extension nobody knows, the one its bytes say.
"""

from __future__ import annotations

import hashlib
import io
import mimetypes
from dataclasses import dataclass
from pathlib import PurePosixPath

from PIL import Image

from processor.comfy.client import sniff_content_type
from processor.job.manifest import OutputOptions

CONVERTIBLE = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
FORMAT_EXT = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
CONTENT_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".apng": "image/apng",
    ".avif": "image/avif",
    ".svg": "image/svg+xml",
    ".mp4": "video/mp4",
    ".m4v": "video/mp4",
    ".mov": "video/quicktime",
    ".mkv": "video/x-matroska",
    ".avi": "video/x-msvideo",
    ".webm": "video/webm",
    ".flac": "audio/flac",
    ".wav": "audio/wav",
    ".mp3": "audio/mpeg",
    ".m4a": "audio/mp4",
    ".aac": "audio/aac",
    ".ogg": "audio/ogg",
    ".opus": "audio/ogg",  # Opus in an Ogg container, as SaveAudioOpus writes it
    ".txt": "text/plain; charset=utf-8",
    ".md": "text/markdown; charset=utf-8",
    ".csv": "text/csv; charset=utf-8",
    ".json": "application/json",
    ".glb": "model/gltf-binary",
    ".gltf": "model/gltf+json",
    ".obj": "model/obj",
    ".stl": "model/stl",
    ".usdz": "model/vnd.usdz+zip",
    ".ply": "application/octet-stream",
    ".fbx": "application/octet-stream",
}


@dataclass(frozen=True)
class PreparedOutput:
    data: bytes
    ext: str
    content_type: str
    sha256: str


def content_type_for(ext: str, data: bytes = b"") -> str:
    """By extension; an extension nobody knows (or none) is settled by the bytes."""
    known = CONTENT_TYPES.get(ext) or mimetypes.types_map.get(ext)
    return known or sniff_content_type(data)


def prepare_output(
    data: bytes, filename: str, kind: str, options: OutputOptions, *, animated: bool = False
) -> PreparedOutput:
    """Convert still images to the requested format; pass every other kind through as made.
    ``animated`` (ComfyUI's flag for video and animations saved under ``images``) and any
    image Pillow finds more than one frame in are never converted: that would keep one frame.
    """
    ext = PurePosixPath(filename).suffix.lower() or ".bin"
    if (
        kind == "images"
        and not animated
        and ext in CONVERTIBLE
        and FORMAT_EXT[options.format] != ext
    ):
        converted = convert_image(data, options)
        if converted is not None:
            data, ext = converted, FORMAT_EXT[options.format]
    return PreparedOutput(data, ext, content_type_for(ext, data), hashlib.sha256(data).hexdigest())


def convert_image(data: bytes, options: OutputOptions) -> bytes | None:
    """The image in the requested format, or None for an animation (kept as it is)."""
    with Image.open(io.BytesIO(data)) as opened:
        if getattr(opened, "is_animated", False):
            return None
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
