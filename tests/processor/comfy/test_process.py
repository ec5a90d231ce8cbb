"""ComfyProcess and ComfyEngine: a local ComfyUI (the fake, as a subprocess) and job cleanup."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from processor.comfy.client import ComfyClient
from processor.comfy.process import ComfyEngine, ComfyProcess, describe_exit
from processor.errors import ComfyDiedWhileWaiting, ComfyUnavailable, SettingsError
from processor.job.retry_table import policy_for
from processor.settings import WorkerSettings
from tests.paths import FAKE_COMFYUI
from tests.processor.comfy.test_client import load_graph, png_bytes, solid

FAKE_DIR = FAKE_COMFYUI


def free_port(span: int = 4) -> int:
    """A free port whose next ``span - 1`` are free too: with --gpus each ComfyUI listens on
    the port plus its place, and a neighbour taken by another test fails its start."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port: int = probe.getsockname()[1]
        if port + span < 65536 and all(_bindable(port + n) for n in range(span)):
            return port
    raise AssertionError(f"no {span} free ports in a row")


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def local_settings(tmp_path: Path, **extra: Any) -> WorkerSettings:
    args = (
        f"--cpu --input-directory {tmp_path / 'in'} --output-directory {tmp_path / 'out'} "
        f"--temp-directory {tmp_path / 'tmp'}"
    )
    return WorkerSettings(
        comfyui_path=FAKE_DIR,
        comfyui_python=sys.executable,
        comfyui_port=free_port(),
        comfyui_args=args,
        comfyui_startup_timeout=30,
        comfyui_log_file=tmp_path / "comfyui.log",
        **extra,
    )


async def configure(url: str, **knobs: Any) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/fake/config", json=knobs) as response,
    ):
        assert response.status == 200, await response.text()


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[tuple[ComfyEngine, ComfyClient]]:
    engine = ComfyEngine(local_settings(tmp_path), stop_grace=3, restart_backoff=0.05)
    async with engine as client:
        yield engine, client


def test_folders_follow_comfyui_arguments(tmp_path: Path) -> None:
    plain = ComfyProcess(path=tmp_path)
    assert (plain.input_dir, plain.output_dir, plain.temp_dir) == (
        tmp_path / "input",
        tmp_path / "output",
        tmp_path / "temp",
    )
    moved = ComfyProcess(
        path=tmp_path,
        args=["--base-directory", "/srv/base", "--output-directory=/data/out", "--temp-directory",
              "/scratch"],
    )  # fmt: skip
    assert moved.input_dir == Path("/srv/base/input")
    assert moved.output_dir == Path("/data/out")
    assert moved.temp_dir == Path("/scratch/temp")  # ComfyUI appends "temp" itself


def test_engine_needs_a_url_or_a_path() -> None:
    with pytest.raises(SettingsError, match="COMFYS3_COMFYUI_URL"):
        ComfyEngine(WorkerSettings())


def test_exit_codes_read_well() -> None:
    assert describe_exit(3) == "exit code 3"
    assert describe_exit(-9) == "killed by signal 9 (SIGKILL)"


async def test_start_failure_reports_the_log_tail(tmp_path: Path) -> None:
    (tmp_path / "main.py").write_text("import sys\nprint('boom: no GPU found')\nsys.exit(3)\n")
    process = ComfyProcess(
        path=tmp_path, python=sys.executable, port=free_port(), log_path=tmp_path / "log"
    )
    with pytest.raises(ComfyUnavailable) as caught:
        await process.start()
    assert "exit code 3 while starting" in str(caught.value)
    assert "boom: no GPU found" in str(caught.value)
    assert not process.running


async def test_local_comfyui_runs_jobs_and_stops_cleanly(
    engine: tuple[ComfyEngine, ComfyClient], tmp_path: Path
) -> None:
    comfy, client = engine
    assert comfy.process is not None
    pid = comfy.process.pid
    assert pid is not None
    result = await client.run(solid(prefix="local"), "run-local", timeout=30)
    [ref] = result.files
    assert (tmp_path / "out" / ref.subfolder / ref.filename).is_file()
    assert "main.py" in (tmp_path / "comfyui.log").read_text()
    await comfy.__aexit__(None, None, None)
    assert not comfy.process.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_comfyui_dying_mid_run_fails_the_job_and_restarts(
    engine: tuple[ComfyEngine, ComfyClient],
) -> None:
    comfy, client = engine
    assert comfy.process is not None
    first_pid = comfy.process.pid
    await configure(client.base_url, die_at_node="2")  # only this process: set at run time
    with pytest.raises(ComfyUnavailable) as caught:
        await client.run(solid(prefix="dies"), "run-dies", timeout=30)
    assert "ComfyUI died" in str(caught.value)
    assert policy_for(caught.value).retry

    # The next job waits for the restarted ComfyUI and succeeds.
    result = await client.run(solid(prefix="after"), "run-after-death", timeout=30)
    assert result.files[0].filename.startswith("after")
    assert comfy.process.restarts == 1
    assert comfy.process.pid != first_pid


