"""Cancel requests: the small document that asks for a job to stop, and the signal a running
job waits on.

A request is an object in the bucket, ``<input>/_cancel/<job id>.json`` (see
:mod:`processor.storage.layout`), so anyone who can write to the bucket can cancel a job, on
whichever worker runs it, without the CLI; ``comfys3 cancel`` and RunPod's cancel write the
same object. Named by a batch manifest's id it cancels every job of that batch. Workers read
the whole ``_cancel/`` prefix in one listing (it holds only open requests, so it stays small),
never one request per job.

The document is read as untrusted input, like everything in the bucket: any JSON at all (or
none) still cancels the job it is named after; its fields only say who asked and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import socket
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from processor.errors import JobCancelled, JsonLimitError
from processor.job.status import utcnow
from processor.safejson import load_json

# A cancel document larger than this is not read (it still cancels: its name says which job).
MAX_CANCEL_BYTES = 16 * 1024


class CancelRequest(BaseModel):
    """``<input>/_cancel/<job id>.json``: who asked for the job to stop, when, and why."""

    model_config = ConfigDict(extra="ignore", title="comfys3 cancel request")

    version: Literal[1] = 1
    job_id: str = Field(description="The job (or batch manifest id) to cancel.")
    requested_by: str = Field(
        default="", max_length=512, description="Who or what asked: `comfys3 cancel (user@host)`."
    )
    requested_at: datetime | None = Field(default=None, description="When it was asked (UTC).")
    reason: str = Field(default="", max_length=2000, description="Why, for the status; optional.")

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=2).encode()

    def describe(self) -> str:
        """``cancelled by alice@host at 2025-06-01 12:00:00 UTC: wrong prompt``."""
        by = f" by {self.requested_by}" if self.requested_by else ""
        when = (
            f" at {self.requested_at.strftime('%Y-%m-%d %H:%M:%S %Z').strip()}"
            if self.requested_at
            else ""
        )
        why = f": {self.reason}" if self.reason else ""
        return f"cancelled{by}{when}{why}"


def cancel_request(job_id: str, requested_by: str, reason: str = "") -> CancelRequest:
    return CancelRequest(
        job_id=job_id,
        requested_by=requested_by[:512],
        requested_at=utcnow(),
        reason=reason[:2000],
    )


def command_line_requester(command: str = "comfys3 cancel") -> str:
    """``comfys3 cancel (alice@build-7)``: enough to find who asked, nothing secret."""
    try:
        user = getpass.getuser()
    except Exception:  # no user name in this environment (a container without passwd)
        user = "?"
    return f"{command} ({user}@{socket.gethostname()})"


def parse_request(
    data: bytes | None, job_id: str, dropped_at: datetime | None = None
) -> CancelRequest:
    """The request stored for ``job_id``; whatever the bytes, a request for that job (a person
    who dropped ``{}`` or a text file still wants it cancelled). What it does not say is
    filled in: by "a cancel object in the bucket", at the object's date (``dropped_at``)."""
    document: Any = None
    if data is not None and len(data) <= MAX_CANCEL_BYTES:
        try:
            document = load_json(data)
        except JsonLimitError:
            document = None
    parsed = CancelRequest(job_id=job_id)
    if isinstance(document, dict):
        with contextlib.suppress(ValidationError, ValueError):
            parsed = CancelRequest.model_validate({**document, "job_id": job_id})
    return parsed.model_copy(
        update={
            "requested_by": parsed.requested_by or "a cancel object in the bucket",
            "requested_at": parsed.requested_at or dropped_at,
        }
    )


class CancelSignal:
    """Set once someone asks a job to stop; the job runner waits on it beside ComfyUI."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.request: CancelRequest | None = None

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def set(self, request: CancelRequest) -> None:
        if not self._event.is_set():
            self.request = request
            self._event.set()

    async def wait(self) -> None:
        await self._event.wait()

    def error(self, stage: Literal["before it started", "while it ran"]) -> JobCancelled:
        """The error that ends the job: who asked, when, why, and how far it had got."""
        request = self.request or CancelRequest(job_id="?")
        return JobCancelled(
            f"{request.describe()} ({stage})",
            {
                "requested_by": request.requested_by,
                "requested_at": (
                    request.requested_at.isoformat() if request.requested_at else None
                ),
                "reason": request.reason,
                "stage": stage,
            },
        )
