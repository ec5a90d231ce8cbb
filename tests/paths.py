"""Fixed places of the checkout, for tests at any depth of tests/."""

from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
DATA = TESTS / "data"
MANIFESTS = DATA / "manifests"
FAKE_COMFYUI = TESTS / "fake_comfyui"
RECORDINGS = FAKE_COMFYUI / "recordings"
WORKFLOWS = REPO / "workflows"
DOCS = REPO / "docs"
