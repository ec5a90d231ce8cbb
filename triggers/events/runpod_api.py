"""The three calls the dispatcher makes to RunPod's serverless API: run, status, cancel.

``POST {base}/v2/{endpoint}/run`` with ``{"input": {...}}`` queues a request and answers
``{"id": ..., "status": "IN_QUEUE"}``; ``GET .../status/{id}`` tells where it is;
``POST .../cancel/{id}`` withdraws it. RunPod throttles with 429 and has bad minutes (5xx):
those are retried with exponential back-off and jitter, honouring ``Retry-After``, a bounded
number of times. Every answer is untrusted: its size is capped, its fields checked, and every
failure is a :class:`RunPodError` that says what to fix, never the API key.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import random
import re
import time
from typing import Any, Self

import aiohttp

from processor import ClosedOnExit, Comfys3Error

log = logging.getLogger("comfys3.dispatch")

MAX_ANSWER_BYTES = 65_536
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"})
_JOB_ID = re.compile(r"[A-Za-z0-9_.:-]{1,200}")


class RunPodError(Comfys3Error):
    """A RunPod call that failed for good; ``retryable`` when a later try may succeed."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class RunPodApi(ClosedOnExit):
    """One endpoint of RunPod's serverless API; ``async with`` opens its HTTP session."""

    def __init__(
        self,
        *,
        base_url: str,
        endpoint_id: str,
        api_key: str,
        attempts: int = 6,
        backoff: float = 0.5,
        max_delay: float = 30.0,
        timeout: float = 30.0,
    ) -> None:
        self._base = f"{base_url.rstrip('/')}/v2/{endpoint_id}"
        self.endpoint_id = endpoint_id
        self._headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        self._attempts = max(1, attempts)
        self._backoff = backoff
        self._max_delay = max_delay
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self.requests = 0  # HTTP requests sent, retries included

    async def __aenter__(self) -> Self:
        self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def run(self, job_input: dict[str, Any]) -> str:
        """Queue one request; its RunPod job id."""
        answer = await self._call("POST", "/run", {"input": job_input}, what="run")
        job_id = answer.get("id") if isinstance(answer, dict) else None
        if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
            raise RunPodError(f"RunPod's /run answer has no usable job id: {_excerpt(answer)}")
        return job_id

    async def status(self, job_id: str) -> str | None:
        """``IN_QUEUE``, ``IN_PROGRESS``, ``COMPLETED``, ... or None when RunPod has no such job
        (it forgets finished requests after a while)."""
        try:
            answer = await self._call("GET", f"/status/{job_id}", None, what="status")
        except _NotFound:
            return None
        status = answer.get("status") if isinstance(answer, dict) else None
        if not isinstance(status, str) or len(status) > 40:
            raise RunPodError(f"RunPod's status answer has no status: {_excerpt(answer)}")
        return status.upper()

    async def cancel(self, job_id: str) -> None:
        with contextlib.suppress(_NotFound):
            await self._call("POST", f"/cancel/{job_id}", None, what="cancel")

    # -- one call, retried ------------------------------------------------------------------

    async def _call(self, method: str, path: str, body: Any, *, what: str) -> Any:
        if self._session is None:
            raise RunPodError("the RunPod client is not open; use 'async with RunPodApi(...)'")
        url = self._base + path
        problem = ""
        for attempt in range(1, self._attempts + 1):
            delay: float | None = None
            try:
                self.requests += 1
                async with self._session.request(
                    method, url, headers=self._headers, json=body
                ) as response:
                    data = await response.content.read(MAX_ANSWER_BYTES + 1)
                    if response.status in RETRY_STATUSES:
                        problem = f"HTTP {response.status}"
                        delay = _retry_after(response.headers.get("Retry-After"))
                    elif response.status == 404 and what != "run":
                        raise _NotFound()
                    elif response.status >= 400:
                        raise _refused(response.status, data, what, self.endpoint_id)
                    else:
                        return _decode(data, what)
            except (aiohttp.ClientError, TimeoutError, OSError) as error:
                problem = f"{type(error).__name__}: {error}".rstrip(": ")
            if attempt == self._attempts:
                break
            pause = delay if delay is not None else self._pause(attempt)
            log.info("RunPod %s: %s; trying again in %.1f s", what, problem, pause)
            await asyncio.sleep(pause)
        raise RunPodError(
            f"RunPod {what} failed after {self._attempts} tries: {problem}", retryable=True
        )

    def _pause(self, attempt: int) -> float:
        return random.uniform(0, min(self._max_delay, self._backoff * 2 ** (attempt - 1)))


class _NotFound(Comfys3Error):
    pass


def _retry_after(value: str | None, cap: float = 60.0) -> float | None:
    """``Retry-After`` as seconds (a number or an HTTP date), at most ``cap``."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            moment = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if moment is None:
            return None
        seconds = moment.timestamp() - time.time()
    if seconds != seconds:  # NaN
        return None
    return max(0.0, min(cap, seconds))


def _decode(data: bytes, what: str) -> Any:
    if len(data) > MAX_ANSWER_BYTES:
        raise RunPodError(f"RunPod's {what} answer is larger than {MAX_ANSWER_BYTES} bytes")
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise RunPodError(f"RunPod's {what} answer is not JSON: {_excerpt(data)}") from None


def _refused(status: int, data: bytes, what: str, endpoint_id: str) -> RunPodError:
    if status in (401, 403):
        return RunPodError(
            f"RunPod refused the {what} request (HTTP {status}); check RUNPOD_API_KEY"
        )
    if status == 404:
        return RunPodError(
            f"RunPod has no endpoint {endpoint_id!r} (HTTP 404); check "
            "COMFYS3_RUNPOD_ENDPOINT_ID and COMFYS3_RUNPOD_API_URL"
        )
    return RunPodError(f"RunPod refused the {what} request (HTTP {status}): {_excerpt(data)}")


def _excerpt(value: Any) -> str:
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else repr(value)
    text = " ".join(text.split())
    return text if len(text) <= 200 else text[:197] + "..."
