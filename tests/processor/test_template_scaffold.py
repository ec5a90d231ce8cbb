"""`comfys3 template new`: a template from a user's own graph (an "Export (API)" file).

The graphs under tests/data/graphs/ are written in the API format the editor exports: the
classic txt2img, a hires fix with two samplers, LoRA + img2img, SDXL base + refiner, Flux with
the custom-sampler nodes, a graph with titles and custom nodes, a pixel-space hires fix small
enough for the fake ComfyUI, and a UI-format save for the error.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from processor import workflows
from processor.template_scaffold import (
    FieldPlan,
    NodeCatalog,
    Plan,
    ScaffoldError,
    check_template_name,
    differences,
    is_link,
    node_order,
    parse_graph,
    plan_template,
    py_literal,
    render_graph,
    render_module,
)
from processor.workflows import WorkflowPayload, builtin_workflows_dir, load_workflow
from tests.fake_comfyui.nodes import NODES, NodeContext
from tests.fake_comfyui.state import FakeState
from tests.s3_servers import free_port
from tests.workers import ROOT, comfys3
from triggers.cli import main as cli

GRAPHS = ROOT / "tests" / "data" / "graphs"
API_GRAPHS = sorted(p.stem for p in GRAPHS.glob("*.json") if p.stem != "ui_export")
RUFF = Path(sys.executable).parent / "ruff"


def graph(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((GRAPHS / f"{name}.json").read_text())
    return data


def plan_of(name: str, catalog: NodeCatalog | None = None) -> Plan:
    return plan_template(graph(name), catalog)


def by_name(plan: Plan) -> dict[str, FieldPlan]:
    return {f.name: f for f in plan.fields}


def bound(plan: Plan) -> dict[str, list[str]]:
    return {f.name: [str(t) for t in f.targets] for f in plan.fields}


def fake_object_info() -> dict[str, Any]:
    """What the fake ComfyUI answers on GET /object_info (its node specs follow 0.3.64)."""
    with tempfile.TemporaryDirectory() as scratch:
        base = Path(scratch)
        ctx = NodeContext(base, base, base, FakeState())
        return {name: node.info(ctx) for name, node in NODES.items()}


def write_template(folder: Path, name: str, plan: Plan, source: str = "graph.json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(render_graph(plan.graph), encoding="utf-8")
    path.with_suffix(".py").write_text(render_module(plan, name, source), encoding="utf-8")
    return path


def filled_with(path: Path, payload: dict[str, Any]) -> dict[str, Any]:
    workflow = load_workflow(path)
    return workflow.fill(workflow.validate_payload(payload), job_id="job")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("COMFYS3_"):
            monkeypatch.delenv(name)


# --- the plan: what becomes a field ------------------------------------------------------------


def test_classic_txt2img_gets_the_fields_of_the_shipped_template() -> None:
    plan = plan_of("txt2img_classic")
    assert bound(plan) == {
        "prompt": ["6.text"],
        "negative_prompt": ["7.text"],
        "ckpt_name": ["4.ckpt_name"],
        "width": ["5.width"],
        "height": ["5.height"],
        "batch_size": ["5.batch_size"],
        "seed": ["3.seed"],
        "steps": ["3.steps"],
        "cfg_scale": ["3.cfg"],
        "sampler_name": ["3.sampler_name"],
        "scheduler": ["3.scheduler"],
        "denoise": ["3.denoise"],
    }
    shipped = load_workflow(builtin_workflows_dir() / "txt2img.json").payload_model
    assert set(bound(plan)) == {*shipped.model_fields, "denoise"}  # a manifest fits both
    fields = by_name(plan)
    assert fields["seed"].default == 156680208700286 and fields["seed"].python_type == "int"
    assert fields["prompt"].default.startswith("beautiful scenery")
    assert fields["negative_prompt"].default == "text, watermark"
    assert fields["sampler_name"].python_type == "str"  # no object_info: plain text
    assert [(v.node, v.input, v.value) for v in plan.fixed] == [("9", "filename_prefix", "ComfyUI")]


def test_positive_and_negative_are_told_by_the_sampler_input_they_feed() -> None:
    swapped = graph("txt2img_classic")
    sampler = swapped["3"]["inputs"]
    sampler["positive"], sampler["negative"] = sampler["negative"], sampler["positive"]
    plan = plan_template(swapped)
    assert bound(plan)["prompt"] == ["7.text"] and bound(plan)["negative_prompt"] == ["6.text"]
    assert by_name(plan)["prompt"].default == "text, watermark"


def test_two_samplers_take_the_title_of_the_second() -> None:
    plan = plan_of("hires_fix")
    names = bound(plan)
    assert names["seed"] == ["3.seed"] and names["hires_seed"] == ["11.seed"]
    assert names["denoise"] == ["3.denoise"] and names["hires_denoise"] == ["11.denoise"]
    assert by_name(plan)["hires_seed"].default == 469771404043268
    # The latent upscale is structure, not a value to vary: left fixed and listed.
    assert {(v.node, v.input) for v in plan.fixed} >= {("10", "width"), ("10", "upscale_method")}


def test_two_untitled_samplers_are_numbered() -> None:
    untitled = graph("hires_fix")
    for node in untitled.values():
        node.pop("_meta")
    names = bound(plan_template(untitled))
    assert names["seed"] == ["3.seed"] and names["seed_2"] == ["11.seed"]
    assert names["steps_2"] == ["11.steps"] and "hires_seed" not in names


def test_lora_and_load_image() -> None:
    plan = plan_of("lora_img2img")
    fields = by_name(plan)
    assert bound(plan)["lora_name"] == ["10.lora_name"]
    assert fields["lora_strength_model"].default == 0.8
    assert fields["lora_strength_clip"].default == 0.65
    image = fields["image"]
    # An input file, as in img2img.py; omitted, the graph keeps ComfyUI's own file name.
    assert image.input_file and image.default is None and image.graph_value == "portrait.png"
    assert "portrait.png" in image.description
    assert fields["denoise"].default == 0.55 and (fields["denoise"].ge, fields["denoise"].le) == (
        0.0,
        1.0,
    )


def test_sdxl_refiner_one_prompt_for_every_encoder_of_it() -> None:
    plan = plan_of("sdxl_refiner")
    names = bound(plan)
    assert names["prompt"] == ["6.text_g", "6.text_l", "15.text"]
    assert names["negative_prompt"] == ["7.text", "16.text"]
    assert names["base_ckpt_name"] == ["4.ckpt_name"]
    assert names["refiner_ckpt_name"] == ["12.ckpt_name"]
    assert names["base_seed"] == ["10.noise_seed"] and names["refiner_seed"] == ["11.noise_seed"]
    fixed = {(v.node, v.input) for v in plan.fixed}
    assert ("10", "end_at_step") in fixed and ("15", "ascore") in fixed


def test_texts_of_differently_titled_nodes_stay_apart() -> None:
    regions = graph("txt2img_classic")
    regions["7"]["inputs"]["text"] = regions["6"]["inputs"]["text"]
    regions["7"]["inputs"]["clip"] = ["4", 1]
    regions["10"] = {
        "class_type": "CLIPTextEncode",
        "inputs": {"text": regions["6"]["inputs"]["text"], "clip": ["4", 1]},
        "_meta": {"title": "Background"},
    }
    regions["11"] = {
        "class_type": "ConditioningCombine",
        "inputs": {"conditioning_1": ["6", 0], "conditioning_2": ["10", 0]},
    }
    regions["3"]["inputs"]["positive"] = ["11", 0]
    names = bound(plan_template(regions))
    assert names["prompt"] == ["6.text"] and names["background_prompt"] == ["10.text"]
    assert names["negative_prompt"] == ["7.text"]


def test_titles_and_custom_nodes() -> None:
    plan = plan_of("titled_custom")
    names = bound(plan)
    # The prompt sits on a custom text node wired into CLIPTextEncode: found by the wire.
    assert names["subject_prompt"] == ["2.text"]
    assert names["negative_prompt"] == ["4.text"]
    # KSampler's seed is a wire from a seed node: the seed node holds the field.
    assert names["seed"] == ["5.seed"]
    assert "7.seed" not in {t for targets in names.values() for t in targets}
    assert names["upscale_seed"] == ["10.seed"] and names["upscale_denoise"] == ["10.denoise"]
    assert names["upscale_model_name"] == ["9.model_name"]
    assert names["portrait_width"] == ["6.width"] and names["ckpt_name"] == ["1.ckpt_name"]
    assert ("10", "tile_width") in {(v.node, v.input) for v in plan.fixed}


def test_values_wired_from_primitive_nodes() -> None:
    g = graph("hires_fix")
    g["20"] = {"class_type": "PrimitiveInt", "inputs": {"value": 1234}, "_meta": {"title": "Int"}}
    g["21"] = {"class_type": "PrimitiveInt", "inputs": {"value": 640}}
    g["3"]["inputs"]["seed"] = ["20", 0]
    g["11"]["inputs"]["seed"] = ["20", 0]  # one seed for both passes: one field
    g["5"]["inputs"]["width"] = ["21", 0]
    g["5"]["inputs"]["height"] = ["21", 0]
    plan = plan_template(g)
    names = bound(plan)
    assert names["seed"] == ["20.value"] and by_name(plan)["seed"].default == 1234
    assert names["width"] == ["21.value"] and "height" not in names
    assert "hires_seed" not in names and names["hires_steps"] == ["11.steps"]


def test_flux_with_the_custom_sampler_nodes() -> None:
    names = bound(plan_of("flux_custom_sampler"))
    assert names["prompt"] == ["6.text"]  # through FluxGuidance and BasicGuider
    assert names["seed"] == ["25.noise_seed"]
    assert names["steps"] == ["17.steps"] and names["scheduler"] == ["17.scheduler"]
    assert names["sampler_name"] == ["16.sampler_name"] and names["guidance"] == ["26.guidance"]
    assert names["unet_name"] == ["12.unet_name"] and names["clip_name1"] == ["11.clip_name1"]
    assert names["width"] == ["27.width"] and names["vae_name"] == ["10.vae_name"]


def test_controlnet_passes_positive_and_negative_on_by_output() -> None:
    g = graph("txt2img_classic")
    g["20"] = {
        "class_type": "ControlNetApplyAdvanced",
        "inputs": {"positive": ["6", 0], "negative": ["7", 0], "control_net": ["21", 0],
                   "image": ["22", 0], "strength": 0.7, "start_percent": 0.0,
                   "end_percent": 1.0},
    }  # fmt: skip
    g["21"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "canny.pth"}}
    g["22"] = {"class_type": "LoadImage", "inputs": {"image": "edges.png"}}
    g["3"]["inputs"]["positive"] = ["20", 0]
    g["3"]["inputs"]["negative"] = ["20", 1]
    names = bound(plan_template(g))
    assert names["prompt"] == ["6.text"] and names["negative_prompt"] == ["7.text"]
    assert names["control_net_name"] == ["21.control_net_name"] and names["image"] == ["22.image"]


def test_links_are_never_fields() -> None:
    for name in API_GRAPHS:
        g = graph(name)
        for item in plan_template(g).fields:
            for target in item.targets:
                assert not is_link(g[target.node]["inputs"][target.input]), (name, target)


def test_node_order_puts_readers_after_what_they_read() -> None:
    chain = {
        str(10 - i): {"class_type": "K", "inputs": {"samples": [str(11 - i), 0]} if i else {}}
        for i in range(10)
    }
    assert node_order(chain) == [str(i) for i in range(10, 0, -1)]
    looped = {
        "1": {"class_type": "K", "inputs": {"a": ["2", 0]}},
        "2": {"class_type": "K", "inputs": {"a": ["1", 0]}},
        "3": {"class_type": "K", "inputs": {"a": ["3", 0], "b": ["9", 0]}},  # self, dangling
    }
    assert node_order(looped) == ["3", "1", "2"]


@pytest.mark.parametrize(
    "title",
    ["class", "model_dump", "json", "copy", "2nd pass", "Überschrift", "🙂", "None", "_x", "def"],
)
def test_names_from_any_title_are_usable(title: str) -> None:
    g = graph("hires_fix")
    g["11"]["_meta"]["title"] = title
    g["3"]["_meta"]["title"] = title
    names = [f.name for f in plan_template(g).fields]
    assert len(names) == len(set(names))
    for name in names:
        assert name.isidentifier() and name.isascii() and not name.startswith(("_", "model_"))
        assert name not in dir(WorkflowPayload) and name not in {"class", "def", "None"}


def test_default_titles_give_no_prefix() -> None:
    g = graph("txt2img_classic")
    g["3"]["_meta"]["title"] = "KSampler (Advanced)"  # a class's own words
    g["4"]["_meta"]["title"] = "Load Checkpoint"
    assert {"seed", "ckpt_name"} <= set(bound(plan_template(g)))


# --- object_info -----------------------------------------------------------------------------


def test_object_info_makes_sampler_and_scheduler_enums() -> None:
    catalog = NodeCatalog.from_object_info(fake_object_info())
    plan = plan_of("pixel_hires", catalog)
    fields = by_name(plan)
    assert fields["sampler_name"].python_type == "Sampler"
    assert fields["hires_sampler_name"].python_type == "Sampler"  # one alias for one list
    assert "dpmpp_2m" in plan.aliases["Sampler"] and "karras" in plan.aliases["Scheduler"]
    assert fields["steps"].le == 10000 and fields["seed"].le == 0xFFFFFFFFFFFFFFFF
    assert fields["ckpt_name"].python_type == "str"  # model files change too often for an enum
    assert plan.notes == ()


def test_newer_combo_format_and_values_comfyui_does_not_offer() -> None:
    catalog = NodeCatalog.from_object_info(
        {
            "KSampler": {
                "input": {
                    "required": {
                        "sampler_name": ["COMBO", {"options": ["euler", "dpmpp_2m"]}],
                        "scheduler": [["normal", "karras"], {}],
                        "cfg": ["FLOAT", {"min": 1.0, "max": 30.0}],
                    }
                },
                "display_name": "KSampler",
            }
        }
    )
    plan = plan_of("hires_fix", catalog)
    fields = by_name(plan)
    assert plan.aliases == {"Scheduler": ("normal", "karras"), "Sampler": ("euler", "dpmpp_2m")}
    # dpmpp_sde is not offered: plain text, and a note says so; dpmpp_2m is.
    assert fields["sampler_name"].python_type == "str"
    assert fields["hires_sampler_name"].python_type == "Sampler"
    assert fields["scheduler"].python_type == "Scheduler"
    assert fields["cfg_scale"].ge == 1.0 and fields["cfg_scale"].le == 30.0
    assert any("dpmpp_sde" in note for note in plan.notes)
    assert any("CheckpointLoaderSimple" in note for note in plan.notes)  # not in this catalog


@pytest.mark.parametrize("document", [[], {}, {"a": 1}, "object_info"])
def test_object_info_that_is_not_one(document: Any) -> None:
    with pytest.raises(ScaffoldError, match="object_info"):
        NodeCatalog.from_object_info(document)


# --- bad input -------------------------------------------------------------------------------


def test_ui_format_says_how_to_export_the_api_format() -> None:
    with pytest.raises(ScaffoldError) as caught:
        parse_graph((GRAPHS / "ui_export.json").read_bytes(), "ui_export.json")
    message = str(caught.value)
    assert "UI format" in message and "'Export (API)'" in message and "Dev mode" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"{not json", "is not valid JSON"),
        (b"[1, 2]", "not a list"),
        (b"{}", "has no nodes"),
        (b'{"3": {"inputs": {}}}', "node '3' has no class_type"),
        (b'{"3": 7}', "node '3' is a number"),
        (b'{"3": {"class_type": "X", "inputs": []}}', "'inputs' is not an object"),
        (b'{"3": {"class_type": "X", "inputs": {"a": NaN}}}', "NaN"),
        (b'{"prompt": {"3": {"class_type": "X", "inputs": {}}}}', "under 'prompt'"),
        (b'{"workflow": {"nodes": [], "links": []}}', "Export (API)"),
        (b"\xff\xfe{}", "UTF-8"),
    ],
)
def test_bad_graphs_get_one_readable_line(data: bytes, expected: str) -> None:
    with pytest.raises(ScaffoldError, match=r"^the graph") as caught:
        parse_graph(data)
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_a_bom_is_fine() -> None:
    data = b"\xef\xbb\xbf" + (GRAPHS / "txt2img_classic.json").read_bytes()
    assert parse_graph(data) == graph("txt2img_classic")


@pytest.mark.parametrize("name", ["", "a b", "../x", "-x", "__init__", "x" * 65, "a.b", "é"])
def test_bad_template_names(name: str) -> None:
    with pytest.raises(ScaffoldError, match="not a valid template name"):
        check_template_name(name)


@pytest.mark.parametrize("name", ["mine", "my_portrait", "SDXL-refiner", "v2", "x" * 64])
def test_good_template_names(name: str) -> None:
    assert check_template_name(name) == name


# --- the files -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", API_GRAPHS)
def test_the_empty_payload_reproduces_the_graph_exactly(name: str, tmp_path: Path) -> None:
    original = graph(name)
    path = write_template(tmp_path, name, plan_template(original), f"{name}.json")
    filled = filled_with(path, {})
    assert differences(original, filled) == []
    for node_id, node in original.items():  # only the worker's per-job prefix differs
        if "filename_prefix" in node["inputs"]:
            assert filled[node_id]["inputs"]["filename_prefix"] == f"comfys3/job/{node_id}"
            filled[node_id]["inputs"]["filename_prefix"] = node["inputs"]["filename_prefix"]
    assert json.dumps(filled, sort_keys=True) == json.dumps(original, sort_keys=True)


def test_a_changed_seed_changes_only_the_seed(tmp_path: Path) -> None:
    original = graph("hires_fix")
    path = write_template(tmp_path, "hires", plan_template(original))
    filled = filled_with(path, {"hires_seed": 7})
    assert differences(original, filled) == ["node '11' input 'seed': 469771404043268 became 7"]


def test_differences_are_exact_about_types() -> None:
    original = {"1": {"class_type": "K", "inputs": {"cfg": 7, "filename_prefix": "a"}}}
    changed = {"1": {"class_type": "K", "inputs": {"cfg": 7.0, "filename_prefix": "b"}}}
    assert differences(original, changed) == ["node '1' input 'cfg': 7 became 7.0"]


@pytest.mark.parametrize("with_object_info", [False, True], ids=["plain", "object_info"])
def test_generated_modules_read_like_the_shipped_ones(
    with_object_info: bool, tmp_path: Path
) -> None:
    """Formatted and linted as this repository's own code is; importing only the
    workflow-definition API, pydantic and typing."""
    catalog = NodeCatalog.from_object_info(fake_object_info()) if with_object_info else None
    for name in API_GRAPHS:
        write_template(tmp_path, name, plan_of(name, catalog), f"{name}.json")
    modules = sorted(str(p) for p in tmp_path.glob("*.py"))
    for command in (["format", "--check"], ["check"]):
        result = subprocess.run(
            [str(RUFF), *command, "--config", str(ROOT / "pyproject.toml"), *modules],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
    public = set(workflows.__all__)
    for module in modules:
        tree = ast.parse(Path(module).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                raise AssertionError(f"{module}: import {node.names[0].name}")
            if isinstance(node, ast.ImportFrom):
                assert node.module in {"typing", "pydantic", "processor.workflows"}, module
                if node.module == "processor.workflows":
                    assert {a.name for a in node.names} <= public


def test_an_input_file_field_loads_as_one(tmp_path: Path) -> None:
    path = write_template(tmp_path, "lora", plan_of("lora_img2img"))
    workflow = load_workflow(path)
    payload = workflow.validate_payload({"image": "uploads/me.png"})
    [staged] = workflow.input_files(payload)
    assert (staged.field, staged.source, [str(t.node) for t in staged.targets]) == (
        "image",
        "uploads/me.png",
        ["1"],
    )
    assert workflow.input_files(workflow.validate_payload({})) == []  # the graph's own file


@given(st.text(max_size=200))
def test_string_literals_round_trip(text: str) -> None:
    assert ast.literal_eval(py_literal(text)) == text


# --- property: random API graphs ---------------------------------------------------------------

IDS = ["1", "2", "3", "10", "11", "a", "10:3", "", "x y", 'q"uote']
CLASSES = st.sampled_from(
    [
        "KSampler", "KSamplerAdvanced", "CLIPTextEncode", "CLIPTextEncodeSDXL",
        "EmptyLatentImage", "EmptyImage", "LoadImage", "LoraLoader", "CheckpointLoaderSimple",
        "SaveImage", "BasicGuider", "ControlNetApplyAdvanced", "UpscaleModelLoader",
        "Seed (rgthree)",
    ]
) | st.text(min_size=1, max_size=20)  # fmt: skip
TITLES = st.sampled_from(
    ["Hires sampler", "class", "model_dump", "2nd pass", "Überschrift", "🙂", "KSampler", " "]
) | st.text(max_size=30)
LINKS = st.tuples(st.sampled_from(IDS), st.integers(0, 3)).map(list)
INTS = st.integers(-(2**70), 2**70) | st.integers(0, 2048)
NUMBERS = INTS | st.floats(allow_nan=False, allow_infinity=False) | st.floats(0, 2)
TEXTS = st.text(max_size=120)
VALUES = st.one_of(
    INTS, NUMBERS, TEXTS, st.booleans(), st.none(), LINKS, st.lists(st.integers(), max_size=3)
)
# Input names the scaffolder looks at, with values of the type it expects there most of the
# time (any value the rest of the time), and arbitrary names with arbitrary values.
TYPED_INPUTS = {
    **dict.fromkeys(["seed", "noise_seed", "steps", "width", "height", "batch_size"], INTS),
    **dict.fromkeys(["cfg", "denoise", "guidance", "strength_model", "strength_clip"], NUMBERS),
    **dict.fromkeys(
        ["sampler_name", "scheduler", "ckpt_name", "lora_name", "vae_name", "unet_name",
         "clip_name1", "model_name", "image", "text", "text_g", "value", "prompt",
         "filename_prefix"],
        TEXTS,
    ),
    **dict.fromkeys(["positive", "negative", "conditioning", "cond1", "clip", "samples"], LINKS),
}  # fmt: skip
INPUT = st.sampled_from(sorted(TYPED_INPUTS)).flatmap(
    lambda name: st.tuples(st.just(name), TYPED_INPUTS[name] | VALUES)
) | st.tuples(st.text(min_size=1, max_size=12), VALUES)
NODE = st.fixed_dictionaries(
    {"class_type": CLASSES, "inputs": st.lists(INPUT, max_size=8).map(dict)},
    optional={"_meta": st.fixed_dictionaries({"title": TITLES})},
)
API_GRAPH = st.dictionaries(st.sampled_from(IDS), NODE, min_size=1, max_size=8)
PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@contextmanager
def scratch() -> Iterator[Path]:
    """A folder per example: hypothesis runs many inside one test (no tmp_path per example)."""
    with tempfile.TemporaryDirectory(prefix="scaffold-") as folder:
        yield Path(folder)


@PROPERTY
@given(API_GRAPH)
def test_random_graphs_make_a_template_that_reproduces_them(original: dict[str, Any]) -> None:
    plan = plan_template(original)
    names = [f.name for f in plan.fields]
    assert len(names) == len(set(names))
    assert all(n.isidentifier() and n not in dir(WorkflowPayload) for n in names)
    with scratch() as folder:
        path = write_template(folder, "random", plan)
        assert json.loads(path.read_text()) == original
        assert differences(original, filled_with(path, {})) == []
        # Every default is also valid when sent explicitly (the graph's values meet the
        # bounds), and fills in the same values (an int sent to a float field becomes 7.0).
        explicit = {f.name: f.graph_value for f in plan.fields if not f.input_file}
        filled = filled_with(path, explicit)
        for field in plan.fields:
            for target in field.targets:
                if not field.input_file:
                    sent = field.graph_value
                    expected = float(sent) if field.python_type == "float" else sent
                    assert filled[target.node]["inputs"][target.input] == expected
        targets = {(t.node, t.input) for f in plan.fields for t in f.targets}
        for line in differences(original, filled):
            assert any(line.startswith(f"node {n!r} input {i!r}:") for n, i in targets), line


@PROPERTY
@given(st.one_of(API_GRAPH, st.dictionaries(st.text(max_size=5), VALUES, max_size=4), VALUES))
def test_random_documents_give_a_plan_or_one_readable_error(document: Any) -> None:
    data = json.dumps(document)
    try:
        plan = plan_template(parse_graph(data))
    except ScaffoldError as error:
        assert str(error) and "\n" not in str(error)
    else:
        assert isinstance(plan, Plan)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_give_a_plan_or_one_readable_error(data: bytes) -> None:
    try:
        parse_graph(data)
    except ScaffoldError as error:
        assert str(error).startswith("the graph")


# --- the command, as a user runs it ----------------------------------------------------------


def run(
    *args: str, cwd: Path, workflows_dir: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMFYS3_")}
    if workflows_dir is not None:
        env["COMFYS3_WORKFLOWS_DIR"] = str(workflows_dir)
    return subprocess.run(
        comfys3(*args), cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.stdout == "" and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("comfys3: "), result.stderr
    return lines[0]


def without_prefixes(graph: dict[str, Any]) -> dict[str, Any]:
    for node in graph.values():
        node["inputs"].pop("filename_prefix", None)
    return graph


def test_new_then_workflows_and_validate(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    made = run("template", "new", "hires", "--from", str(GRAPHS / "hires_fix.json"),
               "--dir", str(folder), cwd=tmp_path)  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["hires.json", "hires.py"]
    assert "fields (18)" in made.stdout and "left fixed (6)" in made.stdout
    assert "hires_seed" in made.stdout and "11.seed (KSampler)" in made.stdout
    assert "10.upscale_method = 'nearest-exact'" in made.stdout
    assert "set per job by the worker" in made.stdout

    listed = run("workflows", cwd=tmp_path, workflows_dir=folder)
    assert listed.returncode == 0, listed.stderr
    assert "hires: From hires_fix.json" in listed.stdout and "txt2img:" in listed.stdout
    assert "  hires_seed" in listed.stdout and "default 469771404043268" in listed.stdout

    (tmp_path / "as_saved.json").write_text('{"workflow": "hires", "payload": {}}')
    (tmp_path / "new_seed.json").write_text('{"workflow": "hires", "payload": {"hires_seed": 5}}')
    for manifest, seed in (("as_saved.json", 469771404043268), ("new_seed.json", 5)):
        checked = run("validate", "--print-graph", manifest, cwd=tmp_path, workflows_dir=folder)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert checked.stderr == f"{manifest}: ok (1 job: {manifest[:-5]})\n"  # a message
        expected = graph("hires_fix")
        expected["11"]["inputs"]["seed"] = seed
        assert without_prefixes(json.loads(checked.stdout)) == without_prefixes(expected)


def in_process(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The command in this process (the working folder set by the test): quicker than a
    subprocess where only the command's own behaviour is under test."""
    code = cli.main(["template", "new", *args])
    out, err = capsys.readouterr()
    return code, out, err


