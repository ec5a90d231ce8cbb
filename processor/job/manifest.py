"""The two documents users read and write: the job manifest (in) and the job status (out).

A manifest is checked in two passes: its own shape (``JobManifest``), then its payload against
the chosen template. Both passes report every problem with its field path, so one round trip
fixes a manifest instead of one error at a time.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from processor.errors import JsonLimitError, ManifestError, Problem, problems_from_validation
from processor.job.status_book import StatusBook
from processor.models.spec import MAX_MODELS, ModelSpec
from processor.safejson import load_json
from processor.storage.layout import MAX_PRIORITY, split_priority
from processor.workflows import (
    Bind,
    Graph,
    StagedInput,
    WorkflowRegistry,
    set_output_prefixes,
)

MANIFEST_VERSION: Literal[1] = 1
JOB_ID_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"
MAX_BATCH = 1000
MAX_GRAPH_INPUTS = 100

NotifyCheck = Callable[[str], str | None]


def check_job_id(value: str) -> str:
    """Ids become key prefixes and folder names, so nothing that could climb out of one."""
    if len(value) > 128:
        raise ValueError(f"is {len(value)} characters; the limit is 128")
    if not re.fullmatch(JOB_ID_PATTERN, value):
        raise ValueError("must be 1-128 characters of A-Z a-z 0-9 . _ -")
    if ".." in value or value.startswith("."):
        raise ValueError("must not start with '.' or contain '..'")
    return value


class OutputOptions(BaseModel):
    """How images are written back. PNG is what ComfyUI makes; other formats are converted."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["png", "jpeg", "webp"] = Field("png", description="Image file format.")
    quality: int = Field(90, ge=1, le=100, description="JPEG/WebP quality (ignored for PNG).")


