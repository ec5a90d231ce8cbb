"""The ``comfys3`` command. Each subcommand lives in the module that owns its work; this file
only assembles them, so ``--help`` is the one map of everything a user can do."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from processor import ComfyError, SettingsError, StorageError, WorkflowLoadError
from provision import cli as provision_cli
from triggers.api import command as api_command
from triggers.cli import cancel, offline, submit, template, worker_commands
from triggers.cli.help_format import CommandParser, RawDescriptionHelpFormatter
from triggers.events import dispatch
from triggers.report import command as report_command
from triggers.runpod import command as runpod

DESCRIPTION = """\
Run ComfyUI workflows as a batch service. Job manifests (JSON) arrive in an S3 prefix or a
local folder; the worker fills a workflow template, runs it on ComfyUI, and writes the outputs
and a status.json next to them.

Start here:
  comfys3 workflows                    list the templates and their fields
  comfys3 validate job.json            check manifests offline
  comfys3 run                          poll S3 and run jobs until stopped
  comfys3 submit job.json --wait       check a manifest, upload it, follow the job
  comfys3 serve                        the HTTP jobs API (POST /jobs, GET /jobs/ID)
  comfys3 cancel JOB_ID                stop a job, waiting or running
  comfys3 dispatch                     wake RunPod: one request per manifest in S3

Settings come from COMFYS3_* environment variables (see README.md).
"""


def package_version() -> str:
    try:
        return version("comfys3")
    except PackageNotFoundError:  # running from a checkout that is not installed
        return "0+unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="comfys3", description=DESCRIPTION, formatter_class=RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"comfys3 {package_version()}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for register in _registrations():
        register(subparsers)
    return parser


def _registrations() -> list[Callable[[Any], None]]:
    registrations: list[Callable[[Any], None]] = [
        offline.register,
        template.register,
        worker_commands.register,
        submit.register,
        api_command.register,
        cancel.register,
        report_command.register,
        runpod.register,
        dispatch.register,
        provision_cli.register,
    ]
    return registrations


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return int(handler(args))
    except (SettingsError, WorkflowLoadError) as error:
        print(f"comfys3: {error}", file=sys.stderr)
        return 2
    except (ComfyError, StorageError) as error:  # ComfyUI or S3 unreachable, refused, ...
        print(f"comfys3: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `comfys3 workflows | head` is fine
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        return 0
    except KeyboardInterrupt:
        print("comfys3: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
