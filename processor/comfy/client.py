"""ComfyUI client: upload inputs, queue prompts, follow them, collect their outputs.

One client holds one HTTP session and one websocket for its whole life. The socket is open
before the first prompt is queued, and events are kept per prompt from the moment it is
queued, so the pipeline can queue job N+1 while it waits for job N and lose nothing.
Completion comes from the socket (no polling); /history is read once per prompt, after
ComfyUI says it is written, and is the source of truth for outputs and timings.

Two ComfyUIs are served (../shared/comfyui-protocol/DELTA.md): 0.3.64, whose routes are
/history, /queue and /interrupt, and today's (0.38.x), which adds the job API
(``/api/jobs/{id}``, ``/api/jobs/{id}/cancel``). Which one answers is found once per connection
(:meth:`ComfyClient.server_info`) and only matters for the rare requests that are not on the
hot path: finding a prompt again after the socket dropped, and stopping one.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import quote

import aiohttp

from processor.aio import ClosedOnExit
from processor.comfy.node_errors import as_dict, dropped_outputs, validation_error
from processor.comfy.waiting import LogNotices, WaitListener, reporting
from processor.comfy.websocket import PromptWatch, SocketListener
from processor.errors import (
    ComfyError,
    ComfyInterrupted,
    ComfyRuntimeError,
    ComfyTimeout,
    ComfyUnavailable,
    ComfyValidationError,
)

__all__ = [
    "ComfyClient",
    "ComfyError",
    "ComfyInterrupted",
    "ComfyRuntimeError",
    "ComfyTimeout",
    "ComfyUnavailable",
    "ComfyValidationError",
    "OutputFile",
    "Progress",
    "RunLimit",
    "RunResult",
    "ServerInfo",
    "new_prompt_id",
    "sniff_content_type",
]

log = logging.getLogger(__name__)

# How long /history may stay empty after success before it is an error. ComfyUI writes the
# entry right after execution_success; a GC pause (~0.3 s) or a busy machine delays it.
HISTORY_GRACE_S = 30.0
# Does the job API exist? One cheap request per connection: only the running job is read, so
# ComfyUI does not walk its history to answer. 200 on today's ComfyUI, 404 on 0.3.64.
JOB_API_PROBE = "/api/jobs?status=in_progress&limit=1"
JOB_STATES_QUEUED = ("pending", "in_progress")
JOB_STATES_FINISHED = ("completed", "failed", "cancelled")
THREE_D_EXTENSIONS = (".glb", ".gltf", ".obj", ".fbx", ".stl", ".ply", ".usdz")


def new_prompt_id() -> str:
    """A prompt id as today's ComfyUI requires one from a client: a canonical lowercase
    uuid4 (0.3.64 took any string; 0.25 and later answer 400 ``invalid_prompt_id``)."""
    return str(uuid.uuid4())


@dataclass(frozen=True)
class ServerInfo:
    """What the ComfyUI at the other end speaks, found once per connection."""

    version: str | None  # /system_stats' comfyui_version, e.g. "0.3.64" or "0.38.1"
    job_api: bool  # GET /api/jobs answers (today's ComfyUI); else only the 0.3.64 routes

    def describe(self) -> str:
        routes = (
            "the job API (/api/jobs)"
            if self.job_api
            else "the 0.3.64 routes (/history, /queue, /interrupt)"
        )
        return f"ComfyUI {self.version or '(version not given)'}, using {routes}"


@dataclass(frozen=True)
class RunLimit:
    """How long a prompt may execute, counted from when ComfyUI starts it (not from when it
    was queued: a job waiting behind another is not charged for the wait)."""

    seconds: float
    source: str  # what set it, named in the timeout message: "timeout_s", "COMFYS3_JOB_TIMEOUT"


@dataclass(frozen=True)
class Progress:
    prompt_id: str
    node_id: str | None
    node_type: str | None
    value: int
    max: int
    fraction: float  # best estimate of the whole prompt, 0..1


@dataclass(frozen=True)
class OutputFile:
    node_id: str
    kind: str  # the /history key: "images", "gifs", "audio", "3d", ...
    filename: str
    subfolder: str
    type: str  # "output" | "temp"
    animated: bool = False  # the node said ``animated``: a video or animation under "images"
    # Named by a preview node rather than saved by one (Preview3D's model path): it may lie in
    # ComfyUI's input folder, so not finding it is no failure.
    optional: bool = False


@dataclass(frozen=True)
class RunResult:
    prompt_id: str
    files: list[OutputFile]
    texts: dict[str, list[str]]  # node_id -> text outputs
    cached_nodes: list[str]
    execution_seconds: float  # ComfyUI's own execution_start -> end timestamps
    # Temp files (previews) that were not asked for but sit on disk: cleanup removes them too.
    temp_files: list[OutputFile] = field(default_factory=list)


_MAGIC: list[tuple[bytes, int, str]] = [
    (b"\x89PNG\r\n\x1a\n", 0, "image/png"),
    (b"\xff\xd8\xff", 0, "image/jpeg"),
    (b"GIF87a", 0, "image/gif"),
    (b"GIF89a", 0, "image/gif"),
    (b"BM", 0, "image/bmp"),
    (b"II*\x00", 0, "image/tiff"),
    (b"MM\x00*", 0, "image/tiff"),
    (b"fLaC", 0, "audio/flac"),
    (b"ID3", 0, "audio/mpeg"),
    (b"glTF", 0, "model/gltf-binary"),
]
# ISO base media files (MP4, MOV, AVIF, HEIC, M4A) tell what they are by their brand.
_FTYP_BRANDS = {
    b"avif": "image/avif",
    b"avis": "image/avif",
    b"heic": "image/heic",
    b"heix": "image/heic",
    b"mif1": "image/heic",
    b"M4A ": "audio/mp4",
    b"qt  ": "video/quicktime",
}


def sniff_content_type(data: bytes) -> str:
    """Content type from the bytes themselves: a file name may lie, or say nothing."""
    head = data[:64]
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "audio/wav"
    if head[4:8] == b"ftyp":
        return _FTYP_BRANDS.get(head[8:12], "video/mp4")
    if head[:4] == b"\x1aE\xdf\xa3":  # EBML: WebM names itself, other Matroska does not
        return "video/webm" if b"webm" in head else "video/x-matroska"
    if head[:4] == b"OggS":
        return "video/ogg" if b"theora" in head else "audio/ogg"
    for magic, offset, content_type in _MAGIC:
        if data[offset : offset + len(magic)] == magic:
            return content_type
    if len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        return "audio/mpeg"  # an MP3 frame without an ID3 tag (after JPEG: FF D8 is not this)
    return "application/octet-stream"


def parse_outputs(
    outputs: dict[str, Any], include_temp: bool
) -> tuple[list[OutputFile], dict[str, list[str]]]:
    """Every file-like entry of every node (any kind), and the strings as text outputs.

    ComfyUI's shapes, old and new: ``images`` (with ``animated: [true]`` for video and
    animations, today's SaveVideo/SaveWEBM/SaveAnimatedWEBP), ``gifs`` (VideoHelperSuite),
    ``audio``, ``3d`` (SaveGLB), ``text`` (PreviewAny, ShowText) and Preview3D's ``result``,
    whose first item names a model file. Extra keys (asset ``id``, ``preview_id``, VHS's
    ``fullpath``) are ignored; a file named twice is taken once.
    """
    files: list[OutputFile] = []
    texts: dict[str, list[str]] = {}
    seen: set[tuple[str, str, str]] = set()
    wanted = {"output", "temp"} if include_temp else {"output"}

    def add(ref: OutputFile) -> None:
        where = (ref.type, ref.subfolder, ref.filename)
        if ref.type in wanted and where not in seen:
            seen.add(where)
            files.append(ref)

    for node_id in sorted(outputs, key=lambda n: (0, int(n), "") if n.isdigit() else (1, 0, n)):
        node_outputs = outputs[node_id]
        if not isinstance(node_outputs, dict):
            continue
        flags = node_outputs.get("animated")
        animated = isinstance(flags, list | tuple) and any(flag is True for flag in flags)
        for kind, items in node_outputs.items():
            if not isinstance(items, list) or kind == "animated":
                continue
            for item in items:
                if isinstance(item, dict) and isinstance(item.get("filename"), str):
                    add(
                        OutputFile(
                            node_id=str(node_id),
                            kind=str(kind),
                            filename=item["filename"],
                            subfolder=str(item.get("subfolder") or ""),
                            type=str(item.get("type") or "output"),
                            animated=animated and kind == "images",
                        )
                    )
                elif isinstance(item, str) and kind == "result" and _is_model_path(item):
                    path = PurePosixPath(item.replace("\\", "/"))
                    parent = "" if str(path.parent) == "." else str(path.parent)
                    add(OutputFile(str(node_id), "3d", path.name, parent, "output", optional=True))
                elif isinstance(item, str):
                    texts.setdefault(str(node_id), []).append(item)
    return files, texts


def _is_model_path(text: str) -> bool:
    """A 3-D file as Preview3D names it ("mesh/ComfyUI_00001_.glb"), not free text."""
    return "\n" not in text and len(text) < 1024 and text.lower().endswith(THREE_D_EXTENSIONS)


def _safe_name(filename: str) -> str:
    name = PurePosixPath(filename.replace("\\", "/")).name
    if name in ("", ".", ".."):
        raise ValueError(f"not a usable input file name: {filename!r}")
    return name


def _safe_subfolder(subfolder: str) -> str:
    parts = [p for p in subfolder.replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"input subfolder must stay inside ComfyUI's input folder: {subfolder!r}")
    return "/".join(parts)


class ComfyClient(ClosedOnExit):
    """Talks to one ComfyUI; safe to share between concurrent jobs on one event loop."""

    def __init__(
        self,
        base_url: str,
        *,
        client_id: str | None = None,
        reconnect_timeout: float = 60.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.client_id = client_id or uuid.uuid4().hex
        # How long the socket may stay down before waiters fail as "unreachable".
        self.reconnect_timeout = reconnect_timeout
        scheme, _, rest = self.base_url.partition("://")
        ws_scheme = "wss" if scheme == "https" else "ws"
        self._ws_url = f"{ws_scheme}://{rest}/ws?clientId={self.client_id}"
        self._session: aiohttp.ClientSession | None = None
        self._listener: SocketListener | None = None
        self._watches: dict[str, PromptWatch] = {}
        self._connected = asyncio.Event()
        self._generation = 0
        self._down_timer: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._dead: ComfyError | None = None
        self._server: ServerInfo | None = None  # found once per connection
        self._server_lock = asyncio.Lock()

    # ----------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> ComfyClient:
        loop = asyncio.get_running_loop()
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, connect=10, sock_read=300),
            connector=aiohttp.TCPConnector(limit=16, keepalive_timeout=60),
        )
        self._listener = SocketListener(self._ws_url, loop, self._on_message, self._on_state)
        self._listener.start()
        self._arm_down_timer()
        return self

    async def aclose(self) -> None:
        if self._listener is not None:
            self._listener.stop()
            await asyncio.to_thread(self._listener.join, 5.0)
            self._listener = None
        for task in [*self._tasks, self._down_timer]:
            if task is not None:
                task.cancel()
        self.fail_pending(ComfyError("the ComfyUI client was closed"))
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def generation(self) -> int:
        """Counts websocket connections: it moves when ComfyUI comes back (a restart, or a
        reconnect after a network fault), when what it offers may have changed."""
        return self._generation

    async def object_info(self) -> dict[str, Any]:
        """``GET /object_info``: every node type ComfyUI offers, with its inputs (the model
        files a loader accepts are the choices of its inputs). Large with many custom nodes,
        so asked once per connection, not per job."""
        await self._wait_connected()
        return await self._request_json("GET", "/object_info")

    async def has_node(self, node_type: str) -> bool:
        """Whether ComfyUI has the node type, asked one by one (``GET /object_info/{type}``).
        ``/object_info`` silently leaves out a node whose inputs could not be listed at that
        moment (LoadImage before its input folder exists, a custom node that raises): it
        answers ``{}`` only for a type it does not have, and an error for one that failed."""
        await self._wait_connected()
        status, raw = await self._request("GET", f"/object_info/{quote(node_type, safe='')}")
        if status != 200:
            return True  # there, but its description failed to build
        try:
            body = json.loads(raw)
        except ValueError:
            return True
        return not (isinstance(body, dict) and not body)

    def drop_connection(self) -> None:
        """Abort the websocket as a network fault would (it reconnects and reconciles)."""
        if self._listener is not None:
            self._listener.drop()

    def mark_down(self) -> None:
        """Treat the socket as down now, because the caller knows the server is gone (its
        process exited) before the websocket thread has noticed. Without this, a prompt
        queued in that gap is posted to a closed port and its job fails for nothing; with it,
        the prompt waits for the reconnect like any other."""
        self._connected.clear()
        self._arm_down_timer()
        self.drop_connection()

    def mark_dead(self, error: ComfyError | None) -> None:
        """Fail everything now and refuse new prompts with ``error`` (None: accept again)."""
        self._dead = error
        if error is not None:
            self.fail_pending(error)

    def fail_pending(self, error: ComfyError, *, waiting: ComfyError | None = None) -> None:
        """Fail every prompt being followed, e.g. when the local ComfyUI process died.

        With ``waiting``, prompts that sat in the queue behind one that was executing get that
        error instead: ComfyUI runs one prompt at a time and its events arrive in order, so a
        prompt not yet started while another had started was not the one running.
        """
        watches = [w for w in self._watches.values() if not w.done.is_set()]
        if waiting is None or not any(w.started for w in watches):
            waiting = error  # nobody is known to have been running: nobody is cleared
        for watch in watches:
            watch.fail(error if watch.started else waiting)

    # ----------------------------------------------------------------- readiness

    async def wait_ready(
        self,
        timeout: float,
        *,
        log_tail: Callable[[], str] | None = None,
        refused_grace: float | None = None,
        on_wait: WaitListener | None = None,
    ) -> dict[str, Any]:
        """/system_stats answered and the websocket open, within ``timeout`` seconds.

        The wait reports itself to ``on_wait`` (log lines by default) from the start. With
        ``refused_grace``, an address where nothing listens (connection refused, or a host name
        that does not resolve) fails once it has refused for that long, instead of after the
        whole ``timeout``: a ComfyUI attached by URL that is still booting opens its port
        within the grace; a wrong address never does.
        """
        what = f"ComfyUI at {self.base_url}"
        last_error = "no answer yet"
        stats: dict[str, Any] | None = None
        delay = 0.05
        refused_since: float | None = None
        listener = on_wait if on_wait is not None else LogNotices(log)
        async with reporting(listener, what, timeout, last_error) as state:
            while True:
                remaining = state.deadline - time.monotonic()
                if stats is None:
                    try:
                        async with self._http.get(
                            f"{self.base_url}/system_stats",
                            timeout=aiohttp.ClientTimeout(total=max(0.5, min(5.0, remaining))),
                        ) as response:
                            if response.status == 200:
                                stats = await response.json(content_type=None)
                            else:
                                last_error = f"HTTP {response.status}"
                        refused_since = None
                    except aiohttp.ClientConnectorError as error:
                        last_error = _nobody_there(error) or str(error)
                        if _nobody_there(error) is None:
                            refused_since = None
                        elif refused_since is None:
                            refused_since = time.monotonic()
                            if refused_grace is not None:
                                state.deadline = min(state.deadline, refused_since + refused_grace)
                    except (aiohttp.ClientError, TimeoutError, ValueError) as error:
                        last_error = str(error) or type(error).__name__
                        refused_since = None
                if stats is not None and self._connected.is_set():
                    with contextlib.suppress(ComfyError):
                        self._server = await self._probe(stats)
                    state.ready = True
                    return stats
                if stats is not None:
                    last_error = "/system_stats answered but the websocket did not connect"
                state.detail = last_error
                remaining = state.deadline - time.monotonic()
                if remaining <= 0:
                    break
                await asyncio.sleep(min(delay, remaining))
                delay = min(delay * 1.5, 0.5)
        tail = log_tail() if log_tail is not None else ""
        if (
            refused_since is not None
            and refused_grace is not None
            and time.monotonic() - refused_since >= refused_grace
        ):
            message = (
                f"nothing answers at {self.base_url} ({last_error} for {refused_grace:g} s): "
                "is ComfyUI running there? Check the address (COMFYS3_COMFYUI_URL, or exec's "
                "--comfyui-url); a ComfyUI that is still starting gets "
                "COMFYS3_COMFYUI_CONNECT_GRACE seconds to open its port"
            )
        else:
            message = (
                f"ComfyUI at {self.base_url} was not ready within {timeout:g} s "
                f"(GET /system_stats: {last_error})"
            )
        if tail.strip():
            message += f"\nlast lines of its log:\n{tail.rstrip()}"
        raise ComfyUnavailable(
            message, {"kind": "unavailable", "url": self.base_url, "log_tail": tail}
        )

    async def server_info(self) -> ServerInfo:
        """What this ComfyUI speaks, asked once per connection (a ComfyUI restarted under the
        worker may be another version)."""
        if self._server is None:
            async with self._server_lock:
                if self._server is None:
                    stats = await self._request_json("GET", "/system_stats")
                    self._server = await self._probe(stats)
        return self._server

    async def _probe(self, stats: dict[str, Any]) -> ServerInfo:
        system = as_dict(stats.get("system"))
        version = system.get("comfyui_version")
        status, _ = await self._request("GET", JOB_API_PROBE)
        info = ServerInfo(str(version) if version is not None else None, status == 200)
        log.info("%s at %s", info.describe(), self.base_url)
        return info

    # ----------------------------------------------------------------- inputs

    async def upload_input(self, data: bytes, filename: str, subfolder: str) -> str:
        """Store an input file in ComfyUI's input folder; returns the LoadImage value.

        Like queueing, it waits while ComfyUI is down (restarting): a retried job stages its
        inputs first, and must not burn its attempts on a ComfyUI that is still booting.
        """
        await self._wait_connected()
        name = _safe_name(filename)
        folder = _safe_subfolder(subfolder)
        form = aiohttp.FormData()
        form.add_field("image", data, filename=name, content_type=sniff_content_type(data))
        form.add_field("subfolder", folder)
        form.add_field("type", "input")
        form.add_field("overwrite", "true")
        body = await self._request_json("POST", "/upload/image", data=form)
        stored = str(body.get("name") or name)
        stored_folder = str(body.get("subfolder") or "")
        return f"{stored_folder}/{stored}" if stored_folder else stored

    # ----------------------------------------------------------------- prompts

    async def queue_prompt(self, graph: dict[str, Any], prompt_id: str) -> list[str]:
        """Queue ``graph`` under ``prompt_id``; its events are kept until someone waits.

        Returns the outputs ComfyUI left out, one readable line each: a 200 that carries
        ``node_errors`` means some output nodes failed validation and the prompt was queued
        without them (both versions do this), which is worth a note, not a failure.
        """
        await self._wait_connected()
        existing = self._watches.get(prompt_id)
        if existing is not None and not existing.done.is_set():
            raise ComfyError(f"prompt {prompt_id} is already queued by this client")
        watch = PromptWatch.for_graph(prompt_id, graph)
        self._watches[prompt_id] = watch
        generation = self._generation
        payload = {"prompt": graph, "prompt_id": prompt_id, "client_id": self.client_id}
        try:
            async with self._http.post(f"{self.base_url}/prompt", json=payload) as response:
                if response.status == 400:
                    try:
                        body: Any = await response.json(content_type=None)
                    except ValueError:
                        body = await response.text()
                    raise validation_error(400, body)
                if response.status != 200:
                    text = (await response.text())[:500]
                    raise ComfyError(
                        f"ComfyUI answered POST /prompt with HTTP {response.status}: {text}",
                        {"kind": "http_error", "status": response.status, "body": text},
                    )
                body = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError) as error:
            self._watches.pop(prompt_id, None)
            raise self._unreachable("POST /prompt", error) from error
        except BaseException:
            self._watches.pop(prompt_id, None)
            raise
        dropped = dropped_outputs(body.get("node_errors")) if isinstance(body, dict) else []
        if dropped:
            log.warning("prompt %s queued without some outputs: %s", prompt_id, "; ".join(dropped))
        if isinstance(body, dict) and isinstance(body.get("number"), int | float):
            watch.number = body["number"]
        watch.queued = True
        if self._generation != generation:
            # The socket reconnected while we posted: events may be lost, ask /history.
            self._spawn(self._reconcile(watch))
        return dropped

    async def wait_for(
        self,
        prompt_id: str,
        *,
        timeout: float,
        on_progress: Callable[[Progress], None] | None = None,
        include_temp: bool = False,
        run_limit: RunLimit | None = None,
    ) -> RunResult:
        """Follow a queued prompt to its end. ``timeout`` counts from this call (the worker's
        bound, queue wait included); ``run_limit`` from when ComfyUI starts executing it. A
        prompt past either is stopped on ComfyUI and :class:`ComfyTimeout` names the limit."""
        watch = self._watches.get(prompt_id)
        if watch is None:
            watch = PromptWatch.for_graph(prompt_id, None)
            watch.queued = True
            self._watches[prompt_id] = watch
            self._spawn(self._reconcile(watch))  # it may be over already
        watch.on_progress = on_progress
        try:
            exceeded = await self._until_done(watch, timeout, run_limit)
            if exceeded is not None:
                seconds, source = exceeded
                await self._stop_prompt(watch)
                raise ComfyTimeout(
                    f"prompt {prompt_id} timed out after {seconds:g} s ({source}) and was "
                    "cancelled on ComfyUI",
                    {
                        "kind": "timeout",
                        "prompt_id": prompt_id,
                        "timeout_s": seconds,
                        "limit": source,
                    },
                ) from None
            if watch.failure is not None:
                raise watch.failure
            assert watch.outcome is not None
            kind, data = watch.outcome
            if kind == "execution_error":
                raise self._runtime_error(prompt_id, data)
            if kind == "execution_interrupted":
                node = data.get("node_id")
                where = f" at node {node} ({data.get('node_type')})" if node else ""
                raise ComfyInterrupted(
                    f"prompt {prompt_id} was interrupted{where}",
                    {"kind": "interrupted", "prompt_id": prompt_id, "node_id": node},
                )
            entry = await self._history_entry(watch)
            return self._result(watch, entry, include_temp)
        finally:
            if self._watches.get(prompt_id) is watch:
                del self._watches[prompt_id]

    async def _until_done(
        self, watch: PromptWatch, timeout: float, run_limit: RunLimit | None
    ) -> tuple[float, str] | None:
        """Wait for the watch to end; the limit it ran past, or None."""
        loop = asyncio.get_running_loop()
        overall = loop.time() + timeout
        while not watch.done.is_set():
            deadline, limit = overall, (timeout, "COMFYS3_JOB_TIMEOUT")
            if run_limit is not None and watch.started_at is not None:
                own = watch.started_at + run_limit.seconds
                if own < deadline:
                    deadline, limit = own, (run_limit.seconds, run_limit.source)
            remaining = deadline - loop.time()
            if remaining <= 0:
                return limit
            waits = [watch.done.wait()]
            if run_limit is not None and watch.started_at is None:
                waits.append(watch.began.wait())  # from then on its own limit counts too
            tasks = [asyncio.ensure_future(w) for w in waits]
            try:
                await asyncio.wait(tasks, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in tasks:
                    task.cancel()
        return None

    async def run(
        self,
        graph: dict[str, Any],
        prompt_id: str,
        *,
        timeout: float,
        on_progress: Callable[[Progress], None] | None = None,
        include_temp: bool = False,
    ) -> RunResult:
        await self.queue_prompt(graph, prompt_id)
        return await self.wait_for(
            prompt_id, timeout=timeout, on_progress=on_progress, include_temp=include_temp
        )

    async def fetch_output(self, ref: OutputFile) -> bytes:
        params = {"filename": ref.filename, "subfolder": ref.subfolder, "type": ref.type}
        try:
            async with self._http.get(f"{self.base_url}/view", params=params) as response:
                if response.status == 200:
                    return await response.read()
                where = "/".join(p for p in (ref.type, ref.subfolder, ref.filename) if p)
                raise ComfyError(
                    f"ComfyUI has no output file {where} (HTTP {response.status}); "
                    "if a cached SaveImage reported it, the file was removed since",
                    {"kind": "output_missing", "file": params, "status": response.status},
                )
        except (aiohttp.ClientError, TimeoutError) as error:
            raise self._unreachable("GET /view", error) from error

    async def cancel(self, prompt_id: str) -> None:
        """Stop ``prompt_id`` on ComfyUI, never another prompt: interrupted if it runs,
        dropped if it waits. A prompt this client follows is settled as far as can be known
        now: one dropped before it started gets :class:`ComfyInterrupted` (``details.kind``
        "cancelled"); one interrupted ends with ComfyUI's ``execution_interrupted``, at its
        next step or node, which nobody needs to wait for.

        Today's ComfyUI does both at once, atomically (``POST /api/jobs/{id}/cancel``). On
        0.3.64, or a ComfyUI whose job API has no cancel yet, the prompt is first deleted from
        the queue (so one that waits cannot start after), and only if it is still there, so
        running, ``/interrupt {prompt_id}`` follows, which ComfyUI carries out only if that
        very prompt is the one running.
        """
        server = await self.server_info()
        done = False
        if server.job_api:
            status, _ = await self._request("POST", f"/api/jobs/{prompt_id}/cancel")
            done = status == 200
            if not done:
                log.info("POST /api/jobs/%s/cancel: HTTP %d; the 0.3.64 way", prompt_id, status)
        if not done:
            await self._request("POST", "/queue", json={"delete": [prompt_id]})
            if await self._in_queue(prompt_id):  # not waiting any more: it runs
                await self._request("POST", "/interrupt", json={"prompt_id": prompt_id})
        watch = self._watches.get(prompt_id)
        if watch is not None and not watch.done.is_set():
            await self._settle_cancelled(watch)

    async def _settle_cancelled(self, watch: PromptWatch) -> None:
        """After a cancel: end the watch of a prompt ComfyUI dropped before it started (no
        event ever comes for that one), or of one that ended meanwhile."""
        where, entry = await self._locate(watch)
        if where == "finished" and entry is not None:
            watch.apply_history(entry)
        elif where == "absent":
            watch.fail(
                ComfyInterrupted(
                    f"prompt {watch.prompt_id} was dropped from ComfyUI's queue before it started",
                    {"kind": "cancelled", "prompt_id": watch.prompt_id},
                )
            )

    # ----------------------------------------------------------------- internals

    @property
    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise ComfyError("ComfyClient is not open: use `async with ComfyClient(...)`")
        return self._session

    def _unreachable(self, what: str, error: BaseException) -> ComfyUnavailable:
        reason = str(error) or type(error).__name__
        return ComfyUnavailable(
            f"ComfyUI at {self.base_url} is unreachable ({what}: {reason})",
            {"kind": "unavailable", "url": self.base_url, "error": reason},
        )

    async def _request(self, method: str, path: str, **kwargs: Any) -> tuple[int, bytes]:
        try:
            async with self._http.request(method, f"{self.base_url}{path}", **kwargs) as response:
                return response.status, await response.read()
        except (aiohttp.ClientError, TimeoutError) as error:
            raise self._unreachable(f"{method} {path}", error) from error

    async def _request_json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        status, raw = await self._request(method, path, **kwargs)
        text = raw.decode("utf-8", "replace")
        if status != 200:
            raise ComfyError(
                f"ComfyUI answered {method} {path} with HTTP {status}: {text[:500]}",
                {"kind": "http_error", "status": status, "body": text[:2000]},
            )
        try:
            body = json.loads(text)
        except ValueError as error:
            raise ComfyError(
                f"ComfyUI answered {method} {path} with non-JSON: {text[:200]}"
            ) from error
        return body if isinstance(body, dict) else {}

    async def _wait_connected(self) -> None:
        if self._dead is not None:
            raise self._dead
        if self._connected.is_set():
            return
        try:
            await asyncio.wait_for(self._connected.wait(), self.reconnect_timeout)
        except TimeoutError:
            raise ComfyUnavailable(
                f"ComfyUI at {self.base_url} is unreachable: no websocket connection "
                f"within {self.reconnect_timeout:g} s",
                {"kind": "unavailable", "url": self.base_url},
            ) from None

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_message(self, message: dict[str, Any]) -> None:
        data = message.get("data")
        if not isinstance(data, dict):
            return
        watch = self._watches.get(str(data.get("prompt_id")))
        if watch is None:
            return  # another client's prompt, or a greeting
        kind = str(message.get("type"))
        if watch.handle(kind, data):
            self._report(watch)
        elif kind == "executing" and data.get("node") is None and not watch.done.is_set():
            # Over, but its end event went out while the socket was down: /history has it now.
            self._spawn(self._reconcile(watch))
        elif kind == "execution_success" and watch.on_progress is not None:
            watch.last_fraction = 1.0
            self._emit(watch, Progress(watch.prompt_id, None, None, 1, 1, 1.0))

    def _report(self, watch: PromptWatch) -> None:
        if watch.on_progress is None:
            return
        fraction = max(watch.last_fraction, watch.estimate())
        watch.last_fraction = fraction
        node = watch.current_node
        progress = Progress(
            prompt_id=watch.prompt_id,
            node_id=node,
            node_type=watch.node_types.get(node) if node else None,
            value=watch.current_value,
            max=watch.current_max,
            fraction=round(fraction, 4),
        )
        self._emit(watch, progress)

    @staticmethod
    def _emit(watch: PromptWatch, progress: Progress) -> None:
        assert watch.on_progress is not None
        try:
            watch.on_progress(progress)
        except Exception:
            log.exception("progress callback for %s failed", watch.prompt_id)

    def _on_state(self, up: bool) -> None:
        if up:
            self._generation += 1
            self._connected.set()
            if self._generation > 1:
                self._server = None  # maybe a restarted, or another, ComfyUI: asked again
            if self._down_timer is not None:
                self._down_timer.cancel()
                self._down_timer = None
            if self._generation > 1:  # a reconnect: events may have been missed
                for watch in list(self._watches.values()):
                    if watch.queued and not watch.done.is_set():
                        self._spawn(self._reconcile(watch))
        else:
            self._connected.clear()
            self._arm_down_timer()

    def _arm_down_timer(self) -> None:
        if self._down_timer is None:
            self._down_timer = asyncio.ensure_future(self._fail_when_down_too_long())

    async def _fail_when_down_too_long(self) -> None:
        await asyncio.sleep(self.reconnect_timeout)
        self._down_timer = None
        if not self._connected.is_set():
            self.fail_pending(
                ComfyUnavailable(
                    f"ComfyUI at {self.base_url} is unreachable: the websocket has been down "
                    f"for {self.reconnect_timeout:g} s (ComfyUI died or hangs?)",
                    {"kind": "unavailable", "url": self.base_url},
                )
            )
            self._arm_down_timer()

    async def _reconcile(self, watch: PromptWatch) -> None:
        """After a reconnect: settle from /history, or confirm ComfyUI still holds the prompt."""
        try:
            for attempt in range(3):
                if watch.done.is_set():
                    return
                where, entry = await self._locate(watch)
                if where == "finished" and entry is not None:
                    watch.apply_history(entry)
                    return
                if where == "queued":
                    return  # still pending or running: its events will come on the new socket
                if attempt < 2:
                    await asyncio.sleep(0.25)
            watch.fail(
                ComfyUnavailable(
                    f"prompt {watch.prompt_id} is lost: ComfyUI neither runs it nor has it in "
                    "its history (ComfyUI died or restarted while it was queued)",
                    {"kind": "unavailable", "url": self.base_url, "prompt_id": watch.prompt_id},
                )
            )
        except ComfyUnavailable:
            pass  # still down: the next reconnect or the down timer settles it
        except Exception:
            log.exception("reconciling prompt %s failed", watch.prompt_id)

    async def _locate(self, watch: PromptWatch) -> tuple[str, dict[str, Any] | None]:
        """Where ComfyUI has the prompt: "queued" (waiting or running), "finished" (with its
        /history entry) or "absent".

        With the job API one request answers while it is queued, and without the race of two
        (a prompt that ends between a /history and a /queue read looks absent). Anything but
        a clear queued or finished answer is checked the 0.3.64 way, so a ComfyUI whose job
        API says something unforeseen never loses a prompt for it.
        """
        if (await self.server_info()).job_api:
            status, raw = await self._request("GET", f"/api/jobs/{watch.prompt_id}")
            state = None
            if status == 200:
                with contextlib.suppress(ValueError):
                    state = as_dict(json.loads(raw)).get("status")
            if state in JOB_STATES_QUEUED:
                return "queued", None
            if state in JOB_STATES_FINISHED:
                entry = await self._get_history(watch)
                if entry is not None:
                    return "finished", entry
        entry = await self._get_history(watch)
        if entry is not None:
            return "finished", entry
        if await self._in_queue(watch.prompt_id):
            return "queued", None
        return "absent", None

    async def _get_history(self, watch: PromptWatch) -> dict[str, Any] | None:
        """This run's entry; an older run that reused the prompt id does not count."""
        body = await self._request_json("GET", f"/history/{watch.prompt_id}")
        entry = body.get(watch.prompt_id)
        if not isinstance(entry, dict):
            return None
        record = entry.get("prompt")
        stale = isinstance(record, list) and record and record[0] != watch.number
        return None if watch.number is not None and stale else entry

    async def _in_queue(self, prompt_id: str) -> bool:
        body = await self._request_json("GET", "/queue")
        for key in ("queue_running", "queue_pending"):
            for item in body.get(key) or []:
                if isinstance(item, list) and len(item) > 1 and item[1] == prompt_id:
                    return True
        return False

    async def _history_entry(self, watch: PromptWatch) -> dict[str, Any]:
        """The /history entry, read once ComfyUI has written it (briefly retried if empty)."""
        if watch.history_entry is not None:
            return watch.history_entry
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(watch.history_ready.wait(), 2.0)
        deadline = time.monotonic() + HISTORY_GRACE_S
        delay = 0.005
        while True:
            entry = await self._get_history(watch)
            if entry is not None:
                return entry
            if time.monotonic() >= deadline:
                raise ComfyUnavailable(
                    f"ComfyUI finished prompt {watch.prompt_id} but /history had no entry for "
                    f"it after {HISTORY_GRACE_S:g} s",
                    {"kind": "history_missing", "prompt_id": watch.prompt_id},
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)

    def _result(self, watch: PromptWatch, entry: dict[str, Any], include_temp: bool) -> RunResult:
        watch.apply_history(entry)  # fills timings and cached nodes from ComfyUI's record
        outputs = as_dict(entry.get("outputs"))
        files, texts = parse_outputs(outputs, include_temp)
        temp_files = (
            [] if include_temp else [f for f in parse_outputs(outputs, True)[0] if f.type == "temp"]
        )
        seconds = 0.0
        if watch.start_ms is not None and watch.end_ms is not None:
            seconds = max(0.0, (watch.end_ms - watch.start_ms) / 1000.0)
        return RunResult(
            prompt_id=watch.prompt_id,
            files=files,
            texts=texts,
            cached_nodes=list(watch.cached),
            execution_seconds=seconds,
            temp_files=temp_files,
        )

    def _runtime_error(self, prompt_id: str, data: dict[str, Any]) -> ComfyRuntimeError:
        trace = data.get("traceback") or []
        trace_text = "".join(trace) if isinstance(trace, list) else str(trace)
        node_id = data.get("node_id")
        return ComfyRuntimeError(
            prompt_id=prompt_id,
            node_id=str(node_id) if node_id is not None else None,
            node_type=data.get("node_type"),
            exception_type=str(data.get("exception_type") or "Exception"),
            exception_message=str(data.get("exception_message") or ""),
            traceback=trace_text,
        )

    async def _stop_prompt(self, watch: PromptWatch) -> None:
        """Cancel it on ComfyUI (a timed-out prompt must not keep the GPU), confirmed."""
        try:
            await self.cancel(watch.prompt_id)
        except ComfyError as error:
            log.warning("could not stop prompt %s: %s", watch.prompt_id, error)


def _nobody_there(error: aiohttp.ClientConnectorError) -> str | None:
    """Why nothing can answer at the address (refused, or no such host), or None when
    something might answer later (a timeout, a network that is unreachable for now)."""
    if isinstance(error, aiohttp.ClientConnectorDNSError):
        return f"host name {error.host!r} not found"
    if error.os_error.errno == errno.ECONNREFUSED:
        return "connection refused"
    return None
