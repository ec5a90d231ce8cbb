"""A workflow template from a user's own ComfyUI graph (the editor's "Export (API)").

Users arrive with a graph they built in the editor, not with a template. This module reads that
graph and proposes a payload: one field per value a person would vary from job to job (prompts,
seeds, steps, cfg, sampler and scheduler, denoise, image size, model files, LoRA strengths,
input images), each with the graph's own value as its default and a ``Bind`` to its node and
input, so the empty payload runs the graph exactly as the user saved it. Everything else stays
fixed in the graph and is listed, so the user sees what they could still expose by hand.

Pure functions only: graph (and optionally ComfyUI's ``/object_info``) -> :class:`Plan` -> the
text of ``NAME.json`` and ``NAME.py``. Reading files, fetching ``/object_info`` and printing
belong to the command (``comfys3 template new``).
"""

from __future__ import annotations

import heapq
import json
import keyword
import math
import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from processor.errors import Comfys3Error, JsonLimitError
from processor.safejson import load_json
from processor.workflows import SAVE_PREFIX_INPUT, Graph, WorkflowPayload

MAX_LINE = 100
TEMPLATE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
# Names a field may not take: pydantic's own attributes, and its protected ``model_`` prefix.
RESERVED = frozenset(dir(WorkflowPayload))
UI_FORMAT_HELP = (
    "it is the editor's normal save (UI format, with 'nodes' and 'links'); comfys3 needs the "
    "API format: in ComfyUI open the Workflow menu and choose 'Export (API)' (in older "
    "versions, enable 'Dev mode options' in the settings, then use 'Save (API Format)')"
)


class ScaffoldError(Comfys3Error, ValueError):
    """A graph (or name, or object_info) that cannot become a template; one line for a person."""


# --- reading ---------------------------------------------------------------------------------


def check_template_name(name: str) -> str:
    if not TEMPLATE_NAME.fullmatch(name):
        raise ScaffoldError(
            f"{name!r} is not a valid template name: use letters, digits, '_' and '-' "
            "(up to 64, starting with a letter or digit), e.g. my_portrait"
        )
    return name


def parse_graph(data: bytes | str, source: str = "the graph") -> Graph:
    """The API-format graph in ``data``, or a :class:`ScaffoldError` that says what is wrong."""
    if isinstance(data, bytes):
        data = data.removeprefix(b"\xef\xbb\xbf")  # a BOM, as some Windows editors save
    try:
        document = load_json(data)
    except JsonLimitError as error:
        raise ScaffoldError(f"{source} {error}") from None
    return check_graph(document, source)


def check_graph(document: Any, source: str = "the graph") -> Graph:
    if not isinstance(document, dict):
        raise ScaffoldError(
            f"{source} is not a ComfyUI API graph: a JSON object of nodes was expected, "
            f"not {_json_kind(document)}"
        )
    if _is_ui_format(document):
        raise ScaffoldError(f"{source} is not an API-format graph: {UI_FORMAT_HELP}")
    if not document:
        raise ScaffoldError(f"{source} has no nodes")
    if _looks_wrapped(document):
        raise ScaffoldError(
            f"{source} holds the graph under 'prompt' (a /prompt request body); "
            "save the object under 'prompt' on its own, or use the editor's 'Export (API)'"
        )
    for node_id, node in document.items():
        where = f"{source}: node {node_id!r}"
        if not isinstance(node, dict):
            raise ScaffoldError(f"{where} is {_json_kind(node)}, not an object with class_type")
        class_type = node.get("class_type")
        if not isinstance(class_type, str) or not class_type:
            raise ScaffoldError(
                f"{where} has no class_type; is this an API-format export ('Export (API)')?"
            )
        if not isinstance(node.get("inputs", {}), dict):
            raise ScaffoldError(f"{where} ({class_type}): 'inputs' is not an object")
    return document


def _is_ui_format(document: Mapping[str, Any]) -> bool:
    if isinstance(document.get("nodes"), list) and "links" in document:
        return True
    inner = document.get("workflow")
    return isinstance(inner, dict) and isinstance(inner.get("nodes"), list)


def _looks_wrapped(document: Mapping[str, Any]) -> bool:
    inner = document.get("prompt")
    return (
        isinstance(inner, dict)
        and "class_type" not in inner
        and any(isinstance(v, dict) and "class_type" in v for v in inner.values())
    )


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    return "null" if value is None else "an object"


def is_link(value: Any) -> bool:
    """``[node_id, output_index]``: a wire from another node, never a value to vary."""
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], int)
        and not isinstance(value[1], bool)
    )


def inputs_of(node: Mapping[str, Any]) -> dict[str, Any]:
    inputs = node.get("inputs")
    return inputs if isinstance(inputs, dict) else {}


def title_of(node: Mapping[str, Any]) -> str | None:
    meta = node.get("_meta")
    title = meta.get("title") if isinstance(meta, dict) else None
    return title if isinstance(title, str) and title.strip() else None


