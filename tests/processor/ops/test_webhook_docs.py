"""The receiver in docs/webhooks.md works as printed: it accepts what the worker sends and
refuses a forged request."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from processor.job.status import NotifyRecord
from processor.ops.webhooks import Notifier, RetryPolicy, Signer, WebhookPolicy
from processor.settings import webhook_key
from tests.paths import DOCS

DOC = DOCS / "webhooks.md"
SECRET = "whsec_" + base64.b64encode(b"d" * 32).decode()


def receiver_example() -> str:
    text = DOC.read_text()
    match = re.search(r"<!-- example: receiver -->\n```python\n(.*?)```", text, re.S)
    assert match, "docs/webhooks.md lost its receiver example"
    return match.group(1)


async def test_the_documented_receiver_takes_a_real_webhook(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COMFYS3_WEBHOOK_SECRET", SECRET)
    namespace: dict[str, Any] = {}
    exec(compile(receiver_example(), str(DOC), "exec"), namespace)
    runner = web.AppRunner(namespace["app"])
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/comfys3"
    status = {"id": "cat-001", "state": "succeeded", "outputs": [{"key": "output/cat-001/9.png"}]}
    policy = WebhookPolicy(allow_http=True, allow_private=True, default_url=url)
    done: asyncio.Queue[NotifyRecord] = asyncio.Queue()
    try:
        async with Notifier(policy, Signer(webhook_key(SECRET)), retry=RetryPolicy()) as sender:
            sender.submit(url, "msg_doc", json.dumps(status).encode(), done.put)
            record = await asyncio.wait_for(done.get(), 20)
        async with aiohttp.ClientSession() as session:
            forged = {"webhook-id": "msg_x", "webhook-timestamp": "1", "webhook-signature": "v1,x"}
            async with session.post(url, data=b"{}", headers=forged) as response:
                forged_status = response.status
    finally:
        await runner.cleanup()
    assert record.delivered_at is not None and record.attempts == 1
    assert capsys.readouterr().out == "cat-001 succeeded ['output/cat-001/9.png']\n"
    assert forged_status == 401
