"""ComfyUI's websocket, read on a thread, and the per-prompt state it feeds.

Why a thread: websocket-client is blocking, and one socket per client must stay open for the
client's whole life so that prompts queued ahead are followed from their first event. The
thread only decodes JSON and hands each message to the event loop with call_soon_threadsafe;
every decision (routing, progress, completion) happens on the loop, single-threaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import websocket

from processor.comfy.node_errors import as_dict
from processor.errors import ComfyError

log = logging.getLogger(__name__)

END_EVENTS = ("execution_success", "execution_error", "execution_interrupted")


class SocketListener:
    """Keeps one websocket to ComfyUI open, reconnecting with backoff until stopped.

    ``on_message`` gets every decoded JSON message; ``on_state(True)`` after the first message
    of a new connection (ComfyUI's greeting ``status``, sent once the socket is registered, so
    events of prompts queued after it reach us), ``on_state(False)`` when it drops.
    """

    def __init__(
        self,
        url: str,
        loop: asyncio.AbstractEventLoop,
        on_message: Callable[[dict[str, Any]], None],
        on_state: Callable[[bool], None],
        *,
        initial_backoff: float = 0.05,
        max_backoff: float = 2.0,
    ) -> None:
        self._url = url
        self._loop = loop
        self._on_message = on_message
        self._on_state = on_state
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._ws: websocket.WebSocket | None = None
        self._thread = threading.Thread(target=self._run, name="comfyui-ws", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end; it wakes from a blocking recv because the socket is aborted."""
        self._stop.set()
        self.drop()

    def drop(self) -> None:
        """Abort the current connection (the thread reconnects unless stopped)."""
        with self._lock:
            ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                ws.abort()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _post(self, func: Callable[..., None], *args: Any) -> bool:
        try:
            self._loop.call_soon_threadsafe(func, *args)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self._stop.set()
            return False
        return True

    def _run(self) -> None:
        backoff = self._initial_backoff
        while not self._stop.is_set():
            try:
                ws = websocket.create_connection(
                    self._url, timeout=10, skip_utf8_validation=True, enable_multithread=True
                )
            except Exception as error:
                log.debug("websocket connect to %s failed: %s", self._url, error)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self._max_backoff)
                continue
            with self._lock:
                self._ws = ws
            if self._stop.is_set():
                ws.shutdown()
                break
            ws.settimeout(None)
            backoff = self._initial_backoff
            announced = False
            try:
                while not self._stop.is_set():
                    opcode, data = ws.recv_data()
                    if opcode == websocket.ABNF.OPCODE_CLOSE:
                        break
                    if opcode != websocket.ABNF.OPCODE_TEXT:
                        continue  # binary preview frames: nothing a batch worker needs
                    try:
                        message = json.loads(data)
                    except ValueError:
                        continue
                    if not announced:
                        announced = True
                        if not self._post(self._on_state, True):
                            break
                    if isinstance(message, dict) and not self._post(self._on_message, message):
                        break
            except Exception as error:
                log.debug("websocket %s dropped: %s", self._url, error)
            finally:
                with self._lock:
                    self._ws = None
                with contextlib.suppress(Exception):
                    ws.shutdown()
                if announced:
                    self._post(self._on_state, False)


