"""Input images are decoded in full before they reach ComfyUI, within the pixel limit.

A file that is not an image, an image too large to decode safely, or one whose body was cut
off (an interrupted upload) fails inside ComfyUI's LoadImage as a runtime error, which is
retried: every attempt burns GPU time on a job that can never succeed. Decoded here first,
with the same library (Pillow) and every frame ComfyUI would read, it fails at once as
``input_invalid``, naming the file. Reading only the header was not enough: a PNG or JPEG
with its header intact and its pixels cut short passed.
"""

from __future__ import annotations

import io
import threading
import warnings

from PIL import Image, UnidentifiedImageError

from processor.errors import InputInvalid

# What Pillow raises for a file it cannot identify or that claims too many pixels to decode.
_NOT_AN_IMAGE = (
    UnidentifiedImageError,
    Image.DecompressionBombWarning,
    Image.DecompressionBombError,
)


# warnings.catch_warnings changes the process's warning filters, and the check runs in
# threads: two at once could leave the bomb warning an error for good. One header at a time
# (a fraction of a millisecond); the decoding itself runs outside the lock.
_HEADER_LOCK = threading.Lock()


def check_image(data: bytes, source: str, *, max_pixels: int) -> tuple[str, int, int]:
    """(format, width, height) of an image whose every pixel decodes, or :class:`InputInvalid`
    saying why. The header is parsed first (Pillow's ``open`` is lazy), so a decompression
    bomb is refused before it expands; then the pixels of every frame are decoded, up to
    ``max_pixels`` in all. CPU work (milliseconds for 1024x1024): callers on an event loop
    run it in a thread, as it may."""
    if not data:
        raise InputInvalid(f"input file {source!r} is empty (0 bytes)")
    with _opened(data, source) as image:
        width, height = image.size
        kind = image.format or "?"
        if width <= 0 or height <= 0:
            raise InputInvalid(f"input file {source!r} is an image of {width}x{height} pixels")
        if width * height > max_pixels:
            raise InputInvalid(
                f"input file {source!r} is {width}x{height} = {width * height:,} pixels; the "
                f"limit is {max_pixels:,} (COMFYS3_MAX_INPUT_PIXELS)"
            )
        try:
            _decode_frames(image, max_pixels)
        except Exception as error:  # as in _opened: whatever Pillow raises, it cannot be loaded
            raise InputInvalid(
                f"input file {source!r} is truncated or corrupt: its {kind} data does not "
                f"decode ({_reason(error)})"
            ) from None
    return kind, width, height


def _opened(data: bytes, source: str) -> Image.Image:
    """The image with its header read and nothing decoded, or :class:`InputInvalid`."""
    with _HEADER_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(io.BytesIO(data))
        except _NOT_AN_IMAGE:
            raise InputInvalid(
                f"input file {source!r} is not an image ComfyUI can load (or it is too large to "
                "decode safely)"
            ) from None
        # Pillow's parsers meet hostile bytes with many exception types (OSError, SyntaxError,
        # struct.error, NotImplementedError from DDS, EOFError...): each means that ComfyUI
        # could not load this file either, so each is the same readable refusal.
        except Exception as error:
            raise InputInvalid(f"input file {source!r} is not a readable image: {error}") from None


def _decode_frames(image: Image.Image, max_pixels: int) -> None:
    """Decode every frame, as ComfyUI's LoadImage iterates them, while their pixels add up to
    at most ``max_pixels``: an animation longer than that is checked that far, never
    expanded past the limit the setting sets."""
    budget = max_pixels
    frame = 0
    while True:
        width, height = image.size
        budget -= width * height
        if budget < 0:
            return
        image.load()
        frame += 1
        try:
            image.seek(frame)
        except EOFError:  # no more frames: how Pillow says so, for every format
            return


def _reason(error: Exception) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__
