"""S3 backend on obstore (Rust ``object_store``): the requests a job makes, for a fraction of
botocore's CPU (``bench/s3_client_cost.py``: 2-6x less per request), same semantics and errors
as :class:`processor.storage.s3.S3Storage`. Chosen with ``COMFYS3_S3_CLIENT=obstore``.

What object_store cannot express stays on aiobotocore, through an :class:`S3Storage` this
backend holds:

- listings: object_store lists a folder with a delimiter only whole (no StartAfter, no
  MaxKeys), and a one-page poll of an intake whose ``_done/`` and ``_failed/`` grow with history
  must stay one request;
- the store's clock: object_store shows no response header, so :meth:`clock_offset` is sampled
  from the listings' ``Date`` headers (a worker lists its intake all the time);
- keys object_store refuses (control characters), which only a lenient move of a badly named
  manifest out of the intake ever touches.

Every obstore failure is translated here into :mod:`processor.errors`, with the bucket, key and
operation, and object_store's long text cut to the S3 error code and message.
"""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Self, Unpack
from urllib.parse import urlsplit, urlunsplit

import obstore
from obstore.exceptions import (
    AlreadyExistsError,
    BaseError,
    NotFoundError,
    NotModifiedError,
    PermissionDeniedError,
    PreconditionError,
    UnauthenticatedError,
)
from obstore.store import S3Store

from processor.aio import ClosedOnExit
from processor.errors import (
    InvalidKey,
    ObjectNotFound,
    ObjectTooLarge,
    PreconditionFailed,
    StorageError,
    StorageUnreachable,
)
from processor.settings import S3Settings
from processor.storage.base import (
    ObjectInfo,
    Page,
    Put,
    PutOptions,
    StoredObject,
    require_open,
    validate_key,
)
from processor.storage.s3 import (
    AUTH_CODES,
    CONFLICT_RETRIES,
    LIST_PAGE,
    S3Storage,
    conflict_settles,
    refused,
)

if TYPE_CHECKING:
    from obstore import PutMode
    from obstore.store import S3Credential

# A whole request, body included; a stalled connection is caught sooner by the read timeout.
REQUEST_TIMEOUT = timedelta(minutes=30)
MAX_DETAIL = 300

_OBSTORE_ERRORS = (BaseError, OSError, ValueError)  # obstore raises builtins for some kinds
_NOT_FOUND = (NotFoundError, FileNotFoundError)
_PRECONDITION = (PreconditionError, AlreadyExistsError, NotModifiedError)
_REFUSED = (PermissionDeniedError, UnauthenticatedError, PermissionError)
_STATUS = re.compile(r"status code: (\d{3})")
_CODE = re.compile(r"<Code>([^<]*)</Code>")
_MESSAGE = re.compile(r"<Message>([^<]*)</Message>")


def _status(error: BaseException) -> int | None:
    """The HTTP status, which object_store puts only in its text."""
    found = _STATUS.search(str(error))
    return int(found.group(1)) if found else None


def _code(error: BaseException) -> str:
    """The S3 error code (``NoSuchBucket``...), from the response body object_store quotes."""
    found = _CODE.search(str(error))
    return found.group(1) if found else ""


def _detail(error: BaseException) -> str:
    """What a person needs of object_store's text (the whole response body and a Rust debug
    dump): the S3 code and message, else the first line, cut short."""
    code = _code(error)
    if code:
        message = _MESSAGE.search(str(error))
        return f"{code}: {message.group(1)}" if message and message.group(1) else code
    text = str(error).split("\n\nDebug source", 1)[0].strip()
    first = text.splitlines()[0] if text else type(error).__name__
    return first if len(first) <= MAX_DETAIL else first[: MAX_DETAIL - 3] + "..."


def _store_endpoint(settings: S3Settings, bucket: str) -> str:
    """object_store takes a virtual-hosted endpoint with the bucket already in its host."""
    if settings.addressing_style != "virtual":
        return settings.endpoint_url
    parts = urlsplit(settings.endpoint_url)
    return urlunsplit((parts.scheme, f"{bucket}.{parts.netloc}", parts.path, "", ""))


