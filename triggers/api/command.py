"""``comfys3 serve``: the jobs API alone, over the bucket (or a local folder), until stopped.

It runs no jobs: workers do (``comfys3 run``, which also serves the API itself when
``COMFYS3_API_PORT`` is set). FastAPI and uvicorn are imported only when the command runs, so
every other command starts as fast as before.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from processor import Layout, Storage, WorkerSettings, load_worker_settings, storage_from_env
from triggers.cli import logs
from triggers.stopping import stop_on_signals

DEFAULT_PORT = 8288  # when neither --port nor COMFYS3_API_PORT gives one


def cmd_serve(args: argparse.Namespace) -> int:
    logs.configure(args.log_format)
    settings = load_worker_settings()
    storage, layout = storage_from_env(args.local)
    asyncio.run(_serve(settings, storage, layout, args.host, args.port))
    return 0


async def _serve(
    settings: WorkerSettings, storage: Storage, layout: Layout, host: str | None, port: int | None
) -> None:
    from triggers.api.server import serving_api

    stop = stop_on_signals()
    async with serving_api(settings, storage, layout, host=host, port=port):
        await stop.wait()


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="serve the HTTP jobs API (submit manifests, follow jobs) on a port",
        description=f"""
            Serve the jobs API: POST /jobs (a manifest, checked as `submit` checks it),
            GET /jobs/ID (its status), GET /jobs?state=... (the backlog), POST /jobs/ID/cancel,
            GET /workflows, /healthz, and the OpenAPI document with interactive docs at /docs.
            Every route but /healthz and the docs needs 'Authorization: Bearer
            $COMFYS3_API_TOKEN'; COMFYS3_API_ALLOW_NO_TOKEN=1 serves without one, on a loopback
            address only. It runs no jobs: run workers beside it (`comfys3 run` serves the same
            API itself when COMFYS3_API_PORT is set). Default: 127.0.0.1, COMFYS3_API_PORT or
            {DEFAULT_PORT}.
        """,
    )
    option = serve.add_argument
    option("--host", help="address to listen on (default COMFYS3_API_HOST, or 127.0.0.1)")
    option("--port", type=int, help=f"port (default COMFYS3_API_PORT, or {DEFAULT_PORT})")
    option("--local", type=Path, metavar="DIR", help="serve a local folder (DIR/input)")
    option("--log-format", choices=("text", "json"), default="text", help="log line format")
    serve.set_defaults(handler=cmd_serve)
