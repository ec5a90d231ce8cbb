"""HTTP and websocket routes of the fake ComfyUI, each also served under /api.

Answers mirror ComfyUI 0.3.64 (see recordings/): the same status codes,
body shapes, and even the 500 page aiohttp writes for a malformed POST /prompt body. With the
`protocol` knob at "current" they mirror today's ComfyUI (0.38.x, DELTA.md) instead: the job
API, UUID-only prompt ids, `create_time`, the new /system_stats and feature flags. A route the
chosen version does not have answers as that server answers any unknown path. The extra
/fake/* routes let a test or a supervisor turn knobs and read counters over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import mimetypes
import os
import platform
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

from . import jobs
from .engine import SENSITIVE_EXTRA_DATA_KEYS, Engine, QueueItem
from .hub import SERVER_FEATURES, Hub, server_features
from .nodes import NodeContext, offered
from .state import ConfigError, FakeState
from .validation import validate_prompt

log = logging.getLogger("fake_comfyui")

COMFYUI_VERSION = "0.3.64"
CURRENT_COMFYUI_VERSION = "0.38.1"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class FakeDirs:
    input_dir: Path
    output_dir: Path
    temp_dir: Path

    def create(self) -> None:
        for path in (self.input_dir, self.output_dir, self.temp_dir):
            path.mkdir(parents=True, exist_ok=True)


ENGINE = web.AppKey("engine", Engine)
HUB = web.AppKey("hub", Hub)
STATE = web.AppKey("state", FakeState)
DIRS = web.AppKey("dirs", FakeDirs)


def create_app(state: FakeState, dirs: FakeDirs) -> web.Application:
    """The aiohttp application; its executor and publisher run while the app runs."""
    dirs.create()
    app = web.Application(
        client_max_size=SERVER_FEATURES["max_upload_size"], middlewares=[count_requests]
    )
    app[STATE] = state
    app[DIRS] = dirs
    hub = Hub()
    app[HUB] = hub
    app[ENGINE] = Engine(
        state, NodeContext(dirs.input_dir, dirs.output_dir, dirs.temp_dir, state), hub
    )

    async def background(app: web.Application) -> AsyncIterator[None]:
        tasks = [
            asyncio.create_task(hub.publish_forever(), name="fake-comfyui-publisher"),
            asyncio.create_task(app[ENGINE].run_forever(), name="fake-comfyui-executor"),
        ]
        yield
        for client in list(hub.clients.values()):
            await client.ws.close()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app.cleanup_ctx.append(background)
    routes: list[tuple[str, str, Handler]] = [
        ("GET", "/ws", websocket),
        ("POST", "/prompt", post_prompt),
        ("GET", "/prompt", get_prompt),
        ("GET", "/history", get_history),
        ("GET", "/history/{prompt_id}", get_history_item),
        ("POST", "/history", post_history),
        ("GET", "/queue", get_queue),
        ("POST", "/queue", post_queue),
        ("POST", "/interrupt", post_interrupt),
        ("GET", "/view", view),
        ("POST", "/upload/image", upload_image),
        ("GET", "/system_stats", system_stats),
        ("GET", "/object_info", object_info),
        ("GET", "/object_info/{node_class}", object_info_node),
        ("GET", "/features", features),
        ("POST", "/free", free),
        ("GET", "/fake/stats", fake_stats),
        ("GET", "/fake/config", get_fake_config),
        ("POST", "/fake/config", post_fake_config),
        # Today's ComfyUI declares these with a literal /api, so the prefixing below also
        # serves them at /api/api/jobs...; there is no bare /jobs (DELTA.md §2).
        ("GET", "/api/jobs", list_jobs),
        ("GET", "/api/jobs/{job_id}", get_job),
        ("POST", "/api/jobs/cancel", cancel_jobs),
        ("POST", "/api/jobs/{job_id}/cancel", cancel_job),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
        app.router.add_route(method, "/api" + path, handler)
    # ComfyUI serves its web frontend from "/" as a static folder, registered last: any other
    # path is looked up there, so an unknown GET is a 404 and an unknown POST a 405.
    app.router.add_route("*", "/{tail:.*}", unknown_route)
    return app


@web.middleware
async def count_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count each request by its route pattern in the engine's stats (see README: requests)."""
    info = request.match_info.route.resource
    pattern = info.canonical if info is not None else "?"
    if pattern == "/{tail}":
        pattern = "?"
    if not pattern.startswith(("/fake/", "/api/fake/")):
        requests = request.app[ENGINE].stats.requests
        name = f"{request.method} {pattern}"
        requests[name] = requests.get(name, 0) + 1
    return await handler(request)


