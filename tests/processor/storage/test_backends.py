"""One contract, three backends: a folder, moto, and a real S3 server (SeaweedFS)."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from processor.errors import (
    ObjectNotFound,
    PreconditionFailed,
    StorageError,
    StorageUnreachable,
)
from processor.settings import S3Settings
from processor.storage import s3 as storage_s3
from processor.storage.base import Storage, folder_prefix, validate_key
from processor.storage.local import LocalStorage
from processor.storage.obstore_s3 import ObstoreStorage
from processor.storage.s3 import S3Storage
from tests.paths import REPO
from tests.s3_servers import (
    ATOMIC_S3_BACKENDS,
    S3_BACKENDS,
    S3Server,
    free_port,
    s3_settings_for,
    storage_backend,
)

BACKENDS = ["local", *S3_BACKENDS]


@pytest.fixture(params=BACKENDS)
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    async with storage_backend(request.param, request, tmp_path / "root") as backend:
        yield backend


S3_CLIENTS = ["botocore", "obstore"]


def s3_client(settings: S3Settings, client: str, **timeouts: float) -> S3Storage | ObstoreStorage:
    """An unopened S3 storage on ``client``, for the tests of S3's own edges."""
    settings = settings.model_copy(update={"client": client})
    if client == "botocore":
        return S3Storage(settings, **timeouts)
    return ObstoreStorage(settings, **timeouts)


def md5_etag(data: bytes) -> str:
    return f'"{hashlib.md5(data).hexdigest()}"'


async def test_put_get_head_round_trip(storage: Storage) -> None:
    data = b'{"hello": "world"}'
    etag = await storage.put("jobs/a.json", data, content_type="application/json")
    assert etag == md5_etag(data)

    stored = await storage.get("jobs/a.json")
    assert stored.key == "jobs/a.json"
    assert stored.data == data
    assert stored.etag == etag
    assert stored.content_type == "application/json"

    info = await storage.head("jobs/a.json")
    assert info is not None
    assert (info.key, info.size, info.etag) == ("jobs/a.json", len(data), etag)
    assert info.last_modified.tzinfo is not None


async def test_put_replaces_and_changes_etag(storage: Storage) -> None:
    first = await storage.put("k.bin", b"one")
    second = await storage.put("k.bin", b"two")
    assert first != second
    assert (await storage.get("k.bin")).data == b"two"


async def test_missing_key(storage: Storage) -> None:
    assert await storage.head("nope/missing.json") is None
    with pytest.raises(ObjectNotFound, match=r"nope/missing\.json"):
        await storage.get("nope/missing.json")


async def test_list_non_recursive_hides_sub_prefixes(storage: Storage) -> None:
    for key in ["input/b.json", "input/a.json", "input/_done/a.json", "inputs/x.json", "top.txt"]:
        await storage.put(key, key.encode())

    flat = await storage.list("input")
    assert [o.key for o in flat] == ["input/a.json", "input/b.json"]
    assert [o.key for o in await storage.list("input/")] == ["input/a.json", "input/b.json"]
    assert flat[0].size == len(b"input/a.json")
    assert flat[0].etag == md5_etag(b"input/a.json")

    deep = await storage.list("input", recursive=True)
    assert [o.key for o in deep] == ["input/_done/a.json", "input/a.json", "input/b.json"]

    assert await storage.head("input") is None  # a folder is not an object
    with pytest.raises(ObjectNotFound):
        await storage.get("input")
    assert [o.key for o in await storage.list("")] == ["top.txt"]
    assert len(await storage.list("", recursive=True)) == 5
    assert await storage.list("empty") == []
    assert [o.key for o in await storage.list("input", recursive=True, limit=2)] == [
        "input/_done/a.json",
        "input/a.json",
    ]


async def test_a_page_names_its_sub_folders_alike_on_every_backend(storage: Storage) -> None:
    for key in ["input/a.json", "input/_done/a.json", "input/sub/deep/b.json", "inputs/x.json"]:
        await storage.put(key, key.encode())

    page = await storage.list_page("input")
    assert [o.key for o in page.items] == ["input/a.json"]
    assert page.folders == ["input/_done/", "input/sub/"]
    top = await storage.list_page("")
    assert top.items == [] and top.folders == ["input/", "inputs/"]  # .comfys3/ stays hidden


