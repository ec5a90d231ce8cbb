"""A local HTTP server for fetches from outside: files, redirects, stalls, errors, and a
stand-in for Hugging Face's resolve URLs. It runs in its own thread (so a test's event loop and
a worker's blocking code can both reach it) and counts what it was asked.

Routes (``server.url`` is ``http://127.0.0.1:PORT``):

- ``/files/<name>``: the bytes given to :meth:`FileServer.add` (``Content-Length`` set);
  ``?chunked=1`` streams them without a length, ``?stall=S`` stops for S seconds halfway;
- ``/redirect?to=URL``: a 302 to URL (``&status=301`` for another code);
- ``/status/<code>``: that status, empty body;
- ``/echo-auth``: 200 with the Authorization header it got (``none`` without one);
- ``/<org>/<repo>/resolve/<revision>/<path>``: Hugging Face's resolve URL: a 302 to
  ``cdn_url/files/<path>`` (``cdn_url``: another host name for the same server, so a test can
  see that a token stays behind), after checking ``Authorization: Bearer <hf_token>`` when one
  is set (401 without it, as for a gated repo).
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from aiohttp import web


class FileServer:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: Counter[str] = Counter()
        self.auth_seen: list[tuple[str, str | None]] = []  # (path, Authorization header)
        self.hf_token: str | None = None
        self.cdn_url = ""
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    def add(self, name: str, data: bytes) -> str:
        """Serve ``data`` at ``/files/<name>``; returns its URL."""
        self.files[name] = data
        return f"{self.url}/files/{name}"

    # -- the routes -----------------------------------------------------------------------

    async def _file(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        self.requests[name] += 1
        self.auth_seen.append((request.path, request.headers.get("authorization")))
        data = self.files.get(name)
        if data is None:
            return web.Response(status=404, text="not found")
        stall = float(request.query.get("stall", "0"))
        chunked = request.query.get("chunked") == "1"
        response = web.StreamResponse()
        if not chunked:
            response.content_length = len(data)
        await response.prepare(request)
        half = len(data) // 2
        await response.write(data[:half])
        if stall:
            await asyncio.sleep(stall)
        await response.write(data[half:])
        await response.write_eof()
        return response

    async def _redirect(self, request: web.Request) -> web.Response:
        self.requests["redirect"] += 1
        status = int(request.query.get("status", "302"))
        target = request.query.get("to", "/redirect")  # no target: to itself, a loop
        return web.Response(status=status, headers={"Location": target})

    async def _status(self, request: web.Request) -> web.Response:
        self.requests[f"status/{request.match_info['code']}"] += 1
        return web.Response(status=int(request.match_info["code"]))

    async def _echo_auth(self, request: web.Request) -> web.Response:
        return web.Response(text=request.headers.get("authorization") or "none")

    async def _hf_resolve(self, request: web.Request) -> web.Response:
        path = request.match_info["path"]
        self.requests[f"resolve/{path}"] += 1
        self.auth_seen.append((request.path, request.headers.get("authorization")))
        if self.hf_token and request.headers.get("authorization") != f"Bearer {self.hf_token}":
            return web.Response(status=401, text="gated repo: log in")
        name = path.rsplit("/", 1)[-1]
        if name not in self.files:
            return web.Response(status=404, text="Entry not found")
        return web.Response(status=302, headers={"Location": f"{self.cdn_url}/files/{name}"})

    # -- running --------------------------------------------------------------------------

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/files/{name}", self._file)
        app.router.add_get("/redirect", self._redirect)
        app.router.add_get("/status/{code}", self._status)
        app.router.add_get("/echo-auth", self._echo_auth)
        app.router.add_get("/{org}/{repo}/resolve/{revision}/{path:.+}", self._hf_resolve)
        return app

    def start(self) -> None:
        ready = threading.Event()
        port: list[int] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            runner = web.AppRunner(self._app(), shutdown_timeout=0.5)
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", 0)
            loop.run_until_complete(site.start())
            server: Any = site._server
            port.append(server.sockets[0].getsockname()[1])
            self._runner = runner
            ready.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=serve, name="file server", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the file server did not start")
        self.url = f"http://127.0.0.1:{port[0]}"
        self.cdn_url = self.url

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


@contextmanager
def file_server() -> Iterator[FileServer]:
    server = FileServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def lookup_to_loopback(*names: str) -> Any:
    """A resolver for the fetch guard that sends these names (and IP literals) to 127.0.0.1,
    and maps ``meta.test`` to the metadata service's address (which the guard must refuse
    before anything connects)."""

    async def lookup(host: str, port: int) -> list[str]:
        if host == "meta.test":
            return ["169.254.169.254"]
        if host == "private.test":
            return ["10.1.2.3"]
        if host in names or host == "127.0.0.1":
            return ["127.0.0.1"]
        raise OSError(f"{host}: no such host in the test")

    return lookup
