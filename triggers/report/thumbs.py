"""Small WebP thumbnails of image outputs, written beside the report page.

A thumbnail is named after the output's key and digest, so running the report again over a
grown batch only makes the new ones. Output files come from the bucket and are untrusted:
sizes are checked before anything is decoded, and a file Pillow cannot read gets a reason
instead of a thumbnail.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from processor import OutputRecord, Storage, StorageError

THUMB_DIR = "thumbs"
THUMB_BOX = 256  # px, the longer side: sharp in a ~160 px card on a 1.5x screen
THUMB_QUALITY = 70
MAX_SOURCE_BYTES = 64 * 1024 * 1024
MAX_SOURCE_PIXELS = 50_000_000  # below Pillow's own bomb warning (~89 M)
THUMB_CONCURRENCY = 8
IMAGE_TYPES = frozenset(
    {"image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp", "image/tiff"}
)


@dataclass(frozen=True)
class Thumb:
    """A thumbnail's path relative to the page, or why there is none."""

    path: str | None = None
    problem: str | None = None


def is_image(output: OutputRecord) -> bool:
    return output.content_type.split(";", 1)[0].strip().lower() in IMAGE_TYPES


def thumbnail_name(output: OutputRecord) -> str:
    digest = hashlib.sha256(f"{output.key}\n{output.sha256}".encode()).hexdigest()
    return f"{THUMB_DIR}/{digest[:32]}.webp"


def make_thumbnail(data: bytes) -> bytes:
    """Image bytes -> WebP bytes no larger than THUMB_BOX on a side (first frame if animated).

    Raises ValueError with a readable reason for an image too large to decode safely; Pillow's
    own errors for undecodable data pass through.
    """
    with Image.open(io.BytesIO(data)) as opened:
        width, height = opened.size
        if width * height > MAX_SOURCE_PIXELS:
            raise ValueError(f"{width}x{height} pixels is too large to preview")
        opened.draft("RGB", (THUMB_BOX, THUMB_BOX))  # JPEG decodes at a reduced scale
        image: Image.Image = opened
        if image.mode not in ("RGB", "RGBA"):
            has_alpha = "A" in image.getbands() or "transparency" in image.info
            image = image.convert("RGBA" if has_alpha else "RGB")
        image.thumbnail((THUMB_BOX, THUMB_BOX))
        buffer = io.BytesIO()
        image.save(buffer, format="WEBP", quality=THUMB_QUALITY)
        return buffer.getvalue()


def _describe(error: Exception) -> str:
    if isinstance(error, ValueError) and str(error):
        return str(error)
    return f"not an image Pillow can read ({type(error).__name__})"


async def thumbnail(storage: Storage, output: OutputRecord, out_dir: Path) -> Thumb:
    name = thumbnail_name(output)
    target = out_dir / name
    if target.is_file():
        return Thumb(name)  # made by an earlier run: same key, same digest
    if output.bytes > MAX_SOURCE_BYTES:
        return Thumb(problem=f"{output.bytes} bytes is too large to preview")
    try:
        data = (await storage.get(output.key)).data
    except StorageError as error:
        return Thumb(problem=f"cannot read it: {error}")
    if len(data) > MAX_SOURCE_BYTES:
        return Thumb(problem=f"{len(data)} bytes is too large to preview")
    try:
        small = await asyncio.to_thread(make_thumbnail, data)
    except Exception as error:  # Pillow's decoders raise many types on hostile bytes
        return Thumb(problem=_describe(error))
    await asyncio.to_thread(_write, target, small)
    return Thumb(name)


def _write(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".part")
    partial.write_bytes(data)
    partial.replace(target)  # a report stopped half-way leaves no truncated thumbnail to reuse


async def make_thumbnails(
    storage: Storage,
    outputs: Iterable[OutputRecord],
    out_dir: Path,
    concurrency: int = THUMB_CONCURRENCY,
) -> dict[str, Thumb]:
    """A thumbnail (or the reason for none) per output key, at most ``concurrency`` at once."""
    gate = asyncio.Semaphore(concurrency)
    unique = {output.key: output for output in outputs}

    async def one(output: OutputRecord) -> Thumb:
        async with gate:
            return await thumbnail(storage, output, out_dir)

    made = await asyncio.gather(*(one(output) for output in unique.values()))
    return dict(zip(unique, made, strict=True))
