"""Progress of comfys3 jobs, relayed to the RunPod requests that asked for them.

One worker (one ComfyUI) serves every request of the process, so progress arrives keyed by
comfys3 job id; the relay finds the RunPod job it belongs to. RunPod bills each update as an
HTTP call from the worker, so a 50-step sampler sends about one per second, not fifty.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from processor import ProgressInfo

log = logging.getLogger("comfys3.runpod")

ProgressSender = Callable[[dict[str, Any], Any], None]
DEFAULT_INTERVAL = 1.0


def runpod_progress_update(job: dict[str, Any], message: Any) -> None:
    """RunPod's own ``progress_update``, when there is a RunPod to send it to.

    Locally (``--test_input``, ``--rp_serve_api``) there is no job webhook: the SDK would post
    to a placeholder URL and log a failure per update, so updates only go to the log.
    """
    if not os.environ.get("RUNPOD_WEBHOOK_POST_OUTPUT"):
        log.debug("progress %s: %s", job.get("id"), message)
        return
    from runpod.serverless import progress_update

    progress_update(job, message)


@dataclass
class _Route:
    runpod_job: dict[str, Any]
    job_id: str | None
    last_sent: dict[str, float] = field(default_factory=dict)


class ProgressRelay:
    """The ``on_progress`` hook of the worker; requests register while they run.

    A request registers the comfys3 job id it runs (a batch's jobs are ``<id>-<n>``). When
    only one request is running, progress that matches no id (a drain) goes to it.
    """

    def __init__(
        self,
        send: ProgressSender = runpod_progress_update,
        *,
        interval: float = DEFAULT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._send = send
        self._interval = interval
        self._clock = clock
        self._routes: dict[int, _Route] = {}
        self._next = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def watch(self, runpod_job: dict[str, Any], job_id: str | None) -> Iterator[None]:
        with self._lock:
            token, self._next = self._next, self._next + 1
            self._routes[token] = _Route(runpod_job, job_id)
        try:
            yield
        finally:
            with self._lock:
                del self._routes[token]

    def __call__(self, job_id: str, info: ProgressInfo) -> None:
        with self._lock:
            route = self._route_for(job_id)
            if route is None:
                return
            now = self._clock()
            last = route.last_sent.get(job_id)
            finished = info.fraction >= 1.0
            if last is not None and now - last < self._interval and not finished:
                return
            route.last_sent[job_id] = now
        message = {
            "job_id": job_id,
            "progress": round(info.fraction, 4),
            "node": info.node,
            "step": info.step,
            "steps": info.steps,
        }
        try:
            self._send(route.runpod_job, message)
        except Exception as error:  # progress must never break the job it reports on
            log.warning("progress update for %s not sent: %s", job_id, error)

    def _route_for(self, job_id: str) -> _Route | None:
        routes = list(self._routes.values())
        named = [r for r in routes if r.job_id is not None]
        for route in named:
            if job_id == route.job_id:
                return route
        batches = [r for r in named if job_id.startswith(f"{r.job_id}-")]
        if batches:
            return max(batches, key=lambda r: len(r.job_id or ""))
        return routes[0] if len(routes) == 1 else None
