"""Shared pytest set-up. Each fixture family lives in its own module, registered here."""

pytest_plugins: list[str] = [
]
