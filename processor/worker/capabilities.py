"""What this worker's ComfyUI can run, so a manifest it cannot run is left for one that can.

Workers sharing a bucket need not be alike: one has the Flux nodes and models, another only
SD1.5. A worker learns what its ComfyUI offers from ``GET /object_info`` (once at start, and
again after ComfyUI comes back from a restart): the node types, and for each loader input the
model files it accepts (the choices of that input). A job needs

- every node type of its graph;
- every model file its graph names in a loader input (a value ending in ``.safetensors``,
  ``.ckpt`` ...), unless the manifest names it in ``models`` (it will be fetched, if this worker
  keeps a model cache) or the cache already holds it.

What is missing is a :class:`Lack`; :mod:`processor.worker.loop` leaves such a manifest for
another worker, and fails it, naming what is missing, once no worker took it in
``COMFYS3_CAPABILITY_WAIT`` seconds. When ``/object_info`` cannot be read, nothing is filtered:
ComfyUI's own validation then says what is wrong, as before.
"""

from __future__ import annotations

import asyncio
import difflib
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from processor.job.manifest import Job
from processor.logsafe import printable_logger
from processor.models.cache import ModelCache

log = printable_logger("comfys3.worker")

MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".sft", ".onnx")
REFRESH_PAUSE = 30.0  # seconds between tries to read /object_info while it fails
MAX_SHOWN = 5  # close matches named in a message


def _choices(spec: Any) -> list[str] | None:
    """The choices of a combo input spec: ``[["a", "b"], {...}]`` (0.3.64) or
    ``["COMBO", {"options": [...]}]`` (current ComfyUI); None for any other input."""
    if not isinstance(spec, list | tuple) or not spec:
        return None
    first = spec[0]
    if isinstance(first, list):
        return [str(item) for item in first]
    if first == "COMBO" and len(spec) > 1 and isinstance(spec[1], Mapping):
        options = spec[1].get("options")
        if isinstance(options, list):
            return [str(item) for item in options]
    return None


def is_model_file(value: object) -> bool:
    return isinstance(value, str) and value.lower().endswith(MODEL_EXTENSIONS)


@dataclass(frozen=True)
class Capabilities:
    """Node types a ComfyUI offers, and the model files each loader input accepts."""

    nodes: frozenset[str]
    models: Mapping[str, Mapping[str, frozenset[str]]]  # node type -> input -> files

    @classmethod
    def from_object_info(cls, info: Mapping[str, Any]) -> Capabilities:
        models: dict[str, dict[str, frozenset[str]]] = {}
        for node_type, entry in info.items():
            inputs = entry.get("input") if isinstance(entry, Mapping) else None
            if not isinstance(inputs, Mapping):
                continue
            for group in ("required", "optional"):
                specs = inputs.get(group)
                if not isinstance(specs, Mapping):
                    continue
                for name, spec in specs.items():
                    choices = _choices(spec)
                    # A loader input: its choices are files (an empty folder lists none).
                    if choices is not None and (
                        not choices or any(is_model_file(c) for c in choices)
                    ):
                        models.setdefault(node_type, {})[name] = frozenset(choices)
        return cls(frozenset(info), models)


@dataclass(frozen=True)
class Lack:
    """What a manifest needs that this worker lacks."""

    nodes: tuple[str, ...] = ()
    models: tuple[str, ...] = ()  # "CheckpointLoaderSimple.ckpt_name = x.safetensors"
    hints: tuple[str, ...] = ()  # close matches among what this worker has
    no_cache: bool = False  # the manifest names models, and this worker keeps no cache

    def describe(self) -> str:
        parts = []
        if self.nodes:
            parts.append(f"node types {', '.join(self.nodes)}")
        if self.models:
            parts.append(f"models {', '.join(self.models)}")
        if self.no_cache:
            parts.append("a model cache to fetch its models into (COMFYS3_MODEL_CACHE)")
        text = "needs " + "; ".join(parts)
        if self.hints:
            text += f" (this worker has {'; '.join(self.hints)})"
        return text

    def details(self) -> dict[str, Any]:
        return {
            "missing_node_types": list(self.nodes),
            "missing_models": list(self.models),
            "needs_model_cache": self.no_cache,
        }


