"""Start, supervise and stop a local ComfyUI, and hand out a ready client for it.

A worker owns its ComfyUI: when the process dies (OOM kill, CUDA fault), the job in flight
must fail fast as retryable instead of waiting for its timeout, and the next job must find a
fresh ComfyUI. ``ComfyProcess`` does the process part; ``ComfyEngine`` joins it (or a ComfyUI
attached by URL) with a ``ComfyClient`` and cleans each job's files off the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import aiohttp

from processor.aio import ClosedOnExit
from processor.comfy.client import ComfyClient, RunResult
from processor.comfy.gpus import Gpu
from processor.comfy.waiting import LogNotices, Waiting, WaitListener, reporting
from processor.errors import ComfyDiedWhileWaiting, ComfyUnavailable, SettingsError
from processor.logsafe import log_tail
from processor.models import paths_config
from processor.ops import volume
from processor.settings import WorkerSettings

log = logging.getLogger(__name__)

ExitListener = Callable[[int, bool], None]  # (exit code, restarting?)


def describe_exit(code: int) -> str:
    """-9 reads better as "killed by SIGKILL" (the OOM killer's signature)."""
    if code < 0:
        try:
            return f"killed by signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


# What a ComfyUI the worker starts may see of the worker's environment. Custom nodes run inside
# ComfyUI with its environment, so the bucket's credentials (COMFYS3_S3_*, AWS_*), RunPod's
# keys and webhook secrets must not be in it. Names ending in "*" are prefixes.
COMFYUI_ENV_ALLOW = (
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "LC_*", "TZ", "TERM",
    "TMPDIR", "TMP", "TEMP", "PWD", "HOSTNAME",
    "PYTHONPATH", "PYTHONHOME", "PYTHONUNBUFFERED", "PYTHONIOENCODING", "PYTHONDONTWRITEBYTECODE",
    "VIRTUAL_ENV", "CONDA_*", "LD_LIBRARY_PATH", "LD_PRELOAD",
    "CUDA_*", "NVIDIA_*", "CUDNN_*", "NCCL_*", "HIP_*", "ROCM_*", "HSA_*",
    "TORCH_*", "PYTORCH_*", "XFORMERS_*", "TRITON_*", "OMP_NUM_THREADS", "MKL_*",
    "HF_*", "HUGGINGFACE_*", "TRANSFORMERS_*", "DIFFUSERS_*", "SAFETENSORS_*",
    "XDG_*", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
)  # fmt: skip
COMFYUI_ENV_DENY = ("COMFYS3_*", "AWS_*", "RUNPOD_*")


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(name.startswith(p[:-1]) if p.endswith("*") else name == p for p in patterns if p)


def comfyui_environment(
    extra: Sequence[str] = (), environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The worker's environment cut down to :data:`COMFYUI_ENV_ALLOW` plus the names the user
    lists in COMFYS3_COMFYUI_ENV (``extra``; a trailing ``*`` is a prefix). Credentials of the
    worker itself never pass, even when named: ComfyUI has no use for them."""
    source = os.environ if environ is None else environ
    allowed = (*COMFYUI_ENV_ALLOW, *extra)
    return {
        name: value
        for name, value in source.items()
        if _matches(name, allowed) and not _matches(name, COMFYUI_ENV_DENY)
    }


def _arg_value(args: Sequence[str], name: str) -> str | None:
    """Last value given for ``--name V`` or ``--name=V`` (ComfyUI's argparse takes the last)."""
    value = None
    for index, arg in enumerate(args):
        if arg == name and index + 1 < len(args):
            value = args[index + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


class ComfyProcess:
    """One ComfyUI child process: started, watched, restarted with backoff, stopped cleanly."""

    def __init__(
        self,
        *,
        path: Path,
        python: str = "python3",
        port: int = 8188,
        args: Sequence[str] = (),
        log_path: Path | None = None,
        startup_timeout: float = 300.0,
        max_restarts: int = 5,
        env: Mapping[str, str] | None = None,
        stop_grace: float = 10.0,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        stable_after: float = 300.0,
    ) -> None:
        self.path = Path(path).resolve()
        self.python = python
        self.port = port
        self.args = list(args)
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path or Path(tempfile.gettempdir()) / f"comfys3-comfyui-{port}.log"
        self.startup_timeout = startup_timeout
        self.max_restarts = max_restarts
        self.env = dict(env) if env is not None else None
        self.stop_grace = stop_grace
        self.backoff = backoff
        self.max_backoff = max_backoff
        # A process that stayed up this long earns a fresh restart budget.
        self.stable_after = stable_after
        self.restarts = 0
        self.gave_up: ComfyUnavailable | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._started_at = 0.0
        self._stopping = False
        self._ready = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._listeners: list[ExitListener] = []
        base = _arg_value(self.args, "--base-directory")
        root = Path(base).resolve() if base else self.path
        self.input_dir = self._dir("--input-directory", root / "input")
        self.output_dir = self._dir("--output-directory", root / "output")
        # ComfyUI puts its temp folder *inside* the directory given.
        temp = _arg_value(self.args, "--temp-directory")
        self.temp_dir = (Path(temp).resolve() / "temp") if temp else root / "temp"

    def _dir(self, flag: str, default: Path) -> Path:
        value = _arg_value(self.args, flag)
        return Path(value).resolve() if value else default

    # ----------------------------------------------------------------- public

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    def add_exit_listener(self, listener: ExitListener) -> None:
        """Called on the loop each time the process dies unexpectedly."""
        self._listeners.append(listener)

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

    async def start(self, on_wait: WaitListener | None = None) -> None:
        """Start ComfyUI and return once it answers; raises ComfyUnavailable with its log tail.
        The wait for its first answer reports itself to ``on_wait`` (log lines by default)."""
        self._stopping = False
        await self._spawn_until_ready(on_wait)
        self._supervisor = asyncio.ensure_future(self._supervise())

    async def wait_ready(self, timeout: float) -> None:
        """Wait for a (re)started process to answer; raises if the restarts ran out."""
        if self.gave_up is not None:
            raise self.gave_up
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            raise ComfyUnavailable(
                f"local ComfyUI at {self.url} is not ready after {timeout:g} s"
            ) from None
        if self.gave_up is not None:
            raise self.gave_up

    async def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it after the grace period."""
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        await self._terminate()
        self._ready.clear()

    # ----------------------------------------------------------------- internals

    def _port_taken(self) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.settimeout(0.5)
            return probe.connect_ex(("127.0.0.1", self.port)) == 0

    async def _spawn_until_ready(self, on_wait: WaitListener | None = None) -> None:
        if self._port_taken():
            raise ComfyUnavailable(
                f"cannot start ComfyUI: port {self.port} on 127.0.0.1 is already in use "
                "(set COMFYS3_COMFYUI_PORT, or COMFYS3_COMFYUI_URL to attach to it)",
                {"kind": "unavailable", "url": self.url},
            )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        volume.rotate_if_large(self.log_path)  # ComfyUI writes it itself: rolled over per start
        command = [
            self.python,
            "main.py",
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            *self.args,
        ]
        with self.log_path.open("ab") as log_file:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log_file.write(f"\n--- comfys3 {stamp}: {shlex.join(command)}\n".encode())
            log_file.flush()
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    *command,
                    cwd=self.path,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=asyncio.subprocess.STDOUT,
                    env=self.env,
                    start_new_session=True,  # its own group: stop() reaches its children too
                )
            except OSError as error:
                raise ComfyUnavailable(
                    f"cannot start ComfyUI ({shlex.join(command)} in {self.path}): {error}",
                    {"kind": "unavailable", "url": self.url},
                ) from error
        self._started_at = time.monotonic()
        log.info("started ComfyUI pid %s on %s, log %s", self._proc.pid, self.url, self.log_path)
        try:
            await self._wait_answering(self._proc, on_wait)
        except BaseException:
            await self._terminate()
            raise
        self._ready.set()

    async def _wait_answering(
        self, proc: asyncio.subprocess.Process, on_wait: WaitListener | None = None
    ) -> None:
        deadline = time.monotonic() + self.startup_timeout
        delay = 0.05
        what = f"ComfyUI to start at {self.url} (pid {proc.pid}, log {self.log_path})"
        listener = on_wait if on_wait is not None else LogNotices(log)
        async with (
            aiohttp.ClientSession() as session,
            reporting(listener, what, self.startup_timeout, "starting") as state,
        ):
            while True:
                if proc.returncode is not None:
                    raise self._died_while_starting(proc.returncode)
                try:
                    async with session.get(
                        f"{self.url}/system_stats", timeout=aiohttp.ClientTimeout(total=5)
                    ) as response:
                        if response.status == 200:
                            state.ready = True
                            return
                        state.detail = f"HTTP {response.status}"
                except (aiohttp.ClientError, TimeoutError):
                    pass
                state.failed = True
                if time.monotonic() >= deadline:
                    tail = self.log_tail(30)
                    raise ComfyUnavailable(
                        f"ComfyUI at {self.url} did not answer within {self.startup_timeout:g} s; "
                        f"last lines of {self.log_path}:\n{tail}",
                        {"kind": "unavailable", "url": self.url, "log_tail": tail},
                    )
                # Wake early if the process exits, instead of sleeping through it.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(proc.wait()), delay)
                delay = min(delay * 1.5, 0.5)

    def _died_while_starting(self, code: int) -> ComfyUnavailable:
        tail = self.log_tail(30)
        return ComfyUnavailable(
            f"ComfyUI {describe_exit(code)} while starting; last lines of {self.log_path}:\n{tail}",
            {"kind": "unavailable", "url": self.url, "exit_code": code, "log_tail": tail},
        )

    async def _terminate(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self.stop_grace)
        except TimeoutError:
            log.warning(
                "ComfyUI pid %s ignored SIGTERM for %g s; killing it", proc.pid, self.stop_grace
            )
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        # Children that outlived the leader (workers spawned by custom nodes).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    async def _supervise(self) -> None:
        failures = 0
        while True:
            proc = self._proc
            assert proc is not None
            code = await proc.wait()
            self._ready.clear()
            if self._stopping:
                return
            # Reap any children of the dead process so the port is free for the restart.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            if time.monotonic() - self._started_at >= self.stable_after:
                failures = 0
            restarting = failures < self.max_restarts
            log.error("ComfyUI pid %s %s", proc.pid, describe_exit(code))
            self._notify(code, restarting)
            while True:
                if failures >= self.max_restarts:
                    self.gave_up = ComfyUnavailable(
                        f"ComfyUI kept dying ({describe_exit(code)}); gave up after "
                        f"{self.max_restarts} restart(s); last lines of {self.log_path}:\n"
                        f"{self.log_tail(30)}",
                        {"kind": "unavailable", "url": self.url, "exit_code": code},
                    )
                    self._ready.set()  # wake waiters so they see gave_up
                    self._notify(code, False)
                    return
                await asyncio.sleep(min(self.backoff * (2**failures), self.max_backoff))
                failures += 1
                self.restarts += 1
                try:
                    await self._spawn_until_ready()
                    break
                except ComfyUnavailable as error:
                    log.error("restarting ComfyUI failed: %s", error)

    def _notify(self, code: int, restarting: bool) -> None:
        for listener in list(self._listeners):
            try:
                listener(code, restarting)
            except Exception:
                log.exception("ComfyUI exit listener failed")


class ComfyEngine(ClosedOnExit):
    """ComfyUI as the worker sees it: attached by URL or started here, always with a ready client.

    ``async with ComfyEngine(settings) as client`` yields a ready ComfyClient; keep the engine to
    call ``cleanup`` after each job's outputs are collected.
    """

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        env: Mapping[str, str] | None = None,
        stop_grace: float = 10.0,
        restart_backoff: float = 1.0,
        on_wait: WaitListener | None = None,
        gpu: Gpu | None = None,
    ) -> None:
        """``gpu``: start this ComfyUI for one GPU of several (``--gpus``): it sees only that
        GPU, listens on the configured port plus the GPU's place, and has folders and a log of
        its own, so that several run side by side."""
        self.settings = settings
        self.gpu = gpu
        self.on_wait = on_wait  # where the wait for ComfyUI at start is told (None: the log)
        self.process: ComfyProcess | None = None
        self._client: ComfyClient | None = None
        self.input_dir: Path | None = settings.comfyui.input_dir
        self.output_dir: Path | None = settings.comfyui.output_dir
        self.temp_dir: Path | None = settings.comfyui.temp_dir
        if settings.comfyui.url and gpu is None:
            self.url = settings.comfyui.url.rstrip("/")
        elif settings.comfyui.path is not None:
            # The model cache as an extra model path, when the worker keeps one.
            args = [*shlex.split(settings.comfyui.args), *paths_config.comfyui_args(settings)]
            child_env = comfyui_environment(settings.comfyui.env) if env is None else dict(env)
            log_path = volume.comfyui_log(settings)
            if gpu is not None:
                args = _own_folders(args, gpu, Path(settings.comfyui.path))
                child_env = {**child_env, "CUDA_VISIBLE_DEVICES": gpu.device}
                if log_path is not None:
                    log_path = log_path.with_name(f"{log_path.stem}-{gpu.name}{log_path.suffix}")
            self.process = ComfyProcess(
                path=settings.comfyui.path,
                python=settings.comfyui.python,
                port=settings.comfyui.port + (gpu.index if gpu is not None else 0),
                args=args,
                log_path=log_path,
                startup_timeout=settings.comfyui.startup_timeout,
                max_restarts=settings.comfyui.max_restarts,
                env=volume.comfyui_environment(settings, child_env),
                stop_grace=stop_grace,
                backoff=restart_backoff,
            )
            self.url = self.process.url
            self.input_dir = self.process.input_dir
            self.output_dir = self.process.output_dir
            self.temp_dir = self.process.temp_dir
        else:
            raise SettingsError(
                "no ComfyUI: set COMFYS3_COMFYUI_URL to attach to a running one, or "
                "COMFYS3_COMFYUI_PATH to the ComfyUI checkout the worker should start"
            )

    @property
    def name(self) -> str:
        """What this ComfyUI is called in logs, metrics and /healthz."""
        return self.gpu.name if self.gpu is not None else "comfyui"

    @property
    def client(self) -> ComfyClient:
        if self._client is None:
            raise RuntimeError("ComfyEngine is not started: use `async with engine`")
        return self._client

    async def __aenter__(self) -> ComfyClient:
        settings = self.settings
        if self.process is not None:
            await self.process.start(self.on_wait)
            # While a dead ComfyUI restarts, queued prompts wait for it, not for the job timeout.
            reconnect = settings.comfyui.startup_timeout + 30.0
        else:
            reconnect = settings.comfyui.reconnect_timeout
        client = ComfyClient(self.url, reconnect_timeout=reconnect)
        folders = {"input": self.input_dir, "output": self.output_dir, "temp": self.temp_dir}
        client.local_folders = {kind: path for kind, path in folders.items() if path is not None}
        await client.__aenter__()
        self._client = client
        try:
            if self.process is not None:
                # It answers already; what is left is the websocket, not worth a report.
                await client.wait_ready(
                    settings.comfyui.startup_timeout,
                    log_tail=self.process.log_tail,
                    on_wait=_unreported,
                )
            else:
                # Nobody here started it: an address that refuses connections fails after a
                # short grace (for one that is booting), not after the whole startup timeout.
                await client.wait_ready(
                    settings.comfyui.startup_timeout,
                    refused_grace=settings.comfyui.connect_grace,
                    on_wait=self.on_wait,
                )
        except BaseException:
            await self.aclose()
            raise
        if self.process is not None:
            self.process.add_exit_listener(self._on_process_exit)
        return client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        if self.process is not None:
            await self.process.stop()

    def _on_process_exit(self, code: int, restarting: bool) -> None:
        assert self.process is not None
        if self._client is None:
            return
        tail = self.process.log_tail(20)
        self._client.mark_down()
        if restarting:
            details = {"kind": "comfyui_died", "exit_code": code, "log_tail": tail}
            self._client.fail_pending(
                ComfyUnavailable(
                    f"ComfyUI died ({describe_exit(code)}) while the job ran; it is being "
                    f"restarted. Last lines of {self.process.log_path}:\n{tail}",
                    details,
                ),
                waiting=ComfyDiedWhileWaiting(
                    f"ComfyUI died ({describe_exit(code)}) while another job ran; this one "
                    "was waiting in its queue, so the attempt does not count",
                    {**details, "bystander": True},
                ),
            )
        else:
            self._client.mark_dead(
                self.process.gave_up
                or ComfyUnavailable(
                    f"ComfyUI died ({describe_exit(code)}) and will not be restarted",
                    {"kind": "comfyui_died", "exit_code": code, "log_tail": tail},
                )
            )

    async def cleanup(self, result: RunResult, input_subfolder: str | None) -> None:
        """Remove a collected job's outputs, previews and inputs, so a warm worker's disk stays
        flat. Does nothing for folders it does not know (ComfyUI attached by URL)."""
        await asyncio.to_thread(self._cleanup_sync, result, input_subfolder)

    def _cleanup_sync(self, result: RunResult, input_subfolder: str | None) -> None:
        roots = {"output": self.output_dir, "temp": self.temp_dir}
        for ref in [*result.files, *result.temp_files]:
            root = roots.get(ref.type)
            if root is None:
                continue
            base = root.resolve()
            target = (base / ref.subfolder / ref.filename).resolve()
            if base not in target.parents:
                continue  # never outside ComfyUI's folder, whatever /history said
            with contextlib.suppress(FileNotFoundError):
                target.unlink()
            _remove_empty_parents(target.parent, base)
        if input_subfolder and self.input_dir is not None:
            base = self.input_dir.resolve()
            target = (base / input_subfolder).resolve()
            if base in target.parents:
                shutil.rmtree(target, ignore_errors=True)
                _remove_empty_parents(target.parent, base)


# ComfyUI's folder flags, and each folder's place when the arguments do not name one.
FOLDER_FLAGS = {
    "--input-directory": "input",
    "--output-directory": "output",
    "--temp-directory": "",
}


def _own_folders(args: list[str], gpu: Gpu, comfyui: Path) -> list[str]:
    """``args`` with input, output and temp folders of this GPU's own: a folder the arguments
    name gets a sub-folder per GPU; one they do not is under ``comfyui/comfys3-gpus/``.
    (ComfyUI puts its temp folder inside the directory given.)"""
    given: dict[str, str] = {}
    kept: list[str] = []
    pending: str | None = None
    for arg in args:
        if pending is not None:
            given[pending], pending = arg, None
            continue
        flag, equals, value = arg.partition("=")
        if flag in FOLDER_FLAGS:
            if equals:
                given[flag] = value
            else:
                pending = flag
            continue
        kept.append(arg)
    for flag, default in FOLDER_FLAGS.items():
        folder = Path(given[flag]) / gpu.name if flag in given else gpu.folder(comfyui) / default
        kept += [flag, str(folder)]
    return kept


def _unreported(waiting: Waiting) -> None:
    del waiting


def _remove_empty_parents(folder: Path, stop: Path) -> None:
    while folder != stop and stop in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent
