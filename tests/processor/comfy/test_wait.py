"""Waiting for ComfyUI out loud: what is awaited is said once a try has failed and then again
while it lasts, with the real deadline; an address where nothing listens fails after a short
grace, not after the start-up timeout; a ComfyUI that answers at once is no wait at all."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from processor.comfy.client import ComfyClient
from processor.comfy.process import ComfyEngine
from processor.comfy.waiting import LogNotices, Waiting
from processor.errors import ComfyUnavailable
from processor.settings import WorkerSettings
from tests.fake_comfyui.thread import FakeComfyUIThread
from tests.s3_servers import free_port
from tests.workers import ROOT, comfys3
from triggers.cli import main as cli
from triggers.cli.wait_line import WaitLine


class Reports(list[Waiting]):
    def __call__(self, waiting: Waiting) -> None:
        self.append(waiting)


async def test_a_refusing_address_fails_after_the_grace_and_says_so_from_the_start() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    reports = Reports()
    began = time.monotonic()
    async with ComfyClient(url) as comfy:
        with pytest.raises(ComfyUnavailable) as caught:
            await comfy.wait_ready(300, refused_grace=1.5, on_wait=reports)
    took = time.monotonic() - began

    assert took < 60  # the grace, not the 300 s start-up timeout (generous: the CPU is shared)
    message = str(caught.value)
    assert message.startswith(f"nothing answers at {url} (connection refused for 1.5 s)")
    assert "COMFYS3_COMFYUI_CONNECT_GRACE" in message and "--comfyui-url" in message
    first = reports[0]
    assert first.what == f"ComfyUI at {url}" and not first.done
    # Said after the first refused try, with the grace as the deadline: never "300 s".
    assert first.detail == "connection refused" and first.gives_up_in <= 1.5
    assert all(r.gives_up_in <= 1.5 for r in reports)
    assert reports[-1].done and not reports[-1].ready
    assert len(reports) >= 2  # every second once refused, and at the end


async def test_a_comfyui_that_opens_its_port_within_the_grace_is_waited_for(
    tmp_path: Path,
) -> None:
    port = free_port()
    fake = FakeComfyUIThread(tmp_path / "comfyui", port=port)
    booted = threading.Timer(1.0, fake.__enter__)  # refuses connections for a second
    booted.start()
    reports = Reports()
    try:
        async with ComfyClient(f"http://127.0.0.1:{port}") as comfy:
            stats = await comfy.wait_ready(60, refused_grace=20, on_wait=reports)
    finally:
        booted.join()
        fake.__exit__(None, None, None)
    assert "system" in stats
    assert any(r.detail == "connection refused" for r in reports)
    assert reports[-1].done and reports[-1].ready


async def test_the_engine_gives_the_grace_only_to_a_comfyui_it_did_not_start() -> None:
    settings = WorkerSettings(
        comfyui_url=f"http://127.0.0.1:{free_port()}", comfyui_connect_grace=0.5
    )
    reports = Reports()
    with pytest.raises(ComfyUnavailable, match="nothing answers at"):
        async with ComfyEngine(settings, on_wait=reports):
            pass
    assert reports and reports[0].what.startswith("ComfyUI at http://127.0.0.1:")


async def test_a_comfyui_that_answers_at_once_is_no_wait(fake_comfyui: object) -> None:
    reports = Reports()
    async with ComfyClient(fake_comfyui.url) as comfy:  # type: ignore[attr-defined]
        await comfy.wait_ready(300, refused_grace=20, on_wait=reports)
    assert [r.done and r.ready for r in reports] == [True]  # only the end, nothing to show


def test_log_notices_say_it_at_once_then_every_few_seconds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    notices = LogNotices(logging.getLogger("test.wait"))
    caplog.set_level(logging.INFO, "test.wait")
    for second in range(0, 13):
        notices(Waiting("ComfyUI at http://x", second + 0.01, 300 - second, "connection refused"))
    notices(Waiting("ComfyUI at http://x", 13.2, 0, "", done=True, ready=True))
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == (
        "waiting for ComfyUI at http://x: connection refused (0 s so far; gives up in 300 s)"
    )
    assert [line.split("(")[1].split(" ")[0] for line in lines[:3]] == ["0", "5", "10"]
    assert lines[3:] == ["ComfyUI at http://x answered after 13 s"]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_one_line_is_redrawn_with_the_time_and_cleared_at_the_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "120")
    screen = Terminal()
    line = WaitLine(screen)
    for second in range(3):
        line(Waiting("ComfyUI at http://x", float(second), 20.0 - second, "connection refused"))
    line(Waiting("ComfyUI at http://x", 3.0, 17.0, "", done=True))
    drawn = screen.getvalue().split("\r")
    assert drawn[1].startswith(
        "waiting for ComfyUI at http://x: connection refused (0 s; gives up in 20 s)"
    )
    assert drawn[3].startswith("waiting for ComfyUI at http://x: connection refused (2 s;")
    assert "\n" not in screen.getvalue() and drawn[-2].strip() == "" and drawn[-1] == ""


def test_elsewhere_it_is_a_line_every_few_seconds() -> None:
    log = io.StringIO()
    line = WaitLine(log, every=5.0)
    for second in range(12):
        line(Waiting("ComfyUI at http://x", float(second), 60.0, "HTTP 503"))
    assert [text.split("(")[1].split(" ")[0] for text in log.getvalue().splitlines()] == [
        "0",
        "5",
        "10",
    ]


@pytest.fixture
def in_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with a manifest, as the current folder; no COMFYS3_* variable set."""
    for name in list(os.environ):
        if name.startswith("COMFYS3_"):
            monkeypatch.delenv(name)
    (tmp_path / "job.json").write_text('{"workflow": "solid"}')
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_exec_on_a_dead_address_says_what_it_waits_for_and_fails_fast(
    in_folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("COMFYS3_COMFYUI_CONNECT_GRACE", "1")

    code = cli.main(["exec", "job.json", "--out", "out", "--comfyui-url", url])

    err = capsys.readouterr().err
    assert code == 1, err
    assert err.startswith(f"waiting for ComfyUI at {url}: ")
    assert f"comfys3: nothing answers at {url} (connection refused for 1 s)" in err
    assert "Traceback" not in err


def test_exec_without_any_comfyui_names_the_flag(
    in_folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COMFYS3_COMFYUI_PORT", str(free_port()))  # nothing answers there
    monkeypatch.setenv("HOME", str(in_folder))  # and comfy-cli installed none
    code = cli.main(["exec", "job.json", "--out", "out"])

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("comfys3: no ComfyUI: no COMFYS3_COMFYUI_URL or COMFYS3_COMFYUI_PATH")
    assert "pip install comfy-cli" in err
    assert err.rstrip().endswith("or give this command --comfyui-url URL")
    assert not (in_folder / "out").exists()


def test_exec_without_a_setting_uses_the_comfyui_on_its_port(
    in_folder: Path,
    fake_comfyui: FakeComfyUIThread,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("COMFYS3_COMFYUI_PORT", fake_comfyui.url.rsplit(":", 1)[1])
    code = cli.main(["exec", "job.json", "--out", "out"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"using the ComfyUI that answers at {fake_comfyui.url}" in captured.err
    assert (in_folder / "out" / "job" / "status.json").is_file()


def test_run_attached_to_a_dead_address_logs_the_wait_and_fails_fast(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMFYS3_")}
    env.update({"COMFYS3_COMFYUI_URL": url, "COMFYS3_COMFYUI_CONNECT_GRACE": "1"})
    result = subprocess.run(
        comfys3("run", "--local", str(tmp_path)),
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert f"INFO processor.comfy.client: waiting for ComfyUI at {url}: " in result.stderr
    assert f"comfys3: nothing answers at {url} (connection refused for 1 s)" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_and_exec_on_a_comfyui_that_answers_at_once_say_no_wait(
    tmp_path: Path, fake_comfyui: FakeComfyUIThread
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMFYS3_")}
    env["COMFYS3_COMFYUI_URL"] = fake_comfyui.url
    (tmp_path / "job.json").write_text('{"workflow": "solid"}')
    for args in (
        ("run", "--once", "--local", str(tmp_path / "jobs")),
        ("exec", "job.json", "--out", "out"),
    ):
        result = subprocess.run(
            comfys3(*args), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        assert "waiting for" not in result.stderr and "gives up" not in result.stderr
