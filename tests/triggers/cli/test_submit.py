"""`comfys3 submit`: manifests are checked before upload, never replace one still waiting, and
`--wait` follows the jobs to their end with an exit code a script can use."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from processor.settings import S3Settings
from processor.storage.layout import Layout
from processor.storage.local import LocalStorage
from processor.storage.s3 import S3Storage
from processor.worker.assembly import local_layout
from tests.triggers.cli.test_local_mode import read_status, start_local_worker
from tests.workers import keys, s3_client, s3_env
from triggers.cli.main import main
from triggers.cli.submit import NOBODY_HINT_SECONDS, follow, nobody_hint, nobody_hint_times


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


def _ended_before(jobs: Path, job_id: str, state: str) -> None:
    """The job ran before: its manifest still in the intake, its status final (or not)."""
    layout = local_layout()
    manifest = jobs / layout.submit_key(job_id, 0)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"workflow": "solid"}))
    status = jobs / layout.status_key(job_id)
    status.parent.mkdir(parents=True, exist_ok=True)
    status.write_text(json.dumps({"version": 1, "id": job_id, "state": state}))


def test_a_resubmit_waits_for_the_finished_runs_manifest_to_be_moved_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The worker writes the final status first and moves the manifest out just after (its
    # deletes are gathered a quarter second): a resubmit in between is not "already waiting".
    jobs = tmp_path / "jobs"
    _ended_before(jobs, "again", "succeeded")
    path = write(tmp_path / "new", "again", {"workflow": "solid", "payload": {"color": 9}})
    lingering = jobs / local_layout().submit_key("again", 0)

    async def submit_while_retiring() -> int:
        def move_out_later() -> None:
            lingering.unlink()

        asyncio.get_running_loop().call_later(0.6, move_out_later)
        return await asyncio.to_thread(main, ["submit", "--local", str(jobs), str(path)])

    assert asyncio.run(submit_while_retiring()) == 0
    assert lingering.read_bytes() == path.read_bytes()
    assert "already succeeded, so a worker will not run it again" in capsys.readouterr().err


def test_a_manifest_of_a_job_still_open_is_refused_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = tmp_path / "jobs"
    _ended_before(jobs, "busy", "running")
    path = write(tmp_path / "new", "busy", {"workflow": "solid"})
    slept: list[float] = []

    async def no_sleep(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr("processor.job.submission.asyncio.sleep", no_sleep)
    assert main(["submit", "--local", str(jobs), str(path)]) == 1
    assert slept == []
    assert "input/busy.json is already waiting to run; not replaced" in capsys.readouterr().err


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

    assert "would both be same.json in the intake: rename one" in capsys.readouterr().err
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
    # COMFYS3_CAPABILITY_WAIT=0: no other worker is waited for that might have the model.
    worker, _ = start_local_worker(jobs, fake_comfyui, capability_wait="0")
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
            storage, local_layout(), ["lonely"], {}, timeout=0.6, interval=0.1, hint_after=0.2,
            manifests=["input/lonely.json"],
        )  # fmt: skip
    assert statuses == {}
    err = capsys.readouterr().err
    assert err.count("no worker has started these jobs after 0 s") == 1
    assert f"they wait at {tmp_path / 'input' / 'lonely.json'}" in err
    assert f"is `comfys3 run --local {tmp_path}` running?" in err


async def test_without_a_timeout_the_hint_comes_again_less_and_less_often(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with LocalStorage(tmp_path) as storage:
        waiting = follow(
            storage, local_layout(), ["lonely"], {}, timeout=None, interval=0.05, hint_after=0.2
        )
        with pytest.raises(TimeoutError):  # no --timeout: only Ctrl-C ends it
            await asyncio.wait_for(waiting, 1.7)
    hints = [line for line in capsys.readouterr().err.splitlines() if "no worker" in line]
    assert len(hints) == 3, hints  # at 0.2 s, 0.6 s and 1.4 s
    assert all(f"they wait at {tmp_path / 'input'}" in line for line in hints)


def test_the_hint_is_repeated_at_growing_bounded_gaps() -> None:
    times = list(itertools.islice(nobody_hint_times(15, 600), 9))
    assert times == [15, 45, 105, 225, 465, 945, 1545, 2145, 2745]
    assert NOBODY_HINT_SECONDS <= 30


def test_the_s3_hint_names_the_bucket_and_the_prefix(moto_env: S3Settings) -> None:
    storage = S3Storage(moto_env)
    hint = nobody_hint(storage, Layout("jobs/in", "out"), ["jobs/in/a.json"], 15.2)
    assert hint == (
        f"no worker has started these jobs after 15 s; they wait at s3://{moto_env.bucket_name}/"
        "jobs/in/a.json: is a worker running on this bucket with the same input prefix "
        "(COMFYS3_S3_INPUT_DIR=jobs/in)?"
    )


def test_a_missing_manifest_is_named_before_any_s3_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in list(os.environ):
        if name.startswith("COMFYS3_"):
            monkeypatch.delenv(name)

    assert main(["submit", str(tmp_path / "nope.json")]) == 1

    err = capsys.readouterr().err
    assert err.startswith(f"{tmp_path / 'nope.json'}: cannot read it: No such file")
    assert "S3" not in err and "nothing was submitted" in err


def test_input_files_the_worker_would_refuse_are_refused_before_any_s3_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in list(os.environ):
        if name.startswith("COMFYS3_"):
            monkeypatch.delenv(name)
    path = write(tmp_path, "host", {"workflow": "scale", "payload": {"image": "/etc/hostname"}})

    assert main(["submit", str(path)]) == 1

    err = capsys.readouterr().err
    assert f"{path}: invalid manifest" in err
    assert "payload.image: input file '/etc/hostname' cannot be read: it starts with '/'" in err


def test_local_submit_looks_for_input_files_under_the_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = tmp_path / "jobs"
    path = write(tmp_path, "small", {"workflow": "scale", "payload": {"image": "in/cat.png"}})

    assert main(["submit", "--local", str(jobs), str(path)]) == 1

    err = capsys.readouterr().err
    assert f"{path}: an input file is missing" in err
    assert f"input 'image': file 'in/cat.png' was not found at {jobs / 'in' / 'cat.png'}" in err
    assert "a path under DIR with --local DIR" in err and "nothing was submitted" in err
    assert not (jobs / "input").exists()

    (jobs / "in").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(jobs / "in" / "cat.png")
    assert main(["submit", "--local", str(jobs), str(path)]) == 0
    assert (jobs / "input" / "small.json").exists()


def test_s3_submit_looks_for_input_files_in_the_bucket(
    moto_env: S3Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    payload = {"image": "uploads/cat.png", "prompt": "a cat"}
    path = write(tmp_path, "redo", {"workflow": "img2img", "payload": payload})

    assert main(["submit", str(path)]) == 1

    where = f"s3://{moto_env.bucket_name}/uploads/cat.png"
    assert f"input 'image': file 'uploads/cat.png' was not found at {where}" in (
        capsys.readouterr().err
    )
    client = s3_client(moto_env)
    assert keys(client, moto_env, "input/") == []
    client.put_object(Bucket=moto_env.bucket_name, Key="uploads/cat.png", Body=b"\x89PNG")
    assert main(["submit", str(path)]) == 0
    assert keys(client, moto_env, "input/") == ["input/redo.json"]