async def unknown_route(request: web.Request) -> web.StreamResponse:
    """What a real 0.3.64 answers for a path only its static "/" route matches (recorded in
    recordings/unknown_routes_0.3.64.json): GET and HEAD a bare 404 without a body, anything
    else aiohttp's 405 page allowing GET and HEAD."""
    if request.method == "HEAD":
        return web.Response(status=404)
    if request.method == "GET":
        return web.Response(status=404, content_type="application/octet-stream")
    raise web.HTTPMethodNotAllowed(request.method, ["GET", "HEAD"])


def current_only(handler: Handler) -> Handler:
    """A route today's ComfyUI has and 0.3.64 does not: unknown under protocol 0.3.64."""

    async def route(request: web.Request) -> web.StreamResponse:
        if not request.app[STATE].current:
            return await unknown_route(request)
        return await handler(request)

    route.__doc__ = handler.__doc__
    return route


# --- websocket ------------------------------------------------------------------------------


async def websocket(request: web.Request) -> web.StreamResponse:
    hub, engine = request.app[HUB], request.app[ENGINE]
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    sid = request.query.get("clientId", "") or uuid.uuid4().hex
    hub.register(sid, ws)
    try:
        hub.send("status", {"status": engine.queue_info(), "sid": sid}, sid)
        if engine.client_id == sid and engine.last_node_id is not None:
            hub.send("executing", {"node": engine.last_node_id}, sid)
        first = True
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            try:
                data = json.loads(msg.data)
            except json.JSONDecodeError:
                log.warning("Invalid JSON received from client %s: %s", sid, msg.data)
                continue
            if first and isinstance(data, dict) and data.get("type") == "feature_flags":
                client = hub.clients.get(sid)
                if client is not None:
                    client.feature_flags = dict(data.get("data") or {})
                state = request.app[STATE]
                hub.send("feature_flags", server_features(state.current, state.assets), sid)
            first = False
    finally:
        hub.unregister(sid, ws)
    return ws


# --- prompts and queue ----------------------------------------------------------------------