@dataclass
class PromptWatch:
    """Everything known about one prompt, built from its events (or its /history entry)."""

    prompt_id: str
    node_types: dict[str, str] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    queued: bool = False
    started: bool = False  # ComfyUI began executing it (any execution event seen)
    started_at: float | None = None  # when that was first seen (loop time)
    number: float | None = None  # POST /prompt's queue number, also stored in /history
    cached: list[str] = field(default_factory=list)
    node_fraction: dict[str, float] = field(default_factory=dict)
    current_node: str | None = None
    current_value: int = 0
    current_max: int = 1
    start_ms: int | None = None
    end_ms: int | None = None
    outcome: tuple[str, dict[str, Any]] | None = None
    failure: ComfyError | None = None
    history_entry: dict[str, Any] | None = None
    on_progress: Callable[[Any], None] | None = None
    last_fraction: float = 0.0
    done: asyncio.Event = field(default_factory=asyncio.Event)
    history_ready: asyncio.Event = field(default_factory=asyncio.Event)
    began: asyncio.Event = field(default_factory=asyncio.Event)  # set with ``started``

    @classmethod
    def for_graph(cls, prompt_id: str, graph: dict[str, Any] | None) -> PromptWatch:
        """Node types name nodes in progress; a sampler's step count weighs its share."""
        watch = cls(prompt_id)
        for node_id, node in (graph or {}).items():
            if not isinstance(node, dict):
                continue
            watch.node_types[str(node_id)] = str(node.get("class_type", ""))
            steps = (node.get("inputs") or {}).get("steps")
            weight = float(steps) if isinstance(steps, int) and steps > 1 else 1.0
            watch.weights[str(node_id)] = weight
        return watch

    def fail(self, error: ComfyError) -> None:
        if not self.done.is_set():
            self.failure = error
            self.done.set()

    def finish(self, kind: str, data: dict[str, Any]) -> None:
        if self.done.is_set():
            return
        self.outcome = (kind, data)
        timestamp = data.get("timestamp")
        if isinstance(timestamp, int | float):
            self.end_ms = int(timestamp)
        self.done.set()

    def handle(self, kind: str, data: dict[str, Any]) -> bool:
        """Apply one event; True when progress moved enough to tell the callback."""
        starts = ("execution_start", "execution_cached", "executing", "progress")
        if kind in starts and not self.started:
            self.started = True
            self.started_at = asyncio.get_running_loop().time()
            self.began.set()
        if kind == "execution_start":
            timestamp = data.get("timestamp")
            if isinstance(timestamp, int | float):
                self.start_ms = int(timestamp)
            return False
        if kind == "execution_cached":
            self.cached = [str(n) for n in data.get("nodes") or []]
            return False
        if kind == "executing":
            node = data.get("node")
            if node is None:
                self.history_ready.set()
                return False
            self.current_node = str(node)
            self.current_value, self.current_max = 0, 1
            self.node_fraction.setdefault(self.current_node, 0.0)
            return True
        if kind == "progress":
            node = data.get("node")
            value, maximum = data.get("value"), data.get("max")
            if node is None or not isinstance(value, int | float) or not maximum:
                return False
            self.current_node = str(node)
            self.current_value, self.current_max = int(value), int(maximum)
            self.node_fraction[self.current_node] = min(1.0, float(value) / float(maximum))
            return True
        if kind == "progress_state":
            before = self.estimate()
            for node_id, state in (data.get("nodes") or {}).items():
                if not isinstance(state, dict):
                    continue
                if state.get("state") == "finished":
                    self.node_fraction[str(node_id)] = 1.0
                    if str(node_id) == self.current_node:
                        self.current_value = self.current_max
                elif state.get("max"):
                    fraction = float(state.get("value") or 0) / float(state["max"])
                    self.node_fraction[str(node_id)] = min(1.0, fraction)
            return self.estimate() > before
        if kind in END_EVENTS:
            self.finish(kind, data)
            return False
        return False

    def estimate(self) -> float:
        """Weighted share of the nodes that will run (cached ones never do), below 1 until done."""
        cached = set(self.cached)
        if self.weights:
            todo = {n: w for n, w in self.weights.items() if n not in cached}
        else:
            todo = {n: 1.0 for n in self.node_fraction if n not in cached}
        total = sum(todo.values())
        if total <= 0:
            return self.last_fraction
        done = sum(self.node_fraction.get(n, 0.0) * w for n, w in todo.items())
        return min(0.99, done / total)

    def apply_history(self, entry: dict[str, Any]) -> None:
        """Complete the watch from /history, for events lost while the socket was down."""
        self.history_entry = entry
        self.history_ready.set()
        status = as_dict(entry.get("status"))
        messages = status.get("messages") or []
        end: tuple[str, dict[str, Any]] | None = None
        for item in messages:
            if not (isinstance(item, list | tuple) and len(item) == 2):
                continue
            kind, data = item[0], as_dict(item[1])
            if kind in ("execution_start", "execution_cached"):
                self.handle(str(kind), data)
            elif kind in END_EVENTS:
                end = (str(kind), data)
        if end is None:
            kind = "execution_success" if status.get("status_str", "success") == "success" else ""
            end = (kind or "execution_error", {"prompt_id": self.prompt_id})
        self.finish(*end)
