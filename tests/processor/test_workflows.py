"""Workflow templates: loading, binding checks, filling graphs, and overriding from a folder."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest

from processor.errors import ManifestError, WorkflowLoadError
from processor.settings import load_worker_settings
from processor.workflows import (
    Bind,
    StagedInput,
    Workflow,
    WorkflowRegistry,
    builtin_workflows_dir,
    load_workflow,
)

SHIPPED = {"img2img", "scale", "solid", "txt2img"}
MINIMAL_PAYLOADS: dict[str, dict[str, Any]] = {
    "img2img": {"image": "in/a.png"},
    "scale": {"image": "in/a.png"},
    "solid": {},
    "txt2img": {},
}

TINY_GRAPH = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "color": 0}},
    "2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x", "images": ["1", 0]}},
}
TINY_MODEL = '''"""A tiny test template."""

from typing import Annotated

from pydantic import Field

from processor.workflows import Bind, WorkflowPayload


class Payload(WorkflowPayload):
    """{doc}"""

    width: Annotated[int, Bind("{node}", "{input}")] = Field(8, ge=1)
'''


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("COMFYS3_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def registry() -> WorkflowRegistry:
    return WorkflowRegistry.load(builtin_workflows_dir())


def write_template(
    folder: Path,
    name: str,
    *,
    node: str = "1",
    input: str = "width",
    doc: str = "A tiny test template.",
    graph: dict[str, Any] | None = None,
    model: str | None = None,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(graph or TINY_GRAPH))
    text = model if model is not None else TINY_MODEL.format(node=node, input=input, doc=doc)
    (folder / f"{name}.py").write_text(text)
    return folder / f"{name}.json"


def filled(workflow: Workflow, payload: dict[str, Any], job_id: str = "job") -> dict[str, Any]:
    return workflow.fill(workflow.validate_payload(payload), job_id=job_id)


# --- the shipped templates -----------------------------------------------------------------


def test_every_shipped_template_loads(registry: WorkflowRegistry) -> None:
    on_disk = {p.stem for p in builtin_workflows_dir().glob("*.json")}
    assert on_disk == SHIPPED
    assert set(registry.names()) == SHIPPED
    for name in SHIPPED:
        workflow = registry.get(name)
        assert (builtin_workflows_dir() / f"{name}.py").is_file()
        assert workflow.description, name
        assert workflow.bindings, name
        graph = filled(workflow, MINIMAL_PAYLOADS[name], job_id=f"t-{name}")
        assert set(graph) == set(workflow.graph)
        prefixes = [
            n["inputs"]["filename_prefix"]
            for n in graph.values()
            if "filename_prefix" in n["inputs"]
        ]
        assert prefixes, f"{name} has no save node"


def test_txt2img_mapping_is_the_classic_graph(registry: WorkflowRegistry) -> None:
    bindings = {
        b.field: [(t.node, t.input) for t in b.targets] for b in registry.get("txt2img").bindings
    }
    assert bindings == {
        "seed": [("3", "seed")],
        "steps": [("3", "steps")],
        "cfg_scale": [("3", "cfg")],
        "sampler_name": [("3", "sampler_name")],
        "scheduler": [("3", "scheduler")],
        "ckpt_name": [("4", "ckpt_name")],
        "batch_size": [("5", "batch_size")],
        "width": [("5", "width")],
        "height": [("5", "height")],
        "prompt": [("6", "text")],
        "negative_prompt": [("7", "text")],
    }


def test_txt2img_values_land_where_bound(registry: WorkflowRegistry) -> None:
    graph = filled(
        registry.get("txt2img"),
        {
            "seed": 11,
            "steps": 12,
            "cfg_scale": 3.5,
            "sampler_name": "dpmpp_2m",
            "ckpt_name": "sdxl.safetensors",
            "batch_size": 4,
            "width": 640,
            "height": 384,
            "prompt": "a lighthouse",
            "negative_prompt": "fog",
        },
    )
    assert graph["3"]["inputs"]["seed"] == 11
    assert graph["3"]["inputs"]["steps"] == 12
    assert graph["3"]["inputs"]["cfg"] == 3.5
    assert graph["3"]["inputs"]["sampler_name"] == "dpmpp_2m"
    assert graph["4"]["inputs"]["ckpt_name"] == "sdxl.safetensors"
    assert graph["5"]["inputs"] == {"width": 640, "height": 384, "batch_size": 4}
    assert graph["6"]["inputs"]["text"] == "a lighthouse"
    assert graph["7"]["inputs"]["text"] == "fog"
    # links between nodes survive filling
    assert graph["3"]["inputs"]["model"] == ["4", 0]
    assert graph["8"]["inputs"]["samples"] == ["3", 0]


def test_missing_seed_becomes_a_random_recorded_one(registry: WorkflowRegistry) -> None:
    workflow = registry.get("txt2img")
    first = workflow.validate_payload({})
    second = workflow.validate_payload({})
    seed_one = first.model_dump()["seed"]
    seed_two = second.model_dump()["seed"]
    assert isinstance(seed_one, int)
    assert seed_one >= 0
    assert seed_one != seed_two  # 2**63 possibilities
    assert workflow.fill(first, job_id="j")["3"]["inputs"]["seed"] == seed_one


def test_filling_never_mutates_the_template(registry: WorkflowRegistry) -> None:
    for name in SHIPPED:
        workflow = registry.get(name)
        before = copy.deepcopy(workflow.graph)
        payload = workflow.validate_payload(MINIMAL_PAYLOADS[name])
        graph = workflow.fill(payload, job_id="mutation-check", staged={"image": "up/x.png"})
        graph["extra"] = {"inputs": {}}
        for node in graph.values():
            node["inputs"]["poke"] = 1
        assert workflow.graph == before, name


def test_save_prefix_comes_from_the_job_id(registry: WorkflowRegistry) -> None:
    graph = filled(registry.get("txt2img"), {}, job_id="order-77")
    assert graph["9"]["inputs"]["filename_prefix"] == "comfys3/order-77/9"
    assert registry.get("txt2img").graph["9"]["inputs"]["filename_prefix"] == "ComfyUI"


def test_img2img_image_is_an_input_file(registry: WorkflowRegistry) -> None:
    workflow = registry.get("img2img")
    payload = workflow.validate_payload({"image": "uploads/cat.png", "seed": 1})
    (staged,) = workflow.input_files(payload)
    assert staged == StagedInput("image", "uploads/cat.png", (Bind("1", "image"),))
    # without a staged name the reference itself is filled; with one, ComfyUI's name wins
    assert workflow.fill(payload, job_id="j")["1"]["inputs"]["image"] == "uploads/cat.png"
    graph = workflow.fill(payload, job_id="j", staged={"image": "comfys3/j/cat.png"})
    assert graph["1"]["inputs"]["image"] == "comfys3/j/cat.png"
    assert registry.get("txt2img").input_files(registry.get("txt2img").validate_payload({})) == []


def test_unknown_workflow_names_the_closest(registry: WorkflowRegistry) -> None:
    with pytest.raises(ManifestError) as caught:
        registry.get("img2imgg")
    (problem,) = caught.value.problems
    assert problem.path == "workflow"
    assert "did you mean 'img2img'?" in problem.message


def test_json_schema_of_a_payload(registry: WorkflowRegistry) -> None:
    schema = registry.get("txt2img").json_schema()
    assert schema["additionalProperties"] is False
    assert {"seed", "steps", "cfg_scale", "prompt"} <= set(schema["properties"])
    assert schema["properties"]["width"]["multipleOf"] == 8
    assert "default" not in schema["properties"]["seed"]  # random per job, not a constant
    assert registry.get("img2img").json_schema()["required"] == ["image"]


# --- broken templates ----------------------------------------------------------------------


def test_binding_to_a_missing_node_fails_at_load(tmp_path: Path) -> None:
    path = write_template(tmp_path, "ghost", node="99", input="width")
    with pytest.raises(WorkflowLoadError) as caught:
        load_workflow(path)
    message = str(caught.value)
    assert "ghost" in message
    assert "field 'width'" in message
    assert "node '99' input 'width'" in message
    assert "no node '99'" in message


def test_binding_to_a_missing_input_fails_at_load(tmp_path: Path) -> None:
    path = write_template(tmp_path, "typo", node="1", input="widht")
    with pytest.raises(WorkflowLoadError) as caught:
        load_workflow(path)
    message = str(caught.value)
    assert "node '1'" in message
    assert "(EmptyImage)" in message
    assert "input 'widht'" in message


def test_template_with_a_syntax_error_names_the_file(tmp_path: Path) -> None:
    path = write_template(tmp_path, "broken", model="class Payload(:\n")
    with pytest.raises(WorkflowLoadError) as caught:
        load_workflow(path)
    assert str(tmp_path / "broken.py") in str(caught.value)
    assert "SyntaxError" in str(caught.value)


def test_template_raising_on_import_names_the_file(tmp_path: Path) -> None:
    path = write_template(tmp_path, "raises", model="raise RuntimeError('boom')\n")
    with pytest.raises(WorkflowLoadError, match=r"raises\.py: RuntimeError: boom"):
        load_workflow(path)


def test_graph_with_invalid_json_names_the_file(tmp_path: Path) -> None:
    path = write_template(tmp_path, "badjson")
    path.write_text("{not json")
    with pytest.raises(WorkflowLoadError) as caught:
        load_workflow(path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("graph_text", ["[]", "{}", '"text"'])
def test_graph_that_is_not_an_api_graph(tmp_path: Path, graph_text: str) -> None:
    path = write_template(tmp_path, "notgraph")
    path.write_text(graph_text)
    with pytest.raises(WorkflowLoadError, match="is not a ComfyUI API graph"):
        load_workflow(path)


def test_graph_without_its_model(tmp_path: Path) -> None:
    path = write_template(tmp_path, "lonely")
    path.with_suffix(".py").unlink()
    with pytest.raises(WorkflowLoadError, match=r"lonely\.py is missing"):
        load_workflow(path)


def test_model_without_payload_class(tmp_path: Path) -> None:
    path = write_template(tmp_path, "nopayload", model="class Other:\n    pass\n")
    with pytest.raises(WorkflowLoadError, match="defines no Payload model"):
        load_workflow(path)


def test_template_using_future_annotations_keeps_its_bindings(tmp_path: Path) -> None:
    """The project's own style: string annotations must still reach Bind metadata."""
    model = (
        "from __future__ import annotations\n"
        + TINY_MODEL.format(node="1", input="width", doc="Future.").split(
            '"""A tiny test template."""', 1
        )[1]
    )
    path = write_template(tmp_path, "future", model=model)
    workflow = load_workflow(path)
    assert [b.field for b in workflow.bindings] == ["width"]
    assert filled(workflow, {"width": 5})["1"]["inputs"]["width"] == 5


