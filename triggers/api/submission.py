"""``POST /jobs``: manifests checked as ``comfys3 submit`` checks them, then dropped into the
intake with a conditional create, so a waiting manifest is never replaced.

The body is one manifest (which may carry a ``batch``) or a list of them. Each goes in as
``<input>/<id>.json``: its own ``id``, or a fresh ``api-<hex>`` when it has none, which is then
its job id too. Nothing is written unless every manifest passes, input files included.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from processor import (
    RULE,
    Job,
    JobState,
    JsonLimitError,
    Layout,
    ManifestError,
    Problem,
    StatusBook,
    Storage,
    WorkflowRegistry,
    check_job_id,
    load_json,
    missing_inputs,
    put_new_manifest,
)
from triggers.api.models import ApiError, Submitted, SubmittedJob
from triggers.cli.submit import already_succeeded, check_manifest

MAX_MANIFESTS = 1000


@dataclass(frozen=True)
class Checked:
    """One manifest that passed: its name in the intake, its bytes, its jobs."""

    name: str
    data: bytes
    jobs: list[Job]


def check_body(
    body: bytes, registry: WorkflowRegistry, *, allow_raw: bool, max_bytes: int
) -> list[Checked]:
    """The manifests of a request body, each checked, or a 422 :class:`ApiError` listing every
    problem of every manifest."""
    text = body.lstrip()
    if not text.startswith(b"["):
        return _check_all([(None, body, _parsed(body))], registry, allow_raw, max_bytes)
    try:
        documents = load_json(body)
    except JsonLimitError as error:
        raise _invalid([f"the body {error}"]) from None
    if not documents:
        raise _invalid(["the list of manifests is empty; send at least one"])
    if len(documents) > MAX_MANIFESTS:
        raise _invalid([f"{len(documents)} manifests in one request; the limit is {MAX_MANIFESTS}"])
    entries = [
        (index, json.dumps(document).encode(), document) for index, document in enumerate(documents)
    ]
    return _check_all(entries, registry, allow_raw, max_bytes)


def _parsed(data: bytes) -> Any:
    try:
        return load_json(data)
    except JsonLimitError:
        return None  # the check says why, in the CLI's words


def _check_all(
    entries: Sequence[tuple[int | None, bytes, Any]],
    registry: WorkflowRegistry,
    allow_raw: bool,
    max_bytes: int,
) -> list[Checked]:
    checked: list[Checked] = []
    problems: list[str] = []
    names: dict[str, int | None] = {}
    for index, data, document in entries:
        where = "" if index is None else f"[{index}]"
        name = _name(document)
        if name in names:
            problems.append(
                f"{where}.id: manifests [{names[name]}] and {where} would both be {name}.json in "
                "the intake; give one another id"
            )
            continue
        names[name] = index
        try:
            jobs = check_manifest(data, name, registry, allow_raw, max_bytes)
        except ManifestError as error:
            problems += [_located(where, problem) for problem in error.problems]
            continue
        checked.append(Checked(name, data, jobs))
    if problems:
        raise _invalid(problems)
    return checked


def _name(document: Any) -> str:
    """The manifest's own ``id`` when it is a usable one; otherwise a fresh name (a bad ``id``
    is reported by the check, in its words)."""
    if isinstance(document, dict) and isinstance(document.get("id"), str):
        try:
            return check_job_id(document["id"])
        except ValueError:
            pass
    return f"api-{uuid.uuid4().hex[:12]}"


def _located(where: str, problem: Problem) -> str:
    """A problem as ``validate`` prints it, its path prefixed with the manifest's index."""
    if not where:
        return str(problem)
    return str(Problem(f"{where}.{problem.path}" if problem.path else where, problem.message))


def _invalid(problems: list[str]) -> ApiError:
    return ApiError(422, "invalid manifest: nothing was submitted", {"problems": problems})


async def submit(storage: Storage, layout: Layout, checked: list[Checked]) -> Submitted:
    """Write the checked manifests, never over a waiting one; 422 when an input file is not
    where a worker will read it, 409 when a manifest of the same name still waits."""
    missing = [line for item in checked for line in await missing_inputs(storage, item.jobs)]
    if missing:
        raise ApiError(
            422,
            f"an input file is missing: nothing was submitted ({RULE})",
            {"problems": missing},
        )
    job_ids = [job.id for item in checked for job in item.jobs]
    book = StatusBook(storage, layout)
    before = dict(zip(job_ids, await book.read_many(job_ids), strict=True))
    submitted: list[SubmittedJob] = []
    refused: list[str] = []
    warnings: list[str] = []
    for item in checked:
        key = layout.manifest_key(item.name)
        ids = [job.id for job in item.jobs]
        if not await put_new_manifest(storage, book, key, item.data, ids):
            refused.append(key)
            continue
        for job in item.jobs:
            submitted.append(SubmittedJob(id=job.id, manifest_key=key))
            previous = before[job.id]
            if not job.rerun and previous and previous.state is JobState.succeeded:
                warnings.append(already_succeeded(job.id))
    if refused:
        raise ApiError(
            409,
            f"{', '.join(refused)}: already waiting to run; not replaced (give the manifest "
            "another id to submit it again)",
            {
                "submitted": [job.model_dump() for job in submitted],
                "refused": refused,
            },
        )
    return Submitted(jobs=submitted, warnings=warnings)
