"""Queue, executor, cache and history: the part of ComfyUI a worker talks to through events.

One prompt runs at a time in FIFO order (by `number`). Each run emits the websocket events in
the order a real ComfyUI 0.3.64 does (see recordings/), keeps ComfyUI's classic
cache (a node whose inputs, recursively, are unchanged since the previous prompt is not run
again), and writes the /history entry only `history_gap` seconds after `execution_success`,
the window in which a real client sometimes reads `{}`.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import copy
import io
import json
import logging
import os
import struct
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from .hub import PREVIEW_IMAGE, PREVIEW_IMAGE_WITH_METADATA, Hub
from .nodes import NODES, Latent, NodeContext, render_picture
from .state import FakeState
from .validation import is_link

log = logging.getLogger("fake_comfyui")

SENSITIVE_EXTRA_DATA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")


@dataclass(order=True)
class QueueItem:
    number: float
    prompt_id: str
    prompt: dict[str, Any] = field(compare=False)
    extra_data: dict[str, Any] = field(compare=False)
    outputs: list[str] = field(compare=False)
    # Today's ComfyUI keeps the API keys out of extra_data (so /queue never shows them).
    sensitive: dict[str, Any] = field(compare=False, default_factory=dict)

    def as_list(self) -> list[Any]:
        """The 5-element shape ComfyUI uses in /queue and in history `prompt`."""
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]


@dataclass
class Stats:
    executed: dict[str, int] = field(default_factory=dict)
    queued: int = 0
    rejected: int = 0
    interrupted: list[str] = field(default_factory=list)
    nodes_run: dict[str, int] = field(default_factory=dict)
    ws_drops: int = 0
    # Checkpoint loads that paid first_load_delay: {"prompt_id", "ckpt_name", "seconds"}.
    model_loads: list[dict[str, Any]] = field(default_factory=list)
    # Requests by "METHOD /route pattern" (unknown routes as "METHOD ?"), fake/ routes left out:
    # tests count what a client asks of ComfyUI (a probe once per connection, say).
    requests: dict[str, int] = field(default_factory=dict)


class Interrupted(Exception):
    """Raised at an interrupt check point, like ComfyUI's InterruptProcessingException."""


