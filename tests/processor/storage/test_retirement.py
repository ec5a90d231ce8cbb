"""processor.storage.retirement: the one place that moves manifests out of the intake.

Storage that fails a few times must not leave a manifest in two places or a claim without
its manifest moved; storage that keeps failing must end in a bounded number of tries with
the manifest still claimable; a name no job can use is moved aside once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from processor.errors import RetireFailed, StorageError
from processor.storage import retirement as retire
from processor.storage.layout import Layout
from processor.storage.local import LocalStorage
from processor.storage.retirement import MAX_BATCH, Retirer, _DeleteBatch
from processor.worker.assembly import open_worker
from tests.processor.worker.test_loop import drop, status_of, worker_settings

LAYOUT = Layout("input", "output")
MANIFEST = b'{"workflow": "solid"}'


class FlakyStorage(LocalStorage):
    """A folder whose copies and deletes fail the first few times, as a bucket on a bad day
    does; ``fail_when`` narrows which delete requests fail."""

    def __init__(
        self,
        root: Path,
        *,
        copy_failures: int = 0,
        delete_failures: int = 0,
        fail_when: Callable[[Sequence[str]], bool] = lambda keys: True,
    ) -> None:
        super().__init__(root)
        self.copy_failures = copy_failures
        self.delete_failures = delete_failures
        self.fail_when = fail_when
        self.copies: list[tuple[str, str]] = []
        self.deletes: list[list[str]] = []

    async def copy(self, src: str, dst: str) -> None:
        self.copies.append((src, dst))
        if self.copy_failures > 0:
            self.copy_failures -= 1
            raise StorageError(f"copy {src}: 503 Slow Down")
        await super().copy(src, dst)

    async def delete_many(self, keys: Sequence[str]) -> None:
        self.deletes.append(list(keys))
        if self.delete_failures > 0 and self.fail_when(keys):
            self.delete_failures -= 1
            raise StorageError(f"delete {keys[0]}: 500 InternalError")
        await super().delete_many(keys)


def setup_manifest(root: Path, name: str = "job") -> tuple[str, str]:
    """A pending manifest and its claim; returns (manifest key, claim key)."""
    for folder in ("input", "input/_claims"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    (root / "input" / f"{name}.json").write_bytes(MANIFEST)
    (root / "input" / "_claims" / f"{name}.json").write_text('{"holder": "me"}')
    return LAYOUT.manifest_key(name), f"{LAYOUT.claims_prefix}/{name}.json"


def quick(storage: LocalStorage, tries: int = 8) -> Retirer:
    return Retirer(storage, LAYOUT, tries=tries, pause=0.001, max_pause=0.004)


def exists(root: Path, key: str) -> bool:
    return (root / key).is_file()


# -- retiring -----------------------------------------------------------------------------


@pytest.mark.parametrize("failed", [False, True])
async def test_a_manifest_ends_in_one_place_and_its_claim_goes_last(
    tmp_path: Path, failed: bool
) -> None:
    key, claim = setup_manifest(tmp_path)
    target, twin = ("_failed", "_done") if failed else ("_done", "_failed")
    (tmp_path / "input" / twin).mkdir()
    (tmp_path / "input" / twin / "job.json").write_text("an earlier run's copy")
    storage = FlakyStorage(tmp_path, copy_failures=2, delete_failures=2)

    await quick(storage).retire(key, failed=failed, claim_key=claim)

    assert (tmp_path / "input" / target / "job.json").read_bytes() == MANIFEST
    assert not exists(tmp_path, f"input/{twin}/job.json")  # one place per manifest
    assert not exists(tmp_path, key) and not exists(tmp_path, claim)
    # Two failed copies, then two tries whose manifest delete failed, then the one that did.
    assert len(storage.copies) == 5
    assert storage.deletes[-2:] == [[key, f"input/{twin}/job.json"], [claim]]


async def test_a_try_after_the_move_succeeded_only_finishes_it(tmp_path: Path) -> None:
    """The manifest was copied and deleted, then the claim delete failed: the next try finds
    no manifest to copy (that is fine) and only deletes what is left."""
    key, claim = setup_manifest(tmp_path)
    storage = FlakyStorage(tmp_path, delete_failures=1, fail_when=lambda keys: claim in keys)

    await quick(storage).retire(key, failed=False, claim_key=claim)

    assert exists(tmp_path, "input/_done/job.json")
    assert not exists(tmp_path, key) and not exists(tmp_path, claim)
    assert len(storage.copies) == 2  # the second found nothing to copy
    assert storage.deletes.count([claim]) == 2


async def test_retiring_that_keeps_failing_ends_after_its_tries_with_the_claim_kept(
    tmp_path: Path,
) -> None:
    """Bounded: exactly ``tries`` tries. The manifest stays pending and the claim stays too,
    so the next holder sees a manifest whose run already ended, never a claim-less orphan."""
    key, claim = setup_manifest(tmp_path)
    storage = FlakyStorage(tmp_path, delete_failures=1000)

    with pytest.raises(RetireFailed, match=r"retiring input/job.json failed 4 times: delete"):
        await quick(storage, tries=4).retire(key, failed=True, claim_key=claim)

    assert len(storage.copies) == 4
    assert all(claim not in keys for keys in storage.deletes)  # the claim was never deleted
    assert exists(tmp_path, key) and exists(tmp_path, claim)


async def test_pauses_between_tries_double_up_to_the_maximum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key, claim = setup_manifest(tmp_path)
    storage = FlakyStorage(tmp_path, copy_failures=1000)
    pauses: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(delay: float, result: Any = None) -> Any:
        pauses.append(delay)
        return await real_sleep(0, result)

    monkeypatch.setattr(retire.asyncio, "sleep", sleep)
    retirer = Retirer(storage, LAYOUT, tries=6, pause=0.5, max_pause=3.0)

    with pytest.raises(RetireFailed):
        await retirer.retire(key, failed=False, claim_key=claim)

    assert pauses == [0.5, 1.0, 2.0, 3.0, 3.0]  # none after the last try


async def test_drop_claim_is_retried_too(tmp_path: Path) -> None:
    _, claim = setup_manifest(tmp_path)
    storage = FlakyStorage(tmp_path, delete_failures=2)

    await quick(storage).drop_claim(claim)

    assert not exists(tmp_path, claim)
    assert storage.deletes == [[claim]] * 3


async def test_an_error_that_is_not_storage_trouble_is_not_retried(tmp_path: Path) -> None:
    key, claim = setup_manifest(tmp_path)

    class Broken(FlakyStorage):
        async def copy(self, src: str, dst: str) -> None:
            self.copies.append((src, dst))
            raise RuntimeError("a bug, not an outage")

    storage = Broken(tmp_path)
    with pytest.raises(RuntimeError, match="a bug"):
        await quick(storage).retire(key, failed=False, claim_key=claim)
    assert len(storage.copies) == 1


# -- batched deletes ----------------------------------------------------------------------


class Recorder:
    def __init__(self, fail_on: str | None = None) -> None:
        self.requests: list[list[str]] = []
        self.fail_on = fail_on

    async def __call__(self, keys: Sequence[str]) -> None:
        self.requests.append(list(keys))
        if self.fail_on is not None and self.fail_on in keys:
            raise StorageError("delete: 500")


async def test_deletes_submitted_together_share_one_request_without_duplicates() -> None:
    recorder = Recorder()
    batch = _DeleteBatch(recorder)
    await asyncio.gather(batch.delete(["a", "b"]), batch.delete(["b", "c"]), batch.delete(["d"]))
    assert recorder.requests == [["a", "b", "c", "d"]]


async def test_a_batch_never_exceeds_the_request_limit_and_groups_stay_whole() -> None:
    recorder = Recorder()
    batch = _DeleteBatch(recorder)
    groups = [[f"{g}-{n}" for n in range(size)] for g, size in enumerate((600, 600, 300, 1500))]
    await asyncio.gather(*(batch.delete(group) for group in groups))
    assert [len(r) for r in recorder.requests] == [600, 900, 1500]  # an oversized one alone
    assert all(len(r) <= MAX_BATCH for r in recorder.requests[:2])


async def test_a_failed_request_fails_only_the_deletes_it_carried() -> None:
    recorder = Recorder(fail_on="x0")
    batch = _DeleteBatch(recorder)
    big = [f"x{n}" for n in range(MAX_BATCH)]
    results = await asyncio.gather(batch.delete(big), batch.delete(["y"]), return_exceptions=True)
    assert isinstance(results[0], StorageError) and results[1] is None
    assert recorder.requests == [big, ["y"]]


async def test_a_delete_after_a_flush_gets_a_request_of_its_own() -> None:
    recorder = Recorder()
    batch = _DeleteBatch(recorder)
    await batch.delete(["a"])
    await batch.delete(["b"])
    assert recorder.requests == [["a"], ["b"]]


async def test_a_stream_of_retirements_shares_requests_and_claims_follow_their_manifests(
    tmp_path: Path,
) -> None:
    """Issue 24: short jobs finishing one after another cost one DeleteObjects a window for
    manifests and claims together (it was two a job), and no claim is deleted in the same
    request as, or before, its manifest."""
    storage = FlakyStorage(tmp_path)
    retirer = Retirer(storage, LAYOUT)
    names = [f"job-{n}" for n in range(12)]
    for name in names:
        (tmp_path / "input").mkdir(exist_ok=True)
        (tmp_path / "input" / f"{name}.json").write_bytes(MANIFEST)

    async def finish(n: int, name: str) -> None:
        await asyncio.sleep(n * retire.BATCH_WINDOW / 4)  # one job ends every quarter window
        await retirer.retire(f"input/{name}.json", failed=False, claim_key=f"input/_claims/{name}")

    await asyncio.gather(*(finish(n, name) for n, name in enumerate(names)))

    # Fewer requests than jobs, where it was two a job. How many fewer is timing: about one a
    # window and the claims' one after it on a quiet machine (4-6 here), 7 on a loaded CI run.
    assert len(storage.deletes) < len(names)
    for name in names:
        manifest = next(n for n, keys in enumerate(storage.deletes) if f"input/{name}.json" in keys)
        claim = next(n for n, keys in enumerate(storage.deletes) if f"input/_claims/{name}" in keys)
        assert claim > manifest
    assert sorted(p.name for p in (tmp_path / "input" / "_done").iterdir()) == sorted(
        f"{name}.json" for name in names
    )


# -- names no job can use -----------------------------------------------------------------


async def test_an_unusable_name_is_moved_aside_once_and_loudly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "input").mkdir()
    bad = "input/tab\there\\.json"
    (tmp_path / bad).write_bytes(MANIFEST)
    retirer = quick(LocalStorage(tmp_path))

    with caplog.at_level(logging.ERROR, logger="comfys3.worker"):
        await retirer.set_aside(bad, "it contains a control character")

    aside = tmp_path / "input" / "_failed" / "tab%09here%5C.json"
    assert aside.read_bytes() == MANIFEST and not (tmp_path / bad).exists()
    [record] = caplog.records
    assert "cannot be run: it contains a control character" in record.getMessage()
    assert "input/_failed/tab%09here%5C.json" in record.getMessage()

    (tmp_path / bad).write_bytes(MANIFEST)  # the same key again: already dealt with
    caplog.clear()
    await retirer.set_aside(bad, "it contains a control character")
    assert (tmp_path / bad).exists() and caplog.records == []


async def test_setting_aside_a_name_that_is_gone_is_quiet(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "input").mkdir()
    with caplog.at_level(logging.ERROR, logger="comfys3.worker"):
        await quick(LocalStorage(tmp_path)).set_aside("input/gone\\.json", "backslash")
    assert caplog.records == []


async def test_setting_aside_when_storage_fails_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class NoMoves(LocalStorage):
        async def move(self, src: str, dst: str, *, lenient: bool = False) -> None:
            raise StorageError("move: 403 AccessDenied")

    with caplog.at_level(logging.ERROR, logger="comfys3.worker"):
        await quick(NoMoves(tmp_path)).set_aside("input/a\\b.json", "backslash")
    [record] = caplog.records
    assert "could not be moved aside" in record.getMessage() and "403" in record.getMessage()


async def test_a_worker_sets_an_unusable_name_aside_and_runs_the_rest(
    tmp_path: Path, fake_comfyui: Any
) -> None:
    drop(tmp_path, "fine", {"workflow": "solid"})
    (tmp_path / "input" / "back\\slash.json").write_bytes(MANIFEST)

    async with open_worker(
        storage=LocalStorage(tmp_path), layout=LAYOUT, settings=worker_settings(fake_comfyui)
    ) as worker:
        counts = await worker.run()

    assert counts.succeeded == 1 and status_of(tmp_path, "fine").error is None
    assert (tmp_path / "input" / "_failed" / "back%5Cslash.json").read_bytes() == MANIFEST
    assert not (tmp_path / "input" / "back\\slash.json").exists()
    assert not (tmp_path / "output" / "back\\slash").exists()  # no status for it
    assert sum(fake_comfyui.stats()["executed"].values()) == 1


def test_retire_failed_is_storage_trouble() -> None:
    """Callers that give a job back on storage trouble treat a failed retirement alike."""
    assert issubclass(RetireFailed, StorageError)