async def test_the_prompt_waiting_behind_one_that_kills_comfyui_is_a_bystander(
    engine: tuple[ComfyEngine, ComfyClient],
) -> None:
    _, client = engine
    await configure(client.base_url, die_at_node="2", exec_delay=1.0)
    await client.queue_prompt(solid(prefix="suspect"), "run-suspect")
    await client.queue_prompt(solid(prefix="waiting"), "run-waiting")
    with pytest.raises(ComfyUnavailable, match="ComfyUI died") as ran:
        await client.wait_for("run-suspect", timeout=30)
    assert not isinstance(ran.value, ComfyDiedWhileWaiting)
    with pytest.raises(ComfyDiedWhileWaiting, match="while another job ran") as waited:
        await client.wait_for("run-waiting", timeout=30)
    assert policy_for(waited.value).retry and waited.value.details["bystander"] is True


async def test_attached_comfyui_that_vanishes_fails_the_job_as_unreachable(
    tmp_path: Path,
) -> None:
    process = ComfyProcess(
        path=FAKE_DIR,
        python=sys.executable,
        port=free_port(),
        args=["--base-directory", str(tmp_path)],
        log_path=tmp_path / "log",
        stop_grace=1,
    )
    await process.start()
    try:
        async with ComfyClient(process.url, reconnect_timeout=1.0) as client:
            await client.wait_ready(10)
            await configure(client.base_url, exec_delay=30)
            await client.queue_prompt(solid(prefix="gone"), "run-gone")
            await process.stop()  # nobody restarts it: as if a remote ComfyUI went away
            with pytest.raises(ComfyUnavailable, match="unreachable") as caught:
                await client.wait_for("run-gone", timeout=60)
            assert policy_for(caught.value).retry
    finally:
        await process.stop()


async def test_cleanup_removes_job_files(engine: tuple[ComfyEngine, ComfyClient]) -> None:
    comfy, client = engine
    assert comfy.input_dir and comfy.output_dir and comfy.temp_dir
    value = await client.upload_input(png_bytes((8, 8), (5, 5, 5)), "in.png", "job-clean")
    graph = load_graph("scale")
    graph["1"]["inputs"]["image"] = value
    graph["3"]["inputs"]["filename_prefix"] = "job-clean/out"
    graph["4"] = {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}
    result = await client.run(graph, "run-clean", timeout=30)
    outputs = [comfy.output_dir / f.subfolder / f.filename for f in result.files]
    previews = [comfy.temp_dir / f.subfolder / f.filename for f in result.temp_files]
    assert outputs and previews
    assert all(p.is_file() for p in [*outputs, *previews])
    assert (comfy.input_dir / "job-clean" / "in.png").is_file()

    await comfy.cleanup(result, "job-clean")

    assert not any(p.exists() for p in [*outputs, *previews])
    assert not (comfy.input_dir / "job-clean").exists()
    assert not (comfy.output_dir / "job-clean").exists()  # the emptied subfolder went too
    assert comfy.input_dir.is_dir() and comfy.output_dir.is_dir()


async def test_a_started_comfyui_is_used_through_its_folders(
    engine: tuple[ComfyEngine, ComfyClient],
) -> None:
    """Issue 24: the worker beside its ComfyUI writes inputs and reads outputs on disk, and a
    prompt it followed needs no /history: ComfyUI serves one request a job, POST /prompt."""
    comfy, client = engine
    value = await client.upload_input(png_bytes((8, 8), (5, 5, 5)), "in.png", "job-disk")
    graph = load_graph("scale")
    graph["1"]["inputs"]["image"] = value
    graph["3"]["inputs"]["filename_prefix"] = "job-disk/out"
    result = await client.run(graph, "run-disk", timeout=30)
    data = await client.fetch_output(result.files[0])
    assert comfy.output_dir is not None
    assert (
        data
        == (comfy.output_dir / result.files[0].subfolder / result.files[0].filename).read_bytes()
    )
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{comfy.url}/fake/stats") as response,
    ):
        requests = (await response.json())["requests"]
    assert requests.get("POST /prompt") == 1
    for route in ("POST /upload/image", "GET /view", "GET /history/{prompt_id}"):
        assert requests.get(route, 0) == 0, route


async def test_cleanup_is_a_no_op_when_folders_are_unknown(fake_comfyui: Any) -> None:
    engine = ComfyEngine(WorkerSettings(comfyui_url=fake_comfyui.url, comfyui_startup_timeout=15))
    async with engine as client:
        result = await client.run(solid(prefix="kept"), "run-kept", timeout=30)
        await engine.cleanup(result, "whatever")
    [ref] = result.files
    assert (Path(fake_comfyui.output_dir) / ref.subfolder / ref.filename).is_file()


async def test_cleanup_with_named_folders_when_attached(fake_comfyui: Any) -> None:
    settings = WorkerSettings(
        comfyui_url=fake_comfyui.url,
        comfyui_startup_timeout=15,
        comfyui_output_dir=Path(fake_comfyui.output_dir),
        comfyui_input_dir=Path(fake_comfyui.input_dir),
    )
    engine = ComfyEngine(settings)
    async with engine as client:
        value = await client.upload_input(png_bytes((8, 8), (1, 1, 1)), "a.png", "job-att")
        graph = load_graph("scale")
        graph["1"]["inputs"]["image"] = value
        result = await client.run(graph, "run-att", timeout=30)
        await engine.cleanup(result, "job-att")
    [ref] = result.files
    assert not (Path(fake_comfyui.output_dir) / ref.subfolder / ref.filename).exists()
    assert not (Path(fake_comfyui.input_dir) / "job-att").exists()