class NotifyOptions(BaseModel):
    """Where to POST the job's status when it ends (a Standard Webhooks signed request)."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        max_length=2048,
        description="https URL; must match the worker's COMFYS3_WEBHOOK_ALLOW host patterns.",
    )


class JobManifest(BaseModel):
    """What a user drops into the input prefix: which template, with which values."""

    model_config = ConfigDict(extra="forbid", title="comfys3 job manifest")

    version: Literal[1] = Field(MANIFEST_VERSION, description="Manifest format version.")
    id: str | None = Field(
        None,
        description="Job id; default: the manifest file's name without .json. "
        "1-128 of A-Z a-z 0-9 . _ -",
        # In the JSON Schema only, so editors flag a bad id; the validator gives the message.
        json_schema_extra={
            "pattern": JOB_ID_PATTERN,
            "not": {"type": "string", "pattern": r"^\.|\.\."},
        },
    )
    workflow: str | None = Field(None, description="Name of a workflow template.")
    payload: dict[str, Any] = Field(
        default_factory=dict, description="Values for the template's fields."
    )
    batch: list[dict[str, Any]] | None = Field(
        None,
        max_length=MAX_BATCH,
        description="One job per entry: each entry is merged over `payload`. "
        "Job ids are `<id>-<n>`, n from 1.",
    )
    graph: dict[str, Any] | None = Field(
        None,
        description="A raw ComfyUI API graph instead of a template "
        "(refused unless COMFYS3_ALLOW_RAW_WORKFLOWS=true).",
    )
    graph_inputs: dict[str, str] | None = Field(
        None,
        max_length=MAX_GRAPH_INPUTS,
        description="With a raw `graph`: input files to stage into ComfyUI first, by the name "
        "the graph uses for each (a LoadImage's `image`) -> the file (a key in the bucket, "
        "or a path under the local root). Every node input whose value is that name then "
        "receives the staged file.",
    )
    output: OutputOptions = Field(default_factory=OutputOptions)  # type: ignore[arg-type]
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="Free-form; copied into the status."
    )
    rerun: bool = Field(False, description="Run again even if this id already succeeded.")
    timeout_s: float | None = Field(
        None,
        gt=0,
        description="Seconds the job may run on ComfyUI once it starts; capped by the worker's "
        "COMFYS3_JOB_TIMEOUT. A job past it fails with error type `timeout`, not retried.",
    )
    priority: int = Field(
        0,
        ge=-MAX_PRIORITY,
        le=MAX_PRIORITY,
        description="Higher is claimed first, ties by age. Workers read it from the manifest's "
        "key (`comfys3 submit` names it so; see docs/layout.md), not from its body.",
    )
    notify: NotifyOptions | None = Field(
        None, description="A webhook for this job's final status (see docs/webhooks.md)."
    )
    models: list[ModelSpec] = Field(
        default_factory=list,
        max_length=MAX_MODELS,
        description="Models the job needs, fetched into the worker's model cache before it "
        "runs unless they are there (see docs/manifests.md#models).",
    )

    @field_validator("id")
    @classmethod
    def _id(cls, value: str | None) -> str | None:
        return None if value is None else check_job_id(value)

    @field_validator("batch")
    @classmethod
    def _batch(cls, value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if value is not None and not value:
            raise ValueError("is empty; give at least one entry, or leave 'batch' out")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> JobManifest:
        if self.workflow is None and self.graph is None:
            raise ValueError("needs 'workflow' (a template name) or 'graph' (a raw ComfyUI graph)")
        if self.workflow is not None and self.graph is not None:
            raise ValueError("give either 'workflow' or 'graph', not both")
        if self.graph is not None and (self.payload or self.batch):
            raise ValueError("a raw 'graph' takes no 'payload' or 'batch'")
        named: dict[str, str] = {}
        for model in self.models:
            earlier = named.setdefault(model.label, model.sha256 or "")
            if earlier != (model.sha256 or ""):
                raise ValueError(f"models: {model.label} is named twice, with different sha256")
        if self.graph_inputs is not None and self.graph is None:
            raise ValueError(
                "'graph_inputs' goes with a raw 'graph'; a template names its files in 'payload'"
            )
        return self


@dataclass(frozen=True)
class Job:
    """One runnable unit, resolved from a manifest: everything the pipeline needs to run it."""

    id: str
    manifest_key: str
    workflow: str
    payload: dict[str, Any]
    graph: Graph
    inputs: list[StagedInput]
    output: OutputOptions
    metadata: dict[str, Any]
    rerun: bool = False
    batch_index: int | None = None
    notify_url: str | None = None
    timeout_s: float | None = None
    priority: int = 0
    # The manifest's id: for a batch the id its entries extend (``x`` of ``x-1``), else the
    # job's own. A cancel named by it cancels every job of the manifest.
    base_id: str = ""

    @property
    def cancel_names(self) -> tuple[str, ...]:
        """The names a cancel request for this job may carry: its id, or its batch's."""
        return (self.id,) if self.base_id in ("", self.id) else (self.id, self.base_id)

    models: tuple[ModelSpec, ...] = ()

    def filled_graph(self, staged: dict[str, str], run_id: str | None = None) -> Graph:
        """The graph for one run: staged input names in place of the user's file references,
        and, given a run id, save prefixes unique to the run.

        A unique prefix matters: ComfyUI answers a fully cached run with the files of the
        earlier run, which the worker has already cleaned up; a new prefix makes SaveImage run.
        """
        graph = json.loads(json.dumps(self.graph))
        for item in self.inputs:
            for target in item.targets:
                graph[target.node]["inputs"][target.input] = staged[item.field]
        if run_id is not None:
            set_output_prefixes(graph, f"{self.id}/{run_id}")
        return graph


def default_job_id(manifest_key: str) -> str:
    """The job id of a manifest without an ``id``: its name, less any priority marker."""
    return split_priority(PurePosixPath(manifest_key).stem)[1]