# --- what ComfyUI offers (/object_info) --------------------------------------------------------


@dataclass(frozen=True)
class InputSpec:
    """One input as ComfyUI declares it: its type, and its choices or numeric range."""

    kind: str  # "INT", "FLOAT", "STRING", "COMBO", ... ("" when unknown)
    choices: tuple[Any, ...] = ()
    minimum: float | None = None
    maximum: float | None = None


@dataclass(frozen=True)
class NodeCatalog:
    """The node types a ComfyUI offers, from its ``GET /object_info`` answer."""

    nodes: Mapping[str, Mapping[str, Any]]

    @classmethod
    def from_object_info(cls, document: Any, source: str = "object_info") -> NodeCatalog:
        nodes = {}
        if isinstance(document, dict):
            nodes = {k: v for k, v in document.items() if isinstance(v, dict)}
        if not any(isinstance(v.get("input"), dict) for v in nodes.values()):
            raise ScaffoldError(
                f"{source} is not ComfyUI's /object_info answer "
                "(an object of node types, each with its inputs)"
            )
        return cls(nodes)

    def knows(self, class_type: str) -> bool:
        return class_type in self.nodes

    def display_name(self, class_type: str) -> str | None:
        name = self.nodes.get(class_type, {}).get("display_name")
        return name if isinstance(name, str) else None

    def spec(self, class_type: str, input_name: str) -> InputSpec | None:
        sections = self.nodes.get(class_type, {}).get("input")
        if not isinstance(sections, dict):
            return None
        for section in ("required", "optional"):
            specs = sections.get(section)
            if isinstance(specs, dict) and input_name in specs:
                return _input_spec(specs[input_name])
        return None