async def test_list_paginates(storage: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    """A page size of 2 walks the continuation logic on every backend, sub-prefixes included."""
    monkeypatch.setattr(storage_s3, "LIST_PAGE", 2)
    keys = [f"p/{i:02d}.json" for i in range(7)]
    await asyncio.gather(*(storage.put(key, b"x") for key in keys))
    await asyncio.gather(*(storage.put(f"p/sub{i}/x.json", b"x") for i in range(3)))

    assert [o.key for o in await storage.list("p")] == keys
    assert len(await storage.list("p", recursive=True)) == 10
    assert [o.key for o in await storage.list("p", limit=5)] == keys[:5]


@pytest.mark.parametrize("client", S3_CLIENTS)
async def test_list_beyond_one_thousand_keys(moto_s3_settings: S3Settings, client: str) -> None:
    """Real 1000-key pages. Keys go straight into moto's in-process backend: a thousand HTTP
    puts would cost seconds and test nothing more."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    for i in range(1003):
        backend.put_object(moto_s3_settings.bucket_name, f"many/{i:04d}", b"")
    backend.put_object(moto_s3_settings.bucket_name, "many/deeper/hidden", b"")
    async with s3_client(moto_s3_settings, client) as storage:
        listed = await storage.list("many")
        assert len(listed) == 1003
        assert listed[-1].key == "many/1002"
        assert len(await storage.list("many", limit=1001)) == 1001
        assert len(await storage.list("many", recursive=True)) == 1004


async def test_delete_is_idempotent(storage: Storage) -> None:
    await storage.put("d/x", b"1")
    await storage.delete("d/x")
    assert await storage.head("d/x") is None
    await storage.delete("d/x")
    await storage.delete("never/was")


async def test_copy_keeps_the_source_and_replaces_the_target(storage: Storage) -> None:
    await storage.put("cp/src.json", b"source", content_type="application/json")
    await storage.put("cp/dst.json", b"old")
    await storage.copy("cp/src.json", "cp/dst.json")
    assert (await storage.get("cp/dst.json")).data == b"source"
    assert (await storage.get("cp/src.json")).data == b"source"
    with pytest.raises(ObjectNotFound, match=r"cp/absent\.json"):
        await storage.copy("cp/absent.json", "cp/other.json")
    assert await storage.head("cp/other.json") is None


async def test_delete_many_removes_the_listed_keys_only(storage: Storage) -> None:
    for key in ["dm/a", "dm/b", "dm/keep"]:
        await storage.put(key, b"x")
    await storage.delete_many(["dm/a", "dm/b", "dm/never-was"])
    assert [o.key for o in await storage.list("dm")] == ["dm/keep"]
    await storage.delete_many([])
    with pytest.raises(StorageError, match="invalid storage key"):
        await storage.delete_many(["dm/keep", "../escape"])
    assert await storage.head("dm/keep") is not None  # refused before any delete


async def test_move(storage: Storage) -> None:
    await storage.put("input/job.json", b"job", content_type="application/json")
    await storage.move("input/job.json", "input/_done/job.json")
    assert await storage.head("input/job.json") is None
    assert (await storage.get("input/_done/job.json")).data == b"job"
    with pytest.raises(ObjectNotFound, match=r"input/job\.json"):
        await storage.move("input/job.json", "elsewhere/job.json")


async def test_if_none_match_refuses_existing_key(storage: Storage) -> None:
    await storage.put("c/claim.json", b"first", if_none_match=True)
    with pytest.raises(PreconditionFailed, match=r"c/claim\.json"):
        await storage.put("c/claim.json", b"second", if_none_match=True)
    assert (await storage.get("c/claim.json")).data == b"first"


async def test_if_match(storage: Storage) -> None:
    etag = await storage.put("m/doc", b"v1")
    newer = await storage.put("m/doc", b"v2", if_match=etag)
    with pytest.raises(PreconditionFailed):
        await storage.put("m/doc", b"stale", if_match=etag)
    assert (await storage.get("m/doc")).data == b"v2"
    assert (await storage.get("m/doc")).etag == newer
    with pytest.raises(PreconditionFailed):
        await storage.put("m/absent", b"x", if_match=etag)
    assert await storage.head("m/absent") is None


@pytest.fixture(params=["local", *ATOMIC_S3_BACKENDS])
async def atomic_storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    """Backends whose conditional writes are atomic under concurrency.

    moto checks If-None-Match / If-Match and then writes without a lock, so two threads of its
    server can both pass the check: it enforces conditions one request at a time only.
    """
    async with storage_backend(request.param, request, tmp_path / "root") as backend:
        yield backend


async def test_concurrent_create_has_one_winner(atomic_storage: Storage) -> None:
    storage = atomic_storage

    async def create(i: int) -> bool:
        try:
            await storage.put("race/one.json", str(i).encode(), if_none_match=True)
        except PreconditionFailed:
            return False
        return True

    wins = await asyncio.gather(*(create(i) for i in range(5)))
    assert sum(wins) == 1
    winner = wins.index(True)
    assert (await storage.get("race/one.json")).data == str(winner).encode()


async def test_presigned_url_is_fetchable(storage: Storage) -> None:
    await storage.put("share/image.png", b"\x89PNG fake")
    url = await storage.presign_get("share/image.png", 300)

    def fetch() -> bytes:
        with urllib.request.urlopen(url, timeout=10) as response:
            return bytes(response.read())

    assert await asyncio.to_thread(fetch) == b"\x89PNG fake"


BAD_KEYS = [
    "",
    "/abs/key",
    "../escape",
    "a/../b",
    "a/./b",
    "a//b",
    "trailing/",
    "back\\slash",
    "s3://bucket/key",
    "https://example.com/x",
    "ctrl\x00char",
    "new\nline",
    "x" * 1025,
]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_validate_key_refuses(key: str) -> None:
    with pytest.raises(StorageError, match="invalid storage key"):
        validate_key(key)


def test_validate_key_accepts_ordinary_keys() -> None:
    for key in ["a", "input/job-1.json", "out/2024/x y.png", "ünïcode/ключ.json", "..dots.."]:
        assert validate_key(key) == key
    assert folder_prefix("input") == folder_prefix("input/") == "input/"
    assert folder_prefix("") == folder_prefix("/") == ""
    with pytest.raises(StorageError, match="invalid storage prefix"):
        folder_prefix("../up")


async def test_backends_refuse_bad_keys_before_io(storage: Storage) -> None:
    with pytest.raises(StorageError, match="invalid storage key"):
        await storage.put("../escape", b"x")
    with pytest.raises(StorageError, match="invalid storage key"):
        await storage.get("/etc/passwd")
    with pytest.raises(StorageError, match="invalid storage prefix"):
        await storage.list("a//b")


# -- S3 specifics -------------------------------------------------------------------------


@pytest.mark.parametrize("client", S3_CLIENTS)
async def test_unreachable_endpoint_is_a_readable_storage_error(client: str) -> None:
    settings = S3Settings(
        region="us-east-1",
        access_key=SecretStr("AKIDEXAMPLE"),
        secret_key=SecretStr("very-secret-value"),
        bucket_name="nowhere",
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        retry_attempts=1,
    )
    async with s3_client(settings, client, connect_timeout=1, read_timeout=1) as storage:
        with pytest.raises(StorageError) as caught:
            await storage.get("input/a.json")
    message = str(caught.value)
    assert not isinstance(caught.value, ObjectNotFound)
    assert "s3://nowhere/input/a.json" in message
    assert "get" in message
    assert "very-secret-value" not in message
    # An outage that may pass, which a starting worker waits out, said in a few words.
    assert isinstance(caught.value, StorageUnreachable)
    assert caught.value.details == {
        "service": "S3",
        "endpoint": settings.endpoint_url,
        "reason": "connection refused",
    }


@pytest.mark.parametrize("client", S3_CLIENTS)
async def test_wrong_secret_is_refused_without_leaking_it(seaweedfs: S3Server, client: str) -> None:
    settings = s3_settings_for(seaweedfs, secret_key="wrong-secret-value", retry_attempts=1)
    async with s3_client(settings, client) as storage:
        with pytest.raises(StorageError) as caught:
            await storage.put("a.json", b"{}")
    message = str(caught.value)
    assert "COMFYS3_S3_SECRET_KEY" in message
    assert "wrong-secret-value" not in message
    assert settings.bucket_name in message
    assert not isinstance(caught.value, StorageUnreachable)  # waiting would not mend it


@pytest.mark.parametrize("client", S3_CLIENTS)
async def test_missing_bucket_is_not_a_missing_key(moto_server: S3Server, client: str) -> None:
    settings = s3_settings_for(moto_server, bucket_name="no-such-bucket-here")
    async with s3_client(settings, client) as storage:
        with pytest.raises(StorageError, match="bucket does not exist") as caught:
            await storage.get("a.json")
    assert not isinstance(caught.value, ObjectNotFound)
    assert not isinstance(caught.value, StorageUnreachable)


def client_error(status: int, code: str) -> Exception:
    from botocore.exceptions import ClientError

    response = {
        "Error": {"Code": code, "Message": "..."},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return ClientError(response, "PutObject")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("status", "code", "reason"),
    [
        (503, "SlowDown", "HTTP 503 SlowDown"),
        (500, "InternalError", "HTTP 500 InternalError"),
        (502, "", "HTTP 502"),
        (400, "RequestTimeout", "HTTP 400 RequestTimeout"),
        (403, "AccessDenied", None),
        (403, "SignatureDoesNotMatch", None),
        (404, "NoSuchBucket", None),
        (412, "PreconditionFailed", None),
        (501, "NotImplemented", None),
    ],
)
def test_answers_that_may_pass_are_told_from_refusals(
    status: int, code: str, reason: str | None
) -> None:
    """botocore's own standard-mode judgement: 5xx and throttling pass, refusals do not."""
    assert storage_s3.passing_reason(client_error(status, code)) == reason


def test_connection_failures_may_pass_but_certificates_do_not() -> None:
    from botocore.exceptions import (
        ConnectTimeoutError,
        EndpointConnectionError,
        ParamValidationError,
        ReadTimeoutError,
    )
    from botocore.exceptions import SSLError as BotoSSLError

    url = "http://s3.example:9000/b"
    refused = EndpointConnectionError(endpoint_url=url, error=ConnectionRefusedError(111, "no"))
    assert storage_s3.passing_reason(refused) == "connection refused"
    assert storage_s3.passing_reason(ConnectTimeoutError(endpoint_url=url)) == (
        "no connection within the connect timeout"
    )
    assert storage_s3.passing_reason(ReadTimeoutError(endpoint_url=url)) == (
        "no answer within the read timeout"
    )
    assert storage_s3.passing_reason(BotoSSLError(endpoint_url=url, error="bad cert")) is None
    assert storage_s3.passing_reason(ParamValidationError(report="x")) is None
    assert storage_s3.passing_reason(ValueError("not a transport error")) is None


async def test_a_host_that_does_not_resolve_may_pass() -> None:
    settings = S3Settings(
        region="us-east-1",
        access_key=SecretStr("a"),
        secret_key=SecretStr("b"),
        bucket_name="nowhere",
        endpoint_url="http://no-such-host.invalid:9000",
        retry_attempts=1,
    )
    async with S3Storage(settings, connect_timeout=1, read_timeout=1).single_try() as storage:
        with pytest.raises(StorageUnreachable) as caught:
            await storage.list_page("input", limit=1)
    assert caught.value.details["reason"] == "host name not found"


async def test_a_single_try_storage_works_and_closes_only_its_own_client(
    moto_s3_settings: S3Settings,
) -> None:
    async with S3Storage(moto_s3_settings) as storage:
        async with storage.single_try() as once:
            assert once._config.retries == {"mode": "standard", "total_max_attempts": 1}
            await once.put("a.json", b"{}")
            assert once.clock_offset() is not None
        # Its answers' dates count for the storage it came from; that one is still open.
        assert storage.clock_offset() is not None
        assert (await storage.get("a.json")).data == b"{}"
    # The storage itself keeps botocore's retries (max_attempts counts retries, the total
    # is one more).
    assert storage._config.retries["total_max_attempts"] == moto_s3_settings.retry_attempts + 1


@pytest.mark.parametrize("client", S3_CLIENTS)
async def test_s3_storage_must_be_opened(moto_s3_settings: S3Settings, client: str) -> None:
    storage = s3_client(moto_s3_settings, client)
    assert storage.bucket == moto_s3_settings.bucket_name
    with pytest.raises(StorageError, match="not open"):
        await storage.get("a.json")


async def test_put_retries_conditional_conflicts(
    moto_s3_settings: S3Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """409 ConditionalRequestConflict is retried; a 409 that persists means we lost."""
    from botocore.exceptions import ClientError

    monkeypatch.setattr(storage_s3, "CONFLICT_BACKOFF", 0.001)
    async with S3Storage(moto_s3_settings) as storage:
        client = storage._s3
        real_put = client.put_object
        calls = {"n": 0}

        def conflict() -> ClientError:
            response = {
                "Error": {"Code": "ConditionalRequestConflict", "Message": "busy"},
                "ResponseMetadata": {"HTTPStatusCode": 409},
            }
            return ClientError(response, "PutObject")

        async def flaky_put(**params: object) -> object:
            calls["n"] += 1
            if calls["n"] <= 2:
                raise conflict()
            return await real_put(**params)

        monkeypatch.setattr(client, "put_object", flaky_put)
        await storage.put("r/claim.json", b"x", if_none_match=True)
        assert calls["n"] == 3
        assert (await storage.get("r/claim.json")).data == b"x"

        async def always_conflict(**params: object) -> object:
            raise conflict()

        monkeypatch.setattr(client, "put_object", always_conflict)
        with pytest.raises(PreconditionFailed, match=r"r/claim\.json"):
            await storage.put("r/claim.json", b"y", if_none_match=True)


# -- local specifics ----------------------------------------------------------------------


async def test_local_private_folder_is_hidden_and_reserved(local_storage: LocalStorage) -> None:
    await local_storage.put("a.txt", b"x", if_none_match=True)
    assert (local_storage.root / ".comfys3").is_dir()
    assert [o.key for o in await local_storage.list("", recursive=True)] == ["a.txt"]
    with pytest.raises(StorageError, match="reserved"):
        await local_storage.put(".comfys3/lock", b"x")
    assert (await local_storage.presign_get("a.txt", 60)).startswith("file:///")


def test_local_if_match_holds_across_processes(tmp_path: Path) -> None:
    """Read-modify-write with If-Match from several processes loses no increment."""
    script = textwrap.dedent(
        """
        import asyncio, sys
        from pathlib import Path
        from processor.errors import PreconditionFailed
        from processor.storage.local import LocalStorage

        async def main() -> None:
            storage = LocalStorage(Path(sys.argv[1]))
            done = 0
            while done < 25:
                current = await storage.get("counter")
                try:
                    await storage.put(
                        "counter", str(int(current.data) + 1).encode(), if_match=current.etag
                    )
                except PreconditionFailed:
                    continue
                done += 1

        asyncio.run(main())
        """
    )
    root = tmp_path / "shared"
    asyncio.run(LocalStorage(root).put("counter", b"0"))
    workers = [
        subprocess.Popen([sys.executable, "-c", script, str(root)], cwd=REPO) for _ in range(4)
    ]
    assert [w.wait(timeout=120) for w in workers] == [0, 0, 0, 0]
    assert (root / "counter").read_bytes() == b"100"


async def test_local_create_without_hard_links(
    local_storage: LocalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(src: object, dst: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr("processor.storage.local.os.link", no_links)
    await local_storage.put("claims/x.json", b"first", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        await local_storage.put("claims/x.json", b"second", if_none_match=True)
    assert (await local_storage.get("claims/x.json")).data == b"first"


@pytest.mark.parametrize("client", S3_CLIENTS)
async def test_s3_storage_closes_once_and_reopens(
    moto_s3_settings: S3Settings, client: str
) -> None:
    storage = s3_client(moto_s3_settings, client)
    async with storage:
        await storage.put("a", b"1")
    await storage.aclose()
    with pytest.raises(StorageError, match="not open"):
        await storage.get("a")
    async with storage:
        assert (await storage.get("a")).data == b"1"


@settings(max_examples=100, derandomize=True, deadline=None)
@given(
    moment=st.datetimes(
        min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
    ),
    shape=st.sampled_from(["iso-ms", "iso", "http", "other"]),
)
def test_the_fast_timestamp_reader_agrees_with_botocore(moment: datetime, shape: str) -> None:
    """S3's timestamps are read without dateutil, to the same value botocore would give."""
    import botocore.utils

    moment = moment.replace(microsecond=moment.microsecond // 1000 * 1000)
    text = {
        "iso-ms": moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
        "iso": moment.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "http": moment.strftime("%a, %d %b %Y %H:%M:%S GMT"),
        "other": moment.isoformat(),
    }[shape]
    assert storage_s3._parse_timestamp(text) == botocore.utils.parse_timestamp(text)
    assert storage_s3._parse_timestamp(text).utcoffset() == timedelta(0)
