"""``comfys3 status --summary``: a backlog counted from listings, on S3 (moto) and a folder."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest

from processor.settings import S3Settings
from processor.storage.layout import Layout
from processor.storage.local import LocalStorage
from processor.storage.s3 import S3Storage
from tests.s3_servers import free_port
from tests.triggers.cli.test_submit import use_s3
from tests.workers import s3_client
from triggers.cli import backlog as summary
from triggers.cli.backlog import summarise
from triggers.cli.main import main

CLAIM = b'{"holder": "w1", "state": "held"}'


def put(client: Any, settings: S3Settings, key: str, body: bytes = b"{}") -> None:
    client.put_object(Bucket=settings.bucket_name, Key=key, Body=body)


def fill_s3(client: Any, settings: S3Settings) -> None:
    """12 manifests in the intake (2 of them claimed), 5 done, 3 failed, and noise."""
    for n in range(12):
        put(client, settings, f"input/job{n:02d}.json")
    for n in range(5):
        put(client, settings, f"input/_done/old{n}.json")
    for n in range(3):
        put(client, settings, f"input/_failed/bad{n}.json")
    put(client, settings, "input/_claims/job00.json", CLAIM)
    put(client, settings, "input/_claims/job01.json", CLAIM)
    put(client, settings, "input/_claims/_probe-1234.json", CLAIM)  # a worker's start check
    put(client, settings, "input/readme.txt")  # not a manifest: never run
    put(client, settings, "input/_dispatched/job03.json")  # a marker, not a state
    put(client, settings, "input/_done/deeper/x.json")  # below _done/: not one of its own
    put(client, settings, "output/job05/status.json", b"not read at all")


def test_counts_every_state_with_a_few_lists(
    moto_s3_settings: S3Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    settings = moto_s3_settings
    use_s3(monkeypatch, settings)
    fill_s3(s3_client(settings), settings)

    assert main(["status", "--summary", "--json"]) == 0
    counted = json.loads(capsys.readouterr().out)
    assert {k: counted[k] for k in ("waiting", "running", "retrying", "succeeded", "failed")} == {
        "waiting": 10,
        "running": 2,
        "retrying": 0,
        "succeeded": 5,
        "failed": 3,
    }
    assert counted["not_manifests"] == 1 and counted["inexact"] == {}
    assert counted["requests"] == 4  # one LIST per prefix: claims, intake, _done, _failed
    assert counted["location"] == f"s3://{settings.bucket_name}/input/"

    assert main(["status", "--summary"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^  waiting +10  manifests", text, re.MULTILINE)
    assert re.search(r"^  failed +3  manifests in _failed/", text, re.MULTILINE)
    assert "counted with 4 LIST requests" in text


async def test_a_claim_nobody_renews_is_retrying_not_running(moto_s3_settings: S3Settings) -> None:
    settings = moto_s3_settings
    client = s3_client(settings)
    for name in ("given-back", "live", "waits"):
        put(client, settings, f"input/{name}.json")
    put(client, settings, "input/_claims/given-back.json", CLAIM)
    time.sleep(2.1)  # S3 dates have a second's resolution: the next claim is surely newer
    put(client, settings, "input/_claims/live.json", CLAIM)

    async with S3Storage(settings) as storage:
        counted = await summarise(storage, Layout(), lease_seconds=2.0)

    assert (counted.waiting, counted.running, counted.retrying) == (1, 1, 1)


async def test_prefixes_are_paged_and_capped(
    moto_s3_settings: S3Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = moto_s3_settings
    client = s3_client(settings)
    for n in range(23):
        put(client, settings, f"input/_done/d{n:02d}.json")
    for n in range(4):
        put(client, settings, f"input/w{n}.json")
    monkeypatch.setattr(summary, "LIST_PAGE", 5)  # pages of 5 keys stand for 1,000

    async with S3Storage(settings) as storage:
        whole = await summarise(storage, Layout(), max_keys=None)
        capped = await summarise(storage, Layout(), max_keys=12)

    assert (whole.succeeded, whole.waiting, whole.inexact) == (23, 4, {})
    # claims 1, intake 1, _done ceil(23/5) = 5, _failed 1
    assert whole.requests == 8
    assert capped.succeeded == 12 and capped.inexact == {"succeeded": "at least"}
    assert capped.waiting == 4
    assert capped.requests == 1 + 1 + 3 + 1  # _done: 5 + 5 + 2 keys, then it stops
    assert "≥12" in capped.describe()


async def test_claims_past_the_cap_make_every_count_inexact(
    moto_s3_settings: S3Settings,
) -> None:
    settings = moto_s3_settings
    client = s3_client(settings)
    for n in range(6):
        put(client, settings, f"input/j{n}.json")
        put(client, settings, f"input/_claims/j{n}.json", CLAIM)

    async with S3Storage(settings) as storage:
        counted = await summarise(storage, Layout(), max_keys=4)

    assert counted.running == 4 and counted.waiting == 0  # the 4 listed are claimed
    assert counted.inexact == {
        "running": "at least",
        "retrying": "at least",
        "waiting": "about",  # capped, and claims past the cap may hide behind it
        "not_manifests": "at least",
    }
    assert "~0" in counted.describe()


def test_bad_names_are_counted_not_fatal(
    moto_s3_settings: S3Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    settings = moto_s3_settings
    use_s3(monkeypatch, settings)
    client = s3_client(settings)
    odd = ["ctl\x01name", "back\\slash", "sp ace", "ünï😀", "dots..", "%2e%2e", "<xml&>"]
    for name in odd:
        put(client, settings, f"input/{name}.json")
        put(client, settings, f"input/_failed/{name}.json")
    put(client, settings, f"input/_claims/{odd[0]}.json", b"\x00\xff not json")
    put(client, settings, "input/_claims/no-suffix", b"")

    assert main(["status", "--summary", "--json"]) == 0
    counted = json.loads(capsys.readouterr().out)
    assert (counted["waiting"], counted["running"], counted["failed"]) == (len(odd) - 1, 1, 7)


def test_local_folder_counts_the_same_with_one_scan_a_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = tmp_path / "jobs"
    for folder in ("input/_claims", "input/_done", "input/_failed", "input/sub"):
        (root / folder).mkdir(parents=True)
    for n in range(7):
        (root / f"input/job{n}.json").write_text("{}")
    (root / "input/_claims/job0.json").write_bytes(CLAIM)
    stale = root / "input/_claims/job1.json"
    stale.write_bytes(CLAIM)
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    (root / "input/_claims/orphan.json").write_bytes(CLAIM)  # its manifest already retired
    for n in range(4):
        (root / f"input/_done/d{n}.json").write_text("{}")
    (root / "input/_failed/f.json").write_text("{}")
    (root / "input/sub/deeper.json").write_text("{}")  # a sub-folder: not work
    (root / "input/dir.json").mkdir()  # a folder named like a manifest
    (root / "input/ctl\x01name.json").write_text("{}")
    (root / "input/back\\slash.json").write_text("{}")
    bad_utf8 = os.path.join(os.fsencode(root / "input"), b"latin\xe9.json")
    with open(bad_utf8, "wb") as handle:
        handle.write(b"{}")

    assert main(["status", "--summary", "--json", "--local", str(root)]) == 0
    counted = json.loads(capsys.readouterr().out)
    assert {k: counted[k] for k in ("waiting", "running", "retrying", "succeeded", "failed")} == {
        "waiting": 5 + 3,
        "running": 2,  # job0, and the orphan claim of a manifest being retired
        "retrying": 1,
        "succeeded": 4,
        "failed": 1,
    }
    assert counted["requests"] == 4 and counted["request_kind"] == "folder scans"

    assert main(["status", "--summary", "--local", str(root), "--max-keys", "3"]) == 0
    text = capsys.readouterr().out
    assert "≥3" in text and "--max-keys 0 counts everything" in text


async def test_an_empty_or_missing_intake_counts_zero(tmp_path: Path) -> None:
    async with LocalStorage(tmp_path) as storage:
        counted = await summarise(storage, Layout())
    assert (counted.waiting, counted.running, counted.succeeded, counted.failed) == (0, 0, 0, 0)


def test_unreachable_s3_is_one_readable_line(
    moto_s3_settings: S3Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    nowhere = moto_s3_settings.model_copy(
        update={"endpoint_url": f"http://127.0.0.1:{free_port()}", "retry_attempts": 1}
    )
    use_s3(monkeypatch, nowhere)
    monkeypatch.setenv("COMFYS3_S3_RETRY_ATTEMPTS", "1")

    assert main(["status", "--summary"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.splitlines()
    assert line.startswith("comfys3: cannot count the backlog: S3 list of s3://")
    assert "127.0.0.1" in line and "Traceback" not in captured.err


def test_a_missing_bucket_is_named(
    moto_s3_settings: S3Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    use_s3(monkeypatch, moto_s3_settings.model_copy(update={"bucket_name": "no-such-bucket-x"}))
    assert main(["status", "--summary"]) == 2
    assert "no-such-bucket-x" in capsys.readouterr().err


def test_summary_and_a_job_id_exclude_each_other(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["status", "job1", "--summary", "--local", str(tmp_path)]) == 2
    assert main(["status", "--local", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not both" in err and "give a JOB_ID, or --summary" in err
    with pytest.raises(SystemExit):
        main(["status", "--summary", "--max-keys", "-1"])
