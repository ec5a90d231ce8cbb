"""JSON Schemas of the documents users exchange with comfys3, rendered from the models.

The schemas under ``docs/schemas/`` are generated, never edited: the models are the truth, and
a test regenerates them in memory and fails when the files on disk are stale. Editors and
validators (``check-jsonschema``, VS Code's ``json.schemas``) can then check a manifest before
it is uploaded. Regenerate with ``python -m processor.job.schemas``; ``--check`` only compares.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from processor.job.manifest import JobManifest
from processor.job.status import JobStatus
from processor.workflows import WorkflowRegistry, builtin_workflows_dir

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
MANIFEST_SCHEMA = Path("job-manifest.schema.json")
STATUS_SCHEMA = Path("job-status.schema.json")
WORKFLOWS_SUBDIR = Path("workflows")
SCHEMA_SUFFIX = ".schema.json"


def default_schemas_dir() -> Path:
    """``docs/schemas`` of the checkout this package lives in."""
    return Path(__file__).resolve().parents[2] / "docs" / "schemas"


def _with_dialect(schema: dict[str, Any]) -> dict[str, Any]:
    return {"$schema": JSON_SCHEMA_DIALECT, **schema}


def manifest_schema() -> dict[str, Any]:
    """What a user may write: validation mode, so defaults are optional."""
    return _with_dialect(JobManifest.model_json_schema(mode="validation"))


def status_schema() -> dict[str, Any]:
    """What a user reads: serialization mode, so every field the worker writes is listed."""
    return _with_dialect(JobStatus.model_json_schema(mode="serialization"))


def workflow_schemas(registry: WorkflowRegistry | None = None) -> dict[str, dict[str, Any]]:
    """One payload schema per template. Only the shipped templates by default: the docs
    describe what comfys3 ships, not whatever COMFYS3_WORKFLOWS_DIR holds on this machine."""
    registry = registry or WorkflowRegistry.load(builtin_workflows_dir())
    return {
        name: _with_dialect(registry.workflows[name].json_schema()) for name in registry.names()
    }


def _text(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def render_all(registry: WorkflowRegistry | None = None) -> dict[Path, str]:
    """Every schema file, as paths relative to the schemas folder mapped to their text."""
    files = {MANIFEST_SCHEMA: _text(manifest_schema()), STATUS_SCHEMA: _text(status_schema())}
    for name, schema in workflow_schemas(registry).items():
        files[WORKFLOWS_SUBDIR / f"{name}{SCHEMA_SUFFIX}"] = _text(schema)
    return files


def _on_disk(root: Path) -> set[Path]:
    """Generated files present now; a schema of a template that no longer exists is stale."""
    found = {p for p in (MANIFEST_SCHEMA, STATUS_SCHEMA) if (root / p).is_file()}
    folder = root / WORKFLOWS_SUBDIR
    if folder.is_dir():
        found |= {p.relative_to(root) for p in folder.glob(f"*{SCHEMA_SUFFIX}")}
    return found


def stale_files(root: Path, registry: WorkflowRegistry | None = None) -> list[Path]:
    """Files under ``root`` that differ from, are missing from, or are absent in a fresh render."""
    expected = render_all(registry)
    stale = [
        rel
        for rel, text in expected.items()
        if not (root / rel).is_file() or (root / rel).read_text(encoding="utf-8") != text
    ]
    stale += sorted(_on_disk(root) - set(expected))
    return stale


def write_all(root: Path, registry: WorkflowRegistry | None = None) -> list[Path]:
    """Write every schema under ``root`` and delete leftovers; returns the files changed."""
    expected = render_all(registry)
    changed = []
    for rel, text in expected.items():
        path = root / rel
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        changed.append(rel)
    for rel in sorted(_on_disk(root) - set(expected)):
        (root / rel).unlink()
        changed.append(rel)
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m processor.job.schemas",
        description="Regenerate the JSON Schemas in docs/schemas/ from the models.",
    )
    parser.add_argument("--dir", type=Path, default=default_schemas_dir(), help="output folder")
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if any file is stale"
    )
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files(args.dir)
        for rel in stale:
            print(f"stale: {args.dir / rel}", file=sys.stderr)
        if stale:
            print("run: python -m processor.job.schemas", file=sys.stderr)
        return 1 if stale else 0
    for rel in write_all(args.dir):
        print(f"updated {args.dir / rel}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