def error_line(out: str, err: str) -> str:
    assert out == "" and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("comfys3: "), err
    return lines[0]


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_ui_format_refused_by_the_command(tmp_path: Path) -> None:
    result = run("template", "new", "mine", "--from", str(GRAPHS / "ui_export.json"),
                 cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2
    line = one_line_error(result)
    assert "is not an API-format graph: it is the editor's normal save (UI format" in line
    assert "choose 'Export (API)'" in line and "'Dev mode options'" in line
    assert not (tmp_path / "workflows").exists()


def test_dry_run_writes_nothing(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = in_process(
        capsys, "x", "--from", str(GRAPHS / "lora_img2img.json"), "--dry-run"
    )
    assert code == 0, err
    assert out.startswith("would write workflows/x.json and workflows/x.py")
    assert "image" in out and "input file" in out
    assert not (in_tmp / "workflows").exists()


def test_existing_files_need_force(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ("t", "--from", str(GRAPHS / "txt2img_classic.json"))
    assert in_process(capsys, *args)[0] == 0
    (in_tmp / "workflows" / "t.py").write_text("# edited by hand\n")
    code, out, err = in_process(capsys, *args)
    assert code == 2
    assert "workflows/t.json and workflows/t.py already exist; add --force" in error_line(out, err)
    assert (in_tmp / "workflows" / "t.py").read_text() == "# edited by hand\n"
    assert in_process(capsys, *args, "--force")[0] == 0
    assert "class Payload(WorkflowPayload)" in (in_tmp / "workflows" / "t.py").read_text()


@pytest.mark.parametrize(
    ("name", "source", "expected"),
    [
        ("mine", "missing.json", "cannot read missing.json: No such file or directory"),
        ("bad name", "txt2img_classic.json", "'bad name' is not a valid template name"),
        ("mine", "not_json.txt", "not_json.txt is not valid JSON: Expecting value at line 1"),
        ("mine", "list.json", "list.json is not a ComfyUI API graph"),
        ("mine", "no_class.json", "no_class.json: node '3' has no class_type"),
        ("__init__", "txt2img_classic.json", "is not a valid template name"),
    ],
)
def test_bad_input_gets_one_line_and_exit_2(
    name: str, source: str, expected: str, in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (in_tmp / "not_json.txt").write_text("Export (API)? no, a note")
    (in_tmp / "list.json").write_text("[]")
    (in_tmp / "no_class.json").write_text('{"3": {"inputs": {"seed": 1}}}')
    path = str(GRAPHS / source) if (GRAPHS / source).exists() else source
    code, out, err = in_process(capsys, name, "--from", path)
    assert code == 2
    assert expected in error_line(out, err)
    assert not (in_tmp / "workflows").exists()


def test_object_info_that_cannot_be_had(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    graph_path = str(GRAPHS / "txt2img_classic.json")
    closed = f"http://127.0.0.1:{free_port()}"
    code, out, err = in_process(capsys, "t", "--from", graph_path, "--object-info", closed)
    assert code == 1
    assert f"cannot get {closed}/object_info" in error_line(out, err)
    (in_tmp / "oi.json").write_text('{"KSampler": 3}')
    code, out, err = in_process(capsys, "t", "--from", graph_path, "--object-info", "oi.json")
    assert code == 2
    assert "oi.json is not ComfyUI's /object_info answer" in error_line(out, err)
    assert not (in_tmp / "workflows").exists()


def test_object_info_from_a_running_comfyui_or_a_file(tmp_path: Path, fake_comfyui: Any) -> None:
    source = str(GRAPHS / "lora_img2img.json")
    from_url = run("template", "new", "lora", "--from", source, "--object-info",
                   fake_comfyui.url, cwd=tmp_path)  # fmt: skip
    assert from_url.returncode == 0, from_url.stderr
    assert "Sampler (42)" in from_url.stdout and "Scheduler (9)" in from_url.stdout
    # The fake has no LoraLoader, as a ComfyUI may lack a custom node: the user is told.
    assert "does not offer the node types LoraLoader" in from_url.stdout
    module = (tmp_path / "workflows" / "lora.py").read_text()
    assert "Sampler = Literal[" in module and "Annotated[Sampler, Bind(" in module

    (tmp_path / "object_info.json").write_text(json.dumps(fake_object_info()))
    from_file = run("template", "new", "lora", "--from", source, "--object-info",
                    "object_info.json", "--force", cwd=tmp_path)  # fmt: skip
    assert from_file.returncode == 0, from_file.stderr
    assert (tmp_path / "workflows" / "lora.py").read_text() == module


def test_notes_about_the_folder(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = in_tmp / "wf"
    folder.mkdir()
    (folder / "export.json").write_text("{}")  # a graph with no model: the folder won't load
    code, out, err = in_process(
        capsys, "txt2img", "--from", str(GRAPHS / "txt2img_classic.json"), "--dir", "wf"
    )
    assert code == 0, err
    assert "'txt2img' replaces the built-in template" in out
    assert "wf/export.json has no export.py" in out


# --- exec on the fake ComfyUI -----------------------------------------------------------------


def exec_job(
    tmp_path: Path, folder: Path, payload: dict[str, Any], url: str, job: str
) -> dict[str, Any]:
    (tmp_path / f"{job}.json").write_text(json.dumps({"workflow": "mine", "payload": payload}))
    result = run("exec", f"{job}.json", "--out", "out", "--comfyui-url", url,
                 cwd=tmp_path, workflows_dir=folder)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    status: dict[str, Any] = json.loads((tmp_path / "out" / job / "status.json").read_text())
    assert status["state"] == "succeeded"
    return status


def test_exec_runs_the_users_graph_as_saved(tmp_path: Path, fake_comfyui: Any) -> None:
    folder = tmp_path / "wf"
    made = run("template", "new", "mine", "--from", str(GRAPHS / "pixel_hires.json"),
               "--dir", str(folder), cwd=tmp_path)  # fmt: skip
    assert made.returncode == 0, made.stderr
    as_saved = exec_job(tmp_path, folder, {}, fake_comfyui.url, "as-saved")
    assert as_saved["payload"]["hires_seed"] == 4711 and as_saved["payload"]["width"] == 64
    image = tmp_path / "out" / "as-saved" / "14_SaveImage_001.png"
    with Image.open(image) as picture:
        assert picture.size == (96, 72)  # the graph's 64x48, scaled by its own 1.5
    exec_job(tmp_path, folder, {"hires_seed": 1}, fake_comfyui.url, "reseeded")
    other = tmp_path / "out" / "reseeded" / "14_SaveImage_001.png"
    assert other.read_bytes() != image.read_bytes()


def test_exec_with_a_load_image_graph(tmp_path: Path, fake_comfyui: Any) -> None:
    """An input-file field: omitted, the graph's own file in ComfyUI's input folder is used;
    given, the file is staged from where exec reads its inputs."""
    scale = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "photo.png"},
              "_meta": {"title": "Load Image"}},
        "2": {"class_type": "ImageScaleBy", "inputs": {"upscale_method": "bilinear",
              "scale_by": 2.0, "image": ["1", 0]}, "_meta": {"title": "Upscale Image By"}},
        "3": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI",
              "images": ["2", 0]}, "_meta": {"title": "Save Image"}},
    }  # fmt: skip
    (tmp_path / "scale.json").write_text(json.dumps(scale))
    folder = tmp_path / "wf"
    made = run("template", "new", "mine", "--from", "scale.json", "--dir", str(folder),
               cwd=tmp_path)  # fmt: skip
    assert made.returncode == 0, made.stderr
    Image.new("RGB", (5, 4), "red").save(fake_comfyui.input_dir / "photo.png")
    Image.new("RGB", (7, 3), "blue").save(tmp_path / "mine.png")
    exec_job(tmp_path, folder, {}, fake_comfyui.url, "own")
    exec_job(tmp_path, folder, {"image": "mine.png"}, fake_comfyui.url, "given")
    with Image.open(tmp_path / "out" / "own" / "3_SaveImage_001.png") as own:
        assert own.size == (10, 8)
    with Image.open(tmp_path / "out" / "given" / "3_SaveImage_001.png") as given_image:
        assert given_image.size == (14, 6)
