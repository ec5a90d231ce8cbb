"""ComfyUI client: upload inputs, queue prompts, follow them, collect their outputs.

One client holds one HTTP session and one websocket for its whole life. The socket is open
before the first prompt is queued, and events are kept per prompt from the moment it is
queued, so the pipeline can queue job N+1 while it waits for job N and lose nothing.
Completion comes from the socket (no polling); /history is read once per prompt, after
ComfyUI says it is written, and is the source of truth for outputs and timings.
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
from processor.comfy.node_errors import as_dict, validation_error
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
    "RunResult",
    "sniff_content_type",
]

log = logging.getLogger(__name__)

# How long /history may stay empty after success before it is an error. ComfyUI writes the
# entry right after execution_success; a GC pause (~0.3 s) or a busy machine delays it.
HISTORY_GRACE_S = 30.0
# After an interrupt, how long to wait for ComfyUI to confirm it stopped the prompt.
INTERRUPT_GRACE_S = 10.0


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
    kind: str  # the /history key: "images", "gifs", "audio", "video", ...
    filename: str
    subfolder: str
    type: str  # "output" | "temp"


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
    (b"ftypavif", 4, "image/avif"),
    (b"ftypheic", 4, "image/heic"),
    (b"ftypisom", 4, "video/mp4"),
    (b"ftypmp42", 4, "video/mp4"),
    (b"\x1aE\xdf\xa3", 0, "video/webm"),
    (b"OggS", 0, "audio/ogg"),
    (b"fLaC", 0, "audio/flac"),
    (b"ID3", 0, "audio/mpeg"),
]


def sniff_content_type(data: bytes) -> str:
    """Content type from the bytes themselves: a manifest's file name may lie."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "audio/wav"
    for magic, offset, content_type in _MAGIC:
        if data[offset : offset + len(magic)] == magic:
            return content_type
    return "application/octet-stream"


def parse_outputs(
    outputs: dict[str, Any], include_temp: bool
) -> tuple[list[OutputFile], dict[str, list[str]]]:
    """Every file-like entry of every node (any kind), and the strings as text outputs."""
    files: list[OutputFile] = []
    texts: dict[str, list[str]] = {}
    wanted = {"output", "temp"} if include_temp else {"output"}
    for node_id in sorted(outputs, key=lambda n: (0, int(n), "") if n.isdigit() else (1, 0, n)):
        node_outputs = outputs[node_id]
        if not isinstance(node_outputs, dict):
            continue
        for kind, items in node_outputs.items():
            if not isinstance(items, list):
                continue
            for item in items:
                if isinstance(item, dict) and isinstance(item.get("filename"), str):
                    file_type = str(item.get("type") or "output")
                    if file_type in wanted:
                        files.append(
                            OutputFile(
                                node_id=str(node_id),
                                kind=str(kind),
                                filename=item["filename"],
                                subfolder=str(item.get("subfolder") or ""),
                                type=file_type,
                            )
                        )
                elif isinstance(item, str):
                    texts.setdefault(str(node_id), []).append(item)
    return files, texts


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
                    state.ready = True
                    return stats
                if stats is not None:
                    last_error = "/system_stats answered but the websocket did not connect"
                state.detail = last_error
                state.failed = True  # deadline and detail are this try's: worth showing now
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

    async def queue_prompt(self, graph: dict[str, Any], prompt_id: str) -> None:
        """Queue ``graph`` under ``prompt_id``; its events are kept until someone waits."""
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
        if isinstance(body, dict) and body.get("node_errors"):
            log.warning("prompt %s queued with node errors: %s", prompt_id, body["node_errors"])
        if isinstance(body, dict) and isinstance(body.get("number"), int | float):
            watch.number = body["number"]
        watch.queued = True
        if self._generation != generation:
            # The socket reconnected while we posted: events may be lost, ask /history.
            self._spawn(self._reconcile(watch))

    async def wait_for(
        self,
        prompt_id: str,
        *,
        timeout: float,
        on_progress: Callable[[Progress], None] | None = None,
        include_temp: bool = False,
    ) -> RunResult:
        """Follow a queued prompt to its end; ``timeout`` counts from this call."""
        watch = self._watches.get(prompt_id)
        if watch is None:
            watch = PromptWatch.for_graph(prompt_id, None)
            watch.queued = True
            self._watches[prompt_id] = watch
            self._spawn(self._reconcile(watch))  # it may be over already
        watch.on_progress = on_progress
        try:
            try:
                await asyncio.wait_for(watch.done.wait(), timeout)
            except TimeoutError:
                await self._stop_prompt(watch)
                raise ComfyTimeout(
                    f"prompt {prompt_id} timed out after {timeout:g} s and was interrupted",
                    {"kind": "timeout", "prompt_id": prompt_id, "timeout_s": timeout},
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

    async def interrupt(self, prompt_id: str | None = None) -> None:
        """Stop ``prompt_id`` if it runs and drop it if it waits; no id stops whatever runs."""
        body = {"prompt_id": prompt_id} if prompt_id else {}
        await self._request("POST", "/interrupt", json=body)
        if prompt_id:
            await self._request("POST", "/queue", json={"delete": [prompt_id]})

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
                entry = await self._get_history(watch)
                if entry:
                    watch.apply_history(entry)
                    return
                if await self._in_queue(watch.prompt_id):
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
        """Interrupt it (or drop it from the queue) and give ComfyUI a moment to confirm."""
        try:
            await self.interrupt(watch.prompt_id)
        except ComfyError as error:
            log.warning("could not interrupt prompt %s: %s", watch.prompt_id, error)
            return
        with contextlib.suppress(ComfyError):
            if not await self._in_queue(watch.prompt_id):
                return  # it was still waiting and is now deleted, or it is already over
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(watch.done.wait(), INTERRUPT_GRACE_S)


def _nobody_there(error: aiohttp.ClientConnectorError) -> str | None:
    """Why nothing can answer at the address (refused, or no such host), or None when
    something might answer later (a timeout, a network that is unreachable for now)."""
    if isinstance(error, aiohttp.ClientConnectorDNSError):
        return f"host name {error.host!r} not found"
    if error.os_error.errno == errno.ECONNREFUSED:
        return "connection refused"
    return None
