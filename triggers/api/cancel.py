"""``POST /jobs/{id}/cancel``: ask the workers to stop a job, as ``comfys3 cancel`` does.

The request is the same object the command writes, ``<input>/_cancel/<job id>.json``, built by
the core's :func:`processor.cancel_request`: every worker watches for it, a waiting job never
starts and a running one is stopped on the worker that runs it.
"""

from __future__ import annotations

from processor import Layout, Storage, cancel_request


async def request_cancel(storage: Storage, layout: Layout, job_id: str, *, by: str) -> str:
    """Write the cancel request for ``job_id``; its key. Asking twice is harmless."""
    key = layout.cancel_key(job_id)
    request = cancel_request(job_id, by)
    await storage.put(key, request.to_json(), content_type="application/json")
    return key
