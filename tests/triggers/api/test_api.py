"""The jobs API over real HTTP, on SeaweedFS and moto: what a client sends and gets back.

Each test starts the API in this process on a free port (``serving_api``, the same code
``comfys3 serve`` and ``comfys3 run`` use) over a fresh bucket, and talks to it with an HTTP
client. ``test_serve.py`` runs the commands themselves, beside a worker.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from openapi_spec_validator import validate as validate_openapi

from processor.errors import SettingsError
from processor.job.status import JobState, JobStatus
from processor.job.status_book import StatusBook
from processor.settings import S3Settings, WorkerSettings
from processor.storage.s3 import S3Storage
from processor.worker.assembly import s3_layout
from processor.workflows import WorkflowRegistry, builtin_workflows_dir
from tests.s3_servers import s3_settings_for
from tests.workers import get_json, keys, s3_client
from triggers.api.server import serving_api
from triggers.cli import main as cli

TOKEN = "t0ken-for-tests"


@dataclass
class Api:
    url: str
    session: aiohttp.ClientSession
    s3: S3Settings

    async def call(
        self, method: str, path: str, body: Any = None, token: str | None = TOKEN, raw: Any = None
    ) -> tuple[int, Any, Any]:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        data = raw if raw is not None else (None if body is None else json.dumps(body))
        async with self.session.request(
            method, self.url + path, data=data, headers=headers
        ) as response:
            text = await response.text()
            try:
                answer = json.loads(text)
            except ValueError:
                answer = text
            return response.status, answer, response.headers


def api_settings(**overrides: Any) -> WorkerSettings:
    return WorkerSettings(**{"api_token": TOKEN, **overrides})


@pytest.fixture(params=["seaweedfs", "moto"])
async def api(request: pytest.FixtureRequest) -> AsyncIterator[Api]:
    server = request.getfixturevalue("seaweedfs" if request.param == "seaweedfs" else "moto_server")
    s3 = s3_settings_for(server)
    async with (
        serving_api(api_settings(), S3Storage(s3), s3_layout(s3), port=0) as url,
        aiohttp.ClientSession() as session,
    ):
        yield Api(url, session, s3)


async def write_status(s3: S3Settings, status: JobStatus) -> None:
    async with S3Storage(s3) as storage:
        await StatusBook(storage, s3_layout(s3)).write(status)


# -- who may call -------------------------------------------------------------------------------


async def test_every_route_but_health_and_docs_needs_the_token(api: Api) -> None:
    for method, path in [
        ("POST", "/jobs"),
        ("GET", "/jobs"),
        ("GET", "/jobs/x"),
        ("POST", "/jobs/x/cancel"),
        ("GET", "/workflows"),
        ("GET", "/workflows/solid"),
    ]:
        status, body, headers = await api.call(method, path, {"workflow": "solid"}, token=None)
        assert status == 401, (method, path, body)
        assert body == {
            "error": "this API needs a bearer token: send 'Authorization: Bearer <token>' with "
            "the token set in COMFYS3_API_TOKEN"
        }
        assert headers["WWW-Authenticate"] == "Bearer"
        status, body, _ = await api.call(method, path, {"workflow": "solid"}, token="guess")
        assert (status, body) == (
            401,
            {"error": "the bearer token is not this API's token (COMFYS3_API_TOKEN)"},
        )
    assert keys(s3_client(api.s3), api.s3, "") == []  # nothing was written
    status, body, _ = await api.call("GET", "/healthz", token=None)
    assert status == 200 and body["status"] == "ok"
    status, page, _ = await api.call("GET", "/docs", token=None)
    assert status == 200 and "swagger" in page.lower()


async def test_the_openapi_document_comes_from_the_models(api: Api) -> None:
    status, document, _ = await api.call("GET", "/openapi.json", token=None)

    assert status == 200
    validate_openapi(document)  # a valid OpenAPI 3.1 document
    assert set(document["paths"]) == {
        "/jobs", "/jobs/{job_id}", "/jobs/{job_id}/cancel", "/workflows", "/workflows/{name}",
        "/healthz",
    }  # fmt: skip
    schemas = document["components"]["schemas"]
    body = document["paths"]["/jobs"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"]["oneOf"][0] == {"$ref": "#/components/schemas/JobManifest"}
    assert set(schemas["JobManifest"]["properties"]) >= {"workflow", "payload", "graph_inputs"}
    assert "JobStatus" in schemas and "ProblemsBody" in schemas
    assert document["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


# -- POST /jobs ---------------------------------------------------------------------------------


async def test_a_manifest_goes_into_the_intake_and_waits(api: Api) -> None:
    status, body, headers = await api.call("POST", "/jobs", {"id": "j1", "workflow": "solid"})

    assert status == 201, body
    assert body == {"jobs": [{"id": "j1", "manifest_key": "input/j1.json"}], "warnings": []}
    assert headers["Location"] == "/jobs/j1"
    client = s3_client(api.s3)
    assert get_json(client, api.s3, "input/j1.json") == {"id": "j1", "workflow": "solid"}
    status, view, _ = await api.call("GET", "/jobs/j1")
    assert (status, view) == (
        200,
        {"id": "j1", "state": "waiting", "manifest_key": "input/j1.json"},
    )

    status, again, _ = await api.call("POST", "/jobs", {"id": "j1", "workflow": "txt2img"})
    assert status == 409
    assert again == {
        "error": "input/j1.json: already waiting to run; not replaced (give the manifest "
        "another id to submit it again)",
        "submitted": [],
        "refused": ["input/j1.json"],
    }
    assert get_json(client, api.s3, "input/j1.json")["workflow"] == "solid"  # untouched


async def test_a_manifest_without_an_id_gets_one(api: Api) -> None:
    status, body, _ = await api.call("POST", "/jobs", {"workflow": "solid", "batch": [{}, {}]})

    assert status == 201
    first, second = (job["id"] for job in body["jobs"])
    name = first.removesuffix("-1")
    assert name.startswith("api-") and second == f"{name}-2"
    assert {job["manifest_key"] for job in body["jobs"]} == {f"input/{name}.json"}
    for job_id in (first, second):  # a batch's jobs wait with their manifest
        status, view, _ = await api.call("GET", f"/jobs/{job_id}")
        assert view == {"id": job_id, "state": "waiting", "manifest_key": f"input/{name}.json"}


async def test_an_invalid_manifest_gets_validates_own_problems(
    api: Api, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = {"workflow": "txt2img", "payload": {"steps": 0, "sede": 1}, "colour": "red"}
    (tmp_path / "bad.json").write_text(json.dumps(manifest))
    assert cli.main(["validate", str(tmp_path / "bad.json")]) == 1
    printed = capsys.readouterr().out.splitlines()[1:]

    status, body, _ = await api.call("POST", "/jobs", manifest)

    assert status == 422
    assert body["error"] == "invalid manifest: nothing was submitted"
    assert [f"  {problem}" for problem in body["problems"]] == printed
    assert any("did you mean 'seed'?" in problem for problem in body["problems"])
    assert keys(s3_client(api.s3), api.s3, "") == []


async def test_a_list_is_all_or_nothing_with_each_problem_located(api: Api) -> None:
    manifests = [
        {"id": "a", "workflow": "solid"},
        {"id": "a", "workflow": "solid"},
        {"workflow": "txt2img", "payload": {"steps": 0}},
        3,
        {"workflow": "img2img", "payload": {"image": "../up.png"}},
    ]

    status, body, _ = await api.call("POST", "/jobs", manifests)

    assert status == 422
    assert body["problems"][:3] == [
        "[1].id: manifests [0] and [1] would both be a.json in the intake; give one another id",
        "[2].payload.steps: Input should be greater than or equal to 1 (got 0)",
        "[3]: manifest must be a JSON object, not int",
    ]
    assert body["problems"][3].startswith("[4].payload.image: input file '../up.png' cannot be")
    assert keys(s3_client(api.s3), api.s3, "") == []

    good = [{"id": "b", "workflow": "solid"}, {"id": "c", "workflow": "solid"}]
    status, body, _ = await api.call("POST", "/jobs", good)
    assert status == 201 and [job["id"] for job in body["jobs"]] == ["b", "c"]


async def test_input_files_must_be_in_the_bucket_first(api: Api) -> None:
    manifest = {"id": "r", "workflow": "img2img", "payload": {"image": "uploads/cat.png"}}

    status, body, _ = await api.call("POST", "/jobs", manifest)

    assert status == 422
    assert body["error"].startswith("an input file is missing: nothing was submitted (")
    assert body["problems"] == [
        f"input 'image': file 'uploads/cat.png' was not found at "
        f"s3://{api.s3.bucket_name}/uploads/cat.png"
    ]


async def test_bodies_that_are_not_manifests(api: Api) -> None:
    status, body, _ = await api.call("POST", "/jobs", raw=b"not json")
    assert status == 422 and body["problems"] == [
        "manifest is not valid JSON: Expecting value at line 1 column 1"
    ]
    status, body, _ = await api.call("POST", "/jobs", [])
    assert body["problems"] == ["the list of manifests is empty; send at least one"]
    status, body, _ = await api.call("POST", "/jobs", {"graph": {}})
    assert status == 422 and "raw ComfyUI graphs are not allowed" in " ".join(body["problems"])


async def test_a_body_over_the_cap_is_refused_unread(seaweed_s3_settings: S3Settings) -> None:
    s3 = seaweed_s3_settings
    settings = api_settings(api_max_body_bytes=2048)
    async with (
        serving_api(settings, S3Storage(s3), s3_layout(s3), port=0) as url,
        aiohttp.ClientSession() as session,
    ):
        api = Api(url, session, s3)
        big = {"workflow": "solid", "metadata": {"pad": "x" * 4096}}
        status, body, _ = await api.call("POST", "/jobs", big)

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it comes
            for _ in range(10):
                yield b" " * 1024

        status_chunked, chunked, _ = await api.call("POST", "/jobs", raw=chunks())
    assert (status, body) == (
        413,
        {"error": "the request body is over 2,048 bytes (COMFYS3_API_MAX_BODY_BYTES)"},
    )
    assert (status_chunked, chunked) == (status, body)


# -- GET /jobs/{id}, cancel ---------------------------------------------------------------------


async def test_a_status_is_served_as_stored(api: Api) -> None:
    done = JobStatus(id="done", state=JobState.succeeded, workflow="solid")
    await write_status(api.s3, done)

    status, body, _ = await api.call("GET", "/jobs/done")

    assert status == 200 and JobStatus.model_validate(body) == done
    status, body, _ = await api.call("GET", "/jobs/ghost")
    assert (status, body) == (
        404,
        {"error": "no status for job 'ghost' at output/ghost/status.json"},
    )
    status, body, _ = await api.call("GET", "/jobs/..x")
    assert status == 400 and body["error"].startswith("'..x' is not a job id")
    client = s3_client(api.s3)
    client.put_object(Bucket=api.s3.bucket_name, Key="output/junk/status.json", Body=b"{")
    status, body, _ = await api.call("GET", "/jobs/junk")
    assert (status, body) == (
        500,
        {"error": "the status at output/junk/status.json is not valid JSON"},
    )


async def test_cancel_writes_the_request_workers_act_on(api: Api) -> None:
    await api.call("POST", "/jobs", {"id": "slow", "workflow": "solid"})
    await write_status(api.s3, JobStatus(id="over", state=JobState.failed))

    status, body, _ = await api.call("POST", "/jobs/slow/cancel")

    assert (status, body) == (
        202,
        {"id": "slow", "state": "waiting", "cancel_key": "input/_cancel/slow.json"},
    )
    request = get_json(s3_client(api.s3), api.s3, "input/_cancel/slow.json")
    assert request["job_id"] == "slow" and request["requested_by"] == "the HTTP jobs API"
    status, body, _ = await api.call("POST", "/jobs/over/cancel")
    assert (status, body) == (409, {"error": "job over already failed; nothing to cancel"})
    status, body, _ = await api.call("POST", "/jobs/ghost/cancel")
    assert status == 404


# -- GET /jobs, /workflows ----------------------------------------------------------------------


async def test_the_backlog_counts_and_pages_by_state(api: Api) -> None:
    for name in ("w1", "w2", "w3"):
        await api.call("POST", "/jobs", {"id": name, "workflow": "solid"})
    client = s3_client(api.s3)
    client.put_object(Bucket=api.s3.bucket_name, Key="input/_done/d1.json", Body=b"{}")
    client.put_object(Bucket=api.s3.bucket_name, Key="input/_claims/w3.json", Body=b"{}")

    status, counts, _ = await api.call("GET", "/jobs")
    assert status == 200
    assert (counts["waiting"], counts["running"], counts["succeeded"]) == (2, 1, 1)

    status, first, _ = await api.call("GET", "/jobs?state=waiting&limit=1")
    assert [m["name"] for m in first["manifests"]] == ["w1"] and first["next"] == "w1"
    status, rest, _ = await api.call("GET", f"/jobs?state=waiting&after={first['next']}")
    assert [m["name"] for m in rest["manifests"]] == ["w2"] and rest["next"] is None
    _, running, _ = await api.call("GET", "/jobs?state=running")
    assert [m["key"] for m in running["manifests"]] == ["input/_claims/w3.json"]
    _, succeeded, _ = await api.call("GET", "/jobs?state=succeeded")
    assert [m["name"] for m in succeeded["manifests"]] == ["d1"]
    status, bad, _ = await api.call("GET", "/jobs?state=lost")
    assert status == 422 and bad["problems"] == [
        "query.state: Input should be 'waiting', 'running', 'retrying', 'succeeded' or 'failed'"
    ]


async def test_workflows_with_their_fields_and_schemas(api: Api) -> None:
    registry = WorkflowRegistry.load(builtin_workflows_dir())

    status, listed, _ = await api.call("GET", "/workflows")
    assert status == 200
    assert [w["name"] for w in listed] == registry.names()
    solid = next(w for w in listed if w["name"] == "solid")
    width = next(f for f in solid["fields"] if f["name"] == "width")
    assert width == {
        "name": "width", "type": "integer (>=1 <=4096)", "required": False, "default": 64,
        "description": "Width.",
    }  # fmt: skip
    status, one, _ = await api.call("GET", "/workflows/txt2img")
    assert one["payload_schema"] == registry.workflows["txt2img"].json_schema()
    status, missing, _ = await api.call("GET", "/workflows/txt2im")
    assert (status, missing) == (404, {"error": registry.unknown_message("txt2im")})
    status, nothing, _ = await api.call("GET", "/nothing")
    assert (status, nothing) == (404, {"error": "no route GET /nothing; see /docs"})


# -- serving without a token --------------------------------------------------------------------


async def test_no_token_is_refused_unless_allowed_and_on_loopback(
    moto_s3_settings: S3Settings,
) -> None:
    s3 = moto_s3_settings
    layout = s3_layout(s3)
    refusals = [
        (WorkerSettings(), None, "the jobs API needs a token: set COMFYS3_API_TOKEN"),
        (
            WorkerSettings(api_allow_no_token=True),
            "0.0.0.0",
            "COMFYS3_API_ALLOW_NO_TOKEN is honoured only on a loopback address, not 0.0.0.0",
        ),
    ]
    for settings, host, message in refusals:
        with pytest.raises(SettingsError, match=message):
            async with serving_api(settings, S3Storage(s3), layout, host=host, port=0):
                pass
    open_settings = WorkerSettings(api_allow_no_token=True)
    async with (
        serving_api(open_settings, S3Storage(s3), layout, port=0) as url,
        aiohttp.ClientSession() as session,
    ):
        status, body, _ = await Api(url, session, s3).call(
            "POST", "/jobs", {"id": "free", "workflow": "solid"}, token=None
        )
    assert status == 201 and body["jobs"][0]["id"] == "free"


async def test_a_port_in_use_is_a_sentence(moto_s3_settings: S3Settings) -> None:
    s3 = moto_s3_settings
    async with serving_api(api_settings(), S3Storage(s3), s3_layout(s3), port=0) as url:
        port = int(url.rsplit(":", 1)[1])
        with pytest.raises(SettingsError, match=f"cannot listen on 127.0.0.1:{port}"):
            async with serving_api(api_settings(), S3Storage(s3), s3_layout(s3), port=port):
                pass
