"""`comfys3 submit`: manifests are checked before upload, never replace one still waiting, and
`--wait` follows the jobs to their end with an exit code a script can use."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from processor.service import local_layout
from processor.settings import S3Settings
from processor.storage import LocalStorage
from tests.test_local_mode import read_status, start_local_worker
from tests.workers import keys, s3_client, s3_env
from triggers.cli import main
from triggers.submit_command import follow


def use_s3(monkeypatch: pytest.MonkeyPatch, settings: S3Settings) -> None:
    for name, value in s3_env(settings).items():
        if name.startswith("COMFYS3_"):
            monkeypatch.setenv(name, value)


@pytest.fixture
def moto_env(moto_s3_settings: S3Settings, monkeypatch: pytest.MonkeyPatch) -> S3Settings:
    """A fresh moto bucket, named to `comfys3` by the COMFYS3_S3_* variables."""
    use_s3(monkeypatch, moto_s3_settings)
    return moto_s3_settings


def write(folder: Path, name: str, document: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return path


def stored(settings: S3Settings, key: str) -> bytes:
    body = s3_client(settings).get_object(Bucket=settings.bucket_name, Key=key)["Body"]
    return bytes(body.read())


@pytest.mark.parametrize("server", ["moto", "seaweed"])
def test_submit_uploads_the_manifest_to_the_intake(
    server: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings: S3Settings = request.getfixturevalue(f"{server}_s3_settings")
    use_s3(monkeypatch, settings)
    path = write(tmp_path, "cat-001", {"workflow": "txt2img", "payload": {"prompt": "a cat"}})

    assert main(["submit", str(path)]) == 0

    assert stored(settings, "input/cat-001.json") == path.read_bytes()
    assert "-> input/cat-001.json (job cat-001)" in capsys.readouterr().out


def test_a_manifest_still_waiting_is_not_replaced(
    moto_env: S3Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = write(tmp_path / "a", "job", {"workflow": "solid"})
    assert main(["submit", str(first)]) == 0
    second = write(tmp_path / "b", "job", {"workflow": "solid", "payload": {"color": 255}})

    assert main(["submit", str(second)]) == 1

    assert stored(moto_env, "input/job.json") == first.read_bytes()
    assert "input/job.json is already waiting to run; not replaced" in capsys.readouterr().err


def test_one_invalid_manifest_stops_the_whole_submission(
    moto_env: S3Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write(tmp_path, "good", {"workflow": "solid"})
    typo = write(tmp_path, "typo", {"workflow": "txt2img", "payload": {"stesp": 20}})
    broken = write(tmp_path, "broken", '{"workflow": ')

    assert main(["submit", str(good), str(typo), str(broken)]) == 1

    err = capsys.readouterr().err
    assert f"{typo}: invalid manifest" in err and "did you mean 'steps'" in err
    assert f"{broken}: invalid manifest" in err
    assert "nothing was submitted" in err
    assert keys(s3_client(moto_env), moto_env, "input/") == []


def test_two_files_of_the_same_name_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    one = write(tmp_path / "x", "same", {"workflow": "solid"})
    two = write(tmp_path / "y", "same", {"workflow": "solid"})

    assert main(["submit", "--local", str(tmp_path / "jobs"), str(one), str(two)]) == 1

    assert "would both be input/same.json" in capsys.readouterr().err
    assert not (tmp_path / "jobs" / "input").exists()


def test_wait_follows_the_jobs_to_their_end(
    tmp_path: Path, fake_comfyui: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = tmp_path / "jobs"
    (jobs / "input").mkdir(parents=True)
    worker, log = start_local_worker(jobs, fake_comfyui)
    try:
        fine = write(tmp_path, "fine", {"workflow": "solid"})
        batch = write(tmp_path, "pair", {"workflow": "solid", "batch": [{}, {"color": 7}]})
        code = main(["submit", "--local", str(jobs), "--wait", "--timeout", "60",
                     "--interval", "0.2", str(fine), str(batch)])  # fmt: skip
        out = capsys.readouterr().out
        assert code == 0, out + log.read_text()[-2000:]
        for job_id in ("fine", "pair-1", "pair-2"):
            assert f"{job_id}: succeeded" in out
            status = read_status(jobs, job_id)
            assert status is not None and status["state"] == "succeeded"
            assert f"{job_id}: {status['outputs'][0]['key']}" in out

        # The same file again: the old final status must not end the wait by itself, and the
        # user is told that a succeeded id is not run again.
        assert main(["submit", "--local", str(jobs), "--wait", "--timeout", "60",
                     "--interval", "0.2", str(fine)]) == 0  # fmt: skip
        captured = capsys.readouterr()
        assert "already succeeded, so a worker will not run it again" in captured.err
        status = read_status(jobs, "fine")
        assert status is not None and any("was not run" in n for n in status["notes"])
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)


def test_wait_exits_1_with_the_error_of_a_failed_job(
    tmp_path: Path, fake_comfyui: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = tmp_path / "jobs"
    (jobs / "input").mkdir(parents=True)
    worker, _ = start_local_worker(jobs, fake_comfyui)
    try:
        missing = write(
            tmp_path, "nomodel", {"workflow": "txt2img", "payload": {"ckpt_name": "x.ckpt"}}
        )
        code = main(["submit", "--local", str(jobs), "--wait", "--timeout", "60",
                     "--interval", "0.2", str(missing)])  # fmt: skip
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)
    captured = capsys.readouterr()
    assert code == 1
    assert "nomodel: failed" in captured.out
    assert "nomodel: validation:" in captured.err and "x.ckpt" in captured.err


def test_wait_gives_up_after_the_timeout_and_says_the_jobs_keep_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "lonely", {"workflow": "solid"})
    code = main(["submit", "--local", str(tmp_path / "jobs"), "--wait", "--timeout", "0.5",
                 "--interval", "0.1", str(path)])  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert "1 job(s) not finished after 0.5 s: lonely (they keep running" in err
    assert (tmp_path / "jobs" / "input" / "lonely.json").exists()


async def test_wait_says_so_when_no_worker_touches_the_jobs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with LocalStorage(tmp_path) as storage:
        statuses = await follow(
            storage, local_layout(), ["lonely"], {}, timeout=0.6, interval=0.1, hint_after=0.2
        )
    assert statuses == {}
    err = capsys.readouterr().err
    assert err.count("no worker has started these jobs after 0.2 s") == 1
    assert "input prefix 'input'" in err
