"""`comfys3 runpod` as a newcomer meets it before any job: how to install the SDK (said the
same way everywhere), and what happens when there is nothing to run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.workers import ROOT
from triggers.runpod.command import INSTALL_HINT

COMFYS3 = Path(sys.executable).parent / "comfys3"


def test_the_install_hint_is_the_same_in_help_readme_and_docs() -> None:
    shown = subprocess.run(
        [str(COMFYS3), "runpod", "--help"],
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert INSTALL_HINT == "pip install -e '.[runpod]'"
    assert INSTALL_HINT in " ".join(shown.stdout.split())  # help wraps at 100 columns
    for document in ("README.md", "docs/runpod.md"):
        text = (ROOT / document).read_text()
        assert INSTALL_HINT in text, document
        assert "comfys3[runpod]" not in text, document


def test_off_runpod_with_no_test_input_it_says_why_it_stops(tmp_path: Path) -> None:
    """The SDK would log a warning, hidden at --rp_log_level ERROR, and exit 1 in silence."""
    result = subprocess.run(
        [str(COMFYS3), "runpod", "--rp_log_level", "ERROR"],
        cwd=tmp_path,
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("comfys3 runpod: nothing to run: this is not RunPod")
    assert f"no test_input.json in {tmp_path}" in result.stderr
    assert "--test_input" in result.stderr and "--rp_serve_api" in result.stderr
