"""Commands that need neither S3 nor ComfyUI: list templates, show schemas, validate manifests.

They read no S3 settings on purpose, so a user can check a manifest on a laptop before uploading.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from processor import (
    ManifestError,
    Workflow,
    WorkflowRegistry,
    key_problems,
    load_jobs,
    load_worker_settings,
)


def load_registry() -> WorkflowRegistry:
    settings = load_worker_settings()
    return WorkflowRegistry.default(settings.jobs.workflows_dir)


def _describe_type(schema: dict[str, Any]) -> str:
    if "enum" in schema:
        values = [str(v) for v in schema["enum"]]
        return "one of " + ", ".join(values[:6]) + (" ..." if len(values) > 6 else "")
    kind = str(schema.get("type", "any"))
    bounds = []
    for key, sign in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<=")):
        if key in schema:
            bounds.append(f"{sign}{schema[key]}")
    if "multipleOf" in schema:
        bounds.append(f"x{schema['multipleOf']}")
    return kind + (f" ({' '.join(bounds)})" if bounds else "")


@dataclass(frozen=True)
class FieldRow:
    """One payload field of a template, as ``comfys3 workflows`` and ``GET /workflows`` show
    it. ``has_default`` is false for a required field and for one filled at run time (a
    random seed), which ``default`` then leaves as None."""

    name: str
    kind: str
    required: bool
    has_default: bool
    default: Any
    description: str


def workflow_fields(workflow: Workflow) -> list[FieldRow]:
    schema = workflow.json_schema()
    required = set(schema.get("required", []))
    defs = schema.get("$defs", {})
    rows = []
    for name, prop in schema.get("properties", {}).items():
        if "$ref" in prop:
            prop = {**defs.get(prop["$ref"].rsplit("/", 1)[-1], {}), **prop}
        rows.append(
            FieldRow(
                name=name,
                kind=_describe_type(prop),
                required=name in required,
                has_default="default" in prop,
                default=prop.get("default"),
                description=str(prop.get("description") or ""),
            )
        )
    return rows


def workflow_table(workflow: Workflow) -> list[str]:
    lines = [f"{workflow.name}: {workflow.description}"]
    for row in workflow_fields(workflow):
        shown = row.default if row.has_default else "(auto)"
        default = "required" if row.required else f"default {shown!r}"
        lines.append(f"  {row.name:<16} {row.kind:<34} {default}")
        if row.description:
            lines.append(f"  {'':<16} {row.description}")
    return lines


def cmd_workflows(args: argparse.Namespace) -> int:
    registry = load_registry()
    if args.schema and args.name is None:
        print(
            "comfys3: --schema prints one template's schema: give its name, e.g. "
            f"`comfys3 workflows txt2img --schema` (templates: {', '.join(registry.names())})",
            file=sys.stderr,
        )
        return 2
    if args.name is None:
        for name in registry.names():
            print("\n".join(workflow_table(registry.workflows[name])))
            print()
        return 0
    if args.name not in registry.workflows:
        print(f"comfys3: {registry.unknown_message(args.name)}", file=sys.stderr)
        return 1
    workflow = registry.workflows[args.name]
    if args.schema:
        print(json.dumps(workflow.json_schema(), indent=2))
    else:
        print("\n".join(workflow_table(workflow)))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    settings = load_worker_settings()
    registry = WorkflowRegistry.default(settings.jobs.workflows_dir)
    failures = 0
    for path in args.files:
        try:
            data = Path(path).read_bytes()
        except OSError as error:
            print(f"{path}: cannot read: {error.strerror}")
            failures += 1
            continue
        try:
            jobs = load_jobs(
                data,
                manifest_key=Path(path).name,
                registry=registry,
                allow_raw=settings.jobs.allow_raw_workflows,
                max_bytes=settings.jobs.max_manifest_bytes,
            )
            problems = key_problems(jobs)  # what the worker would refuse when it stages them
            if problems:
                raise ManifestError(problems)
        except ManifestError as error:
            failures += 1
            print(f"{path}: invalid")
            for problem in error.problems:
                print(f"  {problem}")
            continue
        ids = ", ".join(job.id for job in jobs)
        print(f"{path}: ok ({len(jobs)} job{'s' if len(jobs) != 1 else ''}: {ids})")
        if args.print_graph:
            for job in jobs:
                print(json.dumps(job.graph, indent=2))
    return 1 if failures else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    workflows = subparsers.add_parser(
        "workflows",
        help="list workflow templates and their fields",
        description="List the workflow templates this worker knows (workflows/ and "
        "COMFYS3_WORKFLOWS_DIR), with each field's type, range and default.",
    )
    workflows.add_argument("name", nargs="?", metavar="NAME", help="show only this template")
    workflows.add_argument(
        "--schema", action="store_true", help="print the JSON Schema of NAME's payload"
    )
    workflows.set_defaults(handler=cmd_workflows)

    validate = subparsers.add_parser(
        "validate",
        help="check job manifests offline",
        description="""
            Check manifests without S3 or ComfyUI: template, payload, and input file names the
            worker would refuse (a leading /, '..', a URL). Whether the input files exist is
            checked by `comfys3 submit`. Exit 0 when all are valid; otherwise exit 1 and list,
            per file, every problem with its field path.
        """,
    )
    validate.add_argument("files", nargs="+", metavar="FILE", help="manifest files (JSON)")
    validate.add_argument(
        "--print-graph", action="store_true", help="print the filled ComfyUI graph of each job"
    )
    validate.set_defaults(handler=cmd_validate)
