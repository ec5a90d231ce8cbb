"""Run the fake ComfyUI inside the test process, on its own event loop in a background thread.

A thread (rather than the test's own loop) lets synchronous clients such as websocket-client and
urllib block freely while the server keeps serving, exactly as against a real ComfyUI.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from pathlib import Path
from types import TracebackType
from typing import Any

from aiohttp import web

from .server import ENGINE, FakeDirs, create_app
from .state import FakeState


class FakeComfyUIThread:
    """Start with `with FakeComfyUIThread(base_dir) as fake:`; `fake.url` is http://127.0.0.1:PORT."""

    def __init__(self, base_dir: Path, state: FakeState | None = None, port: int = 0) -> None:
        self.state = state or FakeState()
        self.dirs = FakeDirs(base_dir / "input", base_dir / "output", base_dir / "temp")
        self._port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def input_dir(self) -> Path:
        return self.dirs.input_dir

    @property
    def output_dir(self) -> Path:
        return self.dirs.output_dir

    @property
    def temp_dir(self) -> Path:
        return self.dirs.temp_dir

    def start(self) -> FakeComfyUIThread:
        started: Future[int] = Future()
        self._thread = threading.Thread(
            target=self._serve, args=(started,), name="fake-comfyui", daemon=True
        )
        self._thread.start()
        self.port = started.result(timeout=30)
        return self

    def _serve(self, started: Future[int]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            app = create_app(self.state, self.dirs)
            self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
            loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", self._port)
            loop.run_until_complete(site.start())
            server = getattr(site, "_server", None)
            sockets = getattr(server, "sockets", None) or []
            started.set_result(sockets[0].getsockname()[1])
        except BaseException as exc:
            started.set_exception(exc)
            loop.close()
            return
        loop.run_forever()
        loop.run_until_complete(self._runner.cleanup())
        loop.close()

    def call(self, fn: Any, *args: Any) -> Any:
        """Run `fn(engine, *args)` on the server's loop and return its result (thread-safe)."""
        assert self._loop is not None and self._runner is not None

        async def invoke() -> Any:
            assert self._runner is not None
            return fn(self._runner.app[ENGINE], *args)

        return asyncio.run_coroutine_threadsafe(invoke(), self._loop).result(timeout=10)

    def stats(self) -> dict[str, Any]:
        """The same document as GET /fake/stats."""
        return self.call(lambda engine: engine.stats_json())

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        self._loop = None

    def __enter__(self) -> FakeComfyUIThread:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
