"""Every ``--help`` of comfys3, nested commands included, rendered and read for slips: option
names split across lines, internal names shown to users, help lines in differing styles."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.workers import ROOT
from triggers.cli import main as cli
from triggers.runpod import command as runpod

# Flags of other programs that help texts mention (ComfyUI's, pip's).
FOREIGN_FLAGS = {"--cpu", "--extra-index-url"}
WIDTHS = (50, 60, 80, 200)


def walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[
    tuple[tuple[str, ...], argparse.ArgumentParser]
]:  # fmt: skip
    """Every parser under ``parser`` (itself first), with the argv words that reach it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from walk(child, (*path, name))


def all_parsers() -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    return [*walk(cli.build_parser()), (("<runpod module>",), runpod.build_parser())]


def known_flags() -> set[str]:
    flags = set(FOREIGN_FLAGS)
    for _, parser in all_parsers():
        for action in parser._actions:
            flags.update(s for s in action.option_strings if s.startswith("--"))
    return flags


PATHS = [path for path, _ in walk(cli.build_parser())]


def test_the_walk_reaches_nested_commands() -> None:
    assert ("snapshot", "restore") in PATHS and ("models", "download") in PATHS
    assert {("run",), ("exec",), ("submit",), ("runpod",), ("validate",)} <= set(PATHS)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: " ".join(p) or "comfys3")
@pytest.mark.parametrize("width", WIDTHS)
def test_every_help_renders_without_slips(
    path: tuple[str, ...],
    width: int,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("COLUMNS", str(width))
    with pytest.raises(SystemExit) as caught:
        cli.main([*path, "--help"])
    assert caught.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: {' '.join(('comfys3', *path))}")
    assert_no_slips(text)


def assert_no_slips(text: str) -> None:
    for line in text.splitlines():
        # A hyphenated word (an option name, "per-job") cut at its hyphen.
        assert not re.search(r"\w-$", line.rstrip()), f"a word is split after: {line!r}"
    flags = known_flags()
    for flag in re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", text):
        assert flag in flags, f"{flag} is not an option of any command:\n{text}"
    assert not re.search(r"\b\w+_command\b", text), f"an internal name shows:\n{text}"


def test_help_lines_and_descriptions_share_one_style() -> None:
    """``help=``: a lower-case first word, no full stop at the end. Descriptions: sentences."""
    slips = []
    for path, parser in all_parsers():
        where = " ".join(path) or "comfys3"
        for action in parser._actions:
            helps = [action.help]
            if isinstance(action, argparse._SubParsersAction):
                helps += [choice.help for choice in action._choices_actions]
            for text in helps:
                if not text or text == argparse.SUPPRESS:
                    continue
                if re.match(r"[A-Z][a-z]", text) or text.rstrip().endswith("."):
                    slips.append(f"{where}: help {text!r}")
        description = (parser.description or "").strip()
        if path and (not description.endswith(".") or re.match(r"[a-z]", description)):
            slips.append(f"{where}: description {description[:60]!r}...")
    assert not slips, "\n".join(slips)


@pytest.mark.parametrize("group", ["snapshot", "models"])
def test_a_command_group_without_its_subcommand_shows_its_help(
    group: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main([group])
    _, err = capsys.readouterr()
    assert code == 2
    assert err.startswith(f"usage: comfys3 {group}")
    assert "download" in err or "restore" in err
    assert "_command" not in err


def test_runpod_module_help_needs_no_settings_and_shows_our_flags() -> None:
    env = {"PATH": "/usr/bin:/bin"}  # no S3 variables at all
    result = subprocess.run(
        [sys.executable, "-m", "triggers.runpod", "--help"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m triggers.runpod")
    for flag in ("--test_input", "--rp_serve_api", "--rp_api_port", "--rp_log_level"):
        assert flag in result.stdout
    assert "COMFYS3_" in result.stdout and result.stderr == ""
    assert_no_slips(result.stdout)
