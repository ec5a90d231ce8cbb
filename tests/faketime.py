"""libfaketime (Debian's ``faketime`` package) for a worker process whose clock is off.

Installed from Debian's packages when missing, as tests/browser.py does for Chromium (CI runs
as root); elsewhere a clear message says what to install.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

LIBRARIES = (
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/faketime/libfaketime.so.1",
)


def _found() -> str | None:
    return next((path for path in LIBRARIES if Path(path).is_file()), None)


def libfaketime() -> str:
    found = _found()
    if found:
        return found
    if os.geteuid() != 0:
        raise RuntimeError("libfaketime is missing: run `apt-get install -y faketime` as root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "faketime"]
    if subprocess.run(install, env=env, check=False, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True, capture_output=True)
        subprocess.run(install, env=env, check=True, capture_output=True)
    found = _found()
    if not found:
        raise RuntimeError("apt-get installed faketime, but libfaketime.so.1 is not where expected")
    return found


def skewed(env: dict[str, str], offset: str) -> dict[str, str]:
    """``env`` for a process whose wall clock is ``offset`` off (``+90s``, ``-90s``): the
    monotonic clock is left alone, as a drifting wall clock leaves it."""
    return {
        **env,
        "LD_PRELOAD": libfaketime(),
        "FAKETIME": offset,
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "FAKETIME_NO_CACHE": "1",
    }
