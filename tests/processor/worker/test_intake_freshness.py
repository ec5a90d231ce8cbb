"""The intake does not offer a key it can tell is finished: every claim on a finished manifest
costs three requests (create, read, delete) and is wasted. In the chaos bench (4 workers, 400
manifests, a 30 s outage) these were a fifth of all claims won."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from processor.storage.base import Page
from processor.storage.layout import Layout
from processor.storage.local import LocalStorage
from processor.worker.intake import HintOutcome, Intake

LAYOUT = Layout("input", "output")
LEASE = 30.0


class CountingStorage(LocalStorage):
    listings = 0

    async def list_page(self, prefix: str, **options: object) -> Page:
        if prefix == "input":
            self.listings += 1
        return await super().list_page(prefix, **options)  # type: ignore[arg-type]


def put(root: Path, relative: str) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"workflow": "solid"}))
    return path


def never_busy(_: str) -> bool:
    return False


async def test_a_key_held_elsewhere_is_not_offered_once_its_manifest_is_gone(
    tmp_path: Path,
) -> None:
    manifest = put(tmp_path, "input/held.json")
    now = [100.0]
    async with LocalStorage(tmp_path) as storage:
        intake = Intake(storage, LAYOUT, lease_seconds=LEASE, clock=lambda: now[0])
        # its holder's lease runs out in half a second
        intake.held("input/held.json", recheck_in=0.5)
        now[0] += 1.0
        manifest.unlink()  # because the holder finished it and retired the manifest
        assert await intake.next(never_busy) is None  # not offered as due, nor listed

        put(tmp_path, "input/held.json")  # still there: offered once the lease ran out
        intake.held("input/held.json", recheck_in=0.5)
        assert await intake.next(never_busy) is None  # the listing leaves it to its holder
        now[0] += 1.0
        candidate = await intake.next(never_busy)
        assert candidate is not None
        assert (candidate.key, candidate.source) == ("input/held.json", "due")


def age(root: Path, *keys: str, seconds: float = 1e3) -> None:
    """Backdate objects of the local store: their LastModified is the store's clock."""
    stamp = time.time() - seconds
    for key in keys:
        os.utime(root / key, (stamp, stamp))


async def test_a_stale_claim_is_offered_only_while_it_exists(tmp_path: Path) -> None:
    put(tmp_path, "input/_claims/a-orphan.json")  # no manifest: its claim must still go
    put(tmp_path, "input/_claims/b-settled.json")
    put(tmp_path, "input/b-settled.json")
    async with LocalStorage(tmp_path) as storage:
        # Claims written long ago by the store's clock: unrenewed for longer than a lease.
        age(tmp_path, "input/_claims/a-orphan.json", "input/_claims/b-settled.json")
        intake = Intake(storage, LAYOUT, lease_seconds=LEASE)
        first = await intake.next(never_busy)
        assert first is not None and (first.key, first.source) == (
            "input/a-orphan.json",
            "claims",
        )
        # b's worker finishes it between the scan and our next look.
        (tmp_path / "input/_claims/b-settled.json").unlink()
        (tmp_path / "input/b-settled.json").unlink()
        second = await intake.next(lambda key: key == "input/a-orphan.json")
        assert second is None


async def test_an_orphan_claim_is_found_even_when_the_intake_is_empty(tmp_path: Path) -> None:
    """A worker that died between retiring a manifest and deleting its claim leaves a claim
    with nothing pending beside it; an idle worker must still find it and clean it up."""
    (tmp_path / "input").mkdir()
    now = [0.0]
    async with LocalStorage(tmp_path) as storage:
        intake = Intake(
            storage,
            LAYOUT,
            lease_seconds=LEASE,
            clock=lambda: now[0],
        )
        assert await intake.next(never_busy) is None  # an empty intake, scanned and listed
        put(tmp_path, "input/_claims/orphan.json")
        age(tmp_path, "input/_claims/orphan.json")  # unrenewed for long, by the store's clock
        now[0] += intake.claims_scan_interval + 1
        candidate = await intake.next(never_busy)
        assert candidate is not None and (candidate.key, candidate.source) == (
            "input/orphan.json",
            "claims",
        )


async def test_a_manifest_found_gone_makes_the_page_be_read_again(tmp_path: Path) -> None:
    for n in range(5):
        put(tmp_path, f"input/j{n}.json")
    async with CountingStorage(tmp_path) as storage:
        intake = Intake(storage, LAYOUT, lease_seconds=LEASE, page_max_age=60)
        taken = await intake.next(never_busy)
        assert taken is not None and storage.listings == 1
        # Another worker finished three of them since our page was read.
        others = sorted({f"input/j{n}.json" for n in range(5)} - {taken.key})
        for key in others[:3]:
            (tmp_path / key).unlink()
        await intake.report(others[0], HintOutcome.gone)
        offered = await intake.next(lambda key: key == taken.key)
        assert storage.listings == 2  # read again, though the page is not old
        assert offered is not None and offered.key == others[3]