def _input_spec(raw: Any) -> InputSpec:
    if not isinstance(raw, list | tuple) or not raw:
        return InputSpec("")
    kind, options = raw[0], raw[1] if len(raw) > 1 and isinstance(raw[1], dict) else {}
    if isinstance(kind, list):  # the classic combo: a list of the values themselves
        return InputSpec("COMBO", tuple(kind))
    if kind == "COMBO" and isinstance(options.get("options"), list):  # the newer node schema
        return InputSpec("COMBO", tuple(options["options"]))
    minimum, maximum = options.get("min"), options.get("max")
    return InputSpec(
        str(kind),
        minimum=minimum if _is_number(minimum) else None,
        maximum=maximum if _is_number(maximum) else None,
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# --- the plan --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    node: str
    input: str

    def __str__(self) -> str:
        return f"{self.node}.{self.input}"


@dataclass(frozen=True)
class Kind:
    """A sort of value worth a field: its base name, type, description and usual range."""

    base: str
    python_type: str  # "int", "float" or "str"
    what: str
    ge: float | None = None
    le: float | None = None
    words: frozenset[str] = frozenset()  # title words that only repeat what the field is


_PROMPT_WORDS = frozenset({"positive", "pos", "negative", "neg", "conditioning", "cond"})
_SIZE_WORDS = frozenset({"size", "resolution", "dimensions", "batch"})
KINDS: dict[str, Kind] = {
    "prompt": Kind("prompt", "str", "What to draw", words=_PROMPT_WORDS),
    "negative_prompt": Kind("negative_prompt", "str", "What to avoid", words=_PROMPT_WORDS),
    "text": Kind("prompt", "str", "Prompt text", words=_PROMPT_WORDS),
    "seed": Kind("seed", "int", "Noise seed", 0, 2**64 - 1, frozenset({"noise"})),
    "steps": Kind("steps", "int", "Sampling steps", 1, 10000),
    "cfg": Kind("cfg_scale", "float", "Classifier-free guidance scale", 0.0, 100.0),
    "guidance": Kind("guidance", "float", "Guidance strength", 0.0, 100.0),
    "sampler_name": Kind("sampler_name", "str", "ComfyUI sampler"),
    "scheduler": Kind("scheduler", "str", "ComfyUI noise schedule"),
    "denoise": Kind(
        "denoise", "float", "How much to change the latent (0 keeps it, 1 replaces it)", 0.0, 1.0
    ),
    "width": Kind("width", "int", "Width in pixels", 16, 16384, _SIZE_WORDS),
    "height": Kind("height", "int", "Height in pixels", 16, 16384, _SIZE_WORDS),
    "batch_size": Kind("batch_size", "int", "Images made in one run", 1, 4096, _SIZE_WORDS),
    "lora_strength_model": Kind(
        "lora_strength_model", "float", "LoRA strength on the model", -100.0, 100.0
    ),
    "lora_strength_clip": Kind(
        "lora_strength_clip", "float", "LoRA strength on the text encoder", -100.0, 100.0
    ),
    "image": Kind("image", "str", "Input image"),
}
# Model files by input name: what the file is and which models folder ComfyUI looks in.
MODEL_FILES = {
    "ckpt_name": "Checkpoint file in ComfyUI's checkpoints folder",
    "lora_name": "LoRA file in ComfyUI's loras folder",
    "vae_name": "VAE file in ComfyUI's vae folder",
    "unet_name": "Diffusion model file in ComfyUI's diffusion_models folder",
    "clip_name": "Text encoder file in ComfyUI's text_encoders folder",
    "control_net_name": "ControlNet file in ComfyUI's controlnet folder",
    "style_model_name": "Style model file in ComfyUI's style_models folder",
    "gligen_name": "GLIGEN file in ComfyUI's gligen folder",
    "upscale_model_name": "Upscale model file in ComfyUI's upscale_models folder",
}
_NUMBERED_CLIP = re.compile(r"clip_name\d")
SIMPLE_INPUT_KINDS = {
    "seed": "seed",
    "noise_seed": "seed",
    "steps": "steps",
    "cfg": "cfg",
    "guidance": "guidance",
    "sampler_name": "sampler_name",
    "scheduler": "scheduler",
    "denoise": "denoise",
}
# Inputs that carry a sampler's conditioning, and which prompt they make: followed back to the
# text encoders, they tell a positive prompt from a negative one.
POLARITY_INPUTS = {"positive": "prompt", "negative": "negative_prompt", "cond1": "prompt"}
# Wires that never lead to a prompt: following them would only wander through the graph.
NOT_CONDITIONING = frozenset(
    {
        "clip", "model", "vae", "control_net", "image", "images", "pixels", "mask",
        "clip_vision", "clip_vision_output", "style_model", "samples", "latent", "latent_image",
        "upscale_model", "noise", "sigmas", "sampler", "guider", "seed", "noise_seed",
    }
)  # fmt: skip
DIRECT_PROMPT_INPUTS = {
    "positive": "prompt",
    "positive_prompt": "prompt",
    "prompt": "prompt",
    "negative": "negative_prompt",
    "negative_prompt": "negative_prompt",
}
LOAD_IMAGE_NODES = frozenset({"LoadImage", "LoadImageMask"})
# ComfyUI's display names of common nodes: a title equal to one of them was never set by hand.
DISPLAY_NAMES = {
    "CheckpointLoaderSimple": "Load Checkpoint",
    "CLIPTextEncode": "CLIP Text Encode (Prompt)",
    "CLIPSetLastLayer": "CLIP Set Last Layer",
    "ConditioningCombine": "Conditioning (Combine)",
    "ConditioningAverage": "Conditioning (Average)",
    "ConditioningConcat": "Conditioning (Concat)",
    "ConditioningSetArea": "Conditioning (Set Area)",
    "ConditioningSetMask": "Conditioning (Set Mask)",
    "ControlNetApply": "Apply ControlNet (OLD)",
    "ControlNetApplyAdvanced": "Apply ControlNet",
    "ControlNetLoader": "Load ControlNet Model",
    "CLIPLoader": "Load CLIP",
    "CLIPVisionLoader": "Load CLIP Vision",
    "EmptyLatentImage": "Empty Latent Image",
    "ImageScale": "Upscale Image",
    "ImageScaleBy": "Upscale Image By",
    "ImageUpscaleWithModel": "Upscale Image (using Model)",
    "ImageInvert": "Invert Image",
    "KSamplerAdvanced": "KSampler (Advanced)",
    "LatentUpscale": "Upscale Latent",
    "LatentUpscaleBy": "Upscale Latent By",
    "LoadImage": "Load Image",
    "LoadImageMask": "Load Image (as Mask)",
    "LoraLoader": "Load LoRA",
    "PreviewImage": "Preview Image",
    "PrimitiveFloat": "Float",
    "PrimitiveInt": "Int",
    "PrimitiveString": "String",
    "PrimitiveStringMultiline": "String (Multiline)",
    "SaveImage": "Save Image",
    "StyleModelLoader": "Load Style Model",
    "UNETLoader": "Load Diffusion Model",
    "UpscaleModelLoader": "Load Upscale Model",
    "VAEDecode": "VAE Decode",
    "VAEEncode": "VAE Encode",
    "VAEEncodeForInpaint": "VAE Encode (for Inpainting)",
    "VAELoader": "Load VAE",
}
# Title words that name the node's sort, not the user's purpose: "Hires sampler" -> hires_seed.
NODE_WORDS = frozenset(
    {
        "ksampler", "sampler", "advanced", "custom", "node", "clip", "text", "encode", "encoder",
        "prompt", "load", "loader", "checkpoint", "ckpt", "model", "lora", "vae", "unet",
        "empty", "latent", "image", "img", "simple", "the", "and", "of", "for", "input",
        "primitive", "int", "float", "string", "number", "value",
    }
)  # fmt: skip
MAX_PREFIX = 32


@dataclass(frozen=True)
class FieldPlan:
    """One payload field: where it goes, its type, its default (the graph's value) and range."""

    name: str
    kind: str
    python_type: str  # "int", "float", "str" or the name of a Literal alias
    default: Any
    targets: tuple[Target, ...]
    description: str
    graph_value: Any = None  # what the graph holds (for an input image, the default is None)
    ge: float | None = None
    le: float | None = None
    multiple_of: int | None = None
    min_length: int | None = None
    choices: tuple[str, ...] = ()
    input_file: bool = False


@dataclass(frozen=True)
class FixedValue:
    """A value the template keeps as the graph has it."""

    node: str
    class_type: str
    input: str
    value: Any
    note: str = ""


@dataclass(frozen=True)
class Plan:
    graph: Graph
    fields: tuple[FieldPlan, ...]
    fixed: tuple[FixedValue, ...]
    notes: tuple[str, ...] = ()
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)  # Literal name -> values


