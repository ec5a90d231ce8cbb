"""A fake ComfyUI for tests (0.3.64, or today's with protocol="current"): Pillow nodes, no GPU.

Use the `fake_comfyui` pytest fixture (tests.fake_comfyui.fixtures), `FakeComfyUIThread` for an
in-process server outside pytest, or run `python -m tests.fake_comfyui --port N` (or
`python tests/fake_comfyui/main.py ...`) for a process that a supervisor can start and kill.
"""

from .server import FakeDirs, create_app
from .state import FakeState
from .thread import FakeComfyUIThread

__all__ = ["FakeComfyUIThread", "FakeDirs", "FakeState", "create_app"]
