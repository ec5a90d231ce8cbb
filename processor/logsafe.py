"""Log lines that can always be written as UTF-8.

A manifest name read from a local folder may hold bytes that are not UTF-8; Python carries them
as lone surrogates (``os.fsdecode``). A log line with one cannot be encoded: a UTF-8 log file
reports "--- Logging error" instead of the line, and a log shipper may drop it. The filter
escapes them (``\\udcff``) before any handler sees the record.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from pathlib import Path
from typing import Any

TAIL_BYTES = 64 * 1024  # what is read of a log for its last lines, however long it grew


def printable(text: str) -> str:
    """``text`` with anything UTF-8 cannot encode written as a backslash escape."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def log_tail(path: Path, lines: int) -> str:
    """The last ``lines`` of a child process's log (ComfyUI, the embedded S3), for an error
    that says why it did not start; only its end is read, and bytes that are not UTF-8 are
    replaced. Empty when it cannot be read."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - TAIL_BYTES))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(deque(text.splitlines(), maxlen=lines))


def _printable_arg(value: Any) -> Any:
    return printable(value) if isinstance(value, str) else value


class PrintableRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = printable(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_printable_arg(arg) for arg in record.args)
        return True


def printable_logger(name: str) -> logging.Logger:
    """``logging.getLogger(name)``, with the filter on it (once)."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, PrintableRecords) for f in logger.filters):
        logger.addFilter(PrintableRecords())
    return logger