@dataclass
class _Candidate:
    """A value found worth a field, before it is named."""

    kind: str
    targets: list[Target]
    default: Any
    title: str | None  # the title a person gave the node, if any
    class_type: str
    spec: InputSpec | None = None
    model_base: str | None = None  # for model files: the field's base name


def plan_template(graph: Graph, catalog: NodeCatalog | None = None) -> Plan:
    """Propose a field for each value a user would vary; keep the rest fixed."""
    graph = check_graph(graph)
    order = node_order(graph)
    rank = {node_id: index for index, node_id in enumerate(order)}
    titles = {node_id: _user_title(graph[node_id], catalog) for node_id in order}
    candidates = _text_candidates(graph, order, titles)
    taken = {t for c in candidates for t in c.targets}
    for node_id in order:
        node = graph[node_id]
        for input_name, value in inputs_of(node).items():
            target = Target(node_id, input_name)
            wired = _wired_value(graph, value)
            if wired is not None:  # a primitive node's value, wired into this input
                target, value = wired
            if target in taken:
                continue
            candidate = _value_candidate(
                target, node, input_name, value, titles[target.node], catalog
            )
            if candidate is not None:
                candidates.append(candidate)
                taken.add(target)

    def position(candidate: _Candidate) -> tuple[int, int, int]:
        first = candidate.targets[0]
        prompt_rank = {"prompt": 0, "negative_prompt": 1, "text": 2}.get(candidate.kind, 3)
        return (prompt_rank, rank[first.node], input_rank[first])

    input_rank = {
        Target(node_id, name): index
        for node_id in order
        for index, name in enumerate(inputs_of(graph[node_id]))
    }

    candidates.sort(key=position)
    notes: list[str] = []
    aliases: dict[str, tuple[str, ...]] = {}
    fields = []
    used: set[str] = set()
    numbers: dict[str, int] = {}
    for candidate in candidates:
        name = _unique(_field_name(candidate), used, numbers)
        used.add(name)
        fields.append(_field_plan(name, candidate, catalog, aliases, notes))
    fixed = _fixed_values(graph, order, taken)
    notes.extend(_catalog_notes(graph, order, catalog))
    if not fields:
        notes.append("no value worth a field was recognised; the template runs the graph as is")
    return Plan(graph, tuple(fields), tuple(fixed), tuple(notes), aliases)


def node_order(graph: Graph) -> list[str]:
    """Node ids, every node after the nodes it reads from (ties and cycles by id), so the
    first sampler of a pipeline is met first and keeps the plain names."""
    keys = {node_id: _natural_key(node_id) for node_id in graph}
    readers: dict[str, list[str]] = {node_id: [] for node_id in graph}
    waiting_for: dict[str, int] = {}
    for node_id, node in graph.items():
        sources = {v[0] for v in inputs_of(node).values() if is_link(v) and v[0] in graph}
        sources.discard(node_id)
        waiting_for[node_id] = len(sources)
        for source in sources:
            readers[source].append(node_id)
    by_id = sorted(graph, key=keys.__getitem__)
    ready = [(keys[n], n) for n in by_id if waiting_for[n] == 0]
    done: list[str] = []
    placed: set[str] = set()
    cursor = 0
    while len(done) < len(graph):
        if ready:
            node_id = heapq.heappop(ready)[1]
            if node_id in placed:
                continue
        else:  # a cycle: break it at the lowest id still waiting
            while by_id[cursor] in placed:
                cursor += 1
            node_id = by_id[cursor]
        placed.add(node_id)
        done.append(node_id)
        for reader in readers[node_id]:
            waiting_for[reader] -= 1
            if waiting_for[reader] == 0 and reader not in placed:
                heapq.heappush(ready, (keys[reader], reader))
    return done


def _natural_key(node_id: str) -> tuple[tuple[int, int, str], ...]:
    return tuple(
        (0, int(part), "") if part.isdigit() else (1, 0, part)
        for part in re.findall(r"\d+|\D+", node_id)
    )


