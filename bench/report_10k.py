"""How long `comfys3 report` takes over 10,000 jobs, and how fast its page opens in Chromium.

Makes a local folder of N finished jobs (one small PNG each, a tenth of them failed), then
times: listing + reading the statuses, making thumbnails, a second run (thumbnails reused),
and loading index.html in headless Chromium, paged (200 cards a page, what the command writes)
against one page holding every card. Prints figures; asserts nothing.

    python bench/report_10k.py [--jobs 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from processor.job.status import ErrorInfo, JobState, JobStatus, OutputRecord
from processor.storage.local import LocalStorage
from processor.worker.assembly import local_layout
from tests.browser import Chromium, ensure_chromium
from triggers.report.command import relative_linker, write_report
from triggers.report.data import Selection


def make_jobs(root: Path, count: int) -> None:
    for n in range(count):
        job_id = f"sweep-{n:05d}"
        folder = root / "output" / job_id
        folder.mkdir(parents=True)
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), (n % 256, (n // 256) % 256, 128)).save(buffer, "PNG")
        data = buffer.getvalue()
        failed = n % 10 == 9
        outputs = []
        if not failed:
            key = f"output/{job_id}/9_SaveImage_001.png"
            (root / key).write_bytes(data)
            outputs.append(
                OutputRecord(
                    key=key,
                    node_id="9",
                    kind="images",
                    content_type="image/png",
                    bytes=len(data),
                    sha256=hashlib.sha256(data).hexdigest(),
                )
            )
        status = JobStatus(
            id=job_id,
            state=JobState.failed if failed else JobState.succeeded,
            workflow="txt2img",
            payload={"seed": n, "prompt": f"a fox, variation {n % 7}", "steps": 20},
            outputs=outputs,
            timings={"execute": 1.0 + (n % 13) / 10, "total": 2.0},
            error=ErrorInfo(type="runtime", message=f"node 3 failed on job {n}")
            if failed
            else None,
        )
        (folder / "status.json").write_bytes(status.to_json())


async def report(root: Path, out: Path, per_page: int) -> float:
    started = time.perf_counter()
    await write_report(
        LocalStorage(root),
        local_layout(),
        Selection(),
        out,
        linker=lambda _storage: relative_linker(out, root),
        title="bench",
        per_page=per_page,
    )
    return time.perf_counter() - started


def load_seconds(page: Chromium, path: Path) -> tuple[float, float]:
    """Wall time from navigation to the load event, and the browser's own
    DOMContentLoaded figure."""
    started = time.perf_counter()
    page.open(path.resolve().as_uri())
    wall = time.perf_counter() - started
    dcl = page.evaluate(
        "performance.getEntriesByType('navigation')[0].domContentLoadedEventEnd / 1000"
    )
    return wall, float(dcl)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="comfys3-report-bench-") as folder:
        base = Path(folder)
        root, paged, single = base / "jobs", base / "paged", base / "single"
        started = time.perf_counter()
        make_jobs(root, args.jobs)
        print(f"made {args.jobs} jobs in {time.perf_counter() - started:.1f} s")

        first = asyncio.run(report(root, paged, 200))
        again = asyncio.run(report(root, paged, 200))
        one = asyncio.run(report(root, single, args.jobs))
        thumbs = list((paged / "thumbs").glob("*.webp"))
        pages = sorted(paged.glob("*.html"))
        print(f"report, first run (statuses + {len(thumbs)} thumbnails): {first:.1f} s")
        print(f"report, second run (thumbnails reused):               {again:.1f} s")
        print(f"report as one page:                                   {one:.1f} s")
        index_kb = (paged / "index.html").stat().st_size / 1e3
        single_mb = (single / "index.html").stat().st_size / 1e6
        thumb_kb = sum(t.stat().st_size for t in thumbs) / max(len(thumbs), 1) / 1e3
        print(
            f"paged: {len(pages)} pages, index.html {index_kb:.0f} kB; "
            f"one page: {single_mb:.1f} MB; thumbnails {thumb_kb:.1f} kB each"
        )
        with Chromium(ensure_chromium(), base / "profile") as page:
            load_seconds(page, paged / "page-2.html")  # warm the browser up
            for name, path in (
                ("paged index.html", paged / "index.html"),
                ("paged last page", pages[-1]),
                ("one page, every card", single / "index.html"),
            ):
                wall, dcl = load_seconds(page, path)
                print(f"chromium, {name:22s} load {wall:.2f} s (DOMContentLoaded {dcl:.2f} s)")


if __name__ == "__main__":
    main()
