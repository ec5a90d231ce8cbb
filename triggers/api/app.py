"""The jobs API's routes, its JSON errors and its OpenAPI document.

Every answer is JSON, errors included: ``{"error": "<the CLI's sentence>"}``, plus
``problems`` for a manifest that fails its check. The OpenAPI document (``/openapi.json``, with
interactive docs at ``/docs``) is generated from the models the routes return and from
``JobManifest`` itself for ``POST /jobs``, whose body is read raw so that it is checked exactly
as ``comfys3 submit`` checks a file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from processor import (
    FINAL,
    JobManifest,
    JobStatus,
    Layout,
    Storage,
    StorageError,
    WorkerSettings,
    WorkflowRegistry,
    package_version,
)
from triggers.api import catalog, listing, lookup, submission
from triggers.api.auth import bearer_guard
from triggers.api.cancel import request_cancel
from triggers.api.models import (
    ApiError,
    BacklogState,
    CancelRequested,
    ErrorBody,
    Health,
    JobList,
    ProblemsBody,
    SubmitConflict,
    Submitted,
    WaitingJob,
    WorkflowDetail,
    WorkflowSummary,
)
from triggers.cli.backlog import Summary, summarise

log = logging.getLogger("comfys3.api")

DESCRIPTION = """\
Submit comfys3 job manifests and follow their jobs over HTTP (no S3 SDK needed).
Every route but `/healthz` and these docs needs `Authorization: Bearer <COMFYS3_API_TOKEN>`.
Errors are JSON: `{"error": "..."}`, plus `problems` when a manifest fails its check.
"""


@dataclass(frozen=True)
class Backend:
    """What the routes work on: the bucket (or local folder), its layout, the templates."""

    storage: Storage
    layout: Layout
    registry: WorkflowRegistry
    settings: WorkerSettings


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    models: dict[int, type] = {422: ProblemsBody, 409: SubmitConflict}
    return {code: {"model": models.get(code, ErrorBody)} for code in codes}


def build_app(backend: Backend, token: str | None) -> FastAPI:
    """The API over ``backend``; ``token`` None serves without one (loopback only: the
    caller checked, see :func:`triggers.api.auth.serving_token`)."""
    app = FastAPI(
        title="comfys3 jobs API",
        version=package_version(),
        description=DESCRIPTION,
        openapi_tags=[{"name": "jobs"}, {"name": "workflows"}, {"name": "health"}],
    )
    guarded = [Depends(bearer_guard(token))]
    _install_errors(app)

    def route(
        method: str, path: str, model: Any, summary: str, errors: tuple[int, ...], status: int = 200
    ) -> Any:
        """A route behind the token, its answers and errors described for the OpenAPI
        document; every route but /healthz is one."""
        return app.api_route(
            path,
            methods=[method],
            status_code=status,
            response_model=model,
            tags=[path.split("/")[1]],
            summary=summary,
            responses=_errors(401, *errors),
            dependencies=guarded,
        )

    storage, layout, registry = backend.storage, backend.layout, backend.registry
    limits = backend.settings.jobs

    @route("POST", "/jobs", Submitted, "Submit manifests", (400, 409, 413, 422), 201)
    async def post_jobs(request: Request, response: Response) -> Submitted:
        """Checked as `comfys3 submit` checks a file (template, payload, input file names, and
        that the files exist); nothing is written unless every manifest passes. Each goes in
        as `<input>/<id>.json` (a fresh `api-<hex>` id when it has none), never over one that
        waits."""
        body = await _read_body(request, backend.settings.api.max_body_bytes)
        checked = submission.check_body(
            body,
            registry,
            allow_raw=limits.allow_raw_workflows,
            max_bytes=limits.max_manifest_bytes,
        )
        submitted = await submission.submit(storage, layout, checked)
        response.headers["Location"] = f"/jobs/{submitted.jobs[0].id}"
        return submitted

    @route("GET", "/jobs", JobList | Summary, "The backlog, or one state's manifests", (422,))
    async def get_jobs(
        state: BacklogState | None = None,
        limit: int = Query(100, ge=1, le=listing.MAX_PAGE),
        after: str | None = Query(None, description="`next` of the previous page."),
    ) -> JobList | Summary:
        """Without `state`: how many manifests wait, run, retry, succeeded and failed, as
        `comfys3 status --summary` counts them. With `state`: one page of those manifests."""
        lease = backend.settings.lane.lease_seconds
        if state is None:
            return await summarise(storage, layout, lease_seconds=lease)
        return await listing.list_state(
            storage, layout, state, limit=limit, after=after, lease_seconds=lease
        )

    @route("GET", "/jobs/{job_id}", JobStatus | WaitingJob, "A job's status", (400, 404))
    async def get_job(job_id: str) -> JobStatus | WaitingJob:
        """The job's `status.json`, or `{"state": "waiting"}` while its manifest waits for a
        worker; 404 when there is neither."""
        return await lookup.job_view(storage, layout, job_id)

    @route("POST", "/jobs/{job_id}/cancel", CancelRequested, "Cancel a job", (400, 404, 409), 202)
    async def cancel_job(job_id: str) -> CancelRequested:
        """Writes the cancel request workers act on; a job that has already ended is 409."""
        view = await lookup.job_view(storage, layout, job_id)
        if isinstance(view, JobStatus) and view.state in FINAL:
            raise ApiError(409, f"job {job_id} already {view.state.value}; nothing to cancel")
        key = await request_cancel(storage, layout, job_id, by="the HTTP jobs API")
        return CancelRequested(id=job_id, state=str(view.state), cancel_key=key)

    @route("GET", "/workflows", list[WorkflowSummary], "The templates and their fields", ())
    async def get_workflows() -> list[WorkflowSummary]:
        return catalog.summaries(registry)

    @route("GET", "/workflows/{name}", WorkflowDetail, "One template and its schema", (404,))
    async def get_workflow(name: str) -> WorkflowDetail:
        return catalog.detail(registry, name)

    @app.get("/healthz", response_model=Health, tags=["health"], summary="Liveness (no token)")
    async def healthz() -> Health:
        return Health(version=app.version)

    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes ``limit`` (the declared length first,
    then what arrives, so a lying client cannot make the server buffer more)."""
    too_large = ApiError(
        413, f"the request body is over {limit:,} bytes (COMFYS3_API_MAX_BODY_BYTES)"
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _install_errors(app: FastAPI) -> None:
    """Every error as JSON with one ``error`` sentence, whoever raised it."""

    async def api_error(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, ApiError)
        return JSONResponse(
            {"error": str(error), **error.extra}, status_code=error.status, headers=error.headers
        )

    async def http_error(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, HTTPException)
        message = str(error.detail)
        if error.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see /docs"
        elif error.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}; see /docs"
        return JSONResponse(
            {"error": message}, status_code=error.status_code, headers=error.headers
        )

    async def invalid_request(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        problems = [
            f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}"
            for item in error.errors()
        ]
        body = {"error": "invalid request: " + "; ".join(problems), "problems": problems}
        return JSONResponse(body, status_code=422)

    async def storage_error(request: Request, error: Exception) -> JSONResponse:
        return JSONResponse({"error": f"storage: {error}"}, status_code=502)

    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        body = {"error": f"internal error ({type(error).__name__}): {error}"}
        return JSONResponse(body, status_code=500)

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StorageError, storage_error)
    app.add_exception_handler(Exception, internal_error)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, with ``POST /jobs``'s body described by ``JobManifest`` (one, or a
    list): the route reads the body itself, so FastAPI cannot see it."""
    if app.openapi_schema:
        return app.openapi_schema
    document = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
        tags=app.openapi_tags,
    )
    manifest = JobManifest.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(manifest.pop("$defs", {}))
    schemas["JobManifest"] = manifest
    ref = {"$ref": "#/components/schemas/JobManifest"}
    many = {"type": "array", "items": ref, "minItems": 1, "maxItems": submission.MAX_MANIFESTS}
    document["paths"]["/jobs"]["post"]["requestBody"] = {
        "required": True,
        "content": {"application/json": {"schema": {"oneOf": [ref, many]}}},
    }
    app.openapi_schema = document
    return document