def _text_candidates(
    graph: Graph, order: Sequence[str], titles: Mapping[str, str | None]
) -> list[_Candidate]:
    """Prompt texts, told positive or negative by the sampler input they feed."""
    polarities: dict[Target, set[str]] = {}
    for target, polarity in _conditioning_texts(graph):
        polarities.setdefault(target, set()).add(polarity)
    for node_id in order:
        node = graph[node_id]
        for input_name, value in inputs_of(node).items():
            target = Target(node_id, input_name)
            if not isinstance(value, str) or target in polarities:
                continue
            if input_name in DIRECT_PROMPT_INPUTS:
                polarities[target] = {DIRECT_PROMPT_INPUTS[input_name]}
            elif "TextEncode" in node["class_type"] and _is_text_input(input_name):
                polarities[target] = {"text"}
    groups: dict[tuple[str, str, str | None], _Candidate] = {}
    for node_id in order:
        for input_name in inputs_of(graph[node_id]):
            target = Target(node_id, input_name)
            if target not in polarities:
                continue
            found = polarities[target]
            kind = found.pop() if len(found) == 1 else "text"
            value = graph[node_id]["inputs"][input_name]
            title = titles[node_id]
            # Equal texts of one polarity (SDXL's text_g and text_l, base and refiner) are one
            # prompt to the user, unless the nodes were given different titles.
            key = (kind, value, _title_key(title))
            if key in groups:
                groups[key].targets.append(target)
            else:
                groups[key] = _Candidate(kind, [target], value, title, graph[node_id]["class_type"])
    return list(groups.values())


def _conditioning_texts(graph: Graph) -> Iterator[tuple[Target, str]]:
    """Follow each conditioning wire back from the node that consumes it to the texts it
    was encoded from. Bounded: each (node, output, polarity) is visited once."""
    queue: list[tuple[str, int, str]] = []
    for node in graph.values():
        guider = "Guider" in node["class_type"]
        for input_name, value in inputs_of(node).items():
            polarity = POLARITY_INPUTS.get(input_name)
            if polarity is None and guider and input_name in {"conditioning", "cond2"}:
                polarity = "prompt"
            if polarity is not None and is_link(value):
                queue.append((value[0], value[1], polarity))
    seen: set[tuple[str, int, str]] = set()
    while queue:
        step = queue.pop()
        node_id, output, polarity = step
        if step in seen or not isinstance(graph.get(node_id), dict):
            continue
        seen.add(step)
        inputs = inputs_of(graph[node_id])
        passes_both = is_link(inputs.get("positive")) and is_link(inputs.get("negative"))
        for input_name, value in inputs.items():
            if isinstance(value, str) and _is_text_input(input_name):
                yield Target(node_id, input_name), polarity
            if not is_link(value) or input_name in NOT_CONDITIONING:
                continue
            if passes_both and input_name in {"positive", "negative"}:
                # Apply ControlNet and its kind pass both on: output 0 is positive, 1 negative.
                wanted = {0: "positive", 1: "negative"}.get(output)
                if wanted is not None and input_name != wanted:
                    continue
            queue.append((value[0], value[1], polarity))


def _is_text_input(name: str) -> bool:
    return name.startswith("text") or name in {
        "clip_l", "clip_g", "t5xxl", "prompt", "string", "value", "positive", "negative",
    }  # fmt: skip


def _wired_value(graph: Graph, value: Any) -> tuple[Target, Any] | None:
    """Where a wire's value really lives: the one plain value of the node it comes from
    (PrimitiveInt, a seed node, ...), or None when that node has none or several."""
    if not is_link(value) or not isinstance(graph.get(value[0]), dict):
        return None
    plain = [
        (name, v)
        for name, v in inputs_of(graph[value[0]]).items()
        if not isinstance(v, list | dict)
    ]
    if len(plain) != 1:
        return None
    return Target(value[0], plain[0][0]), plain[0][1]


def _value_candidate(
    target: Target,
    node: Mapping[str, Any],
    input_name: str,
    value: Any,
    title: str | None,
    catalog: NodeCatalog | None,
) -> _Candidate | None:
    """The field ``value`` makes as ``node``'s ``input_name``, or None to keep it fixed. It
    lives at ``target``: that input itself, or a primitive node wired into it."""
    if is_link(value) or isinstance(value, bool):
        return None
    kind = _kind_of(node, input_name, value)
    if kind is None:
        return None
    class_type = node["class_type"]
    spec = catalog.spec(class_type, input_name) if catalog else None
    model_base = None
    if kind == "model_file":
        model_base = "upscale_model_name" if input_name == "model_name" else input_name
    return _Candidate(kind, [target], value, title, class_type, spec, model_base)


def _kind_of(node: Mapping[str, Any], input_name: str, value: Any) -> str | None:
    class_type: str = node["class_type"]
    inputs = inputs_of(node)
    number = _is_number(value)
    if input_name in SIMPLE_INPUT_KINDS:
        kind = SIMPLE_INPUT_KINDS[input_name]
        wanted = KINDS[kind].python_type
        if wanted == "str":
            return kind if isinstance(value, str) else None
        if wanted == "int":
            return kind if isinstance(value, int) else None
        return kind if number else None
    if input_name in {"width", "height", "batch_size"} and "empty" in class_type.lower():
        return input_name if isinstance(value, int) else None
    if input_name in {"strength_model", "strength_clip"} and "lora_name" in inputs:
        return f"lora_{input_name}" if number else None
    if input_name == "image" and class_type in LOAD_IMAGE_NODES:
        return "image" if isinstance(value, str) else None
    if not isinstance(value, str):
        return None
    if input_name in MODEL_FILES or _NUMBERED_CLIP.fullmatch(input_name):
        return "model_file"
    if input_name == "model_name" and "Loader" in class_type:
        return "model_file"
    return None