class Engine:
    def __init__(self, state: FakeState, ctx: NodeContext, hub: Hub) -> None:
        self.state = state
        self.ctx = ctx
        self.hub = hub
        self.pending: list[QueueItem] = []
        self.running: QueueItem | None = None
        self.history: dict[str, dict[str, Any]] = {}
        self.stats = Stats()
        self.number = 0  # next POST /prompt number; counts rejected prompts too, like ComfyUI
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self._wakeup = asyncio.Event()
        self._interrupt = asyncio.Event()
        self._last_gc = float("-inf")
        # ComfyUI's classic cache: signature -> node outputs / ui, kept for the previous prompt.
        self._outputs_cache: dict[str, tuple[Any, ...]] = {}
        self._ui_cache: dict[str, dict[str, Any]] = {}
        # Checkpoints held in memory, as ComfyUI's model management keeps them between prompts.
        self.loaded_checkpoints: set[str] = set()

    # --- queue -------------------------------------------------------------------------------

    def queue_remaining(self) -> int:
        return len(self.pending) + (1 if self.running else 0)

    def queue_info(self) -> dict[str, Any]:
        return {"exec_info": {"queue_remaining": self.queue_remaining()}}

    def _queue_updated(self) -> None:
        self.hub.send("status", {"status": self.queue_info()})

    def put(self, item: QueueItem) -> None:
        bisect.insort(self.pending, item)
        self.stats.queued += 1
        self._queue_updated()
        self._wakeup.set()

    def delete_pending(self, prompt_id: str) -> bool:
        for index, item in enumerate(self.pending):
            if item.prompt_id == prompt_id:
                del self.pending[index]
                self._queue_updated()
                return True
        return False

    def clear_pending(self) -> None:
        self.pending.clear()
        self._queue_updated()

    def interrupt(self, prompt_id: str | None = None) -> bool:
        """Interrupt the running prompt (any, or only `prompt_id`). True if a flag was raised."""
        if prompt_id and (self.running is None or self.running.prompt_id != prompt_id):
            return False
        self._interrupt.set()
        return True

    def stats_json(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "executed": dict(self.stats.executed),
            "queued": self.stats.queued,
            "interrupted": list(self.stats.interrupted),
            "rejected": self.stats.rejected,
            "pending": len(self.pending),
            "running": self.running.prompt_id if self.running else None,
            "nodes_run": dict(self.stats.nodes_run),
            "ws_drops": self.stats.ws_drops,
            "model_loads": [dict(load) for load in self.stats.model_loads],
            "requests": dict(self.stats.requests),
        }

    def get_history(self, max_items: int | None = None, offset: int = -1) -> dict[str, Any]:
        keys = list(self.history)
        if offset < 0 and max_items is not None:
            offset = len(keys) - max_items
        offset = max(offset, 0)
        selected = keys[offset:] if max_items is None else keys[offset : offset + max_items]
        return {key: self.history[key] for key in selected}

    async def run_forever(self) -> None:
        while True:
            while not self.pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            item = self.pending.pop(0)
            self.running = item
            self._queue_updated()
            try:
                await _PromptRun(self, item).run()
            except Exception:  # a bug in the fake must not stop the queue
                log.exception("fake executor crashed on %s", item.prompt_id)
                self.running = None
            await self._maybe_collect_garbage()

    async def _maybe_collect_garbage(self) -> None:
        """ComfyUI's periodic gc.collect() after a prompt: the next prompt waits for it."""
        now = time.monotonic()
        if self.state.gc_pause > 0 and now - self._last_gc >= self.state.gc_interval:
            self._last_gc = now
            await asyncio.sleep(self.state.gc_pause)

    # --- used by a run ----------------------------------------------------------------------

    def signatures(self, prompt: dict[str, Any]) -> dict[str, str]:
        """Cache keys: class, IS_CHANGED and inputs, with links replaced by the source's key."""
        memo: dict[str, str] = {}

        def sign(node_id: Any, seen: frozenset[Any]) -> str:
            key = str(node_id)
            if key in memo:
                return memo[key]
            node = prompt.get(node_id)
            if not isinstance(node, dict) or node_id in seen:
                return f"missing:{node_id!r}"
            definition = NODES[node["class_type"]]
            inputs = node.get("inputs", {})
            parts: list[Any] = [node["class_type"]]
            if definition.is_changed is not None:
                parts.append(definition.is_changed(self.ctx, inputs))
            for name in sorted(inputs):
                value = inputs[name]
                if is_link(value):
                    parts.append([name, "link", sign(value[0], seen | {node_id}), value[1]])
                else:
                    parts.append([name, value])
            memo[key] = json.dumps(parts, sort_keys=True, default=repr)
            return memo[key]

        return {node_id: sign(node_id, frozenset()) for node_id in prompt}

    def prune_cache(self, keep: set[str]) -> None:
        for cache in (self._outputs_cache, self._ui_cache):
            for key in [k for k in cache if k not in keep]:
                del cache[key]


class _Progress:
    """progress_state bookkeeping: every non-pending node of the run, sent on each change."""

    def __init__(self, hub: Hub, prompt_id: str, client_id: str | None) -> None:
        self.hub = hub
        self.prompt_id = prompt_id
        self.client_id = client_id
        self.nodes: dict[str, dict[str, Any]] = {}

    def start(self, node_id: str) -> None:
        self.nodes[node_id] = {"state": "running", "value": 0.0, "max": 1.0}
        self._send()

    def update(self, node_id: str, value: int, maximum: int) -> None:
        self.nodes[node_id] = {"state": "running", "value": value, "max": maximum}
        self._send()

    def finish(self, node_id: str) -> None:
        entry = self.nodes.setdefault(node_id, {"state": "pending", "value": 0, "max": 1})
        entry["state"] = "finished"
        entry["value"] = entry["max"]
        self._send()

    def _send(self) -> None:
        nodes = {
            node_id: {
                "value": entry["value"],
                "max": entry["max"],
                "state": entry["state"],
                "node_id": node_id,
                "prompt_id": self.prompt_id,
                "display_node_id": node_id,
                "parent_node_id": None,
                "real_node_id": node_id,
            }
            for node_id, entry in self.nodes.items()
        }
        self.hub.send(
            "progress_state", {"prompt_id": self.prompt_id, "nodes": nodes}, self.client_id
        )