def parse_manifest_bytes(data: bytes, *, max_bytes: int) -> dict[str, Any]:
    if len(data) > max_bytes:
        raise ManifestError.single(
            f"manifest is {len(data)} bytes; the limit is {max_bytes} (COMFYS3_MAX_MANIFEST_BYTES)"
        )
    try:
        document = load_json(data)
    except JsonLimitError as error:
        raise ManifestError.single(f"manifest {error}") from None
    if not isinstance(document, dict):
        raise ManifestError.single(f"manifest must be a JSON object, not {type(document).__name__}")
    return document


def parse_manifest(document: dict[str, Any]) -> JobManifest:
    try:
        return JobManifest.model_validate(document)
    except ValidationError as error:
        known = list(JobManifest.model_fields)
        raise ManifestError(problems_from_validation(error, "", known)) from None


def resolve_jobs(
    manifest: JobManifest,
    *,
    manifest_key: str,
    registry: WorkflowRegistry,
    allow_raw: bool,
    notify_check: NotifyCheck | None = None,
) -> list[Job]:
    """Validate the payload(s) against the template and fill the graph(s). ``notify_check``
    is the worker's webhook policy: why a ``notify.url`` is refused, or None."""
    job_id = manifest.id or default_job_id(manifest_key)
    try:
        check_job_id(job_id)
    except ValueError as error:
        raise ManifestError([Problem("id", f"{job_id!r} {error} (set 'id' explicitly)")]) from None
    notify_url = manifest.notify.url if manifest.notify is not None else None
    if notify_url is not None and notify_check is not None:
        refusal = notify_check(notify_url)
        if refusal is not None:
            raise ManifestError.single(refusal, "notify.url")
    common: dict[str, Any] = {
        "manifest_key": manifest_key,
        "output": manifest.output,
        "metadata": manifest.metadata,
        "rerun": manifest.rerun,
        "notify_url": notify_url,
        "timeout_s": manifest.timeout_s,
        "priority": manifest.priority,
        "base_id": job_id,
        "models": tuple(manifest.models),
    }
    if manifest.graph is not None:
        if not allow_raw:
            raise ManifestError.single(
                "raw ComfyUI graphs are not allowed on this worker; use a workflow template "
                "or set COMFYS3_ALLOW_RAW_WORKFLOWS=true",
                "graph",
            )
        graph = json.loads(json.dumps(manifest.graph))
        inputs = graph_inputs(graph, manifest.graph_inputs or {})
        set_output_prefixes(graph, job_id)
        return [
            Job(job_id, workflow="(raw graph)", payload={}, graph=graph, inputs=inputs, **common)
        ]

    assert manifest.workflow is not None
    workflow = registry.get(manifest.workflow)
    entries: list[tuple[str, int | None, dict[str, Any], str]]
    if manifest.batch is None:
        entries = [(job_id, None, manifest.payload, "payload")]
    else:
        width = max(1, len(str(len(manifest.batch))))
        entries = [
            (f"{job_id}-{n:0{width}d}", n, {**manifest.payload, **entry}, f"batch[{n - 1}]")
            for n, entry in enumerate(manifest.batch, start=1)
        ]
    jobs: list[Job] = []
    problems: list[Problem] = []
    for entry_id, index, values, where in entries:
        try:
            check_job_id(entry_id)
            payload = workflow.validate_payload(values)
        except ValueError as error:
            problems.append(Problem("id", f"batch job id {entry_id!r} {error}"))
            continue
        except ManifestError as error:
            for problem in error.problems:
                problem = _locate_batch_problem(problem, where, manifest)
                if problem not in problems:  # a bad shared value is reported once, not per entry
                    problems.append(problem)
            continue
        job = Job(
            entry_id,
            workflow=workflow.name,
            payload=payload.model_dump(mode="json"),
            graph=workflow.fill(payload, job_id=entry_id),
            inputs=workflow.input_files(payload),
            batch_index=index,
            **common,
        )
        unwritable = _unwritable_status(job, where)
        if unwritable is not None:
            problems.append(unwritable)
            continue
        jobs.append(job)
    if problems:
        raise ManifestError(problems)
    return jobs