def lacking(
    capabilities: Capabilities, jobs: Iterable[Job], cache: ModelCache | None
) -> Lack | None:
    """What the jobs need that this worker lacks, or None when it can run them all."""
    nodes: dict[str, None] = {}
    models: dict[str, None] = {}
    hints: dict[str, None] = {}
    no_cache = False
    for job in jobs:
        if job.models and cache is None:
            no_cache = True
        fetched = {model.file_name for model in job.models}
        staged = {(t.node, t.input) for item in job.inputs for t in item.targets}
        for node_id, node in job.graph.items():
            node_type = node.get("class_type") if isinstance(node, Mapping) else None
            if not isinstance(node_type, str):
                continue  # ComfyUI's validation names a node without a type
            if node_type not in capabilities.nodes:
                nodes[node_type] = None
                continue
            loaders = capabilities.models.get(node_type, {})
            inputs = node.get("inputs")
            for name, value in (inputs if isinstance(inputs, Mapping) else {}).items():
                offered = loaders.get(name)
                if offered is None or not is_model_file(value) or (node_id, name) in staged:
                    continue
                if value in offered or value in fetched or (cache and cache.has(value)):
                    continue
                models[f"{node_type}.{name} = {value}"] = None
                close = difflib.get_close_matches(value, sorted(offered), n=MAX_SHOWN)
                if close:
                    hints[f"{node_type}.{name}: {', '.join(close)}"] = None
    if not nodes and not models and not no_cache:
        return None
    return Lack(tuple(nodes), tuple(models), tuple(hints), no_cache)


class CapabilityWatch:
    """This worker's :class:`Capabilities`, read from its ComfyUI once per connection (a
    restarted ComfyUI may offer other nodes and models)."""

    def __init__(self, comfy: Any, cache: ModelCache | None) -> None:
        self.comfy = comfy
        self.cache = cache
        self._known: Capabilities | None = None
        self._generation: int | None = None
        self._failed_at = float("-inf")
        self._lock = asyncio.Lock()

    async def current(self) -> Capabilities | None:
        """What ComfyUI offers now, or None when it cannot be told (nothing is filtered)."""
        generation = getattr(self.comfy, "generation", None)
        fetch = getattr(self.comfy, "object_info", None)
        if generation is None or fetch is None:
            return None  # a stand-in for ComfyUI that cannot say
        async with self._lock:
            if self._known is not None and self._generation == generation:
                return self._known
            if time.monotonic() - self._failed_at < REFRESH_PAUSE:
                return None
            try:
                info = await fetch()
                known = Capabilities.from_object_info(info)
            except Exception as error:  # unknown is not a reason to refuse work
                self._failed_at = time.monotonic()
                log.warning("could not read ComfyUI's /object_info: %s", error)
                return None
            self._known, self._generation = known, generation
            log.info(
                "ComfyUI offers %d node types and %d model inputs",
                len(known.nodes),
                sum(len(inputs) for inputs in known.models.values()),
            )
            return known

    async def lacking(self, jobs: Iterable[Job]) -> Lack | None:
        jobs = list(jobs)
        if not jobs:
            return None
        capabilities = await self.current()
        if capabilities is None:
            if any(job.models for job in jobs) and self.cache is None:
                return Lack(no_cache=True)
            return None
        lack = lacking(capabilities, jobs, self.cache)
        if lack is not None and lack.nodes:
            present = await self._confirm_absent(lack.nodes)
            if present:
                lack = lacking(self._with_nodes(capabilities, present), jobs, self.cache)
        return lack

    async def _confirm_absent(self, node_types: Iterable[str]) -> set[str]:
        """Of node types missing from /object_info, those ComfyUI has after all (their
        description failed to build when the catalogue was read); remembered per connection."""
        has_node = getattr(self.comfy, "has_node", None)
        if has_node is None:
            return set()
        present = set()
        for node_type in node_types:
            try:
                found = await has_node(node_type)
            except Exception as error:  # cannot tell: do not refuse the job for it
                log.warning("could not ask ComfyUI about node type %s: %s", node_type, error)
                found = True
            if found:
                log.info("ComfyUI has node type %s, though /object_info left it out", node_type)
                present.add(node_type)
        return present

    def _with_nodes(self, capabilities: Capabilities, present: set[str]) -> Capabilities:
        known = Capabilities(capabilities.nodes | present, capabilities.models)
        if self._known is capabilities:
            self._known = known
        return known
