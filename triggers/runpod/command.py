"""RunPod serverless: ``python -m triggers.runpod`` / ``comfys3 runpod``.

The SDK reads its own flags (``--test_input``, ``--rp_serve_api``, ``--rp_api_host``,
``--rp_api_port``, ``--rp_log_level`` ...) from ``sys.argv``. They are declared here as well, so
``--help`` lists them (with no setting needed) and a typo is refused instead of ignored; then
they go back into ``sys.argv``, and this module loads the settings, builds the handler and hands
both to ``runpod.serverless.start``. What a request may contain and what it answers is in
:mod:`triggers.runpod.handler` and docs/runpod.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from processor import SettingsError, load_s3_settings, load_worker_settings
from triggers.cli import logs
from triggers.cli.help_format import CommandParser
from triggers.runpod.handler import RunpodHandler

# How to get the SDK, said the same way here, in --help, README.md and docs/runpod.md.
INSTALL_HINT = "pip install -e '.[runpod]'"


def build_handler() -> RunpodHandler:
    """A handler from ``COMFYS3_*`` settings; :class:`SettingsError` names what is missing."""
    return RunpodHandler(s3=load_s3_settings(), settings=load_worker_settings())


def runpod_config(handler: RunpodHandler) -> dict[str, Any]:
    return {"handler": handler, "concurrency_modifier": handler.concurrency}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m triggers.runpod``: the same flags as ``comfys3 runpod``. ``--help`` and a
    mistyped flag are answered here, before any setting is read or the SDK is imported."""
    return serve(build_parser().parse_args(argv))


def serve(args: argparse.Namespace) -> int:
    """Start the serverless worker with the SDK flags in ``args``; the SDK reads them from
    ``sys.argv``, so they are put back there."""
    sys.argv = [sys.argv[0], *runpod_argv(args)]
    try:
        import runpod.serverless
    except ImportError:
        print(
            f"comfys3: the runpod package is not installed: {INSTALL_HINT} (in the comfys3 "
            "checkout)",
            file=sys.stderr,
        )
        return 2
    nothing = nothing_to_run(args)
    if nothing:
        print(f"comfys3 runpod: {nothing}", file=sys.stderr)
        return 2
    try:
        handler = build_handler()
    except SettingsError as error:
        print(f"comfys3: {error}", file=sys.stderr)
        return 2
    logs.configure("text")
    logs.to_volume(handler.settings)
    # A ComfyUI this worker started must stop with it, so the worker is closed in `finally`
    # (not atexit: by then thread pools take no more work and closing fails half-way).
    # --test_input ends with sys.exit inside the SDK, which passes through here. uvicorn
    # (--rp_serve_api) shuts down on SIGTERM, then raises the signal again for the handler it
    # found installed: the default one would kill the process before `finally`, this one exits.
    # On RunPod the SDK installs its own SIGTERM handler, which lets start() return.
    signal.signal(signal.SIGTERM, _stop)
    try:
        with _server(args):
            runpod.serverless.start(runpod_config(handler))
    finally:
        handler.close()
    return 0


def nothing_to_run(args: argparse.Namespace) -> str | None:
    """Why the SDK would exit at once: off RunPod, with no --test_input, no --rp_serve_api and
    no ./test_input.json, it logs a warning (hidden by --rp_log_level ERROR) and exits 1."""
    if args.test_input or args.rp_serve_api or os.environ.get("RUNPOD_WEBHOOK_GET_JOB"):
        return None
    if Path("test_input.json").is_file():
        return None
    return (
        "nothing to run: this is not RunPod (RUNPOD_WEBHOOK_GET_JOB is not set) and there is "
        f"no test_input.json in {Path.cwd()}. Give a job with --test_input "
        """'{"input": {"workflow": "solid"}}', put it in ./test_input.json, or serve a local """
        "API with --rp_serve_api"
    )


def _server(args: argparse.Namespace) -> contextlib.AbstractContextManager[None]:
    if not args.rp_serve_api:
        return contextlib.nullcontext()
    from triggers.runpod.local_api import local_api  # FastAPI is only needed for this

    return local_api()


def _stop(signum: int, frame: object) -> None:
    del signum, frame
    raise SystemExit(0)


# RunPod SDK 1.12's own flags. They are declared here (not passed through blindly) so that
# `comfys3 runpod --help` lists them and a typo is refused before the SDK silently ignores it.
_VALUE_FLAGS: dict[str, tuple[str, type, str]] = {
    "test_input": ("JSON", str, "a job to run once, then exit (e.g. tests/test_input.json's text)"),
    "rp_api_host": ("HOST", str, "host of the local API (with --rp_serve_api; default localhost)"),
    "rp_api_port": ("PORT", int, "port of the local API (with --rp_serve_api; default 8000)"),
    "rp_api_concurrency": ("N", int, "uvicorn workers of the local API (keep 1: one ComfyUI each)"),
    "rp_log_level": (
        "LEVEL",
        str,
        "SDK log level: ERROR, WARN, INFO or DEBUG (default: $RUNPOD_LOG_LEVEL, else DEBUG)",
    ),
}
_SWITCHES = {
    "rp_serve_api": "serve a local HTTP API (/run, /runsync, /status) instead of RunPod's queue",
    "rp_debugger": "add the SDK's debugger timings to each answer",
}


def runpod_argv(args: argparse.Namespace) -> list[str]:
    """The parsed flags back as the command line the SDK parses itself."""
    argv: list[str] = []
    for name in _SWITCHES:
        if getattr(args, name):
            argv.append(f"--{name}")
    for name in _VALUE_FLAGS:
        value = getattr(args, name)
        if value is not None:
            argv += [f"--{name}", str(value)]
    return argv


def cmd_runpod(args: argparse.Namespace) -> int:
    return serve(args)


DESCRIPTION = (
    "Start the RunPod serverless handler. A request's input is an inline job "
    '({"workflow": ..., "payload": {...}}), a manifest already in the bucket '
    '({"manifest": "job1.json"}) or a drain ({"drain": true, "max_jobs": N}); see '
    "docs/runpod.md. Settings come from COMFYS3_* variables, as for `comfys3 run`. "
    "With neither --test_input nor --rp_serve_api it serves the endpoint's queue on "
    "RunPod, and runs ./test_input.json once elsewhere. Needs the runpod extra: "
    f"{INSTALL_HINT}."
)


def _add_flags(parser: argparse.ArgumentParser) -> None:
    for name, text in _SWITCHES.items():
        parser.add_argument(f"--{name}", action="store_true", help=text)
    for name, (metavar, kind, text) in _VALUE_FLAGS.items():
        parser.add_argument(f"--{name}", metavar=metavar, type=kind, help=text)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "runpod", help="serve jobs as a RunPod serverless worker", description=DESCRIPTION
    )
    _add_flags(parser)
    parser.set_defaults(handler=cmd_runpod)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m triggers.runpod``: the flags of ``comfys3 runpod``."""
    parser = CommandParser(prog="python -m triggers.runpod", description=DESCRIPTION)
    _add_flags(parser)
    return parser


__all__ = ["build_handler", "build_parser", "main", "register", "runpod_argv", "runpod_config"]

if __name__ == "__main__":
    raise SystemExit(main())