def file_targets(graph: Graph, name: str) -> tuple[Bind, ...]:
    """Every node input of ``graph`` whose value is ``name``: where a file it names goes."""
    return tuple(
        Bind(str(node_id), input_name)
        for node_id, node in graph.items()
        if isinstance(node, dict) and isinstance(node.get("inputs"), dict)
        for input_name, value in node["inputs"].items()
        if value == name
    )


def graph_inputs(graph: Graph, named: dict[str, str]) -> list[StagedInput]:
    """A raw graph's input files, each bound to every node input whose value is its name.

    That is how a graph exported from ComfyUI refers to a file (a LoadImage's ``image`` is
    ``"cat.png"``), so the graph runs as exported; the staged file's own name in ComfyUI's
    input folder replaces it at run time. A name no node uses is a problem: it is a typo, or a
    file the graph does not need.
    """
    staged: list[StagedInput] = []
    problems: list[Problem] = []
    for name, source in named.items():
        targets = file_targets(graph, name)
        if not targets:
            problems.append(
                Problem(
                    f"graph_inputs.{name}",
                    f"no node of the graph has an input whose value is {name!r}; name the file "
                    "as the graph does (e.g. a LoadImage's 'image')",
                )
            )
            continue
        staged.append(StagedInput(name, source, targets, where="graph_inputs"))
    if problems:
        raise ManifestError(problems)
    return staged


def _unwritable_status(job: Job, where: str) -> Problem | None:
    """A job whose status document cannot be written must fail here, before anything runs:
    found later, it would fail after its GPU time, and take its batch siblings with it."""
    reason = StatusBook.unrecordable(job)
    return (
        None
        if reason is None
        else Problem(where, f"cannot be recorded in the job's status: {reason}")
    )


def _locate_batch_problem(problem: Problem, where: str, manifest: JobManifest) -> Problem:
    """Point a batch problem at the entry that caused it (``batch[1].steps``), or at the shared
    ``payload`` when the bad value came from there, so the path names what to edit."""
    if where == "payload" or not problem.path.startswith("payload"):
        return problem
    rest = problem.path[len("payload") :]
    field_name = rest.lstrip(".").split(".", 1)[0].split("[", 1)[0]
    index = int(where[len("batch[") : -1])
    entry = (manifest.batch or [])[index]
    if field_name and field_name not in entry and field_name in manifest.payload:
        return problem
    return Problem(f"{where}{rest}", problem.message)


def load_jobs(
    data: bytes,
    *,
    manifest_key: str,
    registry: WorkflowRegistry,
    allow_raw: bool = False,
    max_bytes: int = 1_048_576,
    notify_check: NotifyCheck | None = None,
) -> list[Job]:
    """Bytes of a manifest -> runnable jobs, or a ManifestError listing every problem."""
    document = parse_manifest_bytes(data, max_bytes=max_bytes)
    try:
        manifest = parse_manifest(document)
    except ManifestError as error:
        # The shape is wrong, but the payload may be checkable anyway: report its problems in
        # the same round instead of after the user has fixed the shape.
        raise ManifestError(error.problems + _payload_problems(document, registry)) from None
    return resolve_jobs(
        manifest,
        manifest_key=manifest_key,
        registry=registry,
        allow_raw=allow_raw,
        notify_check=notify_check,
    )


def _payload_problems(document: dict[str, Any], registry: WorkflowRegistry) -> list[Problem]:
    """Problems of the template and payload of a manifest whose shape failed, when both can be
    told apart from the shape errors (a string workflow, a payload object, no batch)."""
    name, payload = document.get("workflow"), document.get("payload", {})
    if not isinstance(name, str) or not isinstance(payload, dict) or "batch" in document:
        return []
    if name not in registry.workflows:
        return [Problem("workflow", registry.unknown_message(name))]
    try:
        registry.workflows[name].validate_payload(payload)
    except ManifestError as error:
        return error.problems
    return []
