"""What decoding input images in full costs the worker, against reading their header alone.

Every input image is decoded before it is staged into ComfyUI (processor/job/inputs.py), so a
truncated body fails as input_invalid instead of inside ComfyUI. This prints the CPU time of
one check, header only (Pillow's open and the size) and full (check_image), for the sizes the
issue asks about: a 512x512 PNG and a 1024x1024 JPEG, each as a photo-like picture (smooth
areas, edges, some grain) and as pure noise (the worst case: nothing compresses).

    .venv/bin/python bench/input_decode.py [--repeat 200]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from PIL import Image, ImageFilter

from processor.job.inputs import check_image

LIMIT = 64 * 1024 * 1024  # the default COMFYS3_MAX_INPUT_PIXELS


def photo_like(size: int) -> Image.Image:
    """A fractal for edges and smooth areas, coloured by gradients, with a little grain."""
    gray = Image.effect_mandelbrot((size, size), (-2.2, -1.4, 0.8, 1.4), 120)
    gradient = Image.linear_gradient("L").resize((size, size))
    picture = Image.merge("RGB", (gray, gradient, gradient.rotate(90)))
    grain = Image.effect_noise((size, size), 12).convert("RGB")
    return Image.blend(picture.filter(ImageFilter.SMOOTH), grain, 0.15)


def noise(size: int) -> Image.Image:
    return Image.merge("RGB", [Image.effect_noise((size, size), 90) for _ in range(3)])


def encoded(picture: Image.Image, kind: str) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, kind, **({"quality": 90} if kind == "JPEG" else {}))
    return buffer.getvalue()


def header_only(data: bytes) -> None:
    """What the worker did before: Pillow's open (the header) and the size, no pixels."""
    with Image.open(io.BytesIO(data)) as image:
        _ = image.size


def cpu_ms(check: Callable[[], object], repeat: int) -> tuple[float, float]:
    """(median, p90) CPU milliseconds of one call, over ``repeat`` calls after a warm-up."""
    for _ in range(5):
        check()
    samples = []
    for _ in range(repeat):
        started = time.process_time()
        check()
        samples.append((time.process_time() - started) * 1000)
    samples.sort()
    return statistics.median(samples), samples[int(0.9 * (len(samples) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    cases = [
        ("512x512 PNG", 512, "PNG"),
        ("1024x1024 JPEG q90", 1024, "JPEG"),
    ]
    print(f"CPU ms per input image, median (p90) of {args.repeat}; Pillow {Image.__version__}")
    print(f"{'image':<20} {'content':<11} {'bytes':>9} {'header':>13} {'full decode':>15} "
          f"{'added':>8}")  # fmt: skip
    for label, size, kind in cases:
        for content, make in (("photo-like", photo_like), ("noise", noise)):
            data = encoded(make(size), kind)
            head, head_p90 = cpu_ms(lambda d=data: header_only(d), args.repeat)
            full, full_p90 = cpu_ms(
                lambda d=data: check_image(d, "bench", max_pixels=LIMIT), args.repeat
            )
            print(
                f"{label:<20} {content:<11} {len(data):>9,} {head:>6.3f} ({head_p90:.3f}) "
                f"{full:>7.2f} ({full_p90:.2f}) {full - head:>8.2f}"
            )


if __name__ == "__main__":
    main()
