"""processor.job.inputs: an input file that no attempt could use fails at once as ``input_invalid``,
naming the file, instead of failing inside ComfyUI's LoadImage on every retry.

``check_image`` is fed real images, files that are not images, cut-off headers and headers
that claim enormous sizes (decompression bombs); then a worker run shows the same refusals,
and the size limit on the bytes, end as statuses without ComfyUI ever running them.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
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
    data = encoded("PNG", (1000, 500))
    assert check_image(data, "x.png", max_pixels=500_000)[1:] == (1000, 500)
    assert "the limit is 499,999" in invalid(data, "x.png", max_pixels=499_999)


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


def noise(kind: str, size: tuple[int, int] = (64, 64)) -> bytes:
    """An image whose pixels do not compress away: cutting its end cuts pixel data."""
    buffer = io.BytesIO()
    Image.effect_noise(size, 80).convert("RGB").save(buffer, kind)
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["PNG", "JPEG", "GIF", "BMP", "TIFF"])
def test_every_pixel_is_decoded_so_a_cut_body_is_refused(kind: str) -> None:
    """The header of each of these survives the cut (it is all a header check read); their
    pixel data does not, and decoding finds it."""
    whole = noise(kind)
    assert check_image(whole, "sent.img", max_pixels=LIMIT) == (kind, 64, 64)
    cut = whole[: len(whole) * 2 // 3]
    with Image.open(io.BytesIO(cut)) as header_only:
        assert header_only.size == (64, 64)  # what the old check looked at, intact
    message = invalid(cut, "uploads/sent.img")
    assert f"'uploads/sent.img' is truncated or corrupt: its {kind} data does not decode" in (
        message
    )


def animation(frames: int, size: tuple[int, int] = (10, 10)) -> bytes:
    pictures = [Image.effect_noise(size, 30 + 20 * n).convert("P") for n in range(frames)]
    buffer = io.BytesIO()
    pictures[0].save(buffer, "GIF", save_all=True, append_images=pictures[1:], duration=40)
    return buffer.getvalue()


def test_every_frame_is_decoded_as_comfyui_would_within_the_pixel_limit() -> None:
    """ComfyUI's LoadImage reads every frame: a cut in the last one is found too. Decoding
    stops where the frames' pixels reach the limit, so an animation never costs more than
    the setting allows (frames past it are left to ComfyUI)."""
    whole = animation(3)
    with Image.open(io.BytesIO(whole)) as gif:
        assert gif.n_frames == 3
    assert check_image(whole, "a.gif", max_pixels=LIMIT) == ("GIF", 10, 10)
    cut = whole[:-12]  # inside the third frame's data; the first two are whole
    assert "truncated or corrupt" in invalid(cut, "a.gif")
    assert check_image(cut, "a.gif", max_pixels=250) == ("GIF", 10, 10)  # two frames' worth


# Small images in the formats Pillow opens that a user might send, and some it opens that
# nobody means to: any of them may arrive as an input file.
SEEDS = {kind: noise(kind, (12, 10)) for kind in ["PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"]}
SEEDS |= {kind: encoded(kind, (12, 10)) for kind in ["ICO", "DDS", "PCX", "TGA", "PPM", "SGI"]}
SEEDS["GIF+"] = animation(3, (12, 10))


@st.composite
def damaged(draw: st.DrawFn) -> bytes:
    """An image of some format with a few bytes changed and its end cut anywhere."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(0, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))])


def unknown_dds_format() -> bytes:
    """A DDS header whose pixel format flags Pillow does not know: NotImplementedError."""
    data = bytearray(SEEDS["DDS"])
    data[80:84] = struct.pack("<I", 0x2000_0000)
    return bytes(data)


@settings(max_examples=400, derandomize=True, deadline=None)
@given(st.one_of(st.binary(max_size=600), damaged()))
@example(unknown_dds_format())
@example(SEEDS["PNG"][:-40])
def test_no_bytes_raise_anything_but_the_readable_input_error(data: bytes) -> None:
    """Whatever an input file holds, the check answers with an image it decoded or with
    InputInvalid naming the file: never another exception, which would be a crash of the job
    (an internal error, retried) instead of a status a person can act on."""
    try:
        kind, width, height = check_image(data, "uploads/any.img", max_pixels=4096)
    except InputInvalid as error:
        assert "'uploads/any.img'" in str(error)
    else:
        assert kind and 0 < width * height <= 4096


def test_checks_in_threads_at_once_leave_the_warning_filters_as_they_were() -> None:
    """The worker checks inputs in threads; the bomb warning is made an error only around
    each header, and the process's warning filters are left as they were."""
    before = list(warnings.filters)
    bomb, good = png_claiming(10_000, 10_000), SEEDS["PNG"]

    def check(n: int) -> str:
        try:
            check_image(bomb if n % 2 else good, "in.png", max_pixels=LIMIT)
        except InputInvalid as error:
            return str(error)
        return "ok"

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(check, range(400)))
    assert warnings.filters == before
    assert answers[::2] == ["ok"] * 200
    assert all("too large to decode safely" in answer for answer in answers[1::2])


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
    # Headers intact, pixel data cut off (an upload that broke off): once past a header check.
    for name, kind in [("cut", "PNG"), ("cut-jpeg", "JPEG")]:
        whole = noise(kind, (32, 32))
        (uploads / f"{name}.png").write_bytes(whole[: len(whole) * 2 // 3])
    Image.new("RGB", (4, 4)).save(uploads / "ok.png")
    for name in ("noise", "bomb", "notes", "cut", "cut-jpeg", "ok"):
        drop(tmp_path, name, {"workflow": "scale", "payload": {"image": f"uploads/{name}.png"}})
    assert (uploads / "noise.png").stat().st_size > 4000 > (uploads / "ok.png").stat().st_size

    settings = worker_settings(fake_comfyui, max_input_bytes=4000)
    async with open_worker(storage=LocalStorage(tmp_path), layout=LAYOUT, settings=settings) as w:
        counts = await w.run()

    assert (counts.succeeded, counts.failed, counts.retried) == (1, 5, 0)
    assert executions(fake_comfyui) == 1  # only "ok" reached ComfyUI
    messages = {}
    for name in ("noise", "bomb", "notes", "cut", "cut-jpeg"):
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
    assert "is truncated or corrupt: its PNG data does not decode" in messages["cut"]
    assert "is truncated or corrupt: its JPEG data does not decode" in messages["cut-jpeg"]
