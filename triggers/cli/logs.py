"""Log lines for people (text) or for log shippers (one JSON object per line)."""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
from datetime import UTC, datetime
from pathlib import Path

from processor import VolumeLogHandler, WorkerSettings, worker_log_handler

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        document = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        document.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, default=str)


def _formatter(log_format: str) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter()
    return logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a line is logged, not when logging was set up:
    a caller that swaps stderr (an embedding app, a test runner) and closes the old one must
    not turn every later log line into a "--- Logging error" report."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def to_stderr(line: str) -> None:
    """What a short command says beside its data (which alone goes to stdout)."""
    print(f"comfys3: {line}", file=sys.stderr, flush=True)


def configure(log_format: str = "text", level: str = "INFO") -> None:
    handler = _StderrHandler(sys.stderr)
    handler.setFormatter(_formatter(log_format))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in (
        "botocore",
        "aiobotocore",
        "urllib3",
        "websocket",
        "aiohttp.access",
        "watchfiles",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def to_volume(settings: WorkerSettings, log_format: str = "text") -> Path | None:
    """Also log to ``<volume>/logs/worker-<worker id>.log`` when a network volume is mounted,
    so an operator can read what a worker did after it is gone. Call after :func:`configure`;
    returns the file, or None without a volume."""
    handler = worker_log_handler(settings)
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if not isinstance(h, VolumeLogHandler)]
    if handler is None:
        return None
    path = Path(handler.baseFilename)
    handler.setFormatter(_formatter(log_format))
    root.addHandler(handler)
    logging.getLogger("comfys3.worker").info("logging to %s", path)
    return path
