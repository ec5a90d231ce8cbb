"""What a RunPod request may ask for, checked before anything touches S3 or ComfyUI.

A RunPod caller sees only the answer, never the worker's logs, so every refusal here is a
sentence that names the key at fault and the forms that would have worked.
"""

from __future__ import annotations

import difflib
import math
import re
import uuid
from dataclasses import dataclass
from typing import Any

from processor import Comfys3Error, JobManifest, Layout, StorageError, check_job_id, validate_key

MANIFEST_FIELDS = frozenset(JobManifest.model_fields)
DRAIN_FIELDS = frozenset({"drain", "max_jobs", "max_seconds"})
KNOWN_FIELDS = MANIFEST_FIELDS | DRAIN_FIELDS | {"manifest"}
FORMS = (
    'an inline job {"workflow": ..., "payload": {...}}, '
    'a manifest {"manifest": "<name>.json"}, '
    'a drain {"drain": true, "max_jobs": N, "max_seconds": S}, '
    'or a worker-comfyui request {"workflow": {<API graph>}, "images": [...]}'
)
FALLBACK_ID = "runpod-job"
# The id the SDK (1.12, rp_local.py) gives every `--test_input` job that brings none of its own.
LOCAL_TEST_ID = "local_test"
# Ids that do not name one request: every local test (or a job with no usable id) would get the
# same one, and a later request would be answered with an earlier one's stored result.
SHARED_IDS = frozenset({FALLBACK_ID, LOCAL_TEST_ID})


class InputError(Comfys3Error):
    """A request that cannot be served as given; the message says what to change."""


@dataclass(frozen=True)
class InlineJob:
    """A manifest carried in the request; ``document`` already has its ``id``."""

    document: dict[str, Any]

    @property
    def job_id(self) -> str:
        return str(self.document["id"])


@dataclass(frozen=True)
class NamedManifest:
    """A manifest already waiting in the intake prefix."""

    reference: str


@dataclass(frozen=True)
class Drain:
    max_manifests: int | None
    max_seconds: float | None


Request = InlineJob | NamedManifest | Drain


def sanitise_job_id(value: str) -> str:
    """RunPod ids (``sync-<uuid>-e1``) mostly fit the job id charset already; anything else
    becomes ``-`` so the id still reads like the RunPod id it came from."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "-", value)
    cleaned = re.sub(r"\.{2,}", "-", cleaned)
    cleaned = re.sub(r"-{2,}", "-", cleaned).strip(".-")[:128]
    try:
        return check_job_id(cleaned)
    except ValueError:
        return FALLBACK_ID


def inline_job_id(runpod_job_id: str) -> str:
    """The job id of an inline job that brings no ``id`` of its own.

    A real RunPod job id names one request, and RunPod keeps it when it delivers that request
    again (a worker died mid-job): deriving the job id from it makes a redelivery answer with
    the stored result instead of running twice. The SDK's local test id is the same for every
    run, and so is the fallback; those get a fresh suffix, so iterating on a ``--test_input``
    never returns an earlier run's result.
    """
    job_id = sanitise_job_id(runpod_job_id)
    if job_id in SHARED_IDS:
        job_id = f"{job_id}-{uuid.uuid4().hex[:12]}"
    return job_id


def parse_request(job_input: Any, runpod_job_id: str) -> Request:
    """The ``input`` of a RunPod job -> one of the three forms, or an :class:`InputError`."""
    if job_input is None:
        raise InputError(f"the request has no 'input'; send {FORMS}")
    if not isinstance(job_input, dict):
        raise InputError(
            f"'input' must be a JSON object, not {_json_type(job_input)}; send {FORMS}"
        )
    if not job_input:
        raise InputError(f"'input' is empty; send {FORMS}")
    keys = set(job_input)
    unknown = sorted(keys - KNOWN_FIELDS)
    if "manifest" in keys:
        return _named_manifest(job_input, keys)
    if "drain" in keys:
        return _drain(job_input, keys)
    if keys & DRAIN_FIELDS:
        raise InputError("'max_jobs' and 'max_seconds' only go with \"drain\": true")
    if not keys & MANIFEST_FIELDS:
        raise InputError(f"{_unknown(unknown)}; send {FORMS}")
    document = dict(job_input)
    if "id" not in document:
        document["id"] = inline_job_id(runpod_job_id)
    return InlineJob(document)


def _named_manifest(job_input: dict[str, Any], keys: set[str]) -> NamedManifest:
    inline = sorted(keys & MANIFEST_FIELDS)
    if inline:
        raise InputError(
            "give either 'manifest' (a manifest already in the bucket) or an inline job "
            f"({', '.join(repr(k) for k in inline)} ...), not both"
        )
    others = sorted(keys - {"manifest"})
    if others:
        raise InputError(f"'manifest' takes no other keys; {_unknown(others)}")
    reference = job_input["manifest"]
    if not isinstance(reference, str) or not reference.strip():
        raise InputError(
            "'manifest' must be the name or key of a manifest, e.g. \"job1.json\" or "
            f'"input/job1.json", not {_json_type(reference)}'
        )
    return NamedManifest(reference.strip())


def _drain(job_input: dict[str, Any], keys: set[str]) -> Drain:
    others = sorted(keys - DRAIN_FIELDS)
    if others:
        raise InputError(
            f"a drain takes only 'drain', 'max_jobs' and 'max_seconds'; {_unknown(others)}"
        )
    if job_input["drain"] is not True:
        raise InputError(f"'drain' must be true, not {job_input['drain']!r}")
    max_jobs = job_input.get("max_jobs")
    if max_jobs is not None and (
        isinstance(max_jobs, bool) or not isinstance(max_jobs, int) or max_jobs < 1
    ):
        raise InputError(f"'max_jobs' must be a whole number of at least 1, not {max_jobs!r}")
    max_seconds = job_input.get("max_seconds")
    if max_seconds is not None and (
        isinstance(max_seconds, bool)
        or not isinstance(max_seconds, int | float)
        or not math.isfinite(max_seconds)
        or max_seconds <= 0
    ):
        raise InputError(f"'max_seconds' must be a number above 0, not {max_seconds!r}")
    return Drain(max_jobs, None if max_seconds is None else float(max_seconds))


def manifest_key(reference: str, layout: Layout) -> str:
    """``job1``, ``job1.json`` or ``<input>/job1.json`` -> the key of a pending manifest.

    Only the intake prefix is accepted: a key elsewhere (``_done/``, another folder) is not
    something the worker would ever pick up, so running it would surprise the caller.
    """
    example = f'"job1.json" or "{layout.manifest_key("job1")}"'
    if reference.startswith(layout.input_dir + "/"):
        key = reference
    elif "/" in reference:
        raise InputError(
            f"manifest {reference!r} is not in the intake prefix {layout.input_dir}/; "
            f"give {example}"
        )
    else:
        key = f"{layout.input_dir}/{reference}"
    if not key.endswith(".json"):
        key += ".json"
    try:
        validate_key(key)
    except StorageError as error:
        raise InputError(f"manifest {reference!r}: {error}") from None
    if not layout.is_manifest(key):
        raise InputError(
            f"manifest {reference!r} is not a manifest directly in {layout.input_dir}/; "
            f"give {example}"
        )
    return key


def _unknown(names: list[str]) -> str:
    parts = []
    for name in names:
        close = difflib.get_close_matches(name, sorted(KNOWN_FIELDS), n=1, cutoff=0.6)
        parts.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
    return f"unknown key(s): {', '.join(parts)}" if parts else "no known key"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__
