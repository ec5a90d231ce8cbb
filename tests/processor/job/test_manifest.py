"""Job manifests: what a bad one is told, what a good one becomes, and the status document."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from processor.errors import ManifestError, Problem
from processor.job.input_refs import key_problems
from processor.job.manifest import (
    JobManifest,
    check_job_id,
    default_job_id,
    load_jobs,
    parse_manifest_bytes,
)
from processor.job.status import ErrorInfo, JobState, JobStatus, OutputRecord
from processor.job.status_book import StatusBook
from processor.storage.layout import Layout
from processor.storage.local import LocalStorage
from processor.workflows import Bind, WorkflowRegistry, builtin_workflows_dir
from tests.paths import MANIFESTS

DATA = MANIFESTS
RAW_GRAPH: dict[str, Any] = {
    "1": {
        "class_type": "EmptyImage",
        "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0},
    },
    "2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x", "images": ["1", 0]}},
}


@pytest.fixture(scope="module")
def registry() -> WorkflowRegistry:
    return WorkflowRegistry.load(builtin_workflows_dir())


def encode(document: Any) -> bytes:
    return document if isinstance(document, bytes) else json.dumps(document).encode()


def problems_of(
    registry: WorkflowRegistry,
    document: Any,
    *,
    allow_raw: bool = False,
    max_bytes: int = 1_048_576,
    key: str = "input/job.json",
) -> list[Problem]:
    with pytest.raises(ManifestError) as caught:
        load_jobs(
            encode(document),
            manifest_key=key,
            registry=registry,
            allow_raw=allow_raw,
            max_bytes=max_bytes,
        )
    error = caught.value
    # str() of the error is what a person sees: it carries every problem.
    for problem in error.problems:
        assert str(problem) in str(error)
    return error.problems


@dataclass(frozen=True)
class Bad:
    """A malformed manifest and the problems it must get: (path, distinctive substring)."""

    name: str
    document: Any
    expected: tuple[tuple[str, str], ...]
    allow_raw: bool = False
    max_bytes: int = 1_048_576


TXT = "txt2img"
CASES = [
    Bad(
        "not JSON, with line and column",
        b'{"workflow": "txt2img",\n "payload": }',
        (("", "not valid JSON: Expecting value at line 2 column 13"),),
    ),
    Bad(
        "trailing comma",
        b'{"workflow": "txt2img", "payload": {"seed": 1,}}',
        (("", "property name enclosed in double quotes at line 1 column 47"),),
    ),
    Bad("empty file", b"", (("", "not valid JSON"),)),
    Bad("a list", [1, 2], (("", "must be a JSON object, not list"),)),
    Bad("a string", "txt2img", (("", "must be a JSON object, not str"),)),
    Bad("a number", 3, (("", "must be a JSON object, not int"),)),
    Bad(
        "unknown workflow, closest named",
        {"workflow": "txt2imgg"},
        (("workflow", "unknown workflow 'txt2imgg'; did you mean 'txt2img'?"),),
    ),
    Bad(
        "unknown workflow, list of known",
        {"workflow": "zzz"},
        (("workflow", "known: img2img, scale, solid, txt2img"),),
    ),
    Bad(
        "unknown payload field",
        {"workflow": TXT, "payload": {"sed": 1}},
        (("payload.sed", "unknown field; did you mean 'seed'?"),),
    ),
    Bad(
        "img2img without image",
        {"workflow": "img2img", "payload": {"prompt": "x"}},
        (("payload.image", "required field is missing"),),
    ),
    Bad(
        "steps 0",
        {"workflow": TXT, "payload": {"steps": 0}},
        (("payload.steps", "greater than or equal to 1 (got 0)"),),
    ),
    Bad(
        "steps 1000",
        {"workflow": TXT, "payload": {"steps": 1000}},
        (("payload.steps", "less than or equal to 150 (got 1000)"),),
    ),
    Bad(
        "width not a multiple of 8",
        {"workflow": TXT, "payload": {"width": 500}},
        (("payload.width", "multiple of 8 (got 500)"),),
    ),
    Bad(
        "negative seed",
        {"workflow": TXT, "payload": {"seed": -1}},
        (("payload.seed", "greater than or equal to 0 (got -1)"),),
    ),
    Bad(
        "steps of the wrong type",
        {"workflow": TXT, "payload": {"steps": "abc"}},
        (("payload.steps", "valid integer, unable to parse string as an integer (got 'abc')"),),
    ),
    Bad(
        "bad sampler enum",
        {"workflow": TXT, "payload": {"sampler_name": "eulr"}},
        (("payload.sampler_name", "(got 'eulr'); did you mean 'euler'?"),),
    ),
    Bad(
        "bad scheduler enum, no close match",
        {"workflow": TXT, "payload": {"scheduler": "zzzzzz"}},
        (("payload.scheduler", "'karras'"),),
    ),
    Bad(
        "raw graph refused",
        {"graph": RAW_GRAPH},
        (("graph", "COMFYS3_ALLOW_RAW_WORKFLOWS=true"),),
    ),
    Bad(
        "raw graph with a payload",
        {"graph": RAW_GRAPH, "payload": {"seed": 1}},
        (("", "a raw 'graph' takes no 'payload' or 'batch'"),),
        allow_raw=True,
    ),
    Bad(
        "id with a slash",
        {"id": "a/b", "workflow": TXT},
        (("id", "1-128 characters of A-Z a-z 0-9 . _ - (got 'a/b')"),),
    ),
    Bad(
        "id with ..",
        {"id": "a..b", "workflow": TXT},
        (("id", "must not start with '.' or contain '..'"),),
    ),
    Bad("id starting with .", {"id": ".hidden", "workflow": TXT}, (("id", "start with '.'"),)),
    Bad(
        "id too long",
        {"id": "a" * 129, "workflow": TXT},
        (("id", "is 129 characters; the limit is 128"),),
    ),
    Bad(
        "oversized manifest",
        {"workflow": TXT, "payload": {"prompt": "x" * 3000}},
        (("", "the limit is 2048 (COMFYS3_MAX_MANIFEST_BYTES)"),),
        max_bytes=2048,
    ),
    Bad(
        "both workflow and graph",
        {"workflow": TXT, "graph": RAW_GRAPH},
        (("", "give either 'workflow' or 'graph', not both"),),
    ),
    Bad("neither workflow nor graph", {"payload": {}}, (("", "needs 'workflow'"),)),
    Bad(
        "unknown top-level field",
        {"workflow": TXT, "paylod": {"seed": 1}},
        (("paylod", "unknown field; did you mean 'payload'?"),),
    ),
    Bad(
        "bad output.format",
        {"workflow": TXT, "output": {"format": "gif"}},
        (("output.format", "'png', 'jpeg' or 'webp' (got 'gif')"),),
    ),
    Bad(
        "quality out of range",
        {"workflow": TXT, "output": {"format": "jpeg", "quality": 101}},
        (("output.quality", "less than or equal to 100 (got 101)"),),
    ),
    Bad(
        "empty batch",
        {"workflow": TXT, "batch": []},
        (("batch", "is empty; give at least one entry"),),
    ),
    Bad(
        "batch entry with a bad field",
        {"workflow": TXT, "batch": [{"seed": 1}, {"steps": 0}]},
        (("batch[1].steps", "greater than or equal to 1 (got 0)"),),
    ),
    Bad(
        "batch entry with an unknown field",
        {"workflow": TXT, "batch": [{"prompt": "a"}, {"promt": "b"}]},
        (("batch[1].promt", "did you mean 'prompt'?"),),
    ),
    Bad(
        "batch entry that is not an object",
        {"workflow": TXT, "batch": [{"seed": 1}, "seed"]},
        (("batch[1]", "valid dictionary"),),
    ),
    Bad(
        "bad shared payload reported once for the whole batch",
        {"workflow": TXT, "payload": {"steps": 0}, "batch": [{"seed": 1}, {"seed": 2}]},
        (("payload.steps", "greater than or equal to 1 (got 0)"),),
    ),
    Bad(
        "batch of img2img missing an image in one entry",
        {"workflow": "img2img", "batch": [{"image": "a.png"}, {"prompt": "b"}]},
        (("batch[1].image", "required field is missing"),),
    ),
    Bad("version 2", {"version": 2, "workflow": TXT}, (("version", "Input should be 1 (got 2)"),)),
    Bad(
        "non-UTF-8 bytes",
        b'{"workflow": "txt2img", "payload": {"prompt": "caf\xe9"}}',
        (("", "manifest is not UTF-8 text"),),
    ),
    Bad(
        "workflow of the wrong type",
        {"workflow": 3},
        (("workflow", "valid string (got 3)"),),
    ),
    Bad(
        "payload not an object",
        {"workflow": TXT, "payload": [1, 2]},
        (("payload", "valid dictionary"),),
    ),
    Bad(
        "several payload problems, all reported",
        {"workflow": TXT, "payload": {"steps": 0, "width": 500, "sed": 1}},
        (
            ("payload.steps", "greater than or equal to 1"),
            ("payload.width", "multiple of 8"),
            ("payload.sed", "did you mean 'seed'?"),
        ),
    ),
    Bad(
        "several shape problems, all reported",
        {"id": "a/b", "version": 2, "workflw": TXT},
        (
            ("version", "Input should be 1"),
            ("id", "(got 'a/b')"),
            ("workflw", "did you mean 'workflow'?"),
        ),
    ),
    Bad(
        "shape and payload problems in one round",
        {
            "workflow": TXT,
            "payload": {"steps": 0, "sed": 5},
            "output": {"format": "gif"},
            "colour": "red",
        },
        (
            ("output.format", "(got 'gif')"),
            ("colour", "unknown field; known fields: version, id, workflow"),
            ("payload.steps", "greater than or equal to 1"),
            ("payload.sed", "did you mean 'seed'?"),
        ),
    ),
    Bad(
        "shape problem and unknown workflow in one round",
        {"workflow": "txt2imag", "rerun": "maybe"},
        (
            ("rerun", "valid boolean"),
            ("workflow", "did you mean 'txt2img'?"),
        ),
    ),
]


def test_there_are_at_least_twenty_cases() -> None:
    assert len(CASES) >= 20
    assert len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_malformed_manifest_gets_a_specific_message(registry: WorkflowRegistry, case: Bad) -> None:
    problems = problems_of(
        registry, case.document, allow_raw=case.allow_raw, max_bytes=case.max_bytes
    )
    got = [(p.path, p.message) for p in problems]
    for path, fragment in case.expected:
        assert any(p == path and fragment in m for p, m in got), (path, fragment, got)
    assert len(problems) == len(case.expected), got


def test_id_from_a_bad_file_name_says_to_set_id(registry: WorkflowRegistry) -> None:
    problems = problems_of(registry, {"workflow": TXT}, key="input/my job.json")
    assert [p.path for p in problems] == ["id"]
    assert "'my job'" in problems[0].message
    assert "set 'id' explicitly" in problems[0].message


def test_batch_ids_that_would_be_too_long(registry: WorkflowRegistry) -> None:
    problems = problems_of(registry, {"id": "a" * 127, "workflow": TXT, "batch": [{}, {}]})
    assert {p.path for p in problems} == {"id"}
    assert "batch job id" in problems[0].message


def test_size_cap_is_exact(registry: WorkflowRegistry) -> None:
    data = encode({"workflow": TXT, "payload": {"seed": 5}})
    assert load_jobs(data, manifest_key="j.json", registry=registry, max_bytes=len(data))
    with pytest.raises(ManifestError, match=f"manifest is {len(data)} bytes"):
        parse_manifest_bytes(data, max_bytes=len(data) - 1)


def test_size_cap_is_checked_before_parsing() -> None:
    """A huge file is refused by its length, never handed to the JSON parser."""
    with pytest.raises(ManifestError, match="the limit is 1024"):
        parse_manifest_bytes(b"[" * 5000, max_bytes=1024)


# --- good manifests ------------------------------------------------------------------------


def test_seed_example(registry: WorkflowRegistry) -> None:
    jobs = load_jobs(
        (DATA / "valid" / "txt2img-seed.json").read_bytes(),
        manifest_key="input/txt2img-seed.json",
        registry=registry,
    )
    assert len(jobs) == 1
    job = jobs[0]
    assert job.id == "txt2img-seed"  # from the file name
    assert job.manifest_key == "input/txt2img-seed.json"
    assert job.workflow == "txt2img"
    assert job.graph["3"]["inputs"]["seed"] == 123
    assert job.payload["seed"] == 123
    assert job.payload["steps"] == 20  # defaults are filled in the resolved payload
    assert job.graph["9"]["inputs"]["filename_prefix"] == "comfys3/txt2img-seed/9"
    assert job.inputs == []
    assert job.batch_index is None
    assert job.output.format == "png"


@pytest.mark.parametrize("path", sorted((DATA / "valid").glob("*.json")), ids=lambda p: p.name)
def test_valid_fixtures_load(registry: WorkflowRegistry, path: Path) -> None:
    jobs = load_jobs(path.read_bytes(), manifest_key=f"input/{path.name}", registry=registry)
    assert jobs
    document = json.loads(path.read_text())
    assert jobs[0].id.startswith(document.get("id", path.stem))


def test_full_manifest_carries_every_option(registry: WorkflowRegistry) -> None:
    (job,) = load_jobs(
        (DATA / "valid" / "txt2img-full.json").read_bytes(),
        manifest_key="input/ignored.json",
        registry=registry,
    )
    assert job.id == "cat-portrait"
    assert job.output.format == "webp"
    assert job.output.quality == 85
    assert job.metadata == {"requested_by": "alice", "ticket": 1234}
    assert job.rerun is False
    inputs = job.graph["3"]["inputs"]
    assert (inputs["seed"], inputs["steps"], inputs["cfg"]) == (42, 25, 6.5)
    assert (inputs["sampler_name"], inputs["scheduler"]) == ("dpmpp_2m", "karras")
    assert job.graph["5"]["inputs"] == {"width": 768, "height": 512, "batch_size": 2}
    assert job.graph["6"]["inputs"]["text"].startswith("a portrait of a cat")
    assert job.graph["7"]["inputs"]["text"] == "blurry, low quality"


def test_batch_makes_one_job_per_entry(registry: WorkflowRegistry) -> None:
    jobs = load_jobs(
        (DATA / "valid" / "batch.json").read_bytes(), manifest_key="x.json", registry=registry
    )
    assert [job.id for job in jobs] == ["cats-1", "cats-2", "cats-3"]
    assert [job.batch_index for job in jobs] == [1, 2, 3]
    assert [job.payload["seed"] for job in jobs] == [1, 2, 3]
    assert [job.payload["steps"] for job in jobs] == [20, 20, 30]  # entry wins over payload
    assert [job.graph["6"]["inputs"]["text"] for job in jobs] == [
        "a red cat",
        "a blue cat",
        "a green cat",
    ]
    assert [job.graph["9"]["inputs"]["filename_prefix"] for job in jobs] == [
        "comfys3/cats-1/9",
        "comfys3/cats-2/9",
        "comfys3/cats-3/9",
    ]


def test_batch_ids_are_zero_padded_so_they_sort(registry: WorkflowRegistry) -> None:
    document = {"id": "b", "workflow": "solid", "batch": [{"color": n} for n in range(12)]}
    jobs = load_jobs(encode(document), manifest_key="x.json", registry=registry)
    ids = [job.id for job in jobs]
    assert ids[0] == "b-01"
    assert ids[-1] == "b-12"
    assert ids == sorted(ids)


def test_img2img_input_file_is_listed(registry: WorkflowRegistry) -> None:
    (job,) = load_jobs(
        (DATA / "valid" / "img2img.json").read_bytes(), manifest_key="x.json", registry=registry
    )
    assert [(i.field, i.source) for i in job.inputs] == [("image", "uploads/photo.png")]
    assert job.inputs[0].targets[0].node == "1"
    assert job.inputs[0].targets[0].input == "image"
    staged = job.filled_graph({"image": "comfys3/redraw-1/photo.png"})
    assert staged["1"]["inputs"]["image"] == "comfys3/redraw-1/photo.png"
    assert job.graph["1"]["inputs"]["image"] == "uploads/photo.png"  # job graph untouched
    run = job.filled_graph({"image": "x.png"}, "run-7")
    assert run["9"]["inputs"]["filename_prefix"] == f"comfys3/{job.id}/run-7/9"
    assert job.graph["9"]["inputs"]["filename_prefix"] == f"comfys3/{job.id}/9"  # untouched


def test_rerun_of_an_identical_job_gets_a_fresh_save_prefix(registry: WorkflowRegistry) -> None:
    """ComfyUI answers a fully cached run with the earlier run's files, which the worker has
    already removed; a prefix per run makes SaveImage run again."""
    (job,) = load_jobs(b'{"workflow": "solid"}', manifest_key="s.json", registry=registry)
    first, second = job.filled_graph({}, "run-a"), job.filled_graph({}, "run-b")
    assert first["3"]["inputs"]["filename_prefix"] != second["3"]["inputs"]["filename_prefix"]
    assert first is not job.graph


def test_raw_graph_allowed_gets_prefixes(registry: WorkflowRegistry) -> None:
    data = (DATA / "raw-graph.json").read_bytes()
    (job,) = load_jobs(data, manifest_key="x.json", registry=registry, allow_raw=True)
    assert job.id == "raw-1"
    assert job.workflow == "(raw graph)"
    assert job.payload == {}
    assert job.graph["2"]["inputs"]["filename_prefix"] == "comfys3/raw-1/2"
    assert job.graph["1"]["inputs"] == RAW_GRAPH["1"]["inputs"]
    # refused by default
    with pytest.raises(ManifestError, match="COMFYS3_ALLOW_RAW_WORKFLOWS"):
        load_jobs(data, manifest_key="x.json", registry=registry)


def raw_with_files(files: dict[str, str]) -> bytes:
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "cat.png"}},
        "2": {"class_type": "LoadImageMask", "inputs": {"image": "cat.png", "channel": "alpha"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
    }
    return json.dumps({"id": "r", "graph": graph, "graph_inputs": files}).encode()


def test_a_raw_graphs_files_bind_to_every_input_that_names_them(
    registry: WorkflowRegistry,
) -> None:
    data = raw_with_files({"cat.png": "uploads/cat.png"})
    (job,) = load_jobs(data, manifest_key="r.json", registry=registry, allow_raw=True)
    [staged] = job.inputs
    assert (staged.field, staged.source, staged.where) == (
        "cat.png",
        "uploads/cat.png",
        "graph_inputs",
    )
    assert staged.targets == (Bind("1", "image"), Bind("2", "image"))
    run = job.filled_graph({"cat.png": "comfys3/r/cat.png"})
    assert run["1"]["inputs"]["image"] == run["2"]["inputs"]["image"] == "comfys3/r/cat.png"
    assert job.graph["1"]["inputs"]["image"] == "cat.png"  # the job's graph stays as sent


def test_a_raw_graphs_files_are_checked_like_a_payloads(registry: WorkflowRegistry) -> None:
    unused = raw_with_files({"cat.png": "uploads/cat.png", "dog.png": "uploads/dog.png"})
    with pytest.raises(ManifestError) as caught:
        load_jobs(unused, manifest_key="r.json", registry=registry, allow_raw=True)
    assert [str(p) for p in caught.value.problems] == [
        "graph_inputs.dog.png: no node of the graph has an input whose value is 'dog.png'; "
        "name the file as the graph does (e.g. a LoadImage's 'image')"
    ]
    climbing = raw_with_files({"cat.png": "../cat.png"})
    jobs = load_jobs(climbing, manifest_key="r.json", registry=registry, allow_raw=True)
    [problem] = key_problems(jobs)
    assert (
        problem.path == "graph_inputs.cat.png" and "'../cat.png' cannot be read" in problem.message
    )
    with pytest.raises(ManifestError, match="'graph_inputs' goes with a raw 'graph'"):
        load_jobs(
            b'{"workflow": "solid", "graph_inputs": {"a.png": "a.png"}}',
            manifest_key="s.json",
            registry=registry,
        )


def test_defaults_of_the_manifest_model() -> None:
    manifest = JobManifest.model_validate({"workflow": TXT})
    assert manifest.version == 1
    assert manifest.id is None
    assert manifest.payload == {}
    assert manifest.batch is None
    assert manifest.output.format == "png"
    assert manifest.output.quality == 90
    assert manifest.metadata == {}
    assert manifest.rerun is False


@pytest.mark.parametrize("good", ["a", "job-1", "A.b_c-9", "x" * 128, "a.b"])
def test_good_ids(good: str) -> None:
    assert check_job_id(good) == good


@pytest.mark.parametrize("bad", ["", "a/b", "..", "a..b", ".x", "a b", "é", "x" * 129, "a\\b"])
def test_bad_ids(bad: str) -> None:
    with pytest.raises(ValueError):
        check_job_id(bad)


# --- status --------------------------------------------------------------------------------


def test_status_for_job_carries_the_resolved_payload(registry: WorkflowRegistry) -> None:
    (job,) = load_jobs(
        encode({"id": "s1", "workflow": TXT, "metadata": {"k": "v"}}),
        manifest_key="input/s1.json",
        registry=registry,
    )
    book = StatusBook(LocalStorage(Path("unused")), Layout(), worker="w1")
    status = book.attempt(job, attempt=2, max_attempts=3).status
    assert status.id == "s1"
    assert status.state is JobState.running
    assert status.attempt == 2
    assert status.worker == "w1"
    assert status.manifest_key == "input/s1.json"
    assert status.workflow == TXT
    assert isinstance(status.payload["seed"], int)  # the random seed actually used
    assert status.payload == job.payload
    assert status.metadata == {"k": "v"}
    assert status.outputs == []
    assert status.error is None


def test_status_round_trips_through_json() -> None:
    status = JobStatus(
        id="j",
        state=JobState.succeeded,
        outputs=[
            OutputRecord(
                key="output/j/9_00001_.png",
                node_id="9",
                kind="images",
                content_type="image/png",
                bytes=10,
                sha256="0" * 64,
            )
        ],
        timings={"execute": 1.5},
    )
    data = status.to_json()
    document = json.loads(data)
    assert document["state"] == "succeeded"
    assert document["version"] == 1
    assert document["outputs"][0]["node_id"] == "9"
    assert document["created_at"].endswith("Z") or "+00:00" in document["created_at"]
    assert JobStatus.model_validate_json(data) == status


async def test_failed_manifest_status_lists_problems(
    registry: WorkflowRegistry, tmp_path: Path
) -> None:
    problems = problems_of(registry, {"workflow": TXT, "payload": {"steps": 0, "sed": 1}})
    error = ManifestError(problems)
    async with LocalStorage(tmp_path) as storage:
        book = StatusBook(storage, Layout(), worker="w")
        status = await book.never_ran(default_job_id("input/bad.json"), "input/bad.json", error)
        assert await book.read("bad") == status
    assert status.id == "bad"
    assert status.state is JobState.failed
    assert isinstance(status.error, ErrorInfo)
    assert status.error.type == "invalid_manifest"
    assert "payload.steps" in status.error.message
    assert status.error.details["problems"] == [
        {"path": p.path, "message": p.message} for p in problems
    ]
