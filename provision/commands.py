"""Running git, pip and install scripts for the restore, with their output kept for the report.

Output is captured rather than streamed: a build log with the chatter of forty pip runs hides the
one that failed. On failure the last lines go into the error, which is what a person needs.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def tail(self, lines: int = 15) -> str:
        kept = [line for line in self.output.strip().splitlines() if line.strip()][-lines:]
        return "\n".join(f"    {line}" for line in kept)


Runner = Callable[[Sequence[str], Path | None], CommandResult]

# Never wait for a password on a private or misspelt repository: fail and say so.
_QUIET_ENV = {
    "GIT_TERMINAL_PROMPT": "0",
    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    "PYTHONUNBUFFERED": "1",
}


def run_command(
    argv: Sequence[str], cwd: Path | None = None, env: Mapping[str, str] | None = None
) -> CommandResult:
    full_env = {**os.environ, **_QUIET_ENV, **(env or {})}
    try:
        completed = subprocess.run(
            list(argv),
            cwd=cwd,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            check=False,
        )
    except OSError as error:
        return CommandResult(tuple(argv), 127, f"cannot run {argv[0]}: {error.strerror or error}")
    return CommandResult(tuple(argv), completed.returncode, completed.stdout or "")
