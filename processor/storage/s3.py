"""S3 backend on aiobotocore: one client (one connection pool) per worker, opened in __aenter__.

Every botocore failure is translated at this boundary into the :mod:`processor.storage.base`
exceptions, so the pipeline never imports botocore and every message names the bucket, key and
operation, never a credential.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import email.utils
import functools
import random
import socket
import ssl
import statistics
import time
from collections import deque
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Self, Unpack

import aiohttp
import botocore.utils
from aiobotocore.session import AioSession, get_session
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    HTTPClientError,
    ReadTimeoutError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.exceptions import SSLError as BotoSSLError
from botocore.retries.standard import (
    OrRetryChecker,
    RetryContext,
    ThrottledRetryableChecker,
    TransientRetryableChecker,
)

from processor.aio import ClosedOnExit
from processor.errors import (
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
    folder_prefix,
    require_open,
    validate_key,
)

# Concurrent conditional writes on AWS answer 409 ConditionalRequestConflict: "try again".
CONFLICT_RETRIES = 4
DATE_SAMPLES = 15  # responses' Date headers kept to estimate the store's clock
CONFLICT_BACKOFF = 0.05
LIST_PAGE = 1000
DELETE_BATCH = 1000  # DeleteObjects takes at most 1000 keys


def _served_at(response: Mapping[str, Any]) -> datetime | None:
    """The Date header of an S3 answer: the storage's clock at the time it answered."""
    headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
    text = headers.get("date") if isinstance(headers, Mapping) else None
    if not isinstance(text, str):
        return None
    try:
        return email.utils.parsedate_to_datetime(text).astimezone(UTC)
    except (TypeError, ValueError):
        return None


def _user_agent() -> str:
    try:
        from importlib.metadata import version

        return f"comfys3/{version('comfys3')}"
    except Exception:  # not installed: a checkout on the path
        return "comfys3"


_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
_PRECONDITION_CODES = {"PreconditionFailed", "412"}
# S3 error codes that say the credentials or the bucket's permissions are wrong (both clients).
AUTH_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
}


def refused(operation: str, where: str, detail: str) -> StorageError:
    """A request S3 refused for its credentials or permissions, saying what to check."""
    return StorageError(
        f"S3 {operation} of {where} was refused ({detail}); check "
        "COMFYS3_S3_ACCESS_KEY, COMFYS3_S3_SECRET_KEY and the bucket's permissions"
    )


async def conflict_settles(attempt: int, code: str) -> bool:
    """After a conditional put answered 409: whether to try it again (after a short pause).
    AWS answers 409 ConditionalRequestConflict while a concurrent conditional write is in
    flight, which settles quickly; other servers use 409 for "exists". False: the
    precondition failed."""
    if attempt < CONFLICT_RETRIES and code == "ConditionalRequestConflict":
        await asyncio.sleep(random.uniform(0, CONFLICT_BACKOFF * 2**attempt))
        return True
    return False


_TRANSPORT_ERRORS = (BotoCoreError, aiohttp.ClientError, OSError, asyncio.TimeoutError)
# Failures on the way to S3 that may pass: botocore's own transient exceptions (connection
# refused or reset, DNS, timeouts), and the same from aiohttp or the socket before botocore
# wraps them. Certificate errors are not among them: they do not pass by themselves.
_CONNECTION_ERRORS = (
    BotoConnectionError,
    HTTPClientError,
    aiohttp.ClientError,
    OSError,
    asyncio.TimeoutError,
)
_CERTIFICATE_ERRORS = (BotoSSLError, aiohttp.ClientSSLError, ssl.SSLError)
# Answers that say "not now" (500, 502, 503, 504, SlowDown, throttling, RequestTimeout), as
# botocore's standard retry mode judges them, so waiting at start agrees with its retries.
_PASSING_ANSWERS = OrRetryChecker([TransientRetryableChecker(), ThrottledRetryableChecker()])


class _Answer:
    """The one attribute botocore's transient check reads of an HTTP response."""

    def __init__(self, status_code: int) -> None:
        self.status_code = status_code


