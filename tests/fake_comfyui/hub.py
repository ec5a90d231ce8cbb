"""Websocket clients and the single ordered outbox that feeds them.

ComfyUI funnels every event through one queue drained by one publisher, so a client sees events
in the order they were produced no matter which task produced them. Events addressed to a
client id go only to that client's socket (nowhere if it is not connected); `sid=None` means
every socket (queue `status` updates, `execution_interrupted` of a prompt without client id).
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSCloseCode, web

log = logging.getLogger("fake_comfyui")

PREVIEW_IMAGE = 1
PREVIEW_IMAGE_WITH_METADATA = 4

SERVER_FEATURES = {"supports_preview_metadata": True, "max_upload_size": 100 * 1024 * 1024}


def server_features(current: bool, assets: bool = False) -> dict[str, Any]:
    """The server's feature flags (websocket handshake answer and GET /features).

    0.3.64 sends the two recorded flags; today's ComfyUI adds model type tags, the Manager's v4
    marker, node replacements and whether its assets system is on.
    """
    if not current:
        return dict(SERVER_FEATURES)
    return {
        "supports_preview_metadata": True,
        "supports_model_type_tags": True,
        "max_upload_size": SERVER_FEATURES["max_upload_size"],
        "extension": {"manager": {"supports_v4": True}},
        "node_replacements": True,
        "assets": assets,
    }


@dataclass
class Client:
    ws: web.WebSocketResponse
    feature_flags: dict[str, Any] = field(default_factory=dict)


class Hub:
    def __init__(self) -> None:
        self.clients: dict[str, Client] = {}
        self._outbox: asyncio.Queue[tuple[str | int, Any, str | None]] = asyncio.Queue()

    def send(self, event: str | int, data: Any, sid: str | None = None) -> None:
        """Queue an event (JSON for str events, a binary frame for int events)."""
        self._outbox.put_nowait((event, data, sid))

    def supports(self, sid: str | None, flag: str) -> bool:
        client = self.clients.get(sid) if sid is not None else None
        return bool(client and client.feature_flags.get(flag))

    async def drain(self) -> None:
        """Wait until everything queued so far has been written to the sockets."""
        await self._outbox.join()

    async def publish_forever(self) -> None:
        while True:
            event, data, sid = await self._outbox.get()
            try:
                await self._deliver(event, data, sid)
            finally:
                self._outbox.task_done()

    async def _deliver(self, event: str | int, data: Any, sid: str | None) -> None:
        if sid is None:
            targets = list(self.clients.values())
        else:
            client = self.clients.get(sid)
            targets = [client] if client else []
        for client in targets:
            try:
                if isinstance(event, int):
                    await client.ws.send_bytes(struct.pack(">I", event) + bytes(data))
                else:
                    await client.ws.send_str(json.dumps({"type": event, "data": data}))
            except (ConnectionError, RuntimeError) as exc:
                log.info("websocket send failed: %s", exc)

    async def close_all(self) -> None:
        """Drop every connection, as a crashing proxy or restarting server would."""
        await self.drain()
        for client in list(self.clients.values()):
            await client.ws.close(code=WSCloseCode.GOING_AWAY, message=b"fake drop")

    def register(self, sid: str, ws: web.WebSocketResponse) -> None:
        self.clients[sid] = Client(ws)

    def unregister(self, sid: str, ws: web.WebSocketResponse) -> None:
        # Only if the entry is still ours: a client that reconnected with the same id keeps its
        # new socket. (ComfyUI pops unconditionally, which can orphan a fast reconnect.)
        client = self.clients.get(sid)
        if client is not None and client.ws is ws:
            del self.clients[sid]