def _user_title(node: Mapping[str, Any], catalog: NodeCatalog | None) -> str | None:
    """The node's title when a person set it (not the class's own display name)."""
    title = title_of(node)
    if title is None:
        return None
    class_type = node["class_type"]
    defaults = {class_type, DISPLAY_NAMES.get(class_type)}
    if catalog is not None:
        defaults.add(catalog.display_name(class_type))
    if title.strip() in defaults:
        return None
    words = _words(title)
    squashed = "".join(_words(class_type))
    if "".join(words) == squashed:
        return None
    # "KSampler (Advanced)", "Load Checkpoint" on CheckpointLoaderSimple: the class's own words,
    # most of them. "Upscale" on UltimateSDUpscale says what the user means it for.
    own_words = all(len(w) >= 3 and w in squashed for w in words)
    if own_words and 2 * len("".join(words)) >= len(squashed):
        return None
    return title


def _words(text: str) -> list[str]:
    """Lower-case ASCII words of ``text`` (accents dropped), for names and comparisons."""
    plain = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return re.findall(r"[a-z0-9]+", plain.lower())


def _title_key(title: str | None) -> str | None:
    return " ".join(_words(title)) if title is not None else None


def _field_name(candidate: _Candidate) -> str:
    kind = KINDS.get(candidate.kind)
    base = candidate.model_base or (kind.base if kind else candidate.kind)
    if candidate.title is None:
        return base
    skip = NODE_WORDS | set(base.split("_")) | (kind.words if kind else frozenset())
    words = [w for w in _words(candidate.title) if w not in skip]
    prefix = ""
    for word in words:
        if len(prefix) + len(word) + 1 > MAX_PREFIX:
            break
        prefix = f"{prefix}_{word}" if prefix else word
    if not prefix:
        return base
    name = f"{base}_{prefix}" if prefix[0].isdigit() else f"{prefix}_{base}"
    return name if _usable_name(name) else base


def _usable_name(name: str) -> bool:
    return (
        name.isidentifier()
        and name.isascii()
        and not keyword.iskeyword(name)
        and not name.startswith(("_", "model_"))
        and name not in RESERVED
    )


def _unique(name: str, used: set[str], numbers: dict[str, int]) -> str:
    """``name``, or ``name_2``, ``name_3``, ... when it is taken; ``numbers`` remembers where
    each name's count stands, so many nodes of one kind are named in linear time."""
    if name not in used and _usable_name(name):
        return name
    number = numbers.get(name, 2)
    while f"{name}_{number}" in used:  # bounded: one step per field already named
        number += 1
    numbers[name] = number + 1
    return f"{name}_{number}"


def _field_plan(
    name: str,
    candidate: _Candidate,
    catalog: NodeCatalog | None,
    aliases: dict[str, tuple[str, ...]],
    notes: list[str],
) -> FieldPlan:
    default = candidate.default
    targets = tuple(candidate.targets)
    where = _where(targets)
    if candidate.kind == "model_file":
        base = candidate.model_base or ""
        what = MODEL_FILES.get(base) or MODEL_FILES["clip_name"]
        description = f"{what} ({where})."
        min_length = 1 if default else None  # the graph's own value must stay valid
        return FieldPlan(
            name, "model_file", "str", default, targets, description, default, min_length=min_length
        )
    kind = KINDS[candidate.kind]
    if candidate.kind == "image":
        description = (
            f"{kind.what}: a key in the bucket (or a path under the local root); when omitted, "
            f"'{_printable(str(default))}' from ComfyUI's input folder, as in the graph ({where})."
        )
        return FieldPlan(
            name,
            "image",
            "str | None",
            None,
            targets,
            description,
            graph_value=default,
            min_length=1,
            input_file=True,
        )
    python_type = kind.python_type
    spec = candidate.spec
    if python_type != "str":
        if spec is not None and spec.kind in {"INT", "FLOAT"}:
            python_type = "int" if spec.kind == "INT" else "float"
        if python_type == "int" and not isinstance(default, int):
            python_type = "float"
    ge, le = kind.ge, kind.le
    if spec is not None and spec.minimum is not None:
        ge = spec.minimum
    if spec is not None and spec.maximum is not None:
        le = spec.maximum
    if python_type != "str":  # keep only the bounds the graph's own value meets
        ge = ge if ge is not None and default >= ge else None
        le = le if le is not None and default <= le else None
    else:
        ge = le = None
    multiple_of = None
    if candidate.kind in {"width", "height"} and "Latent" in candidate.class_type:
        multiple_of = 8 if isinstance(default, int) and default % 8 == 0 else None
    choices: tuple[str, ...] = ()
    if candidate.kind in {"sampler_name", "scheduler"} and spec is not None:
        offered = spec.choices
        if offered and all(isinstance(c, str) for c in offered) and default in offered:
            choices = tuple(offered)
            python_type = _alias_for(candidate.kind, choices, aliases)
        elif offered:
            notes.append(
                f"{name}: {default!r} is not among the {len(offered)} values ComfyUI offers "
                f"for {candidate.class_type}; kept as plain text"
            )
    return FieldPlan(
        name,
        candidate.kind,
        python_type,
        default,
        targets,
        f"{kind.what} ({where}).",
        graph_value=default,
        ge=ge,
        le=le,
        multiple_of=multiple_of,
        choices=choices,
    )


