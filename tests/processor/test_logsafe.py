"""A name with bytes that are not UTF-8 (a local folder can hold one) still makes a log line."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from processor.logsafe import log_tail, printable, printable_logger


def test_a_lone_surrogate_is_escaped_in_a_utf8_log_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = os.fsdecode(b"input/bad\xffname.json")
    handler = logging.FileHandler(tmp_path / "worker.log", encoding="utf-8")
    logger = printable_logger("comfys3.test-logsafe")
    logger.addHandler(handler)
    # Other tests in this process may have quietened "comfys3" (exec logs errors only).
    level, logger.level = logger.level, logging.WARNING
    try:
        logger.warning("%s is not a valid manifest", name)
        logger.warning(f"{name} again")
    finally:
        logger.level = level
        logger.removeHandler(handler)
        handler.close()
    assert (tmp_path / "worker.log").read_text(encoding="utf-8").splitlines() == [
        "input/bad\\udcffname.json is not a valid manifest",
        "input/bad\\udcffname.json again",
    ]
    assert "Logging error" not in capsys.readouterr().err


def test_printable_leaves_valid_text_alone() -> None:
    assert printable("job é 🐈") == "job é 🐈"


def test_a_logs_tail_is_its_last_lines_however_long_it_grew(tmp_path: Path) -> None:
    log = tmp_path / "child.log"
    body = b"".join(b"line %d\n" % n for n in range(100_000))  # far beyond what is read
    log.write_bytes(body + b"bad \xff byte\nlast\n")
    assert log_tail(log, 3) == "line 99999\nbad \ufffd byte\nlast"
    assert log_tail(tmp_path / "absent.log", 3) == ""
