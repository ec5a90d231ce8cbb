"""The model cache: one download per file (within a worker and across workers on one volume),
checked before it is visible, least recently used evicted, files in use kept, and Hugging Face
fetched through the same guard (against a local stand-in)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from processor.errors import ModelDownloadFailed, ModelInvalid
from processor.job.retry_table import policy_for
from processor.models import cache as cache_module
from processor.models.cache import ModelCache
from processor.models.paths_config import paths_yaml
from processor.models.spec import ModelSpec
from processor.ops.fetch_guard import Fetcher, FetchPolicy, UrlRules
from tests.file_server import FileServer, file_server, lookup_to_loopback

OPEN = FetchPolicy(rules=UrlRules(allow_http=True, allow_private=True), timeout=2.0)


@pytest.fixture
def server() -> Iterator[FileServer]:
    with file_server() as running:
        yield running


@pytest.fixture
async def fetcher() -> AsyncIterator[Fetcher]:
    async with Fetcher(OPEN, lookup=lookup_to_loopback("hub.test", "cdn.test")) as running:
        yield running


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def spec(url: str, **extra: Any) -> ModelSpec:
    return ModelSpec.model_validate({"url": url, "folder": "checkpoints", **extra})


def leftovers(root: Path) -> list[str]:
    """Anything half-done: partial downloads and locks."""
    state = root / ".comfys3"
    return [p.name for p in (*state.glob("tmp/*"), *state.glob("locks/*/*"))]


async def test_fetched_once_then_cached(
    tmp_path: Path, server: FileServer, fetcher: Fetcher
) -> None:
    data = os.urandom(300_000)
    url = server.add("my-model.safetensors", data)
    cache = ModelCache(tmp_path, max_bytes=10**9, fetcher=fetcher)

    first = await cache.ensure(spec(url, sha256=sha(data)))
    second = await cache.ensure(spec(url))

    assert (first.state, first.bytes, first.sha256) == ("fetched", len(data), sha(data))
    assert (second.state, second.sha256) == ("cached", sha(data))
    assert first.source == url and first.name == "my-model.safetensors"
    assert (tmp_path / "checkpoints" / "my-model.safetensors").read_bytes() == data
    assert server.requests["my-model.safetensors"] == 1
    assert cache.has("my-model.safetensors") and not leftovers(tmp_path)


async def test_a_wrong_sha256_fails_leaves_nothing_and_is_not_retried(
    tmp_path: Path, server: FileServer, fetcher: Fetcher
) -> None:
    url = server.add("m.safetensors", b"real bytes")
    cache = ModelCache(tmp_path, max_bytes=10**9, fetcher=fetcher)

    with pytest.raises(ModelInvalid, match="sha256") as failure:
        await cache.ensure(spec(url, sha256="0" * 64))

    assert failure.value.details == {
        "expected_sha256": "0" * 64,
        "sha256": sha(b"real bytes"),
        "bytes": 10,
    }
    assert not policy_for(failure.value).retry
    assert not (tmp_path / "checkpoints" / "m.safetensors").exists()
    assert not leftovers(tmp_path) and not cache.entries()


async def test_download_errors_name_the_model_and_say_whether_to_retry(
    tmp_path: Path, server: FileServer, fetcher: Fetcher
) -> None:
    cache = ModelCache(tmp_path, max_bytes=1000, fetcher=fetcher)
    server.add("big.safetensors", b"z" * 2000)
    cases = [
        (f"{server.url}/status/503", ModelDownloadFailed, "HTTP 503", True),
        (f"{server.url}/files/gone.safetensors", ModelInvalid, "HTTP 404", False),
        (f"{server.url}/files/big.safetensors", ModelInvalid, "COMFYS3_MODEL_CACHE_MAX_GB", False),
        (f"{server.url}/files/big.safetensors?stall=5", ModelInvalid, "limit", False),
    ]
    for url, kind, words, retried in cases:
        with pytest.raises(kind, match=words) as failure:
            await cache.ensure(spec(url, name="x.safetensors"))
        assert "checkpoints/x.safetensors" in str(failure.value)
        assert policy_for(failure.value).retry is retried
    assert not leftovers(tmp_path) and not list((tmp_path / "checkpoints").iterdir())


async def test_a_download_that_stalls_fails_and_leaves_no_partial_file(
    tmp_path: Path, server: FileServer, fetcher: Fetcher
) -> None:
    url = server.add("slow.safetensors", b"s" * 100_000) + "?stall=4"
    cache = ModelCache(tmp_path, max_bytes=10**9, fetcher=fetcher)
    with pytest.raises(ModelDownloadFailed, match="stalled for 2 s"):
        await cache.ensure(spec(url, name="slow.safetensors"))
    assert not leftovers(tmp_path) and not cache.has("slow.safetensors")


async def test_many_jobs_wanting_one_model_share_one_download(
    tmp_path: Path, server: FileServer, fetcher: Fetcher
) -> None:
    data = os.urandom(2_000_000)
    url = server.add("shared.safetensors", data) + "?stall=0.5"
    cache = ModelCache(tmp_path, max_bytes=10**9, fetcher=fetcher)
    fetching: list[int] = []

    records = await asyncio.gather(
        *(
            cache.ensure_all(
                [spec(url, name="shared.safetensors")], on_fetch=lambda: fetching.append(1)
            )
            for _ in range(8)
        )
    )

    assert server.requests["shared.safetensors"] == 1
    assert {r[0].sha256 for r in records} == {sha(data)}
    assert len(fetching) == 8  # every job heard it had to wait for a download


async def test_two_workers_on_one_volume_download_once(tmp_path: Path, server: FileServer) -> None:
    """Two caches (two workers' processes) on one folder: the lock file makes one of them
    download and the other find the file."""
    data = os.urandom(1_000_000)
    url = server.add("vol.safetensors", data) + "?stall=0.5"
    async with (
        Fetcher(OPEN) as one,
        Fetcher(OPEN) as two,
    ):
        caches = [ModelCache(tmp_path, max_bytes=10**9, fetcher=f) for f in (one, two)]
        records = await asyncio.gather(
            *(c.ensure(spec(url, name="vol.safetensors")) for c in caches)
        )
    assert sorted(r.state for r in records) == ["cached", "fetched"]
    assert server.requests["vol.safetensors"] == 1
    assert not leftovers(tmp_path)


async def test_a_lock_nobody_touches_is_taken_over(
    tmp_path: Path, server: FileServer, fetcher: Fetcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cache_module, "LOCK_STALE", 0.5)
    monkeypatch.setattr(cache_module, "LOCK_POLL", 0.05)
    url = server.add("orphan.safetensors", b"o" * 10)
    cache = ModelCache(tmp_path, max_bytes=10**9, fetcher=fetcher)
    lock = tmp_path / ".comfys3" / "locks" / "checkpoints" / "orphan.safetensors.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("a worker that died")

    record = await asyncio.wait_for(cache.ensure(spec(url)), 10)

    assert record.state == "fetched" and not lock.exists()


async def test_least_recently_used_models_are_evicted_but_never_one_in_use(
    tmp_path: Path, server: FileServer, fetcher: Fetcher
) -> None:
    clock = [1000.0]
    cache = ModelCache(
        tmp_path, max_bytes=250, fetcher=fetcher, recent_guard=10, clock=lambda: clock[0]
    )
    specs = {name: spec(server.add(f"{name}.safetensors", bytes(100))) for name in "abcd"}
    (tmp_path / "checkpoints" / "by-hand.safetensors").write_bytes(bytes(500))

    async def use(name: str) -> None:
        clock[0] += 100
        await cache.ensure(specs[name])

    await use("a")
    await use("b")
    await use("a")  # b is now the least recently used
    with cache.pinned([specs["b"]]):
        await use("c")  # over the limit: b is in use, so a goes although used more recently
    names = sorted(e.name for e in cache.entries())
    assert names == ["b.safetensors", "c.safetensors"]
    await use("d")  # b is free again and the oldest
    assert sorted(e.name for e in cache.entries()) == ["c.safetensors", "d.safetensors"]
    assert (tmp_path / "checkpoints" / "by-hand.safetensors").exists()  # never evicted
    # A model used within recent_guard (by any worker of the volume) is kept, over the limit
    # if need be: a job elsewhere may be loading it.
    cache.recent_guard = 1000
    await use("a")
    assert len(cache.entries()) == 3


async def test_last_use_is_kept_by_the_cache_not_the_file_system(
    tmp_path: Path, server: FileServer, fetcher: Fetcher
) -> None:
    clock = [50.0]
    cache = ModelCache(tmp_path, max_bytes=10**9, fetcher=fetcher, clock=lambda: clock[0])
    model = spec(server.add("t.safetensors", b"t"))
    await cache.ensure(model)
    clock[0] = 75.0
    await cache.ensure(model)
    meta = json.loads((tmp_path / ".comfys3/meta/checkpoints/t.safetensors.json").read_text())
    assert (meta["fetched_at"], meta["used_at"]) == (50.0, 75.0)


async def test_a_cached_file_with_another_hash_is_refused(
    tmp_path: Path, server: FileServer, fetcher: Fetcher
) -> None:
    url = server.add("same-name.safetensors", b"first")
    cache = ModelCache(tmp_path, max_bytes=10**9, fetcher=fetcher)
    await cache.ensure(spec(url))  # fetched without a hash: hashed when one is asked for
    assert (await cache.ensure(spec(url, sha256=sha(b"first")))).sha256 == sha(b"first")
    with pytest.raises(ModelInvalid, match="give this one another name"):
        await cache.ensure(spec(url, sha256=sha(b"second")))


async def test_hugging_face_through_its_resolve_url_with_the_token_kept_home(
    tmp_path: Path, server: FileServer, fetcher: Fetcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An HF stand-in: HF_ENDPOINT points huggingface_hub's URL at the local server, whose
    resolve route checks the token (HF_TOKEN) and redirects to a CDN host; the token goes to
    the hub only."""
    port = server.url.rsplit(":", 1)[1]
    server.cdn_url = f"http://cdn.test:{port}"
    server.hf_token = "hf_test_token"
    data = os.urandom(50_000)
    server.add("v1-5.safetensors", data)
    monkeypatch.setenv("HF_ENDPOINT", f"http://hub.test:{port}")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    cache = ModelCache(tmp_path, max_bytes=10**9, fetcher=fetcher)
    model = ModelSpec(
        hf="Comfy-Org/sd15/fp16/v1-5.safetensors", folder="checkpoints", sha256=sha(data)
    )

    record = await cache.ensure(model)

    assert (record.state, record.source) == ("fetched", "hf:Comfy-Org/sd15/fp16/v1-5.safetensors")
    assert (tmp_path / "checkpoints" / "v1-5.safetensors").read_bytes() == data
    assert server.auth_seen == [
        ("/Comfy-Org/sd15/resolve/main/fp16/v1-5.safetensors", "Bearer hf_test_token"),
        ("/files/v1-5.safetensors", None),
    ]
    monkeypatch.setenv("HF_TOKEN", "wrong")
    with pytest.raises(ModelInvalid, match="HTTP 401"):
        await cache.ensure(ModelSpec(hf="Comfy-Org/sd15/other.safetensors", folder="loras"))


def test_the_extra_model_paths_config_is_yaml_comfyui_reads(tmp_path: Path) -> None:
    import yaml

    document = yaml.safe_load(paths_yaml(tmp_path))
    section = document["comfys3_model_cache"]
    assert section["base_path"] == str(tmp_path.resolve()) and section["is_default"] is True
    assert section["checkpoints"] == "checkpoints/" and section["loras"] == "loras/"
