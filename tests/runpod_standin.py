"""A local stand-in for RunPod's serverless API (``/v2/<endpoint>/run``, ``/status``,
``/cancel``), in a thread of its own so sync code (the Lambda handler) can call it too.

It records every request, and answers what the test scripts: a queue of HTTP statuses for
``/run`` (429 with a Retry-After, 500, ...) before it accepts, and a status per job id.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

ENDPOINT = "test-endpoint"
API_KEY = "rp-test-key"


@dataclass
class Recorded:
    method: str
    path: str
    authorization: str | None
    body: Any


@dataclass
class RunPodStandIn:
    url: str = ""
    requests: list[Recorded] = field(default_factory=list)
    run_failures: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    statuses: dict[str, str] = field(default_factory=dict)
    default_status: str = "IN_QUEUE"
    issued: set[str] = field(default_factory=set)
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def runs(self) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.path.endswith("/run")]

    def run_manifests(self) -> list[str]:
        return [r.body["input"]["manifest"] for r in self.runs()]

    def fail_next_runs(self, *answers: int, retry_after: str | None = None) -> None:
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        with self._lock:
            self.run_failures.extend((status, headers) for status in answers)

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        body = json.loads(raw) if raw else None
        with self._lock:
            self.requests.append(
                Recorded(request.method, request.path, request.headers.get("Authorization"), body)
            )
        if request.headers.get("Authorization") != f"Bearer {API_KEY}":
            return web.json_response({"error": "Unauthorized"}, status=401)
        if request.match_info["endpoint"] != ENDPOINT:
            return web.json_response({"error": "not found"}, status=404)
        action, job_id = request.match_info["action"], request.match_info.get("job_id")
        if action == "run":
            with self._lock:
                failure = self.run_failures.pop(0) if self.run_failures else None
            if failure is not None:
                status, headers = failure
                return web.json_response({"error": "try later"}, status=status, headers=headers)
            job_id = f"job-{next(self._ids)}-e1"
            self.issued.add(job_id)
            return web.json_response({"id": job_id, "status": "IN_QUEUE"})
        if action == "status":
            known = job_id in self.statuses or any(job_id == f"job-{n}-e1" for n in range(1, 1000))
            if not known:
                return web.json_response({"error": "job not found"}, status=404)
            return web.json_response(
                {"id": job_id, "status": self.statuses.get(job_id, self.default_status)}
            )
        if action == "cancel":
            self.statuses[job_id or ""] = "CANCELLED"
            return web.json_response({"id": job_id, "status": "CANCELLED"})
        return web.json_response({"error": "unknown"}, status=404)


@contextlib.contextmanager
def runpod_standin() -> Iterator[RunPodStandIn]:
    standin = RunPodStandIn()
    app = web.Application()
    app.router.add_post("/v2/{endpoint}/{action:run}", standin._handle)
    app.router.add_get("/v2/{endpoint}/{action:status}/{job_id}", standin._handle)
    app.router.add_post("/v2/{endpoint}/{action:cancel}/{job_id}", standin._handle)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, access_log=None)
    started = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        standin.url = f"http://127.0.0.1:{port}"
        started.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=serve, name="runpod stand-in", daemon=True)
    thread.start()
    if not started.wait(10):
        raise RuntimeError("the RunPod stand-in did not start")
    try:
        yield standin
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
