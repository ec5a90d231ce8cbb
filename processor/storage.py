"""Where jobs and results live: one :class:`Storage` interface, an S3 and a local-folder backend.

Import everything from here; the ``storage_*`` modules are how it is split, not API.
"""

from __future__ import annotations

from processor.storage_base import (
    InvalidKey,
    ObjectInfo,
    ObjectNotFound,
    ObjectTooLarge,
    Page,
    PreconditionFailed,
    Storage,
    StorageError,
    StoredObject,
    folder_prefix,
    validate_key,
)
from processor.storage_local import LocalStorage
from processor.storage_s3 import S3Storage

__all__ = [
    "InvalidKey",
    "LocalStorage",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectTooLarge",
    "Page",
    "PreconditionFailed",
    "S3Storage",
    "Storage",
    "StorageError",
    "StoredObject",
    "folder_prefix",
    "validate_key",
]
