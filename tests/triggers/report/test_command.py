"""`comfys3 report` on storage: which jobs it reads, how it survives bad statuses and images,
that reads are concurrent but bounded, and its links on a local folder and on S3 (moto)."""

from __future__ import annotations

import asyncio
import io
import os
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from processor.job import status_book
from processor.job.status import ErrorInfo, JobState, JobStatus, OutputRecord
from processor.settings import S3Settings
from processor.storage.base import StoredObject
from processor.storage.layout import Layout
from processor.storage.local import LocalStorage
from tests.triggers.cli.test_submit import use_s3
from tests.workers import s3_client
from triggers.cli.main import main
from triggers.report import thumbs as report_thumbs
from triggers.report.data import Selection, parse_since, read_records, select_jobs

LAYOUT = Layout("input", "output")


def png(width: int = 32, height: int = 24, color: str = "teal") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def finished(job_id: str, data: bytes | None = None, **fields: Any) -> JobStatus:
    outputs = []
    if data is not None:
        outputs.append(
            OutputRecord(
                key=f"output/{job_id}/9_SaveImage_001.png",
                node_id="9",
                kind="images",
                content_type="image/png",
                bytes=len(data),
                sha256="ab" * 32,
            )
        )
    values: dict[str, Any] = {
        "id": job_id,
        "state": JobState.succeeded,
        "workflow": "solid",
        "outputs": outputs,
        "timings": {"execute": 1.5},
    }
    values.update(fields)
    return JobStatus(**values)


def put_job(root: Path, job_id: str, status: JobStatus | bytes, image: bytes | None = None) -> None:
    folder = root / "output" / job_id
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "status.json").write_bytes(status if isinstance(status, bytes) else status.to_json())
    if image is not None:
        (folder / "9_SaveImage_001.png").write_bytes(image)


# -- reading statuses -----------------------------------------------------------------------------


async def test_every_bad_status_becomes_a_readable_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    put_job(tmp_path, "good", finished("good"))
    put_job(tmp_path, "garbage", b"\xff\xfe not json")
    put_job(tmp_path, "wrong-shape", b'{"id": "x", "state": "exploded", "attempt": "many"}')
    put_job(tmp_path, "huge", finished("huge", payload={"prompt": "x" * 5000}))
    monkeypatch.setattr(status_book, "MAX_STATUS_BYTES", 4096)
    ids = ("good", "garbage", "wrong-shape", "huge", "never-ran", "../../etc")

    async with LocalStorage(tmp_path) as storage:
        jobs = await select_jobs(storage, LAYOUT, Selection(job_ids=ids))
        records = await read_records(storage, LAYOUT, jobs)

    problems = {r.job_id: r.problem for r in records}
    assert [r.job_id for r in records] == list(ids)
    assert problems["good"] is None and records[0].status is not None
    assert problems["garbage"] == "not valid JSON"
    assert problems["wrong-shape"] is not None
    assert problems["wrong-shape"].startswith("not a job status: state: Input should be")
    assert "attempt" in problems["wrong-shape"]
    assert problems["huge"] is not None and "the limit is 4096" in problems["huge"]
    assert problems["never-ran"] == "no status document"
    assert problems["../../etc"] is not None and "invalid storage key" in problems["../../etc"]


