"""A wait shown to a person at a terminal: what ``comfys3 exec`` is waiting for, and how long.

On a terminal one line is redrawn every second, with the time so far and when it gives up,
and cleared when the wait ends. Anywhere else (a CI log, a pipe) it is a plain line at once and
then every few seconds, so the log shows the wait without a line per second.
"""

from __future__ import annotations

import shutil
import sys
from typing import TextIO

from processor import Waiting

MAX_WIDTH = 100


class WaitLine:
    """A :data:`processor.comfy.waiting.WaitListener` for commands run by hand."""

    def __init__(self, stream: TextIO | None = None, *, every: float = 5.0) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._every = every
        self._next = 0.0
        self._drawn = False

    def __call__(self, waiting: Waiting) -> None:
        width = min(MAX_WIDTH, shutil.get_terminal_size().columns - 1)
        if waiting.done:
            if self._drawn:  # leave the terminal line as it was before the wait
                self.stream.write("\r" + " " * width + "\r")
                self.stream.flush()
                self._drawn = False
            return
        text = (
            f"waiting for {waiting.what}: {waiting.detail} ({waiting.elapsed:.0f} s; "
            f"gives up in {max(0.0, waiting.gives_up_in):.0f} s)"
        )
        if self.tty:
            self.stream.write("\r" + text[:width].ljust(width))
            self._drawn = True
        elif waiting.elapsed >= self._next:
            self._next += self._every
            self.stream.write(text + "\n")
        else:
            return
        self.stream.flush()
