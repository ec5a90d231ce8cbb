"""``comfys3 snapshot restore`` and ``comfys3 models download``: the image's build steps.

Exit codes: 0 all done, 1 something failed (every failure is named on stderr), 2 the input
itself is unusable (no snapshot, malformed JSON, missing ComfyUI folder).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from provision.models import ModelDownloader, ModelsError, load_models_file
from provision.registry import DEFAULT_REGISTRY_URL, RegistryClient
from provision.restore import RestoreOptions, Restorer
from provision.snapshot import SnapshotError, default_snapshots, load_snapshot

DEFAULT_SNAPSHOT_DIR = Path("snapshot")
DEFAULT_MODELS_DEST = Path("/comfy-models")


def _fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def restore_command(args: argparse.Namespace) -> int:
    comfyui_value = args.comfyui or os.environ.get("COMFYS3_COMFYUI_PATH")
    if not comfyui_value:
        return _fail("say where ComfyUI is: --comfyui DIR (or COMFYS3_COMFYUI_PATH)")
    comfyui = Path(comfyui_value)
    if not comfyui.is_dir():
        return _fail(f"--comfyui {comfyui}: no such folder")
    paths = [Path(p) for p in args.snapshots] or default_snapshots(Path(args.snapshot_dir))
    if not paths:
        return _fail(f"no snapshot given and no *_snapshot.json in {args.snapshot_dir}/")
    try:
        snapshots = [load_snapshot(path) for path in paths]
    except SnapshotError as error:
        return _fail(str(error))
    print(
        f"restoring {', '.join(str(p) for p in paths)} into {comfyui}", file=sys.stderr, flush=True
    )
    options = RestoreOptions(
        comfyui=comfyui,
        python=args.python,
        keep_manager=args.keep_manager,
        install_pips=not args.skip_pips,
        pip_args=list(args.pip_arg or []),
        checkout_comfyui=args.checkout_comfyui,
    )
    report = Restorer(options, fetcher=RegistryClient(args.registry_url)).restore(snapshots)
    if report.ok:
        print(report.summary(), flush=True)
        return 0
    print(report.summary(), file=sys.stderr, flush=True)
    return 1


def models_command(args: argparse.Namespace) -> int:
    try:
        specs = load_models_file(Path(args.models_file))
    except ModelsError as error:
        return _fail(str(error))
    if not specs:
        print(f"models: {args.models_file} lists no models; nothing to do", file=sys.stderr)
        return 0
    report = ModelDownloader(Path(args.dest)).download_all(specs)
    if report.ok:
        print(report.summary(), flush=True)
        return 0
    print(report.summary(), file=sys.stderr, flush=True)
    return 1


def _show_help(parser: argparse.ArgumentParser) -> int:
    """A command group run without its sub-command: its help (with the name a user types)."""
    parser.print_help(sys.stderr)
    return 2


def register(subparsers: argparse._SubParsersAction) -> None:
    snapshot = subparsers.add_parser(
        "snapshot",
        help="custom nodes from ComfyUI-Manager snapshots (image build step)",
        description="Work with ComfyUI-Manager snapshot files (*_snapshot.json).",
    )
    snapshot_commands = snapshot.add_subparsers(title="commands", metavar="COMMAND")
    snapshot.set_defaults(handler=lambda args: _show_help(snapshot))
    restore = snapshot_commands.add_parser(
        "restore",
        help="install the custom nodes a snapshot lists, at their exact commits/versions",
        description=(
            "Clone every git custom node of the snapshot(s) at its pinned commit into "
            "DIR/custom_nodes/<repo>, install its requirements.txt with PY -m pip and run its "
            "install.py with PY; install registry (cnr) packs at their versions from the Comfy "
            "registry; install the snapshot's pips. Disabled nodes are skipped. Nodes already "
            "in place are left alone, so a second run changes nothing. Every failure is "
            "collected and named at the end; the exit code is 1 if anything failed. "
            "ComfyUI-Manager is left out unless --keep-manager: a git clone of it in "
            "custom_nodes/ (ComfyUI up to 0.3.x) is removed (it slows boot), and its pip "
            "package (ComfyUI 0.36+, loaded only when ComfyUI enables the Manager) is not "
            "installed."
        ),
    )
    restore.add_argument(
        "snapshots",
        nargs="*",
        metavar="SNAPSHOT",
        help="snapshot files (default: every *_snapshot.json in --snapshot-dir); "
        "later files win for the same node",
    )
    restore.add_argument(
        "--comfyui",
        metavar="DIR",
        help="the ComfyUI folder (default: $COMFYS3_COMFYUI_PATH)",
    )
    restore.add_argument(
        "--python",
        metavar="PY",
        default=sys.executable,
        help="the Python that runs ComfyUI; node requirements go into it (default: this one)",
    )
    restore.add_argument(
        "--snapshot-dir",
        default=str(DEFAULT_SNAPSHOT_DIR),
        metavar="DIR",
        help="where to look for snapshots when none is named (default: %(default)s)",
    )
    restore.add_argument(
        "--keep-manager",
        action="store_true",
        help="install and keep ComfyUI-Manager: its git clone on ComfyUI up to 0.3.x, "
        "manager_requirements.txt (the pip package) on a ComfyUI that ships that file",
    )
    restore.add_argument(
        "--skip-pips",
        action="store_true",
        help="do not install the snapshot's 'pips' (its pip freeze)",
    )
    restore.add_argument(
        "--pip-arg",
        action="append",
        metavar="ARG",
        help="extra argument for every pip install, e.g. --pip-arg=--extra-index-url=URL "
        "(repeatable)",
    )
    restore.add_argument(
        "--checkout-comfyui",
        action="store_true",
        help="also move ComfyUI itself to the snapshot's 'comfyui' commit",
    )
    restore.add_argument(
        "--registry-url",
        default=os.environ.get("COMFY_REGISTRY_URL", DEFAULT_REGISTRY_URL),
        metavar="URL",
        help="the Comfy registry API for cnr packs (default: $COMFY_REGISTRY_URL or %(default)s)",
    )
    restore.set_defaults(handler=restore_command)

    models = subparsers.add_parser(
        "models",
        help="model files from the Hugging Face Hub (image build step)",
        description="Work with the models file (a JSON list; see docs/image.md).",
    )
    models_commands = models.add_subparsers(title="commands", metavar="COMMAND")
    models.set_defaults(handler=lambda args: _show_help(models))
    download = models_commands.add_parser(
        "download",
        help="download the models a models file lists into DEST/<folder>/",
        description=(
            "Download each entry {repo_id, filename, revision, folder, sha256, name} with "
            "huggingface_hub (token from HF_TOKEN, hub from HF_ENDPOINT) into DEST/<folder>/"
            "<name>, verify its sha256, and skip files already present and verified. A "
            "checksum mismatch fails and leaves no file behind. Exit code 1 if any failed."
        ),
    )
    download.add_argument("models_file", metavar="MODELS_FILE", help="the models JSON file")
    download.add_argument(
        "--dest",
        default=str(DEFAULT_MODELS_DEST),
        metavar="DIR",
        help="root of the model folders (default: %(default)s)",
    )
    download.set_defaults(handler=models_command)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry, for running the build steps without the rest of comfys3."""
    parser = argparse.ArgumentParser(prog="comfys3")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
