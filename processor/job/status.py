"""The job status document: its model, and nothing else.

Only :mod:`processor.job.status_book` builds, writes and reads these documents; everyone else
asks it. The models live apart so that readers of the format (the JSON Schema, the report, a
user's own code) need not import the machinery that writes it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

STATUS_VERSION: Literal[1] = 1


class NotifyRecord(BaseModel):
    """What became of a job's webhook; the status document carries it as ``notify``.

    ``delivered_at`` is set when a receiver answered 2xx. ``last_error`` is the most recent
    failure, also when a later attempt succeeded (it says why more than one was needed).
    """

    url: str = Field(description="Where it was sent (query and credentials left out).")
    message_id: str | None = Field(
        None, description="The webhook-id header: the receiver's key for dropping duplicates."
    )
    delivered_at: datetime | None = Field(None, description="When a receiver answered 2xx.")
    attempts: int = Field(0, ge=0, description="POSTs made; 0 when it was never sent.")
    last_error: str | None = Field(None, description="The latest failure, for a person.")


class JobState(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class OutputRecord(BaseModel):
    key: str = Field(description="Where the file is: a bucket key, or a path under the root.")
    node_id: str = Field(description="The ComfyUI node that made it.")
    kind: str = Field(description="ComfyUI's output kind: images, gifs, audio, video, text ...")
    content_type: str
    bytes: int
    sha256: str


class ModelRecord(BaseModel):
    """A model the manifest named, as this attempt found it in the worker's model cache."""

    folder: str = Field(description="ComfyUI's model folder (checkpoints, loras ...).")
    name: str = Field(description="The file name the workflow uses.")
    source: str = Field(description="Where it comes from: the URL (no query) or hf:org/repo/path.")
    state: Literal["cached", "fetched"] = Field(
        description="cached: it was there already; fetched: downloaded for this attempt."
    )
    bytes: int
    seconds: float = Field(description="Time this attempt spent on it (download or check).")
    sha256: str | None = None


class ErrorInfo(BaseModel):
    type: str = Field(description="validation | runtime | timeout | comfyui_unavailable | ...")
    message: str = Field(description="What went wrong, for a person.")
    details: dict[str, Any] = Field(default_factory=dict)


class TimeLimit(BaseModel):
    """The time an attempt was allowed, and which limit set it."""

    seconds: float = Field(gt=0, description="Seconds the prompt may run on ComfyUI.")
    source: str = Field(
        description="What set it: `timeout_s` (the manifest's own) or `COMFYS3_JOB_TIMEOUT` "
        "(the worker's, which also caps the manifest's)."
    )


class ProgressInfo(BaseModel):
    fraction: float = Field(0.0, ge=0.0, le=1.0)
    node: str | None = Field(None, description="The node running now (id and type).")
    step: int | None = None
    steps: int | None = None


def utcnow() -> datetime:
    return datetime.now(UTC)


class JobStatus(BaseModel):
    """The job's durable record, rewritten as it moves: whoever holds the bucket sees it all."""

    model_config = ConfigDict(title="comfys3 job status")

    version: Literal[1] = STATUS_VERSION
    id: str
    state: JobState
    attempt: int = 1
    max_attempts: int | None = None
    worker: str | None = None
    manifest_key: str | None = None
    manifest_version: str | None = Field(
        default=None,
        description="Which upload of the manifest this records (its ETag and modification "
        "time): a manifest uploaded again runs again, a leftover of this one is only retired.",
    )
    claim_try: int | None = Field(
        default=None,
        description="Which try of the manifest's claim wrote this (every claim counts, "
        "uncharged ones too): once a later try has written, an earlier one that wakes up "
        "late cannot write over it.",
    )
    workflow: str | None = None
    payload: dict[str, Any] = Field(
        default_factory=dict, description="The payload as resolved: defaults filled, seed used."
    )
    progress: ProgressInfo = Field(default_factory=ProgressInfo)  # type: ignore[arg-type]
    outputs: list[OutputRecord] = Field(default_factory=list)
    texts: dict[str, list[str]] = Field(
        default_factory=dict, description="Text outputs by node id."
    )
    models: list[ModelRecord] = Field(
        default_factory=list, description="The models the manifest named: cached or fetched."
    )
    timings: dict[str, float] = Field(
        default_factory=dict, description="Seconds per phase: claim, stage, queue, execute ..."
    )
    error: ErrorInfo | None = None
    time_limit: TimeLimit | None = Field(
        default=None, description="The time limit this attempt ran under, and what set it."
    )
    notify: NotifyRecord | None = Field(
        default=None, description="What became of the job's webhook, once it was sent."
    )
    notes: list[str] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=2).encode()