def _open_store(
    settings: S3Settings, bucket: str, connect_timeout: float, read_timeout: float
) -> S3Store:
    """An S3Store with every option that changes what a request means set here.

    obstore also reads ``AWS_*`` variables for what it is not given; credentials come from a
    provider (so a stray ``AWS_SESSION_TOKEN`` is not sent with these keys, and the secret is
    not in the store's printable config), conditional puts are pinned to ETags."""
    access = settings.access_key.get_secret_value()
    secret = settings.secret_key.get_secret_value()

    def credentials() -> S3Credential:
        return {
            "access_key_id": access,
            "secret_access_key": secret,
            "token": None,
            "expires_at": None,  # static keys: asked for once
        }

    return S3Store(
        bucket,
        endpoint=_store_endpoint(settings, bucket),
        region=settings.region,
        virtual_hosted_style_request=settings.addressing_style == "virtual",
        conditional_put="etag",
        skip_signature=False,
        credential_provider=credentials,
        client_options={
            "allow_http": settings.endpoint_url.startswith("http://"),
            "connect_timeout": timedelta(seconds=connect_timeout),
            "read_timeout": timedelta(seconds=read_timeout),
            "timeout": REQUEST_TIMEOUT,
            "user_agent": "comfys3",
        },
        retry_config={"max_retries": settings.retry_attempts - 1},
    )


