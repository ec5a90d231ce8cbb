"""Workflow templates: a ComfyUI API graph plus the pydantic model of the payload that fills it.

A template is two files in a workflows folder: ``<name>.json`` (the graph) and ``<name>.py``
(a ``Payload`` class deriving from :class:`WorkflowPayload`). Fields say where their value goes
with ``Bind``; a field marked ``InputFile`` names a file the processor stages into ComfyUI before
the graph runs. Adding a workflow means adding those two files, nothing else.

``workflows/*.py`` import only ``Bind``, ``InputFile``, ``WorkflowPayload`` and ``random_seed``
from here: that is the public workflow-definition API.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import importlib.util
import json
import secrets
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from processor.errors import ManifestError, Problem, WorkflowLoadError, problems_from_validation

Graph = dict[str, Any]

# ComfyUI's KSampler choices, shared by templates so their enums read the same everywhere.
Sampler = Literal[
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2",
    "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp",
    "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm",
    "ipndm", "ipndm_v", "deis", "res_multistep", "gradient_estimation", "er_sde", "ddim",
    "uni_pc", "uni_pc_bh2",
]  # fmt: skip
Scheduler = Literal[
    "normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta",
    "linear_quadratic", "kl_optimal",
]  # fmt: skip

# Nodes whose ``filename_prefix`` decides where ComfyUI writes outputs. Any node with that input
# is treated the same way, so custom save nodes work too; these are just the well-known ones.
SAVE_PREFIX_INPUT = "filename_prefix"


@dataclass(frozen=True)
class Bind:
    """Field metadata: the value goes to ``graph[node]["inputs"][input]``."""

    node: str
    input: str


@dataclass(frozen=True)
class InputFile:
    """Field metadata: the value is a file (a bucket key, or a path under the local root) that
    is uploaded to ComfyUI first; the bound input then receives ComfyUI's name for it."""


def random_seed() -> int:
    """A fresh seed for a job that did not choose one; it is recorded in the status."""
    return secrets.randbelow(2**63)


