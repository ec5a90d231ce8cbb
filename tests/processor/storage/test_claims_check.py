"""The start-up check that storage honours the conditional writes claims rely on: real
servers pass it, and a server that silently ignores the conditions stops the worker before
it claims anything (or starts ComfyUI)."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any, cast

import pytest

from processor.errors import ConditionalWritesIgnored
from processor.storage.base import Storage
from processor.storage.claims_check import check_conditional_writes
from processor.storage.local import LocalStorage
from processor.worker.assembly import local_layout, open_worker
from tests.processor.worker.test_loop import worker_settings
from tests.s3_servers import S3_BACKENDS, free_port, storage_backend


class IgnoresConditions:
    """A storage that drops the conditions it is asked for, as some S3-compatible servers do."""

    def __init__(self, inner: Storage, *, if_none_match: bool, if_match: bool) -> None:
        self.inner = inner
        self.drop_if_none_match = if_none_match
        self.drop_if_match = if_match

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return "IgnoresConditions()"

    async def __aenter__(self) -> IgnoresConditions:
        await self.inner.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.inner.__aexit__(exc_type, exc, tb)

    async def put(self, key: str, data: bytes, **options: Any) -> str:
        if self.drop_if_none_match:
            options.pop("if_none_match", None)
        if self.drop_if_match:
            options.pop("if_match", None)
        return await self.inner.put(key, data, **options)


@pytest.mark.parametrize("backend", ["local", *S3_BACKENDS])
async def test_real_storage_passes_and_leaves_nothing_behind(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    async with storage_backend(backend, request, tmp_path / "root") as storage:
        await check_conditional_writes(storage, "input/_claims", "host\\pid 7")
        assert await storage.list("input/_claims", recursive=True) == []
    if backend == "local":  # not even an empty folder for a user to wonder about
        assert [p.name for p in (tmp_path / "root" / "input" / "_claims").iterdir()] == []


@pytest.mark.parametrize(
    ("drop_none_match", "drop_match", "named", "not_named"),
    [
        (True, True, ["(If-None-Match: *) succeeded", "(If-Match) succeeded"], []),
        (False, True, ["(If-Match) succeeded"], ["(If-None-Match: *) succeeded"]),
        (True, False, ["(If-None-Match: *) succeeded"], ["(If-Match) succeeded"]),
    ],
)
async def test_storage_that_ignores_a_condition_is_refused_by_name(
    tmp_path: Path, drop_none_match: bool, drop_match: bool, named: list[str], not_named: list[str]
) -> None:
    async with LocalStorage(tmp_path) as local:
        careless = IgnoresConditions(local, if_none_match=drop_none_match, if_match=drop_match)
        with pytest.raises(ConditionalWritesIgnored) as caught:
            await check_conditional_writes(cast(Storage, careless), "input/_claims", "w1")
        assert await local.list("input/_claims", recursive=True) == []
    message = str(caught.value)
    assert all(part in message for part in named), message
    assert not any(part in message for part in not_named), message
    assert "two workers could run the same job" in message
    assert "COMFYS3_CHECK_CONDITIONAL_WRITES=false" in message


async def test_worker_stops_before_starting_comfyui_on_such_storage(
    tmp_path: Path, fake_comfyui: Any
) -> None:
    # A ComfyUI that is not there: were it contacted first, this would be ComfyUnavailable.
    dead = worker_settings(
        fake_comfyui, comfyui_url=f"http://127.0.0.1:{free_port()}", comfyui_startup_timeout=1
    )
    careless = IgnoresConditions(LocalStorage(tmp_path), if_none_match=True, if_match=True)
    with pytest.raises(ConditionalWritesIgnored):
        async with open_worker(
            storage=cast(Storage, careless), layout=local_layout(), settings=dead
        ):
            pass

    # One worker alone on a bucket may turn the check off, and it runs jobs as usual.
    (tmp_path / "input").mkdir(exist_ok=True)  # the check above made input/_claims/
    (tmp_path / "input" / "solo.json").write_text('{"workflow": "solid"}')
    alone = worker_settings(fake_comfyui, check_conditional_writes=False)
    careless = IgnoresConditions(LocalStorage(tmp_path), if_none_match=True, if_match=True)
    async with open_worker(
        storage=cast(Storage, careless), layout=local_layout(), settings=alone
    ) as worker:
        counts = await worker.run()
    assert counts.succeeded == 1
