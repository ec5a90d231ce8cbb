"""README.md is the first thing a user reads: its settings table and commands must match the
code, and .ci/run must run exactly the test command it gives."""

from __future__ import annotations

import re
from pathlib import Path

from processor.settings import (
    DispatchSettings,
    S3Settings,
    SqsSettings,
    environment_variables,
)
from triggers.cli.main import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def documented_variables() -> set[str]:
    return set(re.findall(r"^\| `(COMFYS3_[A-Z0-9_]+)` \|", README, flags=re.MULTILINE))


def code_variables() -> set[str]:
    names = {f"COMFYS3_S3_{name.upper()}" for name in S3Settings.model_fields}
    names |= environment_variables()
    names |= {f"COMFYS3_SQS_{name.upper()}" for name in SqsSettings.model_fields}
    names |= {
        f"COMFYS3_{name.upper()}"
        for name, info in DispatchSettings.model_fields.items()
        if info.validation_alias is None  # RUNPOD_API_KEY is RunPod's own name, kept as is
    }
    return names


def test_settings_table_matches_the_code() -> None:
    assert documented_variables() == code_variables()


def test_ci_runs_the_readme_test_command() -> None:
    match = re.search(r"^(.*)# the tests", README, flags=re.MULTILINE)
    assert match, "README must give the test command near the top"
    command = match.group(1).strip().split("&&")[-1].strip()
    assert command == "python -m pytest"
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines


def test_commands_in_readme_exist() -> None:
    parser = build_parser()
    subcommands = set(parser._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    used = set(re.findall(r"^\s*comfys3 ([a-z]+)", README, flags=re.MULTILINE))
    assert used and used <= subcommands
