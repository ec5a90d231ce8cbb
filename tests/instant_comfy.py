"""A ComfyUI stand-in that lives in the worker's own process and costs nothing.

It has the methods a job runner calls (``upload_input``, ``queue_prompt``, ``wait_for``,
``fetch_output``, ``cancel``) and answers each at once: every save node of a queued graph
"makes" one small PNG. So a benchmark of many workers (bench/fleet.py) measures only comfys3's
own coordination (claims, listings, statuses, retirement), not a GPU, a fake server's HTTP, or a
websocket. Not a protocol fake: tests of the client use tests/fake_comfyui, which follows the
recordings.

``executions`` counts prompts by job id (read from the save prefix the runner sets,
``comfys3/<job id>/<run id>/<node>``), so a caller can check that every job ran exactly once.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Any

from processor.comfy.client import OutputFile, Progress, RunLimit, RunResult
from processor.workflows import SAVE_PREFIX_INPUT

# A 1x1 PNG: the smallest output a SaveImage could give.
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415478"
    "9c63606060000000040001f61738550000000049454e44ae426082"
)


class InstantComfy:
    """Zero-cost ComfyUI: a prompt is done the moment it is queued (or after ``job_seconds``
    of sleep, which costs no CPU: a fleet of slow GPUs without the GPUs). Like ComfyUI, it
    runs one prompt at a time, in the order they were waited for."""

    def __init__(self, job_seconds: float = 0.0) -> None:
        self.job_seconds = job_seconds
        self.executions: collections.Counter[str] = collections.Counter()
        self._queued: dict[str, list[OutputFile]] = {}
        self._gpu = asyncio.Lock()

    @property
    def connected(self) -> bool:
        return True

    async def upload_input(self, data: bytes, filename: str, subfolder: str) -> str:
        return f"{subfolder}/{filename}"

    async def queue_prompt(self, graph: dict[str, Any], prompt_id: str) -> list[str]:
        files = []
        for node_id, node in graph.items():
            prefix = node.get("inputs", {}).get(SAVE_PREFIX_INPUT)
            if isinstance(prefix, str):
                files.append(OutputFile(node_id, "images", f"{node_id}_00001_.png", "", "output"))
                self.executions[job_of(prefix)] += 1
        self._queued[prompt_id] = files
        return []  # no output left out

    async def wait_for(
        self,
        prompt_id: str,
        *,
        timeout: float,
        on_progress: Callable[[Progress], None] | None = None,
        include_temp: bool = False,
        run_limit: RunLimit | None = None,
    ) -> RunResult:
        if self.job_seconds > 0:
            async with self._gpu:
                await asyncio.sleep(self.job_seconds)
        files = self._queued.pop(prompt_id, [])
        return RunResult(prompt_id, files, {}, [], self.job_seconds)

    async def fetch_output(self, ref: OutputFile) -> bytes:
        return PNG

    async def cancel(self, prompt_id: str) -> None:
        self._queued.pop(prompt_id, None)


def job_of(save_prefix: str) -> str:
    """``comfys3/<job id>/<run id>/<node>`` -> the job id."""
    parts = save_prefix.split("/")
    return parts[1] if len(parts) > 2 and parts[0] == "comfys3" else save_prefix
