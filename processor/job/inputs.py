"""Input images are checked before they reach ComfyUI, from their header alone.

A file that is not an image, or an image too large to decode safely, fails inside ComfyUI's
LoadImage as a runtime error, which is retried: every attempt burns GPU time on a job that can
never succeed. Read here first, it fails at once as ``input_invalid``, naming the file.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from processor.errors import InputInvalid


def check_image(
    data: bytes, source: str, *, max_pixels: int, decode: bool = False
) -> tuple[str, int, int]:
    """(format, width, height) of an image, or :class:`InputInvalid`. The header is parsed
    first: Pillow's ``open`` is lazy, so a decompression bomb is refused before it expands.
    ``decode`` then decodes every pixel too, for bytes that come straight from a caller (a
    truncated or corrupt image body is refused here instead of inside ComfyUI)."""
    if not data:
        raise InputInvalid(f"input file {source!r} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                kind = image.format or "?"
                if decode and 0 < width * height <= max_pixels:
                    image.load()
    except (UnidentifiedImageError, Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise InputInvalid(
            f"input file {source!r} is not an image ComfyUI can load (or it is too large to "
            "decode safely)"
        ) from None
    except (OSError, ValueError, SyntaxError) as error:
        raise InputInvalid(f"input file {source!r} is not a readable image: {error}") from None
    if width <= 0 or height <= 0:
        raise InputInvalid(f"input file {source!r} is an image of {width}x{height} pixels")
    if width * height > max_pixels:
        raise InputInvalid(
            f"input file {source!r} is {width}x{height} = {width * height:,} pixels; the limit "
            f"is {max_pixels:,} (COMFYS3_MAX_INPUT_PIXELS)"
        )
    return kind, width, height