async def post_prompt(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    body = await request.json()  # malformed JSON -> aiohttp's plain 500 page, as in ComfyUI
    if "number" in body:
        number: float = float(body["number"])
    else:
        number = engine.number
        if body.get("front"):
            number = -number
        engine.number += 1
    if "prompt" not in body:
        error = {
            "type": "no_prompt",
            "message": "No prompt provided",
            "details": "No prompt provided",
            "extra_info": {},
        }
        engine.stats.rejected += 1
        return web.json_response({"error": error, "node_errors": {}}, status=400)

    prompt = body["prompt"]
    current = request.app[STATE].current
    if not current:
        prompt_id = str(body.get("prompt_id", uuid.uuid4()))  # null becomes "None", as in 0.3.64
    elif body.get("prompt_id") is None:
        prompt_id = str(uuid.uuid4())
    elif jobs.is_canonical_uuid(body["prompt_id"]):
        prompt_id = body["prompt_id"]
    else:
        engine.stats.rejected += 1
        return web.json_response({"error": INVALID_PROMPT_ID, "node_errors": {}}, status=400)
    result = validate_prompt(prompt, engine.ctx, current)
    extra_data = dict(body.get("extra_data") or {})
    if "client_id" in body:
        extra_data["client_id"] = body["client_id"]
    usage_source = request.headers.get("Comfy-Usage-Source")
    if current and usage_source and "comfy_usage_source" not in extra_data:
        extra_data["comfy_usage_source"] = usage_source
    if not result.ok:
        engine.stats.rejected += 1
        log.warning("invalid prompt: %s", result.error)
        return web.json_response(
            {"error": result.error, "node_errors": result.node_errors}, status=400
        )
    sensitive: dict[str, Any] = {}
    if current:
        for key in SENSITIVE_EXTRA_DATA_KEYS:
            if key in extra_data:
                sensitive[key] = extra_data.pop(key)
        extra_data["create_time"] = int(time.time() * 1000)
    engine.put(QueueItem(number, prompt_id, prompt, extra_data, result.outputs, sensitive))
    return web.json_response(
        {"prompt_id": prompt_id, "number": number, "node_errors": result.node_errors}
    )


INVALID_PROMPT_ID = {
    "type": "invalid_prompt_id",
    "message": "prompt_id must be a valid UUID",
    "details": "prompt_id must be a UUID string in canonical lowercase hyphenated form; "
    "omit it to let the server generate one",
    "extra_info": {},
}


async def get_prompt(request: web.Request) -> web.Response:
    return web.json_response(request.app[ENGINE].queue_info())


async def get_queue(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    running = [engine.running.as_list()] if engine.running else []
    return web.json_response(
        {"queue_running": running, "queue_pending": [item.as_list() for item in engine.pending]}
    )


async def post_queue(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    body = await request.json()
    if body.get("clear"):
        engine.clear_pending()
    for prompt_id in body.get("delete", []):
        engine.delete_pending(prompt_id)
    return web.Response(status=200)


async def post_interrupt(request: web.Request) -> web.Response:
    try:
        body = await request.json()
    except json.JSONDecodeError:
        body = {}
    prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
    request.app[ENGINE].interrupt(prompt_id)
    return web.Response(status=200)


async def get_history(request: web.Request) -> web.Response:
    max_items = request.query.get("max_items")
    offset = int(request.query.get("offset", -1))
    history = request.app[ENGINE].get_history(int(max_items) if max_items else None, offset)
    return web.json_response(history)


async def get_history_item(request: web.Request) -> web.Response:
    prompt_id = request.match_info["prompt_id"]
    entry = request.app[ENGINE].history.get(prompt_id)
    return web.json_response({prompt_id: entry} if entry is not None else {})


async def post_history(request: web.Request) -> web.Response:
    history = request.app[ENGINE].history
    body = await request.json()
    if body.get("clear"):
        history.clear()
    for prompt_id in body.get("delete", []):
        history.pop(prompt_id, None)
    return web.Response(status=200)


# --- files ------------------------------------------------------------------------------------


def _dir_for(dirs: FakeDirs, kind: str | None) -> tuple[Path | None, str]:
    kind = kind or "input"
    return {"input": dirs.input_dir, "output": dirs.output_dir, "temp": dirs.temp_dir}.get(
        kind
    ), kind


def _inside(base: Path, path: Path) -> bool:
    base_s, path_s = os.path.abspath(base), os.path.abspath(path)
    return os.path.commonpath((base_s, path_s)) == base_s


async def view(request: web.Request) -> web.StreamResponse:
    dirs, query = request.app[DIRS], request.query
    if "filename" not in query:
        return web.Response(status=404)
    filename = query["filename"]
    base: Path | None = None
    for suffix, kind in ((" [output]", "output"), (" [input]", "input"), (" [temp]", "temp")):
        if filename.endswith(suffix):
            filename, base = filename[: -len(suffix)], _dir_for(dirs, kind)[0]
    if not filename or filename[0] == "/" or ".." in filename:
        return web.Response(status=400)
    if base is None:
        base = _dir_for(dirs, query.get("type", "output"))[0]
    if base is None:
        return web.Response(status=400)
    if "subfolder" in query:
        folder = base / query["subfolder"]
        if not _inside(base, folder):
            return web.Response(status=403)
        base = folder
    path = base / os.path.basename(filename)
    if not path.is_file():
        return web.Response(status=404)
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    headers = {"Content-Disposition": f'filename="{path.name}"', "Content-Type": content_type}
    if request.app[STATE].current:
        headers["X-Content-Type-Options"] = "nosniff"
    return web.FileResponse(path, headers=headers)


async def upload_image(request: web.Request) -> web.Response:
    dirs = request.app[DIRS]
    post = await request.post()
    image = post.get("image")
    if not isinstance(image, web.FileField) or not image.filename:
        return web.Response(status=400)
    upload_dir, kind = _dir_for(dirs, str(post.get("type") or "") or None)
    if upload_dir is None:
        return web.Response(status=400)
    subfolder = str(post.get("subfolder", ""))
    folder = upload_dir / os.path.normpath(subfolder) if subfolder else upload_dir
    filename = image.filename
    target = folder / filename
    if not _inside(upload_dir, target):
        return web.Response(status=400)
    folder.mkdir(parents=True, exist_ok=True)
    content = image.file.read()
    duplicate = False
    if str(post.get("overwrite", "")) not in ("true", "1"):
        stem, ext = os.path.splitext(filename)
        counter = 1
        while target.exists():
            if hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(content).digest():
                duplicate = True  # same bytes under the same name: reuse, like ComfyUI
                break
            filename = f"{stem} ({counter}){ext}"
            target = folder / filename
            counter += 1
    if not duplicate:
        target.write_bytes(content)
    return web.json_response({"name": filename, "subfolder": subfolder, "type": kind})


# --- info -------------------------------------------------------------------------------------


async def system_stats(request: web.Request) -> web.Response:
    """0.3.64's shape; today's reports `sys.platform` as os and two more keys (DELTA.md §8)."""
    current = request.app[STATE].current
    system: dict[str, Any] = {
        "os": sys.platform if current else os.name,
        "ram_total": 8 * 1024**3,
        "ram_free": 6 * 1024**3,
        "comfyui_version": CURRENT_COMFYUI_VERSION if current else COMFYUI_VERSION,
        "required_frontend_version": "1.53.6" if current else "1.27.10",
        "installed_templates_version": "0.11.73" if current else "0.1.95",
        "required_templates_version": "0.11.73" if current else "0.1.95",
    }
    if current:
        system["comfy_package_versions"] = [
            {"name": name, "installed": version, "required": version}
            for name, version in (
                ("comfyui-frontend-package", "1.53.6"),
                ("comfyui-workflow-templates", "0.11.73"),
                ("comfyui-embedded-docs", "0.5.12"),
            )
        ]
    system.update(
        {
            "python_version": sys.version,
            "pytorch_version": "fake",
            "embedded_python": False,
        }
    )
    if current:
        system["deploy_environment"] = "local-git"
    system["argv"] = sys.argv
    return web.json_response(
        {
            "system": system,
            "devices": [
                {
                    "name": "cpu",
                    "type": "cpu",
                    "index": None,
                    "vram_total": 8 * 1024**3,
                    "vram_free": 6 * 1024**3,
                    "torch_vram_total": 8 * 1024**3,
                    "torch_vram_free": 6 * 1024**3,
                }
            ],
            "fake": {"platform": platform.platform()},
        }
    )


async def object_info(request: web.Request) -> web.Response:
    ctx = request.app[ENGINE].ctx
    broken = set(ctx.state.broken_info_nodes)  # logged and left out, as ComfyUI does
    return web.json_response(
        {name: node.info(ctx) for name, node in offered(ctx).items() if name not in broken}
    )


async def object_info_node(request: web.Request) -> web.Response:
    name = request.match_info["node_class"]
    ctx = request.app[ENGINE].ctx
    node = offered(ctx).get(name)
    if node is not None and name in ctx.state.broken_info_nodes:
        raise web.HTTPInternalServerError(text="500 Internal Server Error")
    return web.json_response({name: node.info(ctx)} if node else {})


async def features(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response(server_features(state.current, state.assets))


async def free(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(status=200)


# --- today's job API ----------------------------------------------------------------------------


@current_only
async def list_jobs(request: web.Request) -> web.Response:
    return jobs.list_jobs(request.app[ENGINE], request.query)


@current_only
async def get_job(request: web.Request) -> web.Response:
    return jobs.get_job(request.app[ENGINE], request.match_info["job_id"])


@current_only
async def cancel_job(request: web.Request) -> web.Response:
    """Always 200: {"cancelled": true} only if a running or pending job was stopped."""
    cancelled = jobs.cancel(request.app[ENGINE], request.match_info["job_id"])
    return web.json_response({"cancelled": cancelled})


@current_only
async def cancel_jobs(request: web.Request) -> web.Response:
    return await jobs.cancel_many(request.app[ENGINE], request)


# --- fake-only --------------------------------------------------------------------------------


async def fake_stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[ENGINE].stats_json())


async def get_fake_config(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].to_json())


async def post_fake_config(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        body: Any = await request.json()
        if not isinstance(body, dict):
            raise ConfigError("POST /fake/config wants a JSON object of knob: value")
        state.update(body)
    except (ConfigError, json.JSONDecodeError) as exc:
        return web.json_response({"error": str(exc)}, status=400)
    return web.json_response(state.to_json())