def test_template_with_an_unresolvable_annotation_names_the_file(tmp_path: Path) -> None:
    model = (
        "from __future__ import annotations\n"
        "from processor.workflows import WorkflowPayload\n"
        "class Payload(WorkflowPayload):\n"
        "    width: Nowhere = 1\n"
    )
    path = write_template(tmp_path, "unresolved", model=model)
    with pytest.raises(WorkflowLoadError, match=r"unresolved\.py.*Nowhere"):
        load_workflow(path)


def test_missing_extra_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(WorkflowLoadError, match="does not exist"):
        WorkflowRegistry.default(tmp_path / "nope")


# --- extra folder --------------------------------------------------------------------------


def test_extra_folder_adds_and_overrides_by_name(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    write_template(tmp_path, "tiny", doc="Added from the extra folder.")
    write_template(tmp_path, "txt2img", doc="My own txt2img.")
    monkeypatch.setenv("COMFYS3_WORKFLOWS_DIR", str(tmp_path))
    registry = WorkflowRegistry.default(load_worker_settings().jobs.workflows_dir)
    assert set(registry.names()) == SHIPPED | {"tiny"}
    assert registry.get("tiny").description == "Added from the extra folder."
    override = registry.get("txt2img")
    assert override.description == "My own txt2img."
    assert override.source == tmp_path / "txt2img.json"
    assert list(override.payload_model.model_fields) == ["width"]
    # the shipped template is untouched by the override in another registry
    shipped = WorkflowRegistry.load(builtin_workflows_dir()).get("txt2img")
    assert "seed" in shipped.payload_model.model_fields


def test_broken_template_in_extra_folder_stops_the_registry(tmp_path: Path) -> None:
    write_template(tmp_path, "ok")
    write_template(tmp_path, "bad", node="42")
    with pytest.raises(WorkflowLoadError, match="workflow 'bad'"):
        WorkflowRegistry.default(tmp_path)


def test_a_field_may_feed_several_inputs(tmp_path: Path) -> None:
    model = '''
from typing import Annotated
from processor.workflows import Bind, WorkflowPayload
class Payload(WorkflowPayload):
    """Square."""
    size: Annotated[int, Bind("1", "width"), Bind("1", "height")] = 8
'''
    workflow = load_workflow(write_template(tmp_path, "square", model=model))
    graph = filled(workflow, {"size": 24})
    assert (graph["1"]["inputs"]["width"], graph["1"]["inputs"]["height"]) == (24, 24)
    assert graph["2"]["inputs"]["filename_prefix"] == "comfys3/job/2"