def _alias_for(kind: str, choices: tuple[str, ...], aliases: dict[str, tuple[str, ...]]) -> str:
    stem = "Sampler" if kind == "sampler_name" else "Scheduler"
    for alias, values in aliases.items():
        if values == choices and alias.startswith(stem):
            return alias
    name, number = stem, 2
    while name in aliases:
        name, number = f"{stem}{number}", number + 1
    aliases[name] = choices
    return name


def _where(targets: Sequence[Target]) -> str:
    nodes = list(dict.fromkeys(t.node for t in targets))
    return ("node " if len(nodes) == 1 else "nodes ") + ", ".join(_printable(n) for n in nodes)


def _printable(text: str, limit: int = 40) -> str:
    """``text`` on one line, short, with no character that would need explaining."""
    clean = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."


def _fixed_values(graph: Graph, order: Sequence[str], taken: set[Target]) -> list[FixedValue]:
    fixed = []
    for node_id in order:
        node = graph[node_id]
        for input_name, value in inputs_of(node).items():
            if is_link(value) or Target(node_id, input_name) in taken:
                continue
            note = "set per job by the worker" if input_name == SAVE_PREFIX_INPUT else ""
            fixed.append(FixedValue(node_id, node["class_type"], input_name, value, note))
    return fixed


def _catalog_notes(graph: Graph, order: Sequence[str], catalog: NodeCatalog | None) -> list[str]:
    if catalog is None:
        return []
    missing = sorted({graph[n]["class_type"] for n in order} - set(catalog.nodes))
    if not missing:
        return []
    return [
        "this ComfyUI does not offer the node types "
        + ", ".join(_printable(m) for m in missing)
        + " (custom nodes that are not installed?)"
    ]


# --- the two files ---------------------------------------------------------------------------


def render_graph(graph: Graph) -> str:
    """``NAME.json``: the user's graph, unchanged, indented like the shipped templates."""
    try:
        return json.dumps(graph, indent=2, ensure_ascii=False) + "\n"
    except UnicodeEncodeError:  # pragma: no cover - load_json refuses unpaired surrogates
        return json.dumps(graph, indent=2) + "\n"


def render_module(plan: Plan, name: str, source: str) -> str:
    """``NAME.py``: the payload model, written the way the shipped templates are."""
    origin = _safe_file_name(source)
    summary = f"From {origin} (comfys3 template new): the defaults reproduce the graph."
    uses_file = any(f.input_file for f in plan.fields)
    heading = f"{name}: a template made by comfys3 template new from {origin}."
    lines = [f'"""{heading}"""', "", "from typing import Annotated"]
    if plan.aliases:
        lines[-1] += ", Literal"
    lines += ["", "from pydantic import Field", ""]
    names = ["Bind", "InputFile", "WorkflowPayload"] if uses_file else ["Bind", "WorkflowPayload"]
    lines.append(f"from processor.workflows import {', '.join(names)}")
    for alias, values in plan.aliases.items():
        lines += ["", *_bracketed("", f"{alias} = Literal", [[py_literal(v)] for v in values])]
    lines += ["", "", "class Payload(WorkflowPayload):", f'    """{summary}"""']
    if plan.fields:
        lines.append("")
    for item in plan.fields:
        lines += _field_lines(item)
    return "\n".join(lines) + "\n"


def _safe_file_name(source: str) -> str:
    base = source.replace("\\", "/").rsplit("/", 1)[-1]
    clean = re.sub(r"[^A-Za-z0-9._ -]", "_", base)[:32]
    return clean or "a ComfyUI graph"


def _field_lines(item: FieldPlan) -> list[str]:
    binds = [f"Bind({py_literal(t.node)}, {py_literal(t.input)})" for t in item.targets]
    metadata = [item.python_type, *binds]
    if item.input_file:
        metadata.append("InputFile()")
    args = [_argument("", item.default)]
    for key, bound in (("ge", item.ge), ("le", item.le)):
        if bound is not None:
            args.append([f"{key}={_bound_literal(bound)}"])
    if item.multiple_of is not None:
        args.append([f"multiple_of={item.multiple_of}"])
    if item.min_length is not None:
        args.append([f"min_length={item.min_length}"])
    args.append(_argument("description=", item.description))
    return _assignment("    ", item.name, [[m] for m in metadata], args)


