"""Shared pytest set-up. Each fixture family lives in its own module, registered here."""

from hypothesis import settings

# Property tests say what must hold, never how fast: hypothesis's 200 ms deadline per example
# turns a busy machine into a failure (speed is measured in bench/, not asserted).
settings.register_profile("comfys3", deadline=None)
settings.load_profile("comfys3")

pytest_plugins: list[str] = [
    "tests.fake_comfyui.fixtures",
    "tests.s3_servers",
    "tests.poison_parts",
]
