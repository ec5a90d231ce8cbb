"""The jobs API on a port, inside the caller's event loop: alone (``comfys3 serve``) or beside
a worker (``comfys3 run`` with ``COMFYS3_API_PORT``).

uvicorn serves it. It is embedded rather than run: the caller owns SIGTERM (a worker must
finish its jobs first, see ``comfys3 run``), so uvicorn's own signal handling is switched
off, and the port is bound here first, so a port in use is a sentence, not an exit from
inside uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Iterator

import uvicorn

from processor import Layout, SettingsError, Storage, WorkerSettings, WorkflowRegistry
from triggers.api.app import Backend, build_app
from triggers.api.auth import serving_token
from triggers.api.command import DEFAULT_PORT

log = logging.getLogger("comfys3.api")

START_TIMEOUT = 10.0  # seconds for uvicorn to start serving on a socket that is already bound
STOP_TIMEOUT = 10.0  # seconds open requests get to finish when the server stops


class _EmbeddedServer(uvicorn.Server):
    """uvicorn, minus its signal handlers: whoever embeds it decides when it stops."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host.strip("[]"), port), family=family)
    except OSError as error:
        raise SettingsError(
            f"the jobs API cannot listen on {host}:{port}: {error.strerror or error} "
            "(COMFYS3_API_HOST, COMFYS3_API_PORT)"
        ) from None


@contextlib.asynccontextmanager
async def serving_api(
    settings: WorkerSettings,
    storage: Storage,
    layout: Layout,
    *,
    host: str | None = None,
    port: int | None = None,
) -> AsyncIterator[str]:
    """Serve the API over ``storage`` (opened and closed here) until the block ends; yields
    its base URL. Refuses to start without a token unless that is allowed (loopback only)."""
    host = host or settings.api.host
    port = port if port is not None else (settings.api.port or DEFAULT_PORT)
    token = serving_token(settings, host)
    registry = WorkflowRegistry.default(settings.jobs.workflows_dir)
    async with storage:
        app = build_app(Backend(storage, layout, registry, settings), token)
        sock = bind(host, port)
        config = uvicorn.Config(
            app, lifespan="off", log_config=None, access_log=False, server_header=False
        )
        server = _EmbeddedServer(config)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            await _started(server, task)
            bound = sock.getsockname()[1]
            url = f"http://{host}:{bound}" if ":" not in host else f"http://[{host}]:{bound}"
            log.info(
                "jobs API at %s (docs at %s/docs)%s",
                url,
                url,
                "" if token else "; no token: loopback only",
            )
            yield url
        finally:
            server.should_exit = True
            try:
                await asyncio.wait_for(asyncio.shield(task), STOP_TIMEOUT)
            except TimeoutError:
                server.force_exit = True
                await task
            sock.close()


async def _started(server: uvicorn.Server, task: asyncio.Task[None]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_TIMEOUT
    while not server.started:
        if task.done():
            task.result()
            raise SettingsError("the jobs API stopped as it started; see the log above")
        if loop.time() > deadline:
            raise SettingsError(f"the jobs API did not start within {START_TIMEOUT:g} s")
        await asyncio.sleep(0.02)