def passing_reason(error: BaseException) -> str | None:
    """A few words on why S3 could not serve the request, if it is an outage that may pass
    (no connection, a timeout, an answer of 5xx or SlowDown); None for anything else (bad
    credentials, no such bucket, a certificate that does not verify), which waiting cannot
    mend."""
    if isinstance(error, ClientError):
        code, status = _error_code(error)
        context = RetryContext(
            attempt_number=1,
            parsed_response=error.response,
            http_response=_Answer(status) if status else None,
        )
        if not _PASSING_ANSWERS.is_retryable(context):
            return None
        return " ".join(part for part in (f"HTTP {status}" if status else "", code) if part)
    if not isinstance(error, _CONNECTION_ERRORS) or _caused_by(error, _CERTIFICATE_ERRORS):
        return None
    if _caused_by(error, (ConnectionRefusedError,)):
        return "connection refused"
    if _caused_by(error, (aiohttp.ClientConnectorDNSError, socket.gaierror)):
        return "host name not found"
    if isinstance(error, ConnectTimeoutError):
        return "no connection within the connect timeout"
    if isinstance(error, ReadTimeoutError) or _caused_by(error, (asyncio.TimeoutError,)):
        return "no answer within the read timeout"
    if _caused_by(error, (ConnectionResetError, aiohttp.ServerDisconnectedError)):
        return "connection closed by the server"
    root = _root(error)
    text = " ".join(str(root).split()) or type(root).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def _causes(error: BaseException) -> list[BaseException]:
    """``error`` and what it wraps: botocore keeps the cause in ``kwargs['error']``, aiohttp's
    connector errors in ``os_error``, Python in ``__cause__`` / ``__context__``."""
    found: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in found and len(found) < 8:
        found.append(current)
        kwargs = getattr(current, "kwargs", None)
        inner = kwargs.get("error") if isinstance(kwargs, dict) else None
        inner = inner if isinstance(inner, BaseException) else getattr(current, "os_error", None)
        if not isinstance(inner, BaseException):
            inner = current.__cause__ or current.__context__
        current = inner
    return found


def _caused_by(error: BaseException, kinds: tuple[type[BaseException], ...]) -> bool:
    return any(isinstance(cause, kinds) for cause in _causes(error))


def _root(error: BaseException) -> BaseException:
    return _causes(error)[-1]


_TIMESTAMP_FORMATS = ("%Y-%m-%dT%H:%M:%S.%fZ", "%Y-%m-%dT%H:%M:%SZ", "%a, %d %b %Y %H:%M:%S GMT")


def _parse_timestamp(value: Any) -> datetime:
    """S3's two timestamp shapes (ISO 8601 in listings, RFC 1123 in headers) read directly;
    botocore's general parser (dateutil) costs ~1 ms of CPU a value, more than the rest of
    a small request. Anything else goes to botocore's parser."""
    if isinstance(value, str):
        for form in _TIMESTAMP_FORMATS:
            try:
                return datetime.strptime(value, form).replace(tzinfo=UTC)
            except ValueError:
                continue
    return botocore.utils.parse_timestamp(value)


@functools.cache
def _session() -> AioSession:
    """One botocore session per process: it only caches service models (loading them costs
    ~100 ms), so every client after the first opens fast. Credentials stay per client."""
    session = get_session()
    session.get_component("response_parser_factory").set_parser_defaults(
        timestamp_parser=_parse_timestamp
    )
    return session


def _error_code(error: ClientError) -> tuple[str, int]:
    code = str(error.response.get("Error", {}).get("Code", ""))
    status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