def _bound_literal(value: float) -> str:
    if value == 2**64 - 1 and isinstance(value, int):
        return "2**64 - 1"
    return repr(value)


ARG_INDENT = 8  # a field's Field(...) arguments, one per line


def _argument(prefix: str, value: Any) -> list[str]:
    """``prefix`` + the literal of ``value``; a string too long for its line becomes several
    literals one under the other (implicit concatenation), split after spaces, as a person
    would wrap a long prompt."""
    literal = py_literal(value)
    if not isinstance(value, str) or ARG_INDENT + len(prefix) + len(literal) + 1 <= MAX_LINE:
        return [prefix + literal]
    parts: list[str] = []
    current = ""
    room = MAX_LINE - ARG_INDENT - len(prefix)
    for piece in re.split(r"(?<= )", value):
        if current and len(py_literal(current + piece)) > room - 1:
            parts.append(py_literal(current))
            current, room = "", MAX_LINE - ARG_INDENT
        current += piece
    parts.append(py_literal(current))
    return [prefix + parts[0], *parts[1:]]


def _assignment(
    indent: str, name: str, metadata: list[list[str]], args: list[list[str]]
) -> list[str]:
    """``name: Annotated[...] = Field(...)`` laid out as ruff format lays out the shipped
    templates: on one line when it fits, else the call's arguments split, else the
    annotation split too."""
    annotation = f"Annotated[{', '.join(m[0] for m in metadata)}]"
    head = f"{indent}{name}: {annotation} = "
    if len(f"{head}Field(") <= MAX_LINE:
        return _bracketed(indent, f"{name}: {annotation} = Field", args, "(", ")")
    opening = _bracketed(indent, f"{name}: Annotated", metadata, force=True)
    closing = opening.pop().strip()  # "]"
    return [*opening, *_bracketed(indent, f"{closing} = Field", args, "(", ")")]


def _bracketed(
    indent: str,
    head: str,
    items: list[list[str]],
    open_: str = "[",
    close: str = "]",
    *,
    force: bool = False,
) -> list[str]:
    """``head[items]``: one line if it fits (and not ``force``), else the items on one indented
    line, else one item per line with a trailing comma: ruff format's three shapes. An item
    of several lines (a long string, split) always takes the last shape."""
    single = all(len(item) == 1 for item in items)
    joined = ", ".join(item[0] for item in items)
    if single and not force and len(f"{indent}{head}{open_}{joined}{close}") <= MAX_LINE:
        return [f"{indent}{head}{open_}{joined}{close}"]
    if single and len(f"{indent}    {joined}") <= MAX_LINE:
        return [f"{indent}{head}{open_}", f"{indent}    {joined}", f"{indent}{close}"]
    lines = [f"{indent}{head}{open_}"]
    for item in items:
        lines += [f"{indent}    {part}" for part in item]
        lines[-1] += ","
    return [*lines, f"{indent}{close}"]


def py_literal(value: Any) -> str:
    """A Python literal for a JSON scalar. Strings take double quotes unless that needs more
    escapes, as ruff format writes them; escapes are repr's, so any text survives."""
    if not isinstance(value, str):
        return repr(value)
    quote = "'" if value.count('"') > value.count("'") else '"'
    body = []
    for token in re.findall(r"\\.|[^\\]", repr(value)[1:-1], flags=re.DOTALL):
        if token in {"\\'", '\\"'}:
            token = token[1]
        body.append("\\" + token if token == quote else token)
    return quote + "".join(body) + quote


# --- the check -------------------------------------------------------------------------------


def differences(graph: Graph, filled: Graph, limit: int = 10) -> list[str]:
    """Where ``filled`` differs from ``graph``, types included (7 is not 7.0), apart from the
    inputs the worker rewrites for every job (``filename_prefix``)."""
    found = []
    for node_id in sorted(set(graph) | set(filled), key=_natural_key):
        before, after = graph.get(node_id), filled.get(node_id)
        if not isinstance(before, dict) or not isinstance(after, dict):
            if _canonical(before) != _canonical(after):
                found.append(f"node {node_id!r}: {_short(before)} became {_short(after)}")
            continue
        for key in sorted(set(before) | set(after)):
            if key != "inputs" and _canonical(before.get(key)) != _canonical(after.get(key)):
                found.append(f"node {node_id!r} {key}: changed")
        old, new = inputs_of(before), inputs_of(after)
        for name in _ordered_union(old, new):
            if name == SAVE_PREFIX_INPUT and name in old and name in new:
                continue
            if name not in old or name not in new or _canonical(old[name]) != _canonical(new[name]):
                found.append(
                    f"node {node_id!r} input {name!r}: "
                    f"{_short(old.get(name))} became {_short(new.get(name))}"
                )
    return found[:limit]


def _ordered_union(*mappings: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(k for mapping in mappings for k in mapping))


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."