class ObstoreStorage(ClosedOnExit):
    """A bucket seen through :class:`processor.storage.base.Storage`, on obstore.

    Opening it opens an aiobotocore client too (see the module's note on what stays there).
    """

    def __init__(
        self,
        settings: S3Settings,
        *,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
    ) -> None:
        self._settings = settings
        self._timeouts = (connect_timeout, read_timeout)
        self._listing = S3Storage(
            settings, connect_timeout=connect_timeout, read_timeout=read_timeout
        )
        self._store: S3Store | None = None

    @property
    def bucket(self) -> str:
        return self._settings.bucket_name

    def __repr__(self) -> str:
        return f"ObstoreStorage(endpoint={self._settings.endpoint_url!r}, bucket={self.bucket!r})"

    async def __aenter__(self) -> Self:
        if self._store is not None:
            return self
        await self._listing.__aenter__()
        try:
            self._store = _open_store(self._settings, self.bucket, *self._timeouts)
        except _OBSTORE_ERRORS as error:
            await self._listing.aclose()
            raise StorageError(
                f"cannot open an S3 client for {self._settings.endpoint_url}: {_detail(error)}"
            ) from None
        return self

    async def aclose(self) -> None:
        self._store = None
        await self._listing.aclose()

    def clock_offset(self) -> float | None:
        """Seconds the store's clock is ahead of this machine's, from the Date headers of the
        listings (the only requests here that show headers); None before any listing."""
        return self._listing.clock_offset()

    def single_try(self) -> S3Storage:
        """The bucket on aiobotocore with its retries off, for the start-up wait on S3 (see
        :meth:`S3Storage.single_try`): object_store retries inside a call with back-off of its
        own, so a probe through it would be several tries behind one log line. The probe's
        answers date this storage's clock, so a skewed clock is told at start as on botocore."""
        return self._listing.single_try()

    def in_bucket(self, bucket: str) -> ObstoreStorage:
        """The same endpoint and credentials, another bucket (an ``s3://bucket/key`` input);
        closing it closes nothing of this storage's."""
        if bucket == self.bucket:
            return self
        other = copy.copy(self)
        other._settings = self._settings.model_copy(update={"bucket_name": bucket})
        other._listing = self._listing.in_bucket(bucket)
        if self._store is not None:
            other._store = _open_store(other._settings, bucket, *self._timeouts)
        return other

    def location(self, key: str) -> str:
        """Where ``key`` is, for a person: ``s3://bucket/key``."""
        return self._where(key)

    # -- helpers --------------------------------------------------------------------------

    @property
    def _s3(self) -> S3Store:
        return require_open(self._store, self.bucket, "ObstoreStorage")

    def _where(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def _translate(self, error: BaseException, operation: str, key: str) -> StorageError:
        where = self._where(key)
        code, status, detail = _code(error), _status(error), _detail(error)
        if code == "NoSuchBucket":
            return StorageError(f"S3 {operation} of {where} failed: bucket does not exist")
        if isinstance(error, _NOT_FOUND) or status == 404:
            return ObjectNotFound(f"S3 {operation}: no object at {where}")
        if isinstance(error, _PRECONDITION) or status == 412:
            return PreconditionFailed(f"S3 {operation} of {where}: precondition failed ({detail})")
        if isinstance(error, _REFUSED) or code in AUTH_CODES or status == 403:
            return refused(operation, where, detail)
        outage = _outage(error, status, code)
        if outage is not None:
            return StorageUnreachable(
                f"S3 {operation} of {where} failed: {detail}",
                {"service": "S3", "endpoint": self._endpoint_shown(), "reason": outage},
            )
        return StorageError(f"S3 {operation} of {where} failed: {detail}")

    def _endpoint_shown(self) -> str:
        return self._settings.endpoint_url or f"s3.{self._settings.region}.amazonaws.com"

    # -- Storage --------------------------------------------------------------------------

    async def get(self, key: str, *, max_bytes: int | None = None) -> StoredObject:
        validate_key(key)
        store = self._s3
        try:
            result = await obstore.get_async(store, key)
            meta = result.meta
            if max_bytes is not None and meta["size"] > max_bytes:
                raise ObjectTooLarge(
                    f"{self._where(key)} is {meta['size']} bytes; the limit is {max_bytes}"
                )
            data = bytes(await result.bytes_async())
        except _OBSTORE_ERRORS as error:
            raise self._translate(error, "get", key) from None
        offset = self.clock_offset()
        return StoredObject(
            key=key,
            data=data,
            etag=meta["e_tag"] or "",
            content_type=result.attributes.get("Content-Type"),
            last_modified=meta["last_modified"],
            # No Date header here: the store's clock as last estimated, if it was.
            served_at=(
                datetime.fromtimestamp(time.time() + offset, UTC) if offset is not None else None
            ),
        )

    async def head(self, key: str) -> ObjectInfo | None:
        validate_key(key)
        try:
            meta = await obstore.head_async(self._s3, key)
        except _OBSTORE_ERRORS as error:
            translated = self._translate(error, "head", key)
            if isinstance(translated, ObjectNotFound):
                return None
            raise translated from None
        return ObjectInfo(
            key=key,
            size=meta["size"],
            etag=meta["e_tag"] or "",
            last_modified=meta["last_modified"],
        )

    async def put(self, key: str, data: bytes, **options: Unpack[PutOptions]) -> str:
        validate_key(key)
        put = Put.of(self._where(key), options)
        mode: PutMode = "overwrite"
        if put.if_none_match:
            mode = "create"
        elif put.if_match is not None:
            mode = {"e_tag": put.if_match}
        store = self._s3
        for attempt in range(CONFLICT_RETRIES + 1):
            try:
                result = await obstore.put_async(
                    store,
                    key,
                    data,
                    attributes={"Content-Type": put.content_type},
                    mode=mode,
                    use_multipart=False,  # one PutObject whatever the size, as S3Storage
                )
                return result["e_tag"] or ""
            except _OBSTORE_ERRORS as error:
                status, code = _status(error), _code(error)
                if put.conditional and status == 409:
                    if await conflict_settles(attempt, code):
                        continue
                    raise PreconditionFailed(
                        f"S3 put of {self._where(key)}: precondition failed ({code or status})"
                    ) from None
                translated = self._translate(error, "put", key)
                if put.if_match is not None and isinstance(translated, ObjectNotFound):
                    # If-Match on a vanished object: the version we expected is gone.
                    raise PreconditionFailed(
                        f"S3 put of {self._where(key)}: precondition failed (object is gone)"
                    ) from None
                raise translated from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def list(
        self, prefix: str, *, recursive: bool = False, limit: int | None = None
    ) -> list[ObjectInfo]:
        return await self._listing.list(prefix, recursive=recursive, limit=limit)

    async def list_page(
        self, prefix: str, *, start_after: str | None = None, limit: int = LIST_PAGE
    ) -> Page:
        return await self._listing.list_page(prefix, start_after=start_after, limit=limit)

    async def delete(self, key: str) -> None:
        validate_key(key)
        try:
            await obstore.delete_async(self._s3, key)
        except _OBSTORE_ERRORS as error:
            raise self._translate(error, "delete", key) from None

    async def delete_many(self, keys: Sequence[str]) -> None:
        """DeleteObjects, a thousand keys a request (object_store batches them): retiring
        finished jobs in batches costs a request per batch. Missing keys are not an error."""
        for key in keys:
            validate_key(key)
        if not keys:
            return
        try:
            await obstore.delete_async(self._s3, list(keys))
        except _OBSTORE_ERRORS as error:
            failed = self._translate(error, "delete", keys[0])
            raise type(failed)(f"{failed} (deleting {len(keys)} object(s))") from None

    async def copy(self, src: str, dst: str) -> None:
        validate_key(src)
        validate_key(dst)
        await self._copy_object(src, dst, "copy")

    async def _copy_object(self, src: str, dst: str, verb: str) -> None:
        try:
            await obstore.copy_async(self._s3, src, dst, overwrite=True)
        except _OBSTORE_ERRORS as error:
            raise self._translate(error, f"{verb} to {self._where(dst)}", src) from None

    async def move(self, src: str, dst: str, *, lenient: bool = False) -> None:
        validate_key(src, lenient=lenient)
        validate_key(dst)
        try:
            validate_key(src)
        except InvalidKey:  # a key object_store cannot address: botocore can
            await self._listing.move(src, dst, lenient=lenient)
            return
        if src == dst:
            if await self.head(src) is None:
                raise ObjectNotFound(f"S3 move: no object at {self._where(src)}")
            return
        await self._copy_object(src, dst, "move")
        # The copy is done: a failed delete leaves the source behind, which whoever claims it
        # next recognises as a leftover (its status already records this upload) and retires.
        try:
            await obstore.delete_async(self._s3, src)
        except _OBSTORE_ERRORS as error:
            raise self._translate(error, "delete (after move)", src) from None

    async def presign_get(self, key: str, expires_in: int) -> str:
        validate_key(key)
        try:
            return await obstore.sign_async(self._s3, "GET", key, timedelta(seconds=expires_in))
        except _OBSTORE_ERRORS as error:
            raise self._translate(error, "presign", key) from None


# obstore's words for a request that got no answer (its errors carry no type for it), most
# telling first, each with what a log line says.
_NO_ANSWER = (
    ("connection refused", "connection refused"),
    ("dns error", "host name not found"),
    ("failed to lookup", "host name not found"),
    ("connection reset", "connection reset"),
    ("broken pipe", "connection reset"),
    ("timed out", "timed out"),
    ("operation timed out", "timed out"),
    ("error sending request", "no answer"),
    ("tcp connect", "no answer"),
)


def _outage(error: BaseException, status: int | None, code: str | None) -> str | None:
    """A few words for a failure that waiting may end (no answer, 5xx, SlowDown), else None:
    the same line botocore's standard retry mode draws for :class:`S3Storage`."""
    if code == "SlowDown":
        return "HTTP 503 SlowDown"
    if status is not None and status >= 500:
        return f"HTTP {status}"
    if status is None:
        text = str(error).lower()
        for words, reason in _NO_ANSWER:
            if words in text:
                return reason
    return None