class S3Storage(ClosedOnExit):
    """A bucket seen through :class:`processor.storage.base.Storage`.

    Timeouts are constructor arguments rather than settings: the defaults suit a worker, and
    tests pass small ones to learn quickly that an endpoint is unreachable.
    """

    def __init__(
        self,
        settings: S3Settings,
        *,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        max_pool_connections: int = 32,
    ) -> None:
        self._settings = settings
        self._config = Config(
            region_name=settings.region,
            signature_version="s3v4",
            s3={"addressing_style": settings.addressing_style},
            retries={"mode": "standard", "max_attempts": settings.retry_attempts},
            # A fixed User-Agent: botocore otherwise rebuilds its long default string twice for
            # every request, about a sixth of the CPU a small request costs.
            user_agent=_user_agent(),
            # CRC checksums only where S3 requires them: our objects are small and every write
            # is already verified by its ETag; S3-compatible servers vary in what they accept.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            # Our own code builds every request's parameters; checking them again against the
            # service model costs CPU on each call and finds nothing.
            parameter_validation=False,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=max_pool_connections,
        )
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None
        self._dates: deque[float] = deque(maxlen=DATE_SAMPLES)  # store minus local, seconds
        self._dated_at = float("-inf")

    @property
    def bucket(self) -> str:
        return self._settings.bucket_name

    def __repr__(self) -> str:
        return f"S3Storage(endpoint={self._settings.endpoint_url!r}, bucket={self.bucket!r})"

    async def __aenter__(self) -> Self:
        if self._client is not None:
            return self
        stack = contextlib.AsyncExitStack()
        session = _session()
        try:
            self._client = await stack.enter_async_context(
                session.create_client(
                    "s3",
                    endpoint_url=self._settings.endpoint_url,
                    region_name=self._settings.region,
                    aws_access_key_id=self._settings.access_key.get_secret_value(),
                    aws_secret_access_key=self._settings.secret_key.get_secret_value(),
                    config=self._config,
                )
            )
        except (*_TRANSPORT_ERRORS, ValueError) as error:
            await stack.aclose()
            raise StorageError(
                f"cannot open an S3 client for {self._settings.endpoint_url}: {error}"
            ) from None
        self._stack = stack
        self._client.meta.events.register("after-call.s3", self._note_date)
        return self

    def _note_date(self, http_response: Any = None, **_: Any) -> None:
        """Sample the store's clock from a response's Date header (at most once a second):
        what :meth:`clock_offset` reports. Nothing depends on it but what people are told."""
        now = time.time()
        if now - self._dated_at < 1.0 or http_response is None:
            return
        self._dated_at = now
        with contextlib.suppress(Exception):  # a missing or odd header is no sample
            stamp = email.utils.parsedate_to_datetime(http_response.headers["Date"])
            # Date has whole seconds: on average half a second behind the moment it was sent.
            self._dates.append(stamp.timestamp() + 0.5 - now)

    def clock_offset(self) -> float | None:
        """Seconds the store's clock is ahead of this machine's (negative: behind), the median
        of recent responses; None before any."""
        return statistics.median(self._dates) if self._dates else None

    async def aclose(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    # -- helpers --------------------------------------------------------------------------

    @property
    def _s3(self) -> Any:
        return require_open(self._client, self.bucket, "S3Storage")

    def _where(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def _translate(self, error: Exception, operation: str, key: str) -> StorageError:
        where = self._where(key)
        reason = passing_reason(error)
        if not isinstance(error, ClientError):
            message = f"S3 {operation} of {where} failed: {error}"
            return self._unreachable(message, reason) if reason else StorageError(message)
        code, status = _error_code(error)
        message = error.response.get("Error", {}).get("Message") or ""
        detail = f"{code or status}" + (f": {message}" if message else "")
        if code == "NoSuchBucket":
            return StorageError(f"S3 {operation} of {where} failed: bucket does not exist")
        if code in _NOT_FOUND_CODES or (status == 404 and not code):
            return ObjectNotFound(f"S3 {operation}: no object at {where}")
        if code in _PRECONDITION_CODES or status == 412:
            return PreconditionFailed(f"S3 {operation} of {where}: precondition failed ({detail})")
        if code in AUTH_CODES or status == 403:
            return refused(operation, where, detail)
        message = f"S3 {operation} of {where} failed: {detail}"
        return self._unreachable(message, reason) if reason else StorageError(message)

    def _unreachable(self, message: str, reason: str) -> StorageUnreachable:
        return StorageUnreachable(
            message, {"service": "S3", "endpoint": self._settings.endpoint_url, "reason": reason}
        )

    async def _call(self, operation: str, key: str, method: str, **params: Any) -> Any:
        try:
            return await getattr(self._s3, method)(Bucket=self.bucket, **params)
        except (ClientError, *_TRANSPORT_ERRORS) as error:
            raise self._translate(error, operation, key) from None

    def location(self, key: str) -> str:
        """Where ``key`` is, for a person: ``s3://bucket/key``."""
        return self._where(key)

    def single_try(self) -> S3Storage:
        """The same bucket, endpoint and credentials, with botocore's own retries off, for
        waiting on S3 at start: there the wait is the retry, so a try is one request and one
        log line, not several hidden behind back-off. Its answers' dates still tell this
        storage's clock. Unopened: use it in ``async with``; closing it closes only its own
        client."""
        other = copy.copy(self)
        other._config = self._config.merge(
            Config(retries={"mode": "standard", "total_max_attempts": 1})
        )
        other._stack = None
        other._client = None
        return other

    def in_bucket(self, bucket: str) -> S3Storage:
        """The same endpoint and credentials, another bucket (an ``s3://bucket/key`` input);
        it shares this storage's open client, so closing it closes nothing."""
        if bucket == self.bucket:
            return self
        other = copy.copy(self)
        other._settings = self._settings.model_copy(update={"bucket_name": bucket})
        other._stack = None
        return other

    # -- Storage --------------------------------------------------------------------------

    async def get(self, key: str, *, max_bytes: int | None = None) -> StoredObject:
        validate_key(key)
        response = await self._call("get", key, "get_object", Key=key)
        try:
            async with response["Body"] as stream:
                size = int(response.get("ContentLength") or 0)
                if max_bytes is not None and size > max_bytes:
                    raise ObjectTooLarge(
                        f"{self._where(key)} is {size} bytes; the limit is {max_bytes}"
                    )
                data = await stream.read()
        except _TRANSPORT_ERRORS as error:
            raise self._translate(error, "get", key) from None
        return StoredObject(
            key=key,
            data=data,
            etag=str(response.get("ETag", "")),
            content_type=response.get("ContentType"),
            last_modified=response.get("LastModified"),
            served_at=_served_at(response),
        )

    async def head(self, key: str) -> ObjectInfo | None:
        validate_key(key)
        try:
            response = await self._call("head", key, "head_object", Key=key)
        except ObjectNotFound:
            return None
        return ObjectInfo(
            key=key,
            size=int(response.get("ContentLength", 0)),
            etag=str(response.get("ETag", "")),
            last_modified=response["LastModified"],
        )

    async def put(self, key: str, data: bytes, **options: Unpack[PutOptions]) -> str:
        validate_key(key)
        put = Put.of(self._where(key), options)
        params: dict[str, Any] = {"Key": key, "Body": data, "ContentType": put.content_type}
        if put.if_none_match:
            params["IfNoneMatch"] = "*"
        if put.if_match is not None:
            params["IfMatch"] = put.if_match
        conditional = put.conditional
        for attempt in range(CONFLICT_RETRIES + 1):
            try:
                response = await self._s3.put_object(Bucket=self.bucket, **params)
                return str(response.get("ETag", ""))
            except ClientError as error:
                code, status = _error_code(error)
                if conditional and status == 409:
                    if await conflict_settles(attempt, code):
                        continue
                    raise PreconditionFailed(
                        f"S3 put of {self._where(key)}: precondition failed ({code or status})"
                    ) from None
                if put.if_match is not None and (code in _NOT_FOUND_CODES or status == 404):
                    # If-Match on a vanished object: the version we expected is gone.
                    raise PreconditionFailed(
                        f"S3 put of {self._where(key)}: precondition failed (object is gone)"
                    ) from None
                raise self._translate(error, "put", key) from None
            except _TRANSPORT_ERRORS as error:
                raise self._translate(error, "put", key) from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def list(
        self, prefix: str, *, recursive: bool = False, limit: int | None = None
    ) -> list[ObjectInfo]:
        folder = folder_prefix(prefix)
        found: list[ObjectInfo] = []
        token: str | None = None
        while limit is None or len(found) < limit:
            params: dict[str, Any] = {"Prefix": folder, "MaxKeys": LIST_PAGE}
            if limit is not None:
                params["MaxKeys"] = max(1, min(LIST_PAGE, limit - len(found)))
            if not recursive:
                params["Delimiter"] = "/"
            if token:
                params["ContinuationToken"] = token
            page: Mapping[str, Any] = await self._call(
                "list", folder or "(root)", "list_objects_v2", **params
            )
            for item in page.get("Contents", []):
                key = str(item["Key"])
                if key.endswith("/"):
                    continue  # a "folder" marker some tools create; not an object to process
                found.append(
                    ObjectInfo(
                        key=key,
                        size=int(item.get("Size", 0)),
                        etag=str(item.get("ETag", "")),
                        last_modified=item["LastModified"],
                    )
                )
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                break
        return found[:limit] if limit is not None else found

    async def list_page(
        self, prefix: str, *, start_after: str | None = None, limit: int = LIST_PAGE
    ) -> Page:
        """One ListObjectsV2 request: at most ``limit`` objects after ``start_after``."""
        folder = folder_prefix(prefix)
        params: dict[str, Any] = {
            "Prefix": folder,
            "Delimiter": "/",
            "MaxKeys": max(1, min(LIST_PAGE, limit)),
        }
        if start_after:
            params["StartAfter"] = start_after
        page: Mapping[str, Any] = await self._call(
            "list", folder or "(root)", "list_objects_v2", **params
        )
        items = [
            ObjectInfo(
                key=str(item["Key"]),
                size=int(item.get("Size", 0)),
                etag=str(item.get("ETag", "")),
                last_modified=item["LastModified"],
            )
            for item in page.get("Contents", [])
            if not str(item["Key"]).endswith("/")
        ]
        folders = [str(common["Prefix"]) for common in page.get("CommonPrefixes", [])]
        return Page(items, truncated=bool(page.get("IsTruncated")), folders=folders)

    async def delete(self, key: str) -> None:
        validate_key(key)
        await self._call("delete", key, "delete_object", Key=key)

    async def delete_many(self, keys: Sequence[str]) -> None:
        """DeleteObjects, a thousand keys a request: retiring finished jobs in batches costs a
        request per batch instead of two per job. Missing keys are not an error (as in S3)."""
        for key in keys:
            validate_key(key)
        for start in range(0, len(keys), DELETE_BATCH):
            chunk = keys[start : start + DELETE_BATCH]
            response = await self._call(
                "delete",
                chunk[0],
                "delete_objects",
                Delete={"Objects": [{"Key": key} for key in chunk], "Quiet": True},
            )
            errors = response.get("Errors") or []
            if errors:
                first = errors[0]
                raise StorageError(
                    f"S3 delete of {len(errors)} object(s) failed, first "
                    f"{self._where(str(first.get('Key')))}: {first.get('Code')}: "
                    f"{first.get('Message', '')}"
                )

    async def copy(self, src: str, dst: str) -> None:
        validate_key(src)
        validate_key(dst)
        await self._copy_object(src, dst, "copy")

    async def _copy_object(self, src: str, dst: str, verb: str) -> None:
        await self._call(
            f"{verb} to {self._where(dst)}",
            src,
            "copy_object",
            Key=dst,
            CopySource={"Bucket": self.bucket, "Key": src},
        )

    async def move(self, src: str, dst: str, *, lenient: bool = False) -> None:
        validate_key(src, lenient=lenient)
        validate_key(dst)
        if src == dst:
            if await self.head(src) is None:
                raise ObjectNotFound(f"S3 move: no object at {self._where(src)}")
            return
        await self._copy_object(src, dst, "move")
        # The copy is done: a failed delete leaves the source behind, which whoever claims it
        # next recognises as a leftover (its status already records this upload) and retires.
        await self._call("delete (after move)", src, "delete_object", Key=src)

    async def presign_get(self, key: str, expires_in: int) -> str:
        validate_key(key)
        try:
            url = await self._s3.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires_in
            )
        except (ClientError, *_TRANSPORT_ERRORS) as error:
            raise self._translate(error, "presign", key) from None
        return str(url)
