"""Log lines that can always be written as UTF-8.

A manifest name read from a local folder may hold bytes that are not UTF-8; Python carries them
as lone surrogates (``os.fsdecode``). A log line with one cannot be encoded: a UTF-8 log file
reports "--- Logging error" instead of the line, and a log shipper may drop it. The filter
escapes them (``\\udcff``) before any handler sees the record.
"""

from __future__ import annotations

import logging
from typing import Any


def printable(text: str) -> str:
    """``text`` with anything UTF-8 cannot encode written as a backslash escape."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


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
