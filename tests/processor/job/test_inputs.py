"""processor.job.inputs: an input file that no attempt could use fails at once as ``input_invalid``,
naming the file, instead of failing inside ComfyUI's LoadImage on every retry.

``check_image`` is fed real images, files that are not images, cut-off headers and headers
that claim enormous sizes (decompression bombs); then a worker run shows the same refusals,
and the size limit on the bytes, end as statuses without ComfyUI ever running them.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from processor.errors import InputInvalid
from processor.job.inputs import check_image
from processor.job.status import JobState
from processor.storage.local import LocalStorage
from processor.worker.assembly import open_worker
from tests.processor.worker.test_loop import LAYOUT, drop, executions, status_of, worker_settings

LIMIT = 64 * 1024 * 1024  # the default COMFYS3_MAX_INPUT_PIXELS


def encoded(kind: str, size: tuple[int, int] = (24, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 90)).save(buffer, kind)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG header (correct CRCs) that claims any size, with no pixels behind it:
    what a decompression bomb looks like to a header check."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("kind", ["PNG", "JPEG", "WEBP"])
def test_real_images_pass_with_their_format_and_size(kind: str) -> None:
    assert check_image(encoded(kind), "uploads/a", max_pixels=LIMIT) == (kind, 24, 16)


def test_an_image_of_exactly_the_pixel_limit_passes() -> None:
    assert check_image(png_claiming(1000, 500), "x.png", max_pixels=500_000)[1:] == (1000, 500)


def invalid(data: bytes, source: str = "uploads/in.png", max_pixels: int = LIMIT) -> str:
    with pytest.raises(InputInvalid) as caught:
        check_image(data, source, max_pixels=max_pixels)
    message = str(caught.value)
    assert repr(source) in message  # always names the file
    return message


def test_an_empty_file_is_refused() -> None:
    assert "is empty (0 bytes)" in invalid(b"")


@pytest.mark.parametrize(
    "data",
    [b"hello, this is not an image\n", b'{"workflow": "solid"}', b"\x00" * 64, b"GIF8"],
)
def test_a_file_that_is_not_an_image_is_refused(data: bytes) -> None:
    assert "is not an image ComfyUI can load" in invalid(data)


@pytest.mark.parametrize(("kind", "cut"), [("PNG", 8), ("PNG", 20), ("JPEG", 4), ("JPEG", 30)])
def test_a_header_cut_short_is_refused(kind: str, cut: int) -> None:
    message = invalid(encoded(kind)[:cut], "uploads/cut.img")
    assert "not an image" in message or "not a readable image" in message


@pytest.mark.parametrize("size", [(100_000, 100_000), (10_000, 10_000)])
def test_a_header_claiming_a_huge_image_is_refused_before_decoding(size: tuple[int, int]) -> None:
    """Past Pillow's own bomb limit (an error above twice it, a warning above it, made an
    error here): the pixels are never allocated."""
    assert "too large to decode safely" in invalid(png_claiming(*size), "uploads/bomb.png")


def test_an_image_over_the_pixel_limit_says_how_large_and_which_setting() -> None:
    message = invalid(png_claiming(9000, 9000), "uploads/big.png")
    assert "is 9000x9000 = 81,000,000 pixels; the limit is 67,108,864" in message
    assert "COMFYS3_MAX_INPUT_PIXELS" in message


def test_a_header_with_no_pixels_is_refused() -> None:
    invalid(png_claiming(0, 16), "uploads/empty.png")


def test_decode_reads_every_pixel_so_a_cut_body_is_refused() -> None:
    """A header check passes an image whose pixel data was cut off; bytes straight from a
    caller (a RunPod request's base64) are decoded in full, and the cut is found."""
    cut = encoded("PNG", (64, 64))[:-40]
    assert check_image(cut, "sent.png", max_pixels=LIMIT) == ("PNG", 64, 64)
    with pytest.raises(InputInvalid, match=r"'sent\.png' is not a readable image"):
        check_image(cut, "sent.png", max_pixels=LIMIT, decode=True)
    assert check_image(encoded("WEBP"), "ok.webp", max_pixels=LIMIT, decode=True)[0] == "WEBP"


# -- as a worker sees it --------------------------------------------------------------------


async def test_bad_inputs_fail_as_input_invalid_without_reaching_comfyui(
    tmp_path: Path, fake_comfyui: Any
) -> None:
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    big = Image.effect_noise((64, 64), 100).convert("RGB")
    big.save(uploads / "noise.png")  # incompressible: well over the byte limit below
    (uploads / "bomb.png").write_bytes(png_claiming(100_000, 100_000))
    (uploads / "notes.png").write_text("not a picture at all")
    Image.new("RGB", (4, 4)).save(uploads / "ok.png")
    for name in ("noise", "bomb", "notes", "ok"):
        drop(tmp_path, name, {"workflow": "scale", "payload": {"image": f"uploads/{name}.png"}})
    assert (uploads / "noise.png").stat().st_size > 4000 > (uploads / "ok.png").stat().st_size

    settings = worker_settings(fake_comfyui, max_input_bytes=4000)
    async with open_worker(storage=LocalStorage(tmp_path), layout=LAYOUT, settings=settings) as w:
        counts = await w.run()

    assert (counts.succeeded, counts.failed, counts.retried) == (1, 3, 0)
    assert executions(fake_comfyui) == 1  # only "ok" reached ComfyUI
    messages = {}
    for name in ("noise", "bomb", "notes"):
        status = status_of(tmp_path, name)
        assert status.state is JobState.failed and status.attempt == 1
        assert status.error is not None and status.error.type == "input_invalid"
        assert status.error.message.startswith("input 'image': ")
        assert f"uploads/{name}.png" in status.error.message
        messages[name] = status.error.message
    assert (
        "the limit is 4000" in messages["noise"] and "COMFYS3_MAX_INPUT_BYTES" in messages["noise"]
    )
    assert "too large to decode safely" in messages["bomb"]
    assert "not an image" in messages["notes"]
