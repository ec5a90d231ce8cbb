"""A small synchronous ComfyUI client for tests of the fake itself (and anyone probing it).

It talks plain HTTP (urllib) and websocket-client, as the real worker does, and records
websocket frames in the recordings' format: JSON messages as dicts, binary frames as
{"type": "<binary>", "len": N, "head_hex": first 8 bytes}.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any

import websocket


@dataclass
class Run:
    """One prompt's round trip: the POST answer, every websocket message, the history entry."""

    post_status: int
    post_body: Any
    prompt_id: str
    ws: list[dict[str, Any]] = field(default_factory=list)
    history: dict[str, Any] = field(default_factory=dict)

    def types(self) -> list[str]:
        return [m["type"] for m in self.ws]

    def last(self, kind: str) -> dict[str, Any]:
        return next(m for m in reversed(self.ws) if m["type"] == kind)


def frame_to_message(opcode: int, payload: bytes | str) -> dict[str, Any]:
    if opcode == websocket.ABNF.OPCODE_BINARY:
        data = payload if isinstance(payload, bytes) else payload.encode()
        return {"type": "<binary>", "len": len(data), "head_hex": data[:8].hex()}
    text = payload.decode() if isinstance(payload, bytes) else payload
    return dict(json.loads(text))


class ComfyTestClient:
    def __init__(self, url: str, client_id: str | None = None, timeout: float = 20.0) -> None:
        self.url = url.rstrip("/")
        self.client_id = client_id or uuid.uuid4().hex
        self.timeout = timeout
        self.ws: websocket.WebSocket | None = None

    # --- websocket ----------------------------------------------------------------------------

    def connect(self, feature_flags: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Open /ws?clientId=...; return the greeting (plus the feature_flags answer if sent)."""
        ws_url = self.url.replace("http://", "ws://", 1) + f"/ws?clientId={self.client_id}"
        self.ws = websocket.create_connection(ws_url, timeout=self.timeout)
        greeting = [self.receive()]
        if feature_flags is not None:
            self.ws.send(json.dumps({"type": "feature_flags", "data": feature_flags}))
            greeting.append(self.receive())
        return greeting

    def receive(self) -> dict[str, Any]:
        """The next message; a close frame raises WebSocketConnectionClosedException."""
        assert self.ws is not None, "connect() first"
        opcode, payload = self.ws.recv_data()
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            raise websocket.WebSocketConnectionClosedException(f"closed by server: {payload!r}")
        return frame_to_message(opcode, payload)

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()
            self.ws = None

    def collect(self, prompt_id: str) -> list[dict[str, Any]]:
        """Messages until `executing {node: null}` for prompt_id (the end of its run)."""
        messages = []
        while True:
            message = self.receive()
            messages.append(message)
            data = message.get("data")
            if (
                message["type"] == "executing"
                and isinstance(data, dict)
                and data.get("node") is None
                and data.get("prompt_id") == prompt_id
            ):
                return messages

    # --- HTTP ---------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes, dict[str, str]]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None and raw is None:
            req.add_header("Content-Type", "application/json")
        for key, value in (headers or {}).items():
            req.add_header(key, value)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.status, resp.read(), dict(resp.headers)
        except urllib.error.HTTPError as err:
            return err.code, err.read(), dict(err.headers)

    def get_json(self, path: str) -> Any:
        status, body, _ = self.request("GET", path)
        assert status == 200, f"GET {path} -> {status}: {body[:200]!r}"
        return json.loads(body)

    def post_prompt(
        self, prompt: dict[str, Any], prompt_id: str | None = None, **extra: Any
    ) -> tuple[int, Any]:
        body: dict[str, Any] = {"prompt": prompt, "client_id": self.client_id, **extra}
        if prompt_id is not None:
            body["prompt_id"] = prompt_id
        status, raw, _ = self.request("POST", "/prompt", body)
        try:
            return status, json.loads(raw)
        except json.JSONDecodeError:
            return status, raw.decode(errors="replace")

    def history(self, prompt_id: str, wait: float = 5.0) -> dict[str, Any]:
        """The /history entry, retried briefly: it is written just after execution_success."""
        deadline = time.monotonic() + wait
        while True:
            entry = self.get_json(f"/history/{prompt_id}")
            if entry or time.monotonic() > deadline:
                return dict(entry)
            time.sleep(0.01)

    def run(self, prompt: dict[str, Any], prompt_id: str | None = None) -> Run:
        """POST a prompt, follow it on the websocket to the end, fetch its history."""
        prompt_id = prompt_id or str(uuid.uuid4())
        status, body = self.post_prompt(prompt, prompt_id)
        run = Run(status, body, prompt_id)
        if status == 200:
            run.ws = self.collect(prompt_id)
            run.history = self.history(prompt_id)
        return run

    def upload(
        self,
        name: str,
        content: bytes,
        subfolder: str = "",
        kind: str = "input",
        overwrite: bool = False,
    ) -> tuple[int, Any]:
        boundary = uuid.uuid4().hex
        parts = []
        fields = {"subfolder": subfolder, "type": kind, "overwrite": "true" if overwrite else ""}
        for key, value in fields.items():
            parts.append(
                f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n'
                f"{value}\r\n".encode()
            )
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
            "Content-Type: image/png\r\n\r\n".encode()
            + content
            + b"\r\n"
        )
        parts.append(f"--{boundary}--\r\n".encode())
        status, raw, _ = self.request(
            "POST",
            "/upload/image",
            raw=b"".join(parts),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        return status, json.loads(raw) if status == 200 else raw
