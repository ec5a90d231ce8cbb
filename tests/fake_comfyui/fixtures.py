"""pytest fixtures: a fake ComfyUI per test, in-process or as a real subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .client import ComfyTestClient
from .state import PROTOCOL_0_3_64, PROTOCOLS, FakeState
from .thread import FakeComfyUIThread

MAIN = Path(__file__).with_name("main.py")


# Run a test against both ComfyUI versions the fake speaks: `@both_protocols` on a test that
# takes `fake_protocol` (and uses fake_comfyui, fake_client or fake_comfyui_process).
both_protocols = pytest.mark.parametrize("fake_protocol", PROTOCOLS)


@pytest.fixture
def fake_protocol() -> str:
    """The protocol the fake fixtures speak: 0.3.64 unless a test parametrises it."""
    return PROTOCOL_0_3_64


@pytest.fixture
def fake_comfyui(tmp_path: Path, fake_protocol: str) -> Iterator[FakeComfyUIThread]:
    """A fresh fake ComfyUI on 127.0.0.1:<free port>, served from a background thread.

    Yields an object with .url, .ws_url, .state (mutable knobs), .stats(), .input_dir,
    .output_dir and .temp_dir. It speaks `fake_protocol` (0.3.64 unless parametrised).
    """
    state = FakeState()
    state.update({"protocol": fake_protocol})
    with FakeComfyUIThread(tmp_path / "comfyui", state) as fake:
        yield fake


@pytest.fixture
def fake_client(fake_comfyui: FakeComfyUIThread) -> Iterator[ComfyTestClient]:
    """A raw protocol client (websocket-client), connected to ``fake_comfyui``."""
    client = ComfyTestClient(fake_comfyui.url)
    client.connect()
    yield client
    client.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class FakeComfyUIProcess:
    """A fake ComfyUI running as `python main.py --listen 127.0.0.1 --port N` in base_dir."""

    proc: subprocess.Popen[bytes]
    port: int
    base_dir: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def input_dir(self) -> Path:
        return self.base_dir / "input"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fake ComfyUI exited early with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(self.url + "/system_stats", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"fake ComfyUI not answering on {self.url} after {timeout}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def start_fake_process(
    base_dir: Path, env: dict[str, str] | None = None, port: int | None = None
) -> FakeComfyUIProcess:
    """Start main.py from its own directory (as a supervisor would) with dirs under base_dir."""
    base_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    cmd = [
        sys.executable,
        str(MAIN),
        "--listen",
        "127.0.0.1",
        "--port",
        str(port),
        "--cpu",
        "--base-directory",
        str(base_dir),
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=MAIN.parent,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    return FakeComfyUIProcess(proc, port, base_dir)


@pytest.fixture
def fake_comfyui_process(tmp_path: Path, fake_protocol: str) -> Iterator[FakeComfyUIProcess]:
    """A fake ComfyUI subprocess, ready to answer; FAKE_COMFYUI_* knobs via monkeypatch.setenv.
    It speaks `fake_protocol` (FAKE_COMFYUI_PROTOCOL) unless the environment already says."""
    env = {} if "FAKE_COMFYUI_PROTOCOL" in os.environ else {"FAKE_COMFYUI_PROTOCOL": fake_protocol}
    process = start_fake_process(tmp_path / "comfyui-proc", env)
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()
