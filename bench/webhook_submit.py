"""What a webhook costs the worker's event loop when the receiver never answers.

Starts a local receiver that accepts the POST and never answers, then submits ``--messages``
webhooks to it through a Notifier (8 concurrent senders, 1 s timeout, 2 attempts). Prints the
time one ``submit`` call takes (p50/p95/max, microseconds) and how late a 10 ms timer fires on
the same loop while the deliveries hang (the lane's jobs share that loop).

    .venv/bin/python bench/webhook_submit.py [--messages 80]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import statistics
import sys
import time
from pathlib import Path

from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import percentiles
from processor.job.status import NotifyRecord
from processor.ops.webhooks import Notifier, RetryPolicy, Signer, WebhookPolicy


async def run(messages: int) -> None:
    async def never(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    app = web.Application()
    app.router.add_post("/hook", never)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    policy = WebhookPolicy(allow_http=True, allow_private=True, default_url=url)
    records: list[NotifyRecord] = []

    async def keep(record: NotifyRecord) -> None:
        records.append(record)

    body = b'{"id": "job", "state": "succeeded"}' + b" " * 4000
    retry = RetryPolicy(attempts=2, timeout=1.0, base_delay=0.1)
    lags: list[float] = []
    async with Notifier(policy, Signer(base64.b64decode("a" * 44)), retry=retry) as notifier:
        stop = asyncio.Event()

        async def ticker() -> None:
            while not stop.is_set():
                start = time.perf_counter()
                await asyncio.sleep(0.01)
                lags.append((time.perf_counter() - start - 0.01) * 1000)

        tick = asyncio.create_task(ticker())
        costs = []
        for n in range(messages):
            start = time.perf_counter()
            notifier.submit(url, f"msg_{n}", body, keep)
            costs.append((time.perf_counter() - start) * 1e6)
        started = time.perf_counter()
        while len(records) < messages:
            await asyncio.sleep(0.05)
        drained = time.perf_counter() - started
        stop.set()
        await tick
    await runner.cleanup()
    p50, p95 = percentiles(costs)
    lag50, lag95 = percentiles(lags)
    print(f"{messages} webhooks to a receiver that never answers (8 senders, 2 x 1 s attempts)")
    print(f"submit(): p50 {p50:.0f} us, p95 {p95:.0f} us, max {max(costs):.0f} us")
    print(f"10 ms timer lateness meanwhile: p50 {lag50:.2f} ms, p95 {lag95:.2f} ms, "
          f"max {max(lags):.2f} ms over {len(lags)} ticks")  # fmt: skip
    print(f"all {messages} recorded as failed after {drained:.1f} s; "
          f"errors: {statistics.mode(r.last_error for r in records)!r}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=80)
    logging.getLogger("comfys3.notify").setLevel(logging.ERROR)  # one warning per failure
    asyncio.run(run(parser.parse_args().messages))


if __name__ == "__main__":
    main()
