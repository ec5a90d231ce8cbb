"""The SDK's local test server (``--rp_serve_api``), made to judge requests as RunPod does.

RunPod hands any JSON ``input`` to the handler, which answers a bad one with its own
``{"error": ...}`` sentence. The SDK's local server (1.12) declares ``input`` as an object
instead, so ``{"input": "txt2img"}`` never reaches the handler and the caller gets FastAPI's
``{"detail": [...]}`` shape, which docs/runpod.md does not describe. This server lets any
``input`` through to ``/run`` and ``/runsync``, and answers a body that is not a request at all
with one ``{"error": ...}`` sentence.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from runpod.serverless.modules import rp_fastapi

NOT_A_REQUEST = (
    'the request body must be a JSON object with an "input", e.g. {"input": {"workflow": "solid"}}'
)


@dataclass
class AnyInput:
    """A request body as RunPod takes it: ``input`` may be any JSON; the handler judges it."""

    input: Any = None
    webhook: str | None = None


class LocalApi(rp_fastapi.WorkerAPI):
    """The SDK's WorkerAPI with RunPod's acceptance of ``input``; its routes are unchanged."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.rp_app.add_exception_handler(RequestValidationError, _not_a_request)

    # FastAPI reads the body's shape from these signatures when the parent registers them.
    async def _sim_run(self, job_request: AnyInput) -> rp_fastapi.JobOutput:
        return await super()._sim_run(job_request)

    async def _sim_runsync(self, job_request: AnyInput) -> rp_fastapi.JobOutput:
        return await super()._sim_runsync(job_request)


async def _not_a_request(request: Request, error: Exception) -> JSONResponse:
    del request, error
    return JSONResponse({"error": NOT_A_REQUEST}, status_code=400)


@contextlib.contextmanager
def local_api() -> Iterator[None]:
    """While inside, ``runpod.serverless.start`` serves :class:`LocalApi`: the SDK looks the
    class up in ``rp_fastapi`` when ``--rp_serve_api`` starts the server."""
    original = rp_fastapi.WorkerAPI
    rp_fastapi.WorkerAPI = LocalApi
    try:
        yield
    finally:
        rp_fastapi.WorkerAPI = original
