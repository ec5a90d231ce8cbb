"""ComfyUI's folders on this machine, used directly instead of through its HTTP server.

Why: ComfyUI's server runs in the process that executes prompts and shares its GIL, so every
``/view`` and ``/upload/image`` it serves slows the prompt running beside it. When the worker
started ComfyUI (or was told its folders), outputs are read from and inputs written to disk.
Both refuse a path that would leave the folder, whatever ComfyUI's events named, and answer
None where the file is not there, so the caller falls back to HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from pathlib import Path

# Files up to this size are read on the event loop: a thread hop costs more than the read.
INLINE_READ_BYTES = 256 * 1024


def inside(root: Path, *parts: str) -> Path | None:
    """``root/parts...`` resolved, or None when it is not strictly inside ``root``."""
    base = root.resolve()
    target = base.joinpath(*(p for p in parts if p)).resolve()
    return target if base in target.parents else None


async def read_file(root: Path, subfolder: str, filename: str) -> bytes | None:
    """The bytes of ``root/subfolder/filename``, or None if it is not a file inside ``root``."""
    target = inside(root, subfolder, filename)
    if target is None:
        return None
    try:
        size = target.stat().st_size
        if size <= INLINE_READ_BYTES:
            return target.read_bytes()
        return await asyncio.to_thread(target.read_bytes)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError):
        return None


def write_file(root: Path, subfolder: str, filename: str, data: bytes) -> bool:
    """Put ``data`` at ``root/subfolder/filename`` whole or not at all (written aside, then
    renamed: ComfyUI never reads half a file). False when the folder cannot take it."""
    target = inside(root, subfolder, filename)
    if target is None:
        return False
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(data)
        os.replace(partial, target)
    except OSError:
        with contextlib.suppress(OSError):
            partial.unlink()
        return False
    return True
