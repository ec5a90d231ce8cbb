"""The obstore backend's own edges: what it reads from object_store's error text, what it keeps
on aiobotocore (the clock, badly named keys), how it is chosen, and what it never sends.

The Storage contract itself runs on it in test_backends.py, test_claims.py and
test_claims_check.py (the ``*-obstore`` backends), against moto and SeaweedFS.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from pydantic import SecretStr, ValidationError

from processor.errors import (
    PreconditionFailed,
    SettingsError,
    StorageError,
    StorageUnreachable,
)
from processor.settings import S3Settings
from processor.storage import s3 as storage_s3
from processor.storage.obstore_s3 import ObstoreStorage, _store_endpoint
from processor.storage.s3 import S3Storage
from processor.storage.s3_clients import s3_storage
from tests.s3_servers import S3Server, s3_settings_for


def settings_for(endpoint: str, **overrides: object) -> S3Settings:
    values: dict[str, object] = {
        "region": "us-east-1",
        "access_key": SecretStr("scripted-access"),
        "secret_key": SecretStr("scripted-secret-value"),
        "bucket_name": "scripted",
        "endpoint_url": endpoint,
        "retry_attempts": 1,
        "client": "obstore",
    }
    values.update(overrides)
    return S3Settings(**values)  # type: ignore[arg-type]


@dataclass
class ScriptedS3:
    """An S3 endpoint that answers each request with the next scripted (status, S3 code), and
    200 with an ETag once the script runs out: how a 409 from AWS looks to object_store."""

    url: str
    script: list[tuple[int, str]]
    requests: list[str] = field(default_factory=list)


@contextlib.asynccontextmanager
async def scripted_s3(script: list[tuple[int, str]]) -> AsyncIterator[ScriptedS3]:
    server = ScriptedS3("", list(script))

    async def answer(request: web.Request) -> web.Response:
        server.requests.append(f"{request.method} {request.path}")
        if not server.script:
            return web.Response(status=200, headers={"ETag": '"scripted-etag"'})
        status, code = server.script.pop(0)
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>'
            f"<Error><Code>{code}</Code><Message>scripted answer</Message></Error>"
        )
        return web.Response(status=status, text=body, content_type="application/xml")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    server.url = f"http://127.0.0.1:{port}"
    try:
        yield server
    finally:
        await runner.cleanup()


async def test_a_busy_conditional_write_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    """AWS answers 409 ConditionalRequestConflict while another conditional write is in
    flight: retried, as on aiobotocore; object_store gives the status only in its text."""
    monkeypatch.setattr(storage_s3, "CONFLICT_BACKOFF", 0.001)  # the one rule both clients use
    busy = (409, "ConditionalRequestConflict")
    async with scripted_s3([busy, busy]) as server:
        async with ObstoreStorage(settings_for(server.url)) as storage:
            etag = await storage.put("r/claim.json", b"x", if_none_match=True)
        assert etag == '"scripted-etag"'
        assert server.requests == ["PUT /scripted/r/claim.json"] * 3


async def test_a_conflict_that_persists_or_means_exists_loses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(storage_s3, "CONFLICT_BACKOFF", 0.001)
    attempts = storage_s3.CONFLICT_RETRIES + 1
    async with scripted_s3([(409, "ConditionalRequestConflict")] * attempts) as server:
        async with ObstoreStorage(settings_for(server.url)) as storage:
            with pytest.raises(PreconditionFailed, match=r"r/claim\.json"):
                await storage.put("r/claim.json", b"y", if_none_match=True)
        assert len(server.requests) == attempts
    async with scripted_s3([(409, "OperationAborted")]) as server:  # another server's "exists"
        async with ObstoreStorage(settings_for(server.url)) as storage:
            with pytest.raises(PreconditionFailed, match="OperationAborted"):
                await storage.put("r/claim.json", b"y", if_none_match=True)
        assert len(server.requests) == 1


async def test_a_stray_session_token_is_not_sent(
    seaweedfs: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """object_store reads AWS_* variables for what it is not given; botocore, given keys, does
    not. A session token left in the environment must not join comfys3's own keys."""
    monkeypatch.setenv("AWS_SESSION_TOKEN", "stray-token")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "stray-secret")
    settings = s3_settings_for(seaweedfs, client="obstore")
    async with ObstoreStorage(settings) as storage:
        await storage.put("t/a.json", b"signed with the settings' keys")
        assert (await storage.get("t/a.json")).data == b"signed with the settings' keys"
        assert settings.secret_key.get_secret_value() not in repr(storage._s3.config)


