"""The installed comfys3 version, for the webhook User-Agent and the build_info metric."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    try:
        return version("comfys3")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"