class CountingStorage(LocalStorage):
    """Counts how many reads run at the same time."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.running = 0
        self.most = 0

    async def get(self, key: str, *, max_bytes: int | None = None) -> StoredObject:
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await asyncio.sleep(0.01)
            return await super().get(key, max_bytes=max_bytes)
        finally:
            self.running -= 1


async def test_reads_are_concurrent_and_bounded(tmp_path: Path) -> None:
    for n in range(24):
        put_job(tmp_path, f"job-{n:02d}", finished(f"job-{n:02d}"))

    async with CountingStorage(tmp_path) as storage:
        jobs = await select_jobs(storage, LAYOUT, Selection())
        records = await read_records(storage, LAYOUT, jobs, concurrency=5)

    assert len(records) == 24 and all(r.status for r in records)
    assert storage.most == 5


async def test_prefix_and_since_choose_from_the_listing(tmp_path: Path) -> None:
    for job_id in ("sweep-1", "sweep-2", "other"):
        put_job(tmp_path, job_id, finished(job_id), image=png())
    old = time.time() - 3 * 86400
    os.utime(tmp_path / "output" / "sweep-1" / "status.json", (old, old))
    (tmp_path / "output" / "sweep-2" / "deeper").mkdir()
    (tmp_path / "output" / "sweep-2" / "deeper" / "status.json").write_text("{}")

    async with LocalStorage(tmp_path) as storage:
        every = await select_jobs(storage, LAYOUT, Selection())
        sweep = await select_jobs(storage, LAYOUT, Selection(prefix="sweep-"))
        recent = await select_jobs(
            storage, LAYOUT, Selection(prefix="sweep-", since=parse_since("1d"))
        )

    assert [job_id for job_id, _ in every] == ["other", "sweep-1", "sweep-2"]
    assert [job_id for job_id, _ in sweep] == ["sweep-1", "sweep-2"]
    assert [job_id for job_id, _ in recent] == ["sweep-2"]


def test_since_takes_dates_times_and_ages() -> None:
    now = datetime(2025, 6, 2, 12, 0, tzinfo=UTC)

    assert parse_since("90m", now) == now - timedelta(minutes=90)
    assert parse_since("2d", now) == now - timedelta(days=2)
    assert parse_since("2025-06-01", now) == datetime(2025, 6, 1, tzinfo=UTC)
    assert parse_since("2025-06-01T14:30+02:00", now) == datetime(2025, 6, 1, 12, 30, tzinfo=UTC)
    with pytest.raises(ValueError, match="give an ISO date or time"):
        parse_since("yesterday", now)


# -- thumbnails -------------------------------------------------------------------------------


async def test_thumbnails_survive_bad_images_and_are_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, out = tmp_path / "jobs", tmp_path / "out"
    put_job(root, "fine", finished("fine", png(600, 300)), image=png(600, 300))
    put_job(root, "corrupt", finished("corrupt", b"\x89PNG broken"), image=b"\x89PNG broken")
    put_job(root, "vast", finished("vast", png(1000, 300)), image=png(1000, 300))
    put_job(root, "gone", finished("gone", png()))  # the status names a file that is not there
    monkeypatch.setattr(report_thumbs, "MAX_SOURCE_PIXELS", 200_000)
    outputs = {
        job_id: finished(job_id, b"x").outputs[0] for job_id in ("fine", "corrupt", "vast", "gone")
    }

    async with LocalStorage(root) as storage:
        thumbs = await report_thumbs.make_thumbnails(storage, outputs.values(), out)

    fine = thumbs[outputs["fine"].key]
    assert fine.path is not None and fine.problem is None
    with Image.open(out / fine.path) as made:
        assert made.format == "WEBP" and made.size == (256, 128)
    assert thumbs[outputs["corrupt"].key].problem == (
        "not an image Pillow can read (UnidentifiedImageError)"
    )
    assert thumbs[outputs["vast"].key].problem == "1000x300 pixels is too large to preview"
    problem = thumbs[outputs["gone"].key].problem
    assert problem is not None and problem.startswith("cannot read it:")

    (root / "output" / "fine" / "9_SaveImage_001.png").unlink()  # a second run needs no read
    async with LocalStorage(root) as storage:
        again = await report_thumbs.make_thumbnails(storage, [outputs["fine"]], out)
    assert again[outputs["fine"].key] == fine


# -- the command ------------------------------------------------------------------------------


def hrefs(html: str) -> list[str]:
    return re.findall(r'href="([^"#][^"]*)"', html)


def test_local_report_links_files_relative_to_the_page(tmp_path: Path) -> None:
    root, out = tmp_path / "jobs", tmp_path / "elsewhere" / "report"
    put_job(root, "a b", finished("a b", png()), image=png())
    error = ErrorInfo(type="runtime", message="boom")
    put_job(root, "failed", finished("failed", state=JobState.failed, error=error, outputs=[]))
    (out).mkdir(parents=True)
    (out / "page-7.html").write_text("left by a longer report")

    assert main(["report", "--local", str(root), "--out", str(out)]) == 0

    html = (out / "index.html").read_text()
    [link] = [h for h in hrefs(html) if h.endswith(".png")]
    assert link == "../../jobs/output/a%20b/9_SaveImage_001.png"
    assert (out / "../../jobs/output/a b/9_SaveImage_001.png").resolve().is_file()
    assert re.search(r'<img class="thumb" src="thumbs/[0-9a-f]{32}\.webp" loading="lazy"', html)
    assert 'data-error-type="runtime"' in html
    assert not (out / "page-7.html").exists()


def test_report_refuses_ids_with_a_filter_and_says_when_nothing_matched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"

    assert main(["report", "a", "--prefix", "b", "--local", str(tmp_path), "--out", str(out)]) == 2
    assert main(["report", "--since", "soon", "--local", str(tmp_path), "--out", str(out)]) == 2
    assert main(["report", "--prefix", "none-", "--local", str(tmp_path), "--out", str(out)]) == 1

    err = capsys.readouterr().err
    assert "not both" in err and "give an ISO date or time" in err and "no jobs matched" in err
    assert "<b>0</b>jobs" in (out / "index.html").read_text()


def test_s3_report_presigns_links_and_reads_images_from_the_bucket(
    moto_s3_settings: S3Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = moto_s3_settings
    use_s3(monkeypatch, settings)
    client = s3_client(settings)
    image = png(300, 200)
    status = finished("cat-1", image)
    for key, body in (
        (status.outputs[0].key, image),
        ("output/cat-1/status.json", status.to_json()),
    ):
        client.put_object(Bucket=settings.bucket_name, Key=key, Body=body)
    plain, signed = tmp_path / "plain", tmp_path / "signed"

    assert main(["report", "--prefix", "cat-", "--out", str(plain)]) == 0
    assert main(["report", "cat-1", "--out", str(signed), "--presign", "--expires", "600"]) == 0

    [key] = [h for h in hrefs((plain / "index.html").read_text()) if h.endswith(".png")]
    assert key == "output/cat-1/9_SaveImage_001.png"  # relative to the bucket root
    [url] = [h for h in hrefs((signed / "index.html").read_text()) if ".png" in h]
    assert url.startswith(f"{settings.endpoint_url}/{settings.bucket_name}/output/cat-1/")
    assert "X-Amz-Signature=" in url and "X-Amz-Expires=600" in url
    assert len(list((signed / "thumbs").glob("*.webp"))) == 1