async def test_the_clock_comes_from_listings(seaweedfs: S3Server) -> None:
    """object_store shows no Date header: the store's clock is learnt from the listings (on
    aiobotocore), and a read's ``served_at`` is that clock, once known."""
    async with ObstoreStorage(s3_settings_for(seaweedfs, client="obstore")) as storage:
        await storage.put("c/a.json", b"{}")
        assert storage.clock_offset() is None
        assert (await storage.get("c/a.json")).served_at is None
        await storage.list_page("c")
        offset = storage.clock_offset()
        assert offset is not None
        served = (await storage.get("c/a.json")).served_at
        assert served is not None
        assert abs(served.timestamp() - (time.time() + offset)) < 5


async def test_a_badly_named_manifest_still_moves(moto_s3_settings: S3Settings) -> None:
    """object_store refuses keys with control characters; the lenient move that takes such a
    manifest out of the intake goes through aiobotocore."""
    settings = moto_s3_settings.model_copy(update={"client": "obstore"})
    async with S3Storage(settings) as botocore, ObstoreStorage(settings) as storage:
        await botocore._call("put", "x", "put_object", Key="input/bad\x01name.json", Body=b"{}")
        await storage.move("input/bad\x01name.json", "input/_failed/bad_name.json", lenient=True)
        assert (await storage.get("input/_failed/bad_name.json")).data == b"{}"
        assert [o.key for o in await storage.list("input")] == []


async def test_another_bucket_shares_the_clients(seaweedfs: S3Server) -> None:
    """An ``s3://other-bucket/key`` input: read through the same endpoint and keys; closing the
    other bucket's view closes nothing of this one."""
    mine = s3_settings_for(seaweedfs, client="obstore")
    theirs = s3_settings_for(seaweedfs)
    seaweedfs.client().put_object(Bucket=theirs.bucket_name, Key="in/x.png", Body=b"png")
    async with ObstoreStorage(mine) as storage:
        other = storage.in_bucket(theirs.bucket_name)
        assert storage.in_bucket(mine.bucket_name) is storage
        assert (await other.get("in/x.png")).data == b"png"
        assert other.location("in/x.png") == f"s3://{theirs.bucket_name}/in/x.png"
        await other.aclose()
        await storage.put("still/open", b"1")
        assert [o.key for o in await storage.list("still")] == ["still/open"]


def test_virtual_hosted_endpoints_name_the_bucket() -> None:
    virtual = settings_for("https://s3.example.com", addressing_style="virtual")
    assert _store_endpoint(virtual, "pics") == "https://pics.s3.example.com"
    path = settings_for("https://s3.example.com:9000", addressing_style="path")
    assert _store_endpoint(path, "pics") == "https://s3.example.com:9000"


def test_obstore_refuses_botocores_auto_addressing() -> None:
    with pytest.raises(ValidationError, match="COMFYS3_S3_ADDRESSING_STYLE=path or virtual"):
        settings_for("https://s3.example.com", addressing_style="auto")
    assert settings_for("https://s3.example.com", client="botocore", addressing_style="auto")


def test_the_setting_picks_the_client(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_for("https://s3.example.com")
    assert isinstance(s3_storage(settings), ObstoreStorage)
    assert isinstance(s3_storage(settings.model_copy(update={"client": "botocore"})), S3Storage)
    monkeypatch.setitem(sys.modules, "obstore", None)  # as if the extra were not installed
    monkeypatch.delitem(sys.modules, "processor.storage.obstore_s3")
    with pytest.raises(SettingsError, match=r"pip install 'comfys3\[obstore\]'"):
        s3_storage(settings)


def test_botocore_is_the_default() -> None:
    plain = dict(settings_for("https://s3.example.com").model_dump())
    plain.pop("client")
    assert S3Settings(**plain).client == "botocore"
    assert S3Settings(**{**plain, "addressing_style": "auto"}).client == "botocore"


async def failed_get(script: list[tuple[int, str]]) -> StorageError:
    async with scripted_s3(script) as server, ObstoreStorage(settings_for(server.url)) as storage:
        try:
            await storage.get("k.json")
        except StorageError as error:
            return error
    raise AssertionError("the get did not fail")


async def test_an_outage_is_told_from_a_refusal() -> None:
    """A worker waits out S3 that does not answer at start (issue 24, item 4) on either
    client: obstore's "no answer" and 5xx are StorageUnreachable, a 403 is not."""
    with socket.socket() as holder:  # a port nobody listens on
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
    async with ObstoreStorage(settings_for(f"http://127.0.0.1:{port}")) as storage:
        with pytest.raises(StorageUnreachable) as down:
            await storage.put("k.json", b"1", if_none_match=True)
    assert down.value.details["reason"] == "connection refused"
    assert down.value.details["endpoint"] == f"http://127.0.0.1:{port}"
    busy = await failed_get([(503, "SlowDown")] * 20)
    assert isinstance(busy, StorageUnreachable)
    refused = await failed_get([(403, "AccessDenied")])
    assert isinstance(refused, StorageError)
    assert not isinstance(refused, StorageUnreachable)
