"""How every ``--help`` of comfys3 is laid out, so all commands read alike.

argparse wraps help text with :mod:`textwrap`, which breaks words at hyphens: an option name
such as ``--comfyui-url`` could end one line as ``--comfyui-`` and start the next with
``url``, and a user copying it gets a flag that does not exist. Here text wraps at spaces only,
and lines stay short enough to read on a wide terminal.

Style of the texts themselves (checked by tests/test_cli_help.py): a ``help=`` line starts with
a lower-case word and has no full stop at the end; a ``description=`` is sentences.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import textwrap
from typing import Any

MAX_WIDTH = 100


def _width() -> int:
    return max(40, min(shutil.get_terminal_size().columns - 2, MAX_WIDTH))


class HelpFormatter(argparse.HelpFormatter):
    """Wraps at whitespace only, never inside a word or an option name."""

    def __init__(self, prog: str, **kwargs: Any) -> None:
        kwargs.setdefault("width", _width())
        super().__init__(prog, **kwargs)

    def _split_lines(self, text: str, width: int) -> list[str]:
        text = " ".join(text.split())
        return textwrap.wrap(text, width, break_on_hyphens=False, break_long_words=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        """Paragraphs (split at blank lines) are wrapped; a table (a title line, then lines
        indented under it, such as a list of exit codes) is kept as laid out."""
        blocks = []
        for block in textwrap.dedent(text).strip("\n").split("\n\n"):
            lines = block.splitlines()
            if len(lines) > 1 and all(line.startswith("  ") for line in lines[1:]):
                blocks.append("\n".join(indent + line for line in lines))
                continue
            blocks.append(
                textwrap.fill(
                    " ".join(block.split()),
                    width,
                    initial_indent=indent,
                    subsequent_indent=indent,
                    break_on_hyphens=False,
                    break_long_words=False,
                )
            )
        return "\n\n".join(blocks)


class RawDescriptionHelpFormatter(HelpFormatter):
    """For a description laid out by hand (the top-level map of commands)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser that lays its help out with :class:`HelpFormatter`.

    ``add_subparsers`` makes sub-commands of the parser's own class, so every nested command
    (``comfys3 snapshot restore``) gets the same layout without repeating it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def show_help(parser: argparse.ArgumentParser) -> int:
    """A command group run without its sub-command: its help, on stderr, and exit code 2."""
    parser.print_help(sys.stderr)
    return 2
