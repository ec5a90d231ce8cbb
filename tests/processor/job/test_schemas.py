"""The generated JSON Schemas are current, mean what the models mean, and the docs' examples run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from processor.errors import ManifestError
from processor.job import schemas
from processor.job.manifest import JobManifest, OutputOptions, check_job_id, load_jobs
from processor.job.status import JobState, JobStatus
from processor.workflows import WorkflowRegistry, builtin_workflows_dir, load_workflow
from tests.paths import MANIFESTS, REPO
from triggers.cli import main as cli

ROOT = REPO
DOCS = ROOT / "docs" / "manifests.md"
DATA = MANIFESTS
EXAMPLE = re.compile(r"<!-- example: ([\w-]+)(?: ([\w-]+))? -->\n```(\w+)\n(.*?)\n```", re.DOTALL)


@pytest.fixture(scope="module")
def registry() -> WorkflowRegistry:
    return WorkflowRegistry.load(builtin_workflows_dir())


def validator(schema: dict[str, Any]) -> Draft202012Validator:
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


# --- the files on disk -----------------------------------------------------------------------


def test_schema_files_are_current() -> None:
    stale = schemas.stale_files(schemas.default_schemas_dir())
    assert stale == [], f"stale schemas {stale}: run `python -m processor.job.schemas`"


def test_expected_files_are_rendered(registry: WorkflowRegistry) -> None:
    names = {str(path) for path in schemas.render_all()}
    assert "job-manifest.schema.json" in names
    assert "job-status.schema.json" in names
    for name in registry.names():
        assert f"workflows/{name}.schema.json" in names


def test_stale_detection_and_rewrite(tmp_path: Path) -> None:
    assert schemas.write_all(tmp_path)  # first write creates everything
    assert schemas.stale_files(tmp_path) == []
    assert schemas.write_all(tmp_path) == []  # nothing changes the second time

    manifest = tmp_path / "job-manifest.schema.json"
    manifest.write_text(manifest.read_text().replace('"png"', '"gif"'))
    (tmp_path / "workflows" / "txt2img.schema.json").unlink()
    leftover = tmp_path / "workflows" / "retired.schema.json"
    leftover.write_text("{}")
    assert sorted(map(str, schemas.stale_files(tmp_path))) == [
        "job-manifest.schema.json",
        "workflows/retired.schema.json",
        "workflows/txt2img.schema.json",
    ]
    assert schemas.main(["--dir", str(tmp_path), "--check"]) == 1
    assert schemas.main(["--dir", str(tmp_path)]) == 0
    assert not leftover.exists()
    assert schemas.stale_files(tmp_path) == []
    assert schemas.main(["--dir", str(tmp_path), "--check"]) == 0


def test_rendering_is_deterministic() -> None:
    """A random default (the seed) must never reach a schema, or the files would churn."""
    assert schemas.render_all() == schemas.render_all()


# --- what the schemas mean -------------------------------------------------------------------


def test_manifest_schema_accepts_the_valid_fixtures() -> None:
    check = validator(schemas.manifest_schema())
    paths = [*sorted((DATA / "valid").glob("*.json")), DATA / "raw-graph.json"]
    for path in paths:
        errors = list(check.iter_errors(json.loads(path.read_text())))
        assert errors == [], (path.name, [e.message for e in errors])


@pytest.mark.parametrize(
    "document",
    [
        {"workflow": "txt2img", "paylod": {}},
        {"version": 2, "workflow": "txt2img"},
        {"workflow": "txt2img", "output": {"format": "gif"}},
        {"workflow": "txt2img", "output": {"quality": 0}},
        {"workflow": "txt2img", "rerun": "perhaps"},
        {"workflow": "txt2img", "batch": "not a list"},
    ],
)
def test_manifest_schema_refuses_what_the_model_refuses(
    registry: WorkflowRegistry, document: dict[str, Any]
) -> None:
    assert not validator(schemas.manifest_schema()).is_valid(document)
    with pytest.raises(ManifestError):
        load_jobs(json.dumps(document).encode(), manifest_key="x.json", registry=registry)


@pytest.mark.parametrize(
    "job_id", ["ok", "a.b", "A_9-z", "x" * 128, "x" * 129, "a/b", "a..b", ".x", "..", "a b", ""]
)
def test_manifest_schema_id_rule_matches_the_code(job_id: str) -> None:
    try:
        check_job_id(job_id)
        accepted = True
    except ValueError:
        accepted = False
    document = {"workflow": "txt2img", "id": job_id}
    assert validator(schemas.manifest_schema()).is_valid(document) == accepted


def test_status_schema_accepts_a_real_status() -> None:
    status = JobStatus(id="j", state=JobState.running)
    document = json.loads(status.to_json())
    check = validator(schemas.status_schema())
    assert check.is_valid(document)
    assert not check.is_valid({**document, "state": "exploded"})
    schema = schemas.status_schema()
    assert set(schema["properties"]) == set(JobStatus.model_fields)


def test_workflow_schema_checks_payloads() -> None:
    check = validator(schemas.workflow_schemas()["txt2img"])
    assert check.is_valid({"seed": 123})
    assert check.is_valid({})
    assert not check.is_valid({"steps": 0})
    assert not check.is_valid({"width": 500})
    assert not check.is_valid({"sed": 1})
    assert not check.is_valid({"sampler_name": "eulr"})
    assert not validator(schemas.workflow_schemas()["img2img"]).is_valid({})


def test_schemas_module_runs_as_a_script(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "processor.job.schemas", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "job-status.schema.json").is_file()
    assert "job-manifest.schema.json" in result.stdout


# --- the examples in docs/manifests.md --------------------------------------------------------


def doc_examples() -> list[tuple[str, str | None, str, str]]:
    return [m.groups() for m in EXAMPLE.finditer(DOCS.read_text())]  # type: ignore[misc]


def test_docs_have_examples_of_each_kind() -> None:
    kinds = [kind for kind, *_ in doc_examples()]
    assert kinds.count("manifest") >= 3
    assert kinds.count("status") >= 2
    assert "template-graph" in kinds
    assert "template-model" in kinds


def test_docs_manifest_examples_are_valid(registry: WorkflowRegistry) -> None:
    check = validator(schemas.manifest_schema())
    for kind, flag, language, text in doc_examples():
        if kind != "manifest":
            continue
        assert language == "json"
        document = json.loads(text)
        assert check.is_valid(document), text
        jobs = load_jobs(
            text.encode(), manifest_key="input/example.json", registry=registry, allow_raw=True
        )
        assert jobs
        if flag == "raw":
            with pytest.raises(ManifestError, match="COMFYS3_ALLOW_RAW_WORKFLOWS"):
                load_jobs(text.encode(), manifest_key="input/e.json", registry=registry)


def test_docs_status_examples_are_valid() -> None:
    check = validator(schemas.status_schema())
    for kind, _, language, text in doc_examples():
        if kind != "status":
            continue
        assert language == "json"
        document = json.loads(text)
        assert check.is_valid(document), text
        status = JobStatus.model_validate(document)
        # every field is shown, so the example documents the whole shape
        assert set(document) == set(JobStatus.model_fields)
        assert status.state in set(JobState)


def test_docs_status_example_payload_is_a_real_resolution(registry: WorkflowRegistry) -> None:
    """The resolved payload shown must be exactly what the template resolves it to."""
    for kind, _, _, text in doc_examples():
        document = json.loads(text) if kind == "status" else None
        if document and document["workflow"]:
            workflow = registry.get(document["workflow"])
            resolved = workflow.validate_payload(document["payload"]).model_dump(mode="json")
            assert resolved == document["payload"]


def test_docs_template_example_loads(tmp_path: Path) -> None:
    files: dict[str, dict[str, str]] = {}
    for kind, name, _, text in doc_examples():
        if kind.startswith("template-"):
            assert name
            files.setdefault(name, {})[kind] = text
    assert files
    for name, parts in files.items():
        (tmp_path / f"{name}.json").write_text(parts["template-graph"])
        (tmp_path / f"{name}.py").write_text(parts["template-model"])
        workflow = load_workflow(tmp_path / f"{name}.json")
        assert workflow.description
        payload = workflow.validate_payload({"image": "in/photo.png", "size": 256})
        graph = workflow.fill(payload, job_id="doc-example")
        assert workflow.input_files(payload)
        saves = [n for n in graph.values() if "filename_prefix" in n["inputs"]]
        assert saves
        assert all(n["inputs"]["filename_prefix"].startswith("comfys3/doc-example/") for n in saves)


def test_docs_name_every_manifest_and_status_field() -> None:
    text = DOCS.read_text()
    for field in JobManifest.model_fields:
        if field != "output":
            assert f"| `{field}` |" in text, field
    for field in OutputOptions.model_fields:
        assert f"| `output.{field}` |" in text, field
    for field in JobStatus.model_fields:
        assert f"`{field}`" in text, field
    for state in JobState:
        assert f"`{state.value}`" in text, state


def test_docs_validate_output_is_what_the_command_prints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for variable in list(os.environ):
        if variable.startswith("COMFYS3_"):
            monkeypatch.delenv(variable)
    blocks = {(kind, tag): text for kind, tag, _, text in doc_examples()}
    manifests = {tag: text for (kind, tag), text in blocks.items() if kind == "invalid-manifest"}
    assert manifests
    monkeypatch.chdir(tmp_path)
    for name, text in manifests.items():
        assert name
        (tmp_path / f"{name}.json").write_text(text)
        shown = blocks[("validate-output", name)]
        command, expected = shown.split("\n", 1)
        assert command == f"$ comfys3 validate {name}.json"
        assert cli.main(["validate", f"{name}.json"]) == 1
        assert capsys.readouterr().out == expected + "\n"