class _Plan:
    """Which node runs next: ComfyUI's ready-set order, preferring nodes close to an output."""

    def __init__(self, prompt: dict[str, Any], outputs: list[str], cached: set[str]) -> None:
        self.prompt = prompt
        self.pending: dict[str, None] = {}
        self.blockers: dict[str, set[str]] = {}
        self.blocking: dict[str, dict[str, None]] = {}
        for output in outputs:
            self._add(output, cached)

    def _add(self, root: str, cached: set[str]) -> None:
        stack, links = [root], []
        while stack:
            node_id = stack.pop()
            if node_id in self.pending:
                continue
            self.pending[node_id] = None
            self.blockers[node_id] = set()
            self.blocking[node_id] = {}
            for value in self.prompt[node_id]["inputs"].values():
                if is_link(value) and value[0] not in cached:
                    stack.append(value[0])
                    links.append((value[0], node_id))
        for source, target in links:
            self.blocking[source][target] = None
            self.blockers[target].add(source)

    def _is_output(self, node_id: str) -> bool:
        return NODES[self.prompt[node_id]["class_type"]].output_node

    def next(self) -> str | None:
        ready = [n for n in self.pending if not self.blockers[n]]
        if not ready:
            return None
        for node_id in ready:
            if self._is_output(node_id):
                return node_id
        for node_id in ready:
            if any(self._is_output(d) for d in self.blocking[node_id]):
                return node_id
        for node_id in ready:
            for down in self.blocking[node_id]:
                if any(self._is_output(d) for d in self.blocking[down]):
                    return node_id
        return ready[0]

    def done(self, node_id: str) -> None:
        del self.pending[node_id]
        for target in self.blocking.pop(node_id):
            self.blockers[target].discard(node_id)


def _save_prefixes(prompt: dict[str, Any]) -> list[str]:
    """The filename_prefix of every node that has one: comfys3 puts the job id in it."""
    found = []
    for node in prompt.values():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if isinstance(inputs, dict) and isinstance(inputs.get("filename_prefix"), str):
            found.append(inputs["filename_prefix"])
    return found


def _format_value(value: Any) -> Any:
    if value is None or isinstance(value, int | float | bool | str):
        return value
    return str(value)


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )


