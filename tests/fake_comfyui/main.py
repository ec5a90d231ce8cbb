"""Run the fake ComfyUI as its own process, command-line compatible with ComfyUI's main.py.

    python tests/fake_comfyui/main.py --listen 127.0.0.1 --port 8188 [--cpu] ...
    python -m tests.fake_comfyui --listen 127.0.0.1 --port 8188 ...

A process supervisor can start, probe, kill and restart it like the real thing. Flags ComfyUI
knows but the fake does not use are accepted and ignored. Knobs come from FAKE_COMFYUI_* env vars
(see state.FakeState), e.g. FAKE_COMFYUI_DIE_AT_NODE=3 to crash when node 3 starts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import signal
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script, possibly from its own directory
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import yaml
from aiohttp import web

from tests.fake_comfyui.server import FakeDirs, create_app
from tests.fake_comfyui.state import ConfigError, FakeState

ENV_REPORT = "FAKE_COMFYUI_ENV_REPORT"


def report_environment(port: int) -> None:
    """Test-only: write this process's environment as JSON to the file named by
    FAKE_COMFYUI_ENV_REPORT (``{port}`` in it becomes this process's port, so several fakes
    started by one supervisor report apart), so a test can see what ComfyUI was given."""
    target = os.environ.get(ENV_REPORT)
    if target:
        Path(target.replace("{port}", str(port))).write_text(
            json.dumps(dict(os.environ), sort_keys=True)
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Fake ComfyUI for tests")
    parser.add_argument("--listen", default="127.0.0.1", nargs="?", const="0.0.0.0")
    parser.add_argument("--port", type=int, default=8188)
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--base-directory", type=Path, default=None)
    parser.add_argument("--input-directory", type=Path, default=None)
    parser.add_argument("--output-directory", type=Path, default=None)
    parser.add_argument("--temp-directory", type=Path, default=None)
    parser.add_argument("--extra-model-paths-config", type=Path, nargs="+", action="append")
    args, unknown = parser.parse_known_args(argv)
    args.ignored = unknown
    return args


def checkpoint_dirs(configs: list[list[Path]] | None) -> list[str]:
    """The checkpoint folders of ComfyUI extra_model_paths.yaml files, as ComfyUI reads them:
    each section's base_path joined with each line of its ``checkpoints`` entry."""
    folders: list[str] = []
    for path in (p for group in configs or [] for p in group):
        document = yaml.safe_load(path.read_text()) or {}
        for section in document.values():
            if not isinstance(section, dict):
                continue
            base = Path(str(section.get("base_path", path.parent)))
            for line in str(section.get("checkpoints", "")).splitlines():
                if line.strip():
                    folders.append(str(base / line.strip()))
    return folders


def resolve_dirs(args: argparse.Namespace) -> FakeDirs:
    """ComfyUI's rules: input/output/temp under the base dir; --temp-directory D means D/temp."""
    base = (args.base_directory or Path.cwd()).resolve()
    temp = args.temp_directory.resolve() / "temp" if args.temp_directory else base / "temp"
    return FakeDirs(
        input_dir=(args.input_directory or base / "input").resolve(),
        output_dir=(args.output_directory or base / "output").resolve(),
        temp_dir=temp,
    )


async def serve(args: argparse.Namespace, state: FakeState) -> None:
    dirs = resolve_dirs(args)
    shutil.rmtree(dirs.temp_dir, ignore_errors=True)  # ComfyUI empties temp/ at start
    if state.startup_delay:
        print(f"fake ComfyUI: booting for {state.startup_delay:.1f}s", flush=True)
        await asyncio.sleep(state.startup_delay)
    runner = web.AppRunner(create_app(state, dirs), shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, args.listen, args.port).start()
    print("Starting server\n", flush=True)
    print(f"To see the GUI go to: http://{args.listen}:{args.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report_environment(args.port)
    logging.basicConfig(
        stream=sys.stdout, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    try:
        state = FakeState.from_env()
    except ConfigError as exc:
        print(f"fake ComfyUI: {exc}", file=sys.stderr)
        return 2
    state.checkpoint_dirs += checkpoint_dirs(args.extra_model_paths_config)
    if args.ignored:
        print(f"fake ComfyUI: ignoring flags {' '.join(args.ignored)}", flush=True)
    try:
        asyncio.run(serve(args, state))
    except OSError as exc:
        print(f"fake ComfyUI: cannot listen on {args.listen}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
