"""What the jobs API answers, as pydantic models: the routes return them and the OpenAPI
document is generated from them. Requests are the job manifest itself (``JobManifest``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from processor import Comfys3Error

# How a job stands before any worker has written its status.
WAITING: Literal["waiting"] = "waiting"
BacklogState = Literal["waiting", "running", "retrying", "succeeded", "failed"]


class ApiError(Comfys3Error):
    """A request answered with an HTTP error; ``extra`` goes into the JSON body beside
    ``error`` (the sentence, the CLI's own)."""

    def __init__(
        self,
        status: int,
        message: str,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.extra = extra or {}
        self.headers = headers


class ErrorBody(BaseModel):
    error: str = Field(description="What went wrong, for a person (the CLI's message).")


class ProblemsBody(ErrorBody):
    problems: list[str] = Field(
        description="Every problem, each `path: message`, as `comfys3 validate` prints them; "
        "in a list of manifests the path starts with the manifest's index, `[1].payload.seed`."
    )


class SubmittedJob(BaseModel):
    id: str = Field(description="The job id: its status is at GET /jobs/{id}.")
    manifest_key: str = Field(description="Where its manifest waits in the intake.")


class Submitted(BaseModel):
    jobs: list[SubmittedJob] = Field(description="One entry per job (a batch makes several).")
    warnings: list[str] = Field(
        default_factory=list, description="Things a worker will do that you may not expect."
    )


class SubmitConflict(ErrorBody):
    submitted: list[SubmittedJob] = Field(description="Jobs whose manifests did go in.")
    refused: list[str] = Field(description="Intake keys already taken by a waiting manifest.")


class WaitingJob(BaseModel):
    """A job whose manifest waits in the intake: no worker has claimed it yet."""

    id: str
    state: Literal["waiting"] = WAITING
    manifest_key: str = Field(description="The manifest that will run it.")


class CancelRequested(BaseModel):
    id: str
    state: str = Field(description="The job's state when the cancel was asked for.")
    cancel_key: str = Field(description="The cancel request the workers act on.")


class ManifestEntry(BaseModel):
    name: str = Field(description="The manifest's name: its job id, unless it sets `id`.")
    key: str
    last_modified: datetime


class JobList(BaseModel):
    """One page of the manifests in one state, from listings alone (nothing is read)."""

    state: BacklogState
    manifests: list[ManifestEntry]
    next: str | None = Field(description="Pass as `after` for the next page; null at the end.")


class WorkflowField(BaseModel):
    name: str
    type: str = Field(description="Type and range, as `comfys3 workflows` shows them.")
    required: bool
    default: Any = Field(
        None, description="The default; null for a required field or one chosen at run time."
    )
    description: str


class WorkflowSummary(BaseModel):
    name: str
    description: str
    fields: list[WorkflowField]


class WorkflowDetail(WorkflowSummary):
    payload_schema: dict[str, Any] = Field(
        description="The JSON Schema of the template's payload (`comfys3 workflows NAME --schema`)."
    )


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    version: str