class _PromptRun:
    def __init__(self, engine: Engine, item: QueueItem) -> None:
        self.engine = engine
        self.hub = engine.hub
        self.state = engine.state
        self.item = item
        self.prompt = item.prompt
        self.prompt_id = item.prompt_id
        self.client_id: str | None = item.extra_data.get("client_id")
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self.executed: list[str] = []
        self.emitted: set[str] = set()  # nodes whose `executed` went out in this run
        self.progress = _Progress(self.hub, self.prompt_id, self.client_id)
        self.inputs: dict[str, Any] = {}  # of the node being run, for execution_error
        self.delay_share = 0.0

    def _message(self, event: str, data: dict[str, Any], broadcast: bool = False) -> None:
        data = {**data, "timestamp": int(time.time() * 1000)}
        self.messages.append((event, data))
        if self.client_id is not None or broadcast:
            self.hub.send(event, data, self.client_id)

    def _to_client(self, event: str, data: dict[str, Any]) -> None:
        if self.client_id is not None:
            self.hub.send(event, data, self.client_id)

    async def run(self) -> None:
        engine, stats = self.engine, self.engine.stats
        engine._interrupt.clear()
        engine.client_id = self.client_id
        stats.executed[self.prompt_id] = stats.executed.get(self.prompt_id, 0) + 1
        self._record("start", prefixes=_save_prefixes(self.prompt))
        self._message("execution_start", {"prompt_id": self.prompt_id})

        signatures = engine.signatures(self.prompt)
        engine.prune_cache(set(signatures.values()))
        cached = {n for n in self.prompt if signatures[n] in engine._outputs_cache}
        self._message(
            "execution_cached",
            {"nodes": [n for n in self.prompt if n in cached], "prompt_id": self.prompt_id},
        )
        plan = _Plan(self.prompt, self.item.outputs, cached)
        self.delay_share = self._delay_share(plan, cached)
        success = True
        while (node_id := plan.next()) is not None:
            try:
                await self._execute(node_id, signatures, node_id in cached)
            except Interrupted:
                success = False
                stats.interrupted.append(self.prompt_id)
                self._message(
                    "execution_interrupted",
                    {
                        "prompt_id": self.prompt_id,
                        "node_id": node_id,
                        "node_type": self.prompt[node_id]["class_type"],
                        "executed": list(self.executed),
                    },
                    broadcast=True,
                )
                break
            except Exception as exc:
                success = False
                self._report_error(node_id, exc, signatures)
                break
            plan.done(node_id)
        if success:
            if self.state.current:
                self._replay_intermediate_outputs(signatures)
            self._message("execution_success", {"prompt_id": self.prompt_id})
        self._record("end", success=success)

        outputs, meta = {}, {}
        for node_id in self.prompt:
            ui = engine._ui_cache.get(signatures[node_id])
            if ui is not None:
                outputs[node_id] = self._with_assets(ui)
                meta[node_id] = {
                    "node_id": node_id,
                    "display_node": node_id,
                    "parent_node": None,
                    "real_node_id": node_id,
                }
        engine.last_node_id = None
        # The gap a real client sometimes falls into: success is on the wire, history is not.
        await asyncio.sleep(self.state.history_gap)
        extra = {
            k: v for k, v in self.item.extra_data.items() if k not in SENSITIVE_EXTRA_DATA_KEYS
        }
        prompt_record = [self.item.number, self.prompt_id, self.prompt, extra, self.item.outputs]
        engine.history[self.prompt_id] = {
            "prompt": prompt_record,
            "outputs": outputs,
            "status": {
                "status_str": "success" if success else "error",
                "completed": success,
                "messages": [[event, data] for event, data in self.messages],
            },
            "meta": meta,
        }
        engine.running = None
        engine._queue_updated()
        self._to_client("executing", {"node": None, "prompt_id": self.prompt_id})
        log.info("Prompt %s executed (%s)", self.prompt_id, "success" if success else "error")

    def _replay_intermediate_outputs(self, signatures: dict[str, str]) -> None:
        """Today's ComfyUI, after a successful run, sends `executed` again for every
        HAS_INTERMEDIATE_OUTPUT node that did not run (it came from cache), so a client that
        only listens sees its preview too."""
        for node_id in self.prompt:
            if node_id in self.executed or node_id in self.emitted:
                continue
            if not NODES[self.prompt[node_id]["class_type"]].intermediate_output:
                continue
            ui = self.engine._ui_cache.get(signatures[node_id])
            if ui is not None:
                self._send_executed(node_id, ui)

    def _send_executed(self, node_id: str, ui: dict[str, Any] | None) -> None:
        self.emitted.add(node_id)
        self._to_client(
            "executed",
            {
                "node": node_id,
                "display_node": node_id,
                "output": self._with_assets(ui) if ui is not None else None,
                "prompt_id": self.prompt_id,
            },
        )

    def _with_assets(self, ui: dict[str, Any]) -> dict[str, Any]:
        """With the assets knob (current protocol), each output file entry gets the asset `id`
        ComfyUI registers it under, and images their own `preview_id`. The id is derived from
        the file's path, so a cached replay of the same file names the same asset."""
        if not (self.state.current and self.state.assets):
            return ui
        enriched = copy.deepcopy(ui)
        bases = {"output": self.engine.ctx.output_dir, "temp": self.engine.ctx.temp_dir}
        for entries in enriched.values():
            if not isinstance(entries, list):
                continue
            for entry in entries:
                if not (isinstance(entry, dict) and "filename" in entry and "type" in entry):
                    continue
                base = bases.get(entry["type"], self.engine.ctx.input_dir)
                path = (base / (entry.get("subfolder") or "") / entry["filename"]).resolve()
                if not path.is_file():
                    continue
                entry["id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, path.as_uri()))
                if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".gif"):
                    entry["preview_id"] = entry["id"]
        return enriched

    def _record(self, event: str, **fields: Any) -> None:
        """One line in the exec_log file (if set): it outlives the process, stats do not."""
        path = self.state.exec_log
        if not path:
            return
        line = {"t": time.time(), "event": event, "prompt_id": self.prompt_id, **fields}
        with open(path, "a", encoding="utf-8") as handle:  # one write: a line is never torn
            handle.write(json.dumps(line) + "\n")

    def _delay_share(self, plan: _Plan, cached: set[str]) -> float:
        units = 0
        for node_id in plan.pending:
            if node_id in cached:
                continue
            definition = NODES[self.prompt[node_id]["class_type"]]
            steps = self.prompt[node_id]["inputs"].get(definition.steps_input or "", 1)
            units += max(int(steps), 1) if isinstance(steps, int) else 1
        return self.state.exec_delay / units if units else 0.0

    async def _pause(self, extra: float = 0.0) -> None:
        """Spend this unit's share of exec_delay (plus `extra`, a sampler step's step_delay);
        an interrupt cuts the wait short."""
        seconds = self.delay_share + extra
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.engine._interrupt.wait(), seconds)

    def _check_interrupt(self) -> None:
        if self.engine._interrupt.is_set():
            raise Interrupted()

    async def _execute(self, node_id: str, signatures: dict[str, str], is_cached: bool) -> None:
        node = self.prompt[node_id]
        definition = NODES[node["class_type"]]
        signature = signatures[node_id]
        if is_cached:
            self._send_executed(node_id, self.engine._ui_cache.get(signature))
            self.progress.finish(node_id)
            return

        self.progress.start(node_id)
        self.engine.last_node_id = node_id
        self._to_client(
            "executing", {"node": node_id, "display_node": node_id, "prompt_id": self.prompt_id}
        )
        self.inputs = {}
        kwargs = self.inputs = self._gather_inputs(node_id, signatures)
        await self._apply_knobs(node_id)

        await self._load_model(definition.name, kwargs)
        steps = kwargs.get(definition.steps_input) if definition.steps_input else None
        self._check_interrupt()
        if isinstance(steps, int):
            for step in range(1, steps + 1):
                await self._pause(self.state.step_delay)
                self._check_interrupt()
                self._step_progress(node_id, step, steps, kwargs)
        else:
            await self._pause()
        result = await asyncio.to_thread(definition.function, self.engine.ctx, kwargs)
        self.engine.stats.nodes_run[definition.name] = (
            self.engine.stats.nodes_run.get(definition.name, 0) + 1
        )

        if result.ui:
            self.engine._ui_cache[signature] = result.ui
            self._send_executed(node_id, result.ui)
        self.engine._outputs_cache[signature] = result.outputs
        self.progress.finish(node_id)
        self.executed.append(node_id)

    async def _load_model(self, class_type: str, kwargs: dict[str, Any]) -> None:
        """The first load of a checkpoint in this process pays ``first_load_delay`` (reading
        weights from disk); ComfyUI keeps it loaded, so later prompts do not pay it again."""
        if class_type != "CheckpointLoaderSimple":
            return
        name = str(kwargs.get("ckpt_name"))
        if name in self.engine.loaded_checkpoints:
            return
        delay = self.state.first_load_delay
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.engine._interrupt.wait(), delay)
            self._check_interrupt()  # an interrupted load leaves nothing loaded
        self.engine.loaded_checkpoints.add(name)
        self.engine.stats.model_loads.append(
            {"prompt_id": self.prompt_id, "ckpt_name": name, "seconds": delay}
        )

    def _gather_inputs(self, node_id: str, signatures: dict[str, str]) -> dict[str, Any]:
        node = self.prompt[node_id]
        declared = NODES[node["class_type"]].input_types(self.engine.ctx)
        names = [*declared.get("required", {}), *declared.get("optional", {})]
        kwargs: dict[str, Any] = {}
        for name in names:
            if name not in node["inputs"]:
                continue
            value = node["inputs"][name]
            if is_link(value):
                source_outputs = self.engine._outputs_cache[signatures[value[0]]]
                value = source_outputs[value[1]]
            kwargs[name] = value
        return kwargs

    async def _apply_knobs(self, node_id: str) -> None:
        state = self.state
        if state.die_at_node == node_id:
            marker = Path(state.die_marker) if state.die_marker else None
            if marker is None or not marker.exists():
                if marker is not None:
                    marker.touch()
                await self.hub.drain()
                print(f"fake ComfyUI: dying at node {node_id} (die_at_node)", flush=True)
                sys.stderr.flush()
                os._exit(state.die_exit_code)
        if state.drop_ws_at_node == node_id:
            state.drop_ws_at_node = None
            self.engine.stats.ws_drops += 1
            await self.hub.close_all()
        if state.fail_at_node == node_id and state.fail_times != 0:
            if state.fail_times is not None:
                state.fail_times -= 1
            raise RuntimeError(state.fail_message)

    def _step_progress(self, node_id: str, step: int, steps: int, kwargs: dict[str, Any]) -> None:
        self.progress.update(node_id, step, steps)
        metadata_client = self.hub.supports(self.client_id, "supports_preview_metadata")
        preview = self._preview_jpeg(kwargs, step) if self.state.preview_frames else None
        if preview is not None and metadata_client:
            meta = json.dumps(
                {
                    "node_id": node_id,
                    "prompt_id": self.prompt_id,
                    "display_node_id": node_id,
                    "parent_node_id": None,
                    "real_node_id": node_id,
                    "image_type": "image/jpeg",
                }
            ).encode()
            self.hub.send(
                PREVIEW_IMAGE_WITH_METADATA,
                struct.pack(">I", len(meta)) + meta + preview,
                self.client_id,
            )
        self.hub.send(
            "progress",
            {"value": step, "max": steps, "prompt_id": self.prompt_id, "node": node_id},
            self.client_id,
        )
        if preview is not None and not metadata_client:
            self.hub.send(PREVIEW_IMAGE, struct.pack(">I", 1) + preview, self.client_id)

    def _preview_jpeg(self, kwargs: dict[str, Any], step: int) -> bytes:
        latent = kwargs.get("latent_image")
        width, height = (latent.width, latent.height) if isinstance(latent, Latent) else (64, 64)
        scale = min(1.0, 512 / max(width, height, 1))
        picture: Image.Image = render_picture(
            int(kwargs.get("seed", 0)) + step,
            "preview",
            max(1, int(width * scale)),
            max(1, int(height * scale)),
            0,
        )
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=95)
        return buffer.getvalue()

    def _report_error(self, node_id: str, exc: Exception, signatures: dict[str, str]) -> None:
        log.error("!!! Exception during processing !!! %s", exc)
        inputs = self.inputs
        self._message(
            "execution_error",
            {
                "prompt_id": self.prompt_id,
                "node_id": node_id,
                "node_type": self.prompt[node_id]["class_type"],
                "executed": list(self.executed),
                "exception_message": f"{exc}\n",
                "exception_type": _type_name(exc),
                "traceback": traceback.format_tb(exc.__traceback__),
                "current_inputs": {k: [_format_value(v)] for k, v in inputs.items()},
                "current_outputs": list(self.prompt),
            },
        )
