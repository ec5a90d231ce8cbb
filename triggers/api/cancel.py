"""``POST /jobs/{id}/cancel``: ask the workers to stop a job.

The request is an object at ``<input>/_cancel/<job id>.json``, where workers look for it
(issue 22 adds the worker side and a ``cancelled`` state). This helper is the one place the
API writes it; when the core gains its own cancel function, swap it in here and nowhere else.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from processor import Layout, Storage

CANCEL = "_cancel"


def cancel_key(layout: Layout, job_id: str) -> str:
    return f"{layout.input_dir}/{CANCEL}/{job_id}.json"


async def request_cancel(storage: Storage, layout: Layout, job_id: str, *, by: str) -> str:
    """Write the cancel request for ``job_id``; its key. Asking twice is harmless."""
    key = cancel_key(layout, job_id)
    document = {
        "job_id": job_id,
        "requested_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "requested_by": by,
    }
    await storage.put(key, json.dumps(document).encode(), content_type="application/json")
    return key
