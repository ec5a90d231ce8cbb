"""Waiting for storage at start: back-off that grows to a cap, only outages are waited out, and
a stop (SIGTERM) ends the wait at once, even in the middle of a try."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest

from processor.errors import StoppedWhileStarting, StorageError, StorageUnreachable
from processor.storage.local import LocalStorage
from processor.storage.obstore_s3 import ObstoreStorage
from processor.storage.reachable import Backoff, describe_wait, until_reachable
from processor.storage.s3 import S3Storage
from processor.worker.assembly import local_layout, open_worker
from tests.processor.worker.test_loop import worker_settings
from tests.s3_servers import s3_settings_for


def outage(reason: str = "connection refused") -> StorageUnreachable:
    return StorageUnreachable(
        "S3 put of s3://b/k failed: Could not connect",
        {"service": "S3", "endpoint": "http://s3.example:9000", "reason": reason},
    )


def test_pauses_double_from_one_second_up_to_the_cap_with_jitter() -> None:
    backoff = Backoff(rng=random.Random(7))
    ceilings = [1, 2, 4, 8, 16, 30, 30, 30]
    for failures, ceiling in enumerate(ceilings, start=1):
        pauses = [backoff.pause(failures) for _ in range(50)]
        assert all(ceiling / 2 <= p <= ceiling for p in pauses), (failures, pauses)
        assert len(set(pauses)) > 1  # jittered: workers started together spread out
    assert backoff.pause(10_000) <= 30  # no overflow however long the outage


def test_the_log_line_says_where_why_and_when() -> None:
    line = describe_wait(outage("host name not found"), 3.25)
    assert line == (
        "S3 at http://s3.example:9000 not reachable (host name not found); trying again in 3.2 s"
    )


async def test_an_outage_is_waited_out_and_each_try_is_told() -> None:
    told: list[tuple[str, float]] = []
    tries = 0

    async def attempt() -> str:
        nonlocal tries
        tries += 1
        if tries < 4:
            raise outage()
        return "answered"

    result = await until_reachable(
        attempt,
        on_wait=lambda error, pause: told.append((error.details["reason"], pause)),
        backoff=Backoff(first=0.001, cap=0.004),
    )
    assert result == ("answered", 3)
    assert [reason for reason, _ in told] == ["connection refused"] * 3
    assert all(0 < pause <= 0.004 for _, pause in told)


@pytest.mark.parametrize(
    "error",
    [
        StorageError("S3 put of s3://b/k was refused (AccessDenied); check COMFYS3_S3_ACCESS_KEY"),
        StorageError("S3 list of s3://b/input/ failed: bucket does not exist"),
        ValueError("a bug"),
    ],
)
async def test_anything_but_an_outage_is_raised_at_the_first_try(error: Exception) -> None:
    told: list[object] = []
    tries = 0

    async def attempt() -> None:
        nonlocal tries
        tries += 1
        raise error

    with pytest.raises(type(error)) as caught:
        await until_reachable(attempt, on_wait=lambda *a: told.append(a))
    assert caught.value is error
    assert tries == 1 and told == []


async def test_a_stop_during_a_pause_ends_the_wait() -> None:
    stop = asyncio.Event()

    async def attempt() -> None:
        raise outage()

    # The pause is an hour: only the stop can end this wait.
    waiting = until_reachable(
        attempt, on_wait=lambda *a: stop.set(), stop=stop, backoff=Backoff(3600, 3600)
    )
    with pytest.raises(StoppedWhileStarting, match="asked to stop"):
        await waiting


async def test_a_stop_during_a_try_cancels_the_try() -> None:
    stop = asyncio.Event()
    entered = asyncio.Event()
    cancelled = False

    async def hanging() -> None:  # a connect that waits out a long timeout
        nonlocal cancelled
        entered.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled = True
            raise

    async def stop_once_inside() -> None:
        await entered.wait()
        stop.set()

    stopper = asyncio.create_task(stop_once_inside())
    with pytest.raises(StoppedWhileStarting):
        await until_reachable(hanging, on_wait=lambda *a: None, stop=stop)
    await stopper
    assert cancelled


class DownAtFirst(LocalStorage):
    """A folder whose first ``failures`` writes fail as an S3 outage would."""

    def __init__(self, root: Path, failures: int) -> None:
        super().__init__(root)
        self.failures = failures

    async def put(self, key: str, data: bytes, **options: Any) -> str:
        if self.failures > 0:
            self.failures -= 1
            raise outage()
        return await super().put(key, data, **options)


async def test_a_worker_waits_for_storage_then_runs_jobs(
    tmp_path: Path, fake_comfyui: Any, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    monkeypatch.setattr(Backoff, "pause", lambda self, failures: 0.01)
    (tmp_path / "input").mkdir()
    (tmp_path / "input" / "job.json").write_text('{"workflow": "solid"}')
    storage = DownAtFirst(tmp_path, failures=2)
    caplog.set_level("INFO", logger="comfys3.worker")
    with pytest.raises(StorageUnreachable):  # a drain (or a RunPod request) does not wait
        async with open_worker(
            storage=storage, layout=local_layout(), settings=worker_settings(fake_comfyui)
        ):
            pass
    storage.failures = 2
    async with open_worker(
        storage=storage,
        layout=local_layout(),
        settings=worker_settings(fake_comfyui),
        wait_for_storage=True,
    ) as worker:
        counts = await worker.run()
    assert counts.succeeded == 1
    waits = [r.getMessage() for r in caplog.records if "not reachable" in r.getMessage()]
    assert len(waits) == 2, waits
    assert waits[0].startswith("S3 at http://s3.example:9000 not reachable (connection refused)")
    assert any("answers after 2 failed tries" in r.getMessage() for r in caplog.records)


async def test_a_worker_on_obstore_probes_with_single_tries_and_knows_the_clock_at_start(
    seaweedfs: Any, fake_comfyui: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """object_store retries inside a call with back-off of its own and shows no Date header:
    the start-up wait probes through the backend's aiobotocore side with one try a probe, and
    the store's clock is known before the worker says whether this machine's is off."""
    storage = ObstoreStorage(s3_settings_for(seaweedfs, client="obstore"))
    probes: list[S3Storage] = []
    single_try = storage.single_try

    def spied() -> S3Storage:
        probe = single_try()
        probes.append(probe)
        return probe

    monkeypatch.setattr(storage, "single_try", spied)
    async with open_worker(
        storage=storage,
        layout=local_layout(),
        settings=worker_settings(fake_comfyui),
        wait_for_storage=True,
    ):
        assert storage.clock_offset() is not None
    assert len(probes) == 1
    assert probes[0]._config.retries == {"mode": "standard", "total_max_attempts": 1}
