"""A counting reverse proxy for benches: what a client asks of a server, by route, in bytes.

It stands between a client under measurement (a `comfys3 run` worker, a peer) and a server (S3,
ComfyUI) on loopback and forwards every HTTP request and websocket unchanged, so signed S3
requests stay valid (the Host header is passed through as the client signed it). It counts:

- requests by a label that a ``classify`` function gives (an S3 operation, a ComfyUI route),
  and by label and status code;
- body bytes up (client to server) and down (server to client), websocket payloads included;
- websocket messages by direction and type (the JSON ``type`` of a text frame, ``<binary>``
  for a binary one);
- the ``prompt_id`` of every accepted ``POST /prompt``, so a bench can read those prompts'
  exec times from ComfyUI's /history afterwards, and when the first was sent.

It runs in a thread with its own event loop, so a synchronous bench can start and stop it.
Forwarding costs a little CPU in the bench's own process, not in the client's or the server's.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

# Hop-by-hop headers (RFC 9110 7.6.1) and those aiohttp sets itself from the body it sends.
_SKIP_UP = {
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
    "upgrade", "expect", "content-length",
}  # fmt: skip
_SKIP_DOWN = {
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
    "upgrade", "content-length", "date", "server",
}  # fmt: skip

Classify = Callable[[str, str, Any], str]  # (method, path with query, headers) -> label


@dataclass
class Counts:
    """What went through one proxy. Read it once the client has stopped."""

    requests: collections.Counter[str] = field(default_factory=collections.Counter)
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    ws_messages: collections.Counter[str] = field(default_factory=collections.Counter)
    bytes_up: int = 0
    bytes_down: int = 0
    prompt_ids: list[str] = field(default_factory=list)
    first_prompt_at: float | None = None  # time.time() when the first POST /prompt arrived
    requests_before_first_prompt: collections.Counter[str] = field(
        default_factory=collections.Counter
    )
    # (time.time(), label, path with query, status) of every HTTP request, for a closer look
    trace: list[tuple[float, str, str, int]] = field(default_factory=list)
    deleted_keys: list[str] = field(default_factory=list)  # the keys of S3 DeleteObjects calls

    def total_requests(self) -> int:
        return sum(self.requests.values())


class CountingProxy:
    """``with CountingProxy(target, classify) as proxy:`` point the client at ``proxy.url``."""

    def __init__(
        self,
        target: str,
        classify: Classify,
        on_first_prompt: Callable[[], None] | None = None,
        peer: CountingProxy | None = None,
    ) -> None:
        self.target = target.rstrip("/")
        self.classify = classify
        self.counts = Counts()
        self._on_first_prompt = on_first_prompt
        # The other proxy of the same run, whose counts are split at this one's first prompt.
        self.peer = peer
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    def __enter__(self) -> CountingProxy:
        self._thread.start()
        self.url = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _start(self) -> str:
        self._session = aiohttp.ClientSession(
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            connector=aiohttp.TCPConnector(limit=0),
        )
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None and server.sockets  # type: ignore[attr-defined]
        port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        return f"http://127.0.0.1:{port}"

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def _count(self, label: str) -> None:
        self.counts.requests[label] += 1
        if self.counts.first_prompt_at is None:
            self.counts.requests_before_first_prompt[label] += 1

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        label = self.classify(request.method, request.path_qs, request.headers)
        self._count(label)
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._websocket(request)
        body = await request.read()
        self.counts.bytes_up += len(body)
        if label == "DeleteObjects":
            self.counts.deleted_keys += [m.decode() for m in _DELETE_KEY.findall(body)]
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _SKIP_UP}
        assert self._session is not None
        async with self._session.request(
            request.method,
            self.target + request.path_qs,
            headers=headers,
            data=body if body else None,
            allow_redirects=False,
            skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
        ) as upstream:
            data = await upstream.read()
            status = upstream.status
            down = [(k, v) for k, v in upstream.headers.items() if k.lower() not in _SKIP_DOWN]
            length = upstream.headers.get("Content-Length")
        self.counts.statuses[f"{label} {status}"] += 1
        self.counts.trace.append((time.time(), label, request.path_qs, status))
        self.counts.bytes_down += len(data)
        if request.method == "POST" and label.endswith("/prompt") and status == 200:
            self._note_prompt(data)
        response = web.Response(status=status, body=data if request.method != "HEAD" else None)
        for key, value in down:
            response.headers.add(key, value)
        if request.method == "HEAD" and length is not None:
            response.headers["Content-Length"] = length  # what a GET would send; no body
        return response

    def _note_prompt(self, data: bytes) -> None:
        with contextlib.suppress(ValueError, AttributeError):
            prompt_id = json.loads(data).get("prompt_id")
            if isinstance(prompt_id, str):
                self.counts.prompt_ids.append(prompt_id)
        if self.counts.first_prompt_at is None:
            self.counts.first_prompt_at = time.time()
            if self.peer is not None:
                self.peer.counts.first_prompt_at = self.counts.first_prompt_at
            if self._on_first_prompt is not None:
                self._on_first_prompt()

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        down = web.WebSocketResponse(compress=False, max_msg_size=0)
        await down.prepare(request)
        assert self._session is not None
        target = "ws" + self.target[len("http") :] + request.path_qs
        async with self._session.ws_connect(target, compress=0, max_msg_size=0) as up:
            pumps = [
                asyncio.create_task(self._pump(up, down, "server->client")),
                asyncio.create_task(self._pump(down, up, "client->server")),
            ]
            _, pending = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await down.close()
        return down

    async def _pump(self, source: Any, sink: Any, direction: str) -> None:
        async for message in source:
            if message.type == aiohttp.WSMsgType.TEXT:
                self.counts.ws_messages[f"{direction} {_ws_type(message.data)}"] += 1
                self._add_ws_bytes(direction, len(message.data.encode()))
                await sink.send_str(message.data)
            elif message.type == aiohttp.WSMsgType.BINARY:
                self.counts.ws_messages[f"{direction} <binary>"] += 1
                self._add_ws_bytes(direction, len(message.data))
                await sink.send_bytes(message.data)
            else:
                break

    def _add_ws_bytes(self, direction: str, size: int) -> None:
        if direction == "server->client":
            self.counts.bytes_down += size
        else:
            self.counts.bytes_up += size


def _ws_type(text: str) -> str:
    with contextlib.suppress(ValueError, AttributeError):
        value = json.loads(text).get("type")
        if isinstance(value, str):
            return value
    return "<text>"


# -- classifiers ------------------------------------------------------------------------------


def s3_operation(method: str, path_qs: str, headers: Any) -> str:
    """The S3 operation of a path-style request, with the conditional header a claim uses."""
    query = path_qs.partition("?")[2]
    params = {part.partition("=")[0] for part in query.split("&") if part}
    if method == "GET":
        if "list-type" in params:
            return "ListObjectsV2"
        if path_qs.count("/") <= 1 and not query:
            return "ListBuckets" if path_qs in ("", "/") else "ListObjects"
        return "GetObject"
    if method == "HEAD":
        return "HeadObject"
    if method == "DELETE":
        return "DeleteObject"
    if method == "POST" and "delete" in params:
        return "DeleteObjects"
    if method == "PUT":
        if "x-amz-copy-source" in headers:
            return "CopyObject"
        for header in ("If-None-Match", "If-Match"):
            if header in headers:
                return f"PutObject {header}"
        return "PutObject"
    return method


_DELETE_KEY = re.compile(rb"<Key>([^<]*)</Key>")
_ID = re.compile(r"/[0-9a-fA-F-]{8,}(?=/|$)")


def comfy_route(method: str, path_qs: str, headers: Any) -> str:
    """``GET /history/{id}``: the method and path, ids folded, query dropped, /api kept."""
    path = path_qs.partition("?")[0]
    path = _ID.sub("/{id}", path)
    if path.endswith("/ws") and headers.get("Upgrade", "").lower() == "websocket":
        return "WS /ws"
    return f"{method} {path}"


@contextlib.contextmanager
def counting(target: str, classify: Classify, **kwargs: Any) -> Iterator[CountingProxy]:
    with CountingProxy(target, classify, **kwargs) as proxy:
        yield proxy
