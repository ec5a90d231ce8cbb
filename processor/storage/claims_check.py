"""A check, once at start, that the storage can referee claims.

Claims are exclusive only because the storage refuses a create over an existing object
(``If-None-Match: *``) and a replace with a stale ETag (``If-Match``). A server that ignores
those headers answers 200 to both, so nothing fails: two workers simply run the same job,
and a worker that lost its lease never learns it. That failure is silent, so it is looked
for before the first claim, with three small writes and a delete.
"""

from __future__ import annotations

import contextlib
import json
import uuid

from processor.errors import ConditionalWritesIgnored, PreconditionFailed, StorageError
from processor.storage.base import Storage, folder_prefix

# Probe names: this, then a random uuid, which no manifest's claim will share.
PROBE_PREFIX = "_probe-"
# An ETag no object has: a replace conditional on it must be refused.
_STALE_ETAG = '"00000000000000000000000000000000"'


async def check_conditional_writes(storage: Storage, claims_prefix: str, holder: str) -> None:
    """Raise :class:`ConditionalWritesIgnored`, naming what went through, if ``storage``
    ignores either condition that claims rely on."""
    # The holder goes in the body, not the key: a worker id need not be a valid key. The probe
    # sits directly in the claims prefix, not in a folder of its own: on the local-folder
    # backend a deleted file leaves its folder behind, and an empty _probe/ puzzles users.
    key = f"{folder_prefix(claims_prefix)}{PROBE_PREFIX}{uuid.uuid4().hex}.json"
    data = json.dumps({"probe": "comfys3 checks conditional writes", "holder": holder}).encode()
    await storage.put(key, data, content_type="application/json", if_none_match=True)
    ignored: list[str] = []
    try:
        try:
            await storage.put(key, data, content_type="application/json", if_none_match=True)
            ignored.append("a create over an existing object (If-None-Match: *) succeeded")
        except PreconditionFailed:
            pass
        try:
            await storage.put(key, data, content_type="application/json", if_match=_STALE_ETAG)
            ignored.append("a replace with a stale ETag (If-Match) succeeded")
        except PreconditionFailed:
            pass
    finally:
        with contextlib.suppress(StorageError):
            await storage.delete(key)
    if ignored:
        raise ConditionalWritesIgnored(
            f"{storage!r} ignores conditional writes: {'; '.join(ignored)}. Claims rely on "
            "them, so two workers could run the same job. Use S3 storage that honours "
            "If-None-Match and If-Match on PutObject (AWS S3 and SeaweedFS do), or, if exactly "
            "one worker uses this bucket, set COMFYS3_CHECK_CONDITIONAL_WRITES=false."
        )
