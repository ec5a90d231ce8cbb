"""Property-based fuzzing of everything a worker reads from the bucket (issue 9).

Manifests, claims and statuses are untrusted: any bytes must end as a result or as the one
readable error each reader promises, never as another exception (which once crashed or looped
a worker). The generators build JSON *text*, so they reach what ``json.dumps`` never writes:
nesting thousands deep, integers of thousands of digits, NaN, Infinity and 1e400, lone
surrogate escapes, as well as near-valid manifests that get past the JSON layer into the
template checks. Bounded and deterministic, as the house rules ask.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processor.errors import ManifestError, ObjectNotFound
from processor.job.manifest import Job, JobManifest, load_jobs
from processor.job.runner import JobRunner
from processor.job.status import JobStatus
from processor.job.status_book import StatusBook
from processor.settings import JobLimits
from processor.storage.base import StoredObject
from processor.storage.claims import HELD, MAX_COUNT, MAX_ERROR_CHARS, ClaimState, ClaimStore, Lease
from processor.storage.layout import Layout
from processor.storage.local import LocalStorage
from processor.workflows import WorkflowRegistry
from triggers.cli.main import main

FUZZ = settings(
    max_examples=100,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
REGISTRY = WorkflowRegistry.default(None)

# -- generators of JSON text -----------------------------------------------------------------

ODD_NUMBERS = ["NaN", "-NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1e-400", "-0", "1E+2"]
ODD_STRINGS = ['"\\ud83d"', '"x\\udc00"', '"\\ud83d\\ude00"', '"\\u0000"', '"\\\\"', '""']
PAYLOAD_FIELDS = sorted(
    {
        name
        for workflow in REGISTRY.workflows.values()
        for name in workflow.payload_model.model_fields
    }
)
CLAIM_FIELDS = ["holder", "attempt", "tries", "expires_at", "state", "last_error", "token"]
FIELDS = sorted(
    {*JobManifest.model_fields, *JobStatus.model_fields, *PAYLOAD_FIELDS, *CLAIM_FIELDS}
)


def _quoted(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


scalars = st.one_of(
    st.sampled_from(["null", "true", "false", "0", "1", "-1", "2", "64", "512"]),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.integers(min_value=60, max_value=5000).map(lambda digits: "9" * digits),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(ODD_NUMBERS),
    st.text(max_size=20).map(_quoted),
    st.sampled_from(ODD_STRINGS),
    st.sampled_from([*REGISTRY.workflows, "held", "succeeded", "uploads/a.png", "../x", "job"]).map(
        _quoted
    ),
)
keys = st.one_of(
    st.sampled_from(FIELDS).map(_quoted),
    st.text(max_size=8).map(_quoted),
    st.sampled_from(ODD_STRINGS),
)


def _containers(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    arrays = st.lists(children, max_size=4).map(lambda items: "[" + ",".join(items) + "]")
    objects = st.lists(st.tuples(keys, children), max_size=5).map(
        lambda pairs: "{" + ",".join(f"{k}:{v}" for k, v in pairs) + "}"
    )
    deep = st.tuples(st.integers(min_value=30, max_value=3000), st.booleans(), children).map(
        lambda t: ("[" * t[0] if t[1] else '{"a":' * t[0]) + t[2] + ("]" if t[1] else "}") * t[0]
    )
    return st.one_of(arrays, objects, deep)


json_text = st.recursive(scalars, _containers, max_leaves=12)


def _object(
    fields: dict[str, st.SearchStrategy[str]], required: tuple[str, ...] = ()
) -> st.SearchStrategy[str]:
    """A JSON object with ``required`` and some other ``fields`` (each value from its
    strategy), in any order."""
    optional = sorted(set(fields) - set(required))
    some = st.lists(st.sampled_from(optional), unique=True) if optional else st.just([])
    chosen = some.map(lambda names: [*required, *names])
    return chosen.flatmap(st.permutations).flatmap(
        lambda names: st.tuples(*(fields[name] for name in names)).map(
            lambda values: (
                "{"
                + ",".join(f"{_quoted(n)}:{v}" for n, v in zip(names, values, strict=True))
                + "}"
            )
        )
    )


payload_text = _object({name: json_text | scalars for name in PAYLOAD_FIELDS})
manifest_text = _object(
    {
        "workflow": st.sampled_from(sorted(REGISTRY.workflows)).map(_quoted) | scalars,
        "payload": payload_text | json_text,
        "batch": st.lists(payload_text, min_size=0, max_size=3).map(
            lambda e: "[" + ",".join(e) + "]"
        ),
        "metadata": json_text,
        "id": scalars,
        "output": json_text,
        "rerun": scalars,
        "version": scalars,
    }
)
claim_text = _object({name: scalars | json_text for name in CLAIM_FIELDS})
ids = st.sampled_from(["job", "job", "other", "../x", "", "a" * 129]).map(_quoted) | scalars
states = st.sampled_from(["succeeded", "failed", "running", "queued"]).map(_quoted) | scalars
numbers = st.sampled_from(["0", "1.5", "-1", *ODD_NUMBERS]) | scalars
strings = st.one_of(st.text(max_size=10).map(_quoted), st.sampled_from(ODD_STRINGS))
status_text = _object(
    {
        "id": ids,
        "state": states,
        "attempt": st.integers(min_value=0, max_value=4).map(str) | scalars,
        "timings": _object({"total": numbers, "stage": numbers}) | json_text,
        "notes": st.lists(strings, max_size=3).map(lambda items: "[" + ",".join(items) + "]"),
        "metadata": _object({"a": json_text, "b": strings}) | json_text,
        "payload": _object({"seed": numbers, "prompt": strings}) | json_text,
        "outputs": st.just("[]") | json_text,
        "progress": _object({"fraction": numbers, "step": numbers}) | json_text,
        "error": _object({"type": strings, "message": strings}, required=("type", "message")),
        "manifest_version": strings,
    },
    required=("id", "state"),
)


def documents(shaped: st.SearchStrategy[str]) -> st.SearchStrategy[bytes]:
    """Raw bytes, any JSON, or JSON shaped like the document a reader expects."""
    return st.one_of(
        st.binary(max_size=200),
        json_text.map(lambda text: text.encode("utf-8", "surrogatepass")),
        shaped.map(lambda text: text.encode("utf-8", "surrogatepass")),
    )


# -- manifests -------------------------------------------------------------------------------


@FUZZ
@given(documents(manifest_text))
def test_load_jobs_gives_jobs_or_a_manifest_error(data: bytes) -> None:
    try:
        jobs = load_jobs(data, manifest_key="input/fuzz.json", registry=REGISTRY)
    except ManifestError as error:
        assert error.problems
        str(error).encode("utf-8")  # a message that can be printed and stored
        return
    assert jobs and all(isinstance(job, Job) for job in jobs)
    for job in jobs:  # whatever loads can be run and recorded
        json.dumps(job.graph, allow_nan=False)
        assert StatusBook.unrecordable(job) is None


@settings(FUZZ, max_examples=50)  # each run loads the templates again, as the command does
@given(documents(manifest_text))
def test_validate_command_exits_0_or_1_without_a_traceback(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.json"
        path.write_bytes(data)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["validate", str(path)])
    assert code in (0, 1)
    assert "Traceback" not in out.getvalue() + err.getvalue()
    first = out.getvalue().splitlines()[0]
    assert first == f"{path}: invalid" if code else first.startswith(f"{path}: ok")


# -- claims ----------------------------------------------------------------------------------


@FUZZ
@given(documents(claim_text))
def test_claim_state_parse_is_safe_on_any_bytes(data: bytes) -> None:
    state = ClaimState.parse(data)
    assert isinstance(state.holder, str) and len(state.holder) <= 200
    assert isinstance(state.attempt, int) and 0 <= state.attempt <= MAX_COUNT
    assert isinstance(state.tries, int) and 0 <= state.tries <= MAX_COUNT
    assert isinstance(state.expires_at, float) and math.isfinite(state.expires_at)
    assert state.state in ("held", "released", "")
    assert state.last_error is None or (
        isinstance(state.last_error, str) and len(state.last_error) <= MAX_ERROR_CHARS
    )


@settings(FUZZ, max_examples=40)  # a storage round trip each
@given(documents(claim_text))
def test_any_stored_claim_is_taken_over_or_honoured(data: bytes) -> None:
    """Whatever a claim holds, acquiring its job gives a lease, or 'taken' only for a claim
    that is held and whose expiry is plausible; the lease written is ours and readable."""

    async def acquire(root: Path) -> tuple[Lease | Any, ClaimState]:
        async with LocalStorage(root) as storage:
            await storage.put("input/_claims/job.json", data)
            store = ClaimStore(storage, "input/_claims", "fuzzer", 30.0, clock=lambda: 1000.0)
            result = await store.acquire("job")
            stored = (await storage.get("input/_claims/job.json")).data
            return result, ClaimState.parse(stored)

    previous = ClaimState.parse(data)
    with tempfile.TemporaryDirectory() as folder:
        result, now = asyncio.run(acquire(Path(folder)))
    if isinstance(result, Lease):
        assert now.holder == "fuzzer" and now.state == HELD
        assert result.attempt == min(previous.attempt, MAX_COUNT) + 1
        assert now.attempt == min(result.attempt, MAX_COUNT)
        assert 1 <= result.tries <= MAX_COUNT + 1
    else:
        assert previous.state == HELD and 1000.0 < previous.expires_at <= 1000.0 + 10 * 30.0
        assert now == previous  # left alone


# -- statuses, as the worker reads them ------------------------------------------------------


class OneObject:
    """A ResultStore holding one status document, recording what is written back."""

    def __init__(self, key: str, data: bytes) -> None:
        self.objects = {key: data}

    async def get(self, key: str, *, max_bytes: int | None = None) -> StoredObject:
        if key not in self.objects:
            raise ObjectNotFound(key)
        return StoredObject(key, self.objects[key], '"etag"', "application/json")

    async def put(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str = "application/octet-stream",
        if_none_match: bool = False,
        if_match: str | None = None,
    ) -> str:
        self.objects[key] = data
        return '"etag"'


@FUZZ
@given(documents(status_text))
def test_a_status_read_by_the_worker_is_its_own_and_can_be_written_back(data: bytes) -> None:
    """``StatusBook.read`` is how the worker reads statuses (an earlier success, a
    re-upload, a broken manifest's id): it gives this job's status or None, never an error, and
    what it gives can be written again (the worker appends a note and writes it)."""
    layout = Layout("input", "output")
    store = OneObject(layout.status_key("job"), data)
    runner = JobRunner(
        storage=store,
        comfy=None,
        layout=layout,  # type: ignore[arg-type]
        limits=JobLimits(job_timeout=1),
        worker_id="w",
    )
    status = asyncio.run(runner.book.read("job"))
    if status is None:
        return
    assert isinstance(status, JobStatus) and status.id == "job"
    status.notes.append("a note")
    asyncio.run(runner.book.write(status))
    assert set(store.objects) == {"output/job/status.json"}


@settings(FUZZ, max_examples=60)
@given(documents(status_text))
def test_status_command_reads_any_status_without_a_traceback(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "output" / "job" / "status.json"
        path.parent.mkdir(parents=True)
        path.write_bytes(data)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["status", "job", "--local", folder])
    # A readable status exits with its state's code (0, 1 or 3); an unreadable one is unknown.
    assert code in (0, 1, 3, 4)
    assert "Traceback" not in out.getvalue() + err.getvalue()
    if code == 4:
        assert "output/job/status.json" in out.getvalue() + err.getvalue()
    else:
        assert out.getvalue().startswith("job ")  # the document's own id, shown as it is