class WorkflowPayload(BaseModel):
    """Base of every template's payload. Unknown fields are refused so a typo cannot pass."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class FieldBinding:
    field: str
    targets: tuple[Bind, ...]
    is_input_file: bool


@dataclass(frozen=True)
class StagedInput:
    """A file the job needs inside ComfyUI before it runs. ``where`` is the manifest object
    that names it (a template's ``payload``, or a raw graph's ``graph_inputs``), so a problem
    with it points at the line to edit."""

    field: str
    source: str
    targets: tuple[Bind, ...]
    where: str = "payload"


@dataclass(frozen=True)
class Workflow:
    """One loaded template: its graph (never mutated) and its payload model."""

    name: str
    graph: Graph
    payload_model: type[WorkflowPayload]
    bindings: tuple[FieldBinding, ...]
    description: str
    source: Path

    def validate_payload(self, payload: Mapping[str, Any]) -> WorkflowPayload:
        try:
            return self.payload_model.model_validate(dict(payload))
        except ValidationError as error:
            known = list(self.payload_model.model_fields)
            raise ManifestError(problems_from_validation(error, "payload", known)) from None

    def input_files(self, payload: WorkflowPayload) -> list[StagedInput]:
        return [
            StagedInput(b.field, str(getattr(payload, b.field)), b.targets)
            for b in self.bindings
            if b.is_input_file and getattr(payload, b.field) is not None
        ]

    def fill(
        self,
        payload: WorkflowPayload,
        *,
        job_id: str,
        staged: Mapping[str, str] | None = None,
    ) -> Graph:
        """A new graph with the payload's values in place; the template stays as loaded.

        ``staged`` maps an input-file field to the name ComfyUI knows the uploaded file by.
        """
        graph = copy.deepcopy(self.graph)
        for binding in self.bindings:
            value = getattr(payload, binding.field)
            if binding.is_input_file:
                value = (staged or {}).get(binding.field, value)
            if value is None:
                continue
            for target in binding.targets:
                graph[target.node]["inputs"][target.input] = value
        set_output_prefixes(graph, job_id)
        return graph

    def json_schema(self) -> dict[str, Any]:
        schema = self.payload_model.model_json_schema()
        schema.setdefault("title", self.name)
        if self.description:
            schema.setdefault("description", self.description)
        return schema


def set_output_prefixes(graph: Graph, job_id: str) -> None:
    """Point every save node at ``comfys3/<job id>/<node id>`` so outputs of concurrent jobs
    never mix, a person can tell which node made a file, and clean-up is one folder."""
    for node_id, node in graph.items():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if isinstance(inputs, dict) and SAVE_PREFIX_INPUT in inputs:
            inputs[SAVE_PREFIX_INPUT] = f"comfys3/{job_id}/{node_id}"


def _bindings_of(model: type[WorkflowPayload]) -> tuple[FieldBinding, ...]:
    result = []
    for name, info in model.model_fields.items():
        targets = tuple(m for m in info.metadata if isinstance(m, Bind))
        is_file = any(isinstance(m, InputFile) for m in info.metadata)
        if targets:
            result.append(FieldBinding(name, targets, is_file))
    return tuple(result)


def _check_bindings(name: str, graph: Graph, bindings: Iterable[FieldBinding]) -> None:
    problems = []
    for binding in bindings:
        for target in binding.targets:
            node = graph.get(target.node)
            if not isinstance(node, dict):
                problems.append(
                    f"field '{binding.field}' is bound to node {target.node!r} "
                    f"input {target.input!r}, but the graph has no node {target.node!r}"
                )
            elif target.input not in node.get("inputs", {}):
                problems.append(
                    f"field '{binding.field}' is bound to node {target.node!r} "
                    f"({node.get('class_type', '?')}) input {target.input!r}, "
                    "which that node does not have"
                )
    if problems:
        raise WorkflowLoadError(f"workflow '{name}': " + "; ".join(problems))


def _import_module(path: Path) -> ModuleType:
    # The module must be in sys.modules while it runs: pydantic resolves string annotations
    # (``from __future__ import annotations``) through it. The name carries a hash of the path
    # so a template overriding a built-in one of the same name does not replace its module.
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    module_name = f"comfys3_workflow_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise WorkflowLoadError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # a template bug must name the file, not crash the worker
        sys.modules.pop(module_name, None)
        raise WorkflowLoadError(f"{path}: {type(error).__name__}: {error}") from error
    return module


def load_workflow(graph_path: Path) -> Workflow:
    name = graph_path.stem
    model_path = graph_path.with_suffix(".py")
    try:
        graph = json.loads(graph_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise WorkflowLoadError(f"workflow '{name}': cannot read {graph_path}: {error}") from None
    if not isinstance(graph, dict) or not graph:
        raise WorkflowLoadError(f"workflow '{name}': {graph_path} is not a ComfyUI API graph")
    if not model_path.exists():
        raise WorkflowLoadError(f"workflow '{name}': {model_path} is missing")
    module = _import_module(model_path)
    model = getattr(module, "Payload", None)
    if not (isinstance(model, type) and issubclass(model, WorkflowPayload)):
        raise WorkflowLoadError(f"workflow '{name}': {model_path} defines no Payload model")
    try:
        model.model_rebuild()
    except Exception as error:  # an annotation naming something the module never imported
        raise WorkflowLoadError(f"{model_path}: {type(error).__name__}: {error}") from error
    bindings = _bindings_of(model)
    _check_bindings(name, graph, bindings)
    description = (model.__doc__ or module.__doc__ or "").strip()
    return Workflow(name, graph, model, bindings, description, graph_path)


def builtin_workflows_dir() -> Path:
    """The templates shipped with comfys3, beside the processor package."""
    return Path(__file__).resolve().parent.parent / "workflows"


@dataclass
class WorkflowRegistry:
    """Every template the worker knows, by name. Later folders override earlier ones."""

    workflows: dict[str, Workflow] = field(default_factory=dict)

    @classmethod
    def load(cls, *folders: Path | None) -> WorkflowRegistry:
        registry = cls()
        for folder in folders:
            if folder is None:
                continue
            if not folder.is_dir():
                raise WorkflowLoadError(f"workflows folder {folder} does not exist")
            for graph_path in sorted(folder.glob("*.json")):
                workflow = load_workflow(graph_path)
                registry.workflows[workflow.name] = workflow
        return registry

    @classmethod
    def default(cls, extra: Path | None = None) -> WorkflowRegistry:
        return cls.load(builtin_workflows_dir(), extra)

    def names(self) -> list[str]:
        return sorted(self.workflows)

    def get(self, name: str) -> Workflow:
        try:
            return self.workflows[name]
        except KeyError:
            raise ManifestError([Problem("workflow", self.unknown_message(name))]) from None

    def unknown_message(self, name: str) -> str:

        close = difflib.get_close_matches(name, self.names(), n=1, cutoff=0.4)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"unknown workflow {name!r}{hint} (known: {', '.join(self.names())})"


__all__ = [
    "Bind",
    "InputFile",
    "Sampler",
    "Scheduler",
    "StagedInput",
    "Workflow",
    "WorkflowLoadError",
    "WorkflowPayload",
    "WorkflowRegistry",
    "random_seed",
]
