"""One worker per process, on an event loop of its own, opened on the first job and kept.

The RunPod SDK runs the handler on whatever loop it has made: ``asyncio.run`` per local test,
uvicorn's loop for ``--rp_serve_api``, its job scaler's loop in production. The worker's S3
client and ComfyUI connection belong to one loop and ComfyUI takes long to start, so they live
on a loop owned here, in a daemon thread, and requests cross over to it. Whatever loop calls,
the same ComfyUI serves every job, and :meth:`WorkerHost.close` can stop it from any thread,
at interpreter exit included (``--test_input`` ends with ``sys.exit`` inside the SDK).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import TypeVar

from processor import Worker

log = logging.getLogger("comfys3.runpod")

T = TypeVar("T")
WorkerOpener = Callable[[], AbstractAsyncContextManager[Worker]]


class WorkerHost:
    def __init__(self, opener: WorkerOpener, *, close_timeout: float = 60.0) -> None:
        self._opener = opener
        self._close_timeout = close_timeout
        self._guard = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._worker: Worker | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._opening: asyncio.Lock | None = None

    @property
    def started(self) -> bool:
        """Whether a worker is open (ComfyUI answered at least once)."""
        return self._worker is not None

    async def run(
        self,
        work: Callable[[Worker], Awaitable[T]],
        *,
        on_cancel: Callable[[Worker], Awaitable[None]] | None = None,
    ) -> T:
        """Run ``work(worker)`` on the worker's loop; the first call waits for the worker.

        Cancelling the caller (RunPod stops a request: cancelled, or past its execution
        timeout) cancels the work on the worker's loop too, so it gives its claim back instead
        of running on unseen; with ``on_cancel``, that runs instead, and the work goes on to
        its own end (a cancelled job ends as ``cancelled``, its manifest settled).
        """
        loop = self._ensure_loop()
        future = asyncio.run_coroutine_threadsafe(self._with_worker(work), loop)
        if on_cancel is None:
            return await asyncio.wrap_future(future)
        try:
            return await asyncio.shield(asyncio.wrap_future(future))
        except asyncio.CancelledError:
            if not future.done():
                asyncio.run_coroutine_threadsafe(self._with_worker(on_cancel), loop)
            raise

    def close(self) -> None:
        """Close the worker (stopping a ComfyUI it started) and end the loop's thread."""
        with self._guard:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        future = asyncio.run_coroutine_threadsafe(self._aclose(), loop)
        try:
            future.result(self._close_timeout)
        except Exception as error:
            log.warning("closing the worker: %s", error, exc_info=True)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(self._close_timeout)

    # -- on the worker's loop ---------------------------------------------------------------

    async def _with_worker(self, work: Callable[[Worker], Awaitable[T]]) -> T:
        return await work(await self._ready())

    async def _ready(self) -> Worker:
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._worker is None:
                stack = contextlib.AsyncExitStack()
                try:
                    worker = await stack.enter_async_context(self._opener())
                except BaseException:
                    await stack.aclose()
                    raise  # not kept: the next job tries again (ComfyUI may be up by then)
                self._worker, self._stack = worker, stack
            return self._worker

    async def _aclose(self) -> None:
        # Jobs still running are cancelled first: that gives their claims back, so another
        # worker takes them over instead of waiting out the lease.
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        stack, self._stack, self._worker = self._stack, None, None
        if stack is not None:
            await stack.aclose()
            log.info("worker closed: ComfyUI and the S3 client are released")

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._guard:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=_serve, args=(loop,), name="comfys3-worker", daemon=True
                )
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        loop.close()
