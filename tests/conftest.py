"""Shared pytest set-up. Each fixture family lives in its own module, registered here."""

pytest_plugins: list[str] = [
    "tests.fake_comfyui.fixtures",
    "tests.s3_servers",
    "tests.poison_parts",
]
