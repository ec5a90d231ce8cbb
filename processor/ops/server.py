"""The ops HTTP server: ``/metrics`` for Prometheus, ``/healthz`` and ``/livez`` for probes.

It runs on the worker's own event loop, so ``/livez`` answering is itself the proof that the
loop is not stuck. It listens on 127.0.0.1 unless told otherwise (``COMFYS3_METRICS_HOST``):
the numbers name workflows and error types, and nothing outside the machine should read them
unless the operator opens it (``0.0.0.0`` inside a container, whose network is already its
own, so Prometheus on the same network can scrape it).
"""

from __future__ import annotations

import logging
from typing import Self

from aiohttp import web
from prometheus_client import exposition

from processor.aio import ClosedOnExit
from processor.ops.metrics import Health, Metrics

log = logging.getLogger("comfys3.ops")


def make_app(metrics: Metrics, health: Health) -> web.Application:
    async def scrape(request: web.Request) -> web.Response:
        encoder, content_type = exposition.choose_encoder(request.headers.get("Accept", ""))
        response = web.Response(body=encoder(metrics.registry))
        response.headers["Content-Type"] = content_type
        return response

    async def healthz(request: web.Request) -> web.Response:
        readiness = health.readiness()
        return web.json_response(readiness.to_json(), status=200 if readiness.ready else 503)

    async def livez(request: web.Request) -> web.Response:
        live = health.liveness()
        body = {"live": live.ok, "reason": live.detail}
        return web.json_response(body, status=200 if live.ok else 503)

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/livez", livez)
    return app


class OpsServer(ClosedOnExit):
    """``async with OpsServer(metrics, health, host, port) as server``; ``server.port`` is the
    port it listens on (useful with port 0)."""

    def __init__(
        self, metrics: Metrics, health: Health, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.host = host
        self.port = port
        self._runner = web.AppRunner(
            make_app(metrics, health), access_log=None, shutdown_timeout=1.0
        )

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        try:
            await site.start()
        except OSError as error:
            await self._runner.cleanup()
            raise OSError(
                error.errno,
                f"the metrics server cannot listen on {self.host}:{self.port} "
                f"(COMFYS3_METRICS_HOST/COMFYS3_METRICS_PORT): {error.strerror or error}",
            ) from None
        self.port = int(self._runner.addresses[0][1])
        log.info("metrics and health on %s (/metrics, /healthz, /livez)", self.url)

    async def aclose(self) -> None:
        await self._runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self
