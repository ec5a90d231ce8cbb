"""Issue 9: poison manifests, claims, names and inputs end, once, and the worker goes on.

Each test drops poison next to a good manifest and drains a real worker (the fake ComfyUI,
LocalStorage and moto's S3). It asserts the three things the issue was about: the poison ends
(a final status where one can be written, and it has left ``input/``), the good manifest beside
it still runs, and the poison was claimed a bounded number of times (once, for everything no
attempt can fix).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import random
import struct
import subprocess
import zlib
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from processor.job.status import JobState
from processor.storage.claims import STORE_CLOCK_MARGIN
from processor.worker.assembly import open_worker
from tests.poison_parts import (
    LAYOUT,
    Bucket,
    LocalBucket,
    drain,
    ended,
    executions,
    worker_settings,
)
from tests.storage_spy import SpyStorage, claim_creates
from tests.workers import ROOT, comfys3

DEEP = 2000


def deep_manifest() -> str:
    return '{"workflow": "solid", "metadata": {"x": ' + "[" * DEEP + "]" * DEEP + "}}"


def bigint_manifest() -> str:
    return '{"workflow": "solid", "payload": {"width": ' + "7" * 5000 + "}}"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMFYS3_")}
    env.update(extra)
    return env


# -- 1. manifests that used to loop forever ------------------------------------------------


async def test_poison_manifests_end_after_one_claim(bucket: Bucket, fake_comfyui: Any) -> None:
    """Deep nesting and a 5000-digit integer used to raise past the manifest check on every
    claim; a name whose id is '.' or '..' has no status to write. All four fail once."""
    bucket.drop("deep", deep_manifest())
    bucket.drop("bigint", bigint_manifest())
    bucket.drop(".", {"workflow": "solid"})  # input/..json: its id would be '.'
    bucket.drop("..", {"workflow": "solid"})  # input/...json: its id would be '..'
    bucket.drop("good", {"workflow": "solid"})

    drained = await drain(bucket, fake_comfyui)

    for name in ("deep", "bigint", ".", ".."):
        assert ended(bucket, name), (name, bucket.keys("input/"))
        assert drained.won()[name] == 1, name
    deep = bucket.status("deep")
    assert deep.state is JobState.failed and deep.error is not None
    assert deep.error.type == "invalid_manifest"
    assert "nested too deeply" in deep.error.message
    bigint = bucket.status("bigint")
    assert bigint.error is not None and bigint.error.type == "invalid_manifest"
    assert "manifest holds an integer of 5000 digits; the limit is 64" in bigint.error.message
    # No status can be written under an id of '.' or '..' (it would climb out of output/).
    assert [
        key
        for key in bucket.keys("output/")
        if not key.startswith(("output/deep/", "output/bigint/", "output/good/"))
    ] == []
    assert bucket.status("good").state is JobState.succeeded
    assert bucket.pending() == []
    assert (drained.counts.succeeded, drained.counts.failed) == (1, 4)
    assert executions(fake_comfyui) == 1


def test_run_once_with_poison_exits_with_a_done_line(tmp_path: Path, fake_comfyui: Any) -> None:
    """The command a user runs: it used to never return on these manifests."""
    bucket = LocalBucket(tmp_path)
    bucket.drop("deep", deep_manifest())
    bucket.drop("bigint", bigint_manifest())
    bucket.drop(".", {"workflow": "solid"})
    bucket.drop("good", {"workflow": "solid"})

    done = subprocess.run(
        comfys3("run", "--once", "--local", str(tmp_path)),
        env=clean_env(COMFYS3_COMFYUI_URL=fake_comfyui.url, COMFYS3_RETRY_DELAY="0.2"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 0, done.stderr[-3000:]
    assert "done: 4 job(s): 1 succeeded, 3 failed" in done.stdout, done.stdout
    assert "Traceback" not in done.stderr
    assert bucket.pending() == []
    assert sorted(bucket.keys("input/_failed/")) == [
        "input/_failed/..json",
        "input/_failed/bigint.json",
        "input/_failed/deep.json",
    ]


def test_validate_says_what_is_wrong_without_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "deep.json").write_text(deep_manifest())
    (tmp_path / "bigint.json").write_text(bigint_manifest())

    result = subprocess.run(
        comfys3("validate", str(tmp_path / "deep.json"), str(tmp_path / "bigint.json")),
        env=clean_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        f"{tmp_path / 'deep.json'}: invalid",
        "  manifest is nested too deeply (the limit is 64 levels)",
        f"{tmp_path / 'bigint.json'}: invalid",
        "  manifest holds an integer of 5000 digits; the limit is 64",
    ]


# -- 2. claims nobody could have written ---------------------------------------------------

POISON_CLAIMS: dict[str, bytes] = {
    "attempt-1e400": b'{"holder": "ghost", "attempt": 1e400, "tries": 1, "state": "released"}',
    "attempt-nan": b'{"holder": "ghost", "attempt": NaN, "tries": NaN, "state": "released"}',
    "attempt-huge-float": b'{"holder": "ghost", "attempt": 1e300, "state": "released"}',
    "attempt-text": b'{"holder": "ghost", "attempt": "3", "state": "released"}',
    "attempt-bigint": b'{"holder": "ghost", "attempt": ' + b"9" * 5000 + b"}",
    "deep": b'{"holder": "ghost", "x": ' + b"[" * DEEP + b"]" * DEEP + b"}",
    "expires-1e400": b'{"holder": "ghost", "attempt": 1, "state": "held", "expires_at": 1e400}',
    # valid JSON and held: a lock forever if its expiry were believed; nobody renews it, so it
    # is taken over once the store's clock says it is a lease old (expires_at is not read)
    "expires-far": b'{"holder": "ghost", "attempt": 1, "state": "held", "expires_at": 1e299}',
    "holder-object": b'{"holder": {"a": [1]}, "attempt": [1], "state": ["held"]}',
    "list": b"[1, 2, 3]",
    "empty": b"",
    "random": random.Random(9).randbytes(200),
    "not-utf8": b'{"holder": "\xff\xfe", "state": "held", "expires_at": 4102444800}',
}


async def test_malformed_claims_never_stop_a_manifest(
    bucket: Bucket, fake_comfyui: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A claim is read from the bucket: 1e400, NaN, nesting or random bytes in it once crashed
    the worker that read it, and an expiry beyond any lease blocked its job for good. A held
    claim that nobody renews is taken over a lease after it was written, by the store's own
    clock, even by a worker that has never seen it before (a drain)."""
    for name, claim in POISON_CLAIMS.items():
        bucket.drop(name, {"workflow": "solid"})
        bucket.put(f"input/_claims/{name}.json", claim)
    bucket.drop("good", {"workflow": "solid"})
    await asyncio.sleep(1.0 + STORE_CLOCK_MARGIN + 1.0)  # a lease of 1 s, the margin, a second

    # The claims' logger at WARNING whatever an earlier test in this process configured.
    with caplog.at_level(logging.WARNING, logger="processor.storage.claims"):
        drained = await drain(bucket, fake_comfyui, lease_seconds=1.0)

    for name in [*POISON_CLAIMS, "good"]:
        assert ended(bucket, name, "_done"), (name, bucket.keys("input/"))
        status = bucket.status(name)
        assert status.state is JobState.succeeded, (name, status.error)
        # Garbage is no count of earlier attempts; a readable count is carried on.
        assert status.attempt == (2 if name == "expires-far" else 1), name
        assert drained.won()[name] == 1, name
    assert drained.counts.succeeded == len(POISON_CLAIMS) + 1
    assert executions(fake_comfyui) == len(POISON_CLAIMS) + 1
    assert bucket.keys("input/_claims/") == []
    far = [r.getMessage() for r in caplog.records if "taking it over" in r.getMessage()]
    assert len(far) == 1 and "expires-far" in far[0], far
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# -- 3. one bad entry of a batch -----------------------------------------------------------


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


async def test_a_bad_batch_entry_fails_its_manifest_and_runs_no_sibling(
    local_bucket: Bucket, fake_comfyui: Any
) -> None:
    """A lone surrogate or deep nesting in one entry once failed that entry only after its
    siblings had run, and the retry ran them again. Now the manifest is refused before any
    entry runs, and the error names the entry."""
    surrogate = json.dumps(
        {
            "workflow": "txt2img",
            "payload": {"steps": 1},
            "batch": [{"prompt": "a cat"}, {"prompt": "PLACEHOLDER"}, {"prompt": "a dog"}],
        }
    ).replace("PLACEHOLDER", "\\ud83d")  # an escape json.dumps would never write
    local_bucket.drop("surrogate", surrogate)
    local_bucket.drop(
        "entry-deep", {"workflow": "solid", "batch": [{}, {"width": nested(300)}, {}]}
    )
    local_bucket.drop(
        "metadata-deep", {"workflow": "solid", "batch": [{}, {}], "metadata": nested(300)}
    )
    # A paired surrogate escape is a real character (an emoji): that batch runs, each entry once.
    local_bucket.drop(
        "good",
        '{"workflow": "txt2img", "payload": {"steps": 1}, '
        '"batch": [{"prompt": "\\ud83d\\ude00"}, {"prompt": "plain"}]}',
    )

    drained = await drain(local_bucket, fake_comfyui)

    messages = {}
    for name in ("surrogate", "entry-deep", "metadata-deep"):
        assert ended(local_bucket, name), name
        assert drained.won()[name] == 1, name
        status = local_bucket.status(name)
        assert status.state is JobState.failed and status.error is not None
        assert status.error.type == "invalid_manifest"
        messages[name] = status.error.message
        for n in (1, 2, 3):  # no entry got as far as a status of its own
            assert local_bucket.read(f"output/{name}-{n}/status.json") is None
    assert messages["surrogate"].startswith("manifest batch[1].prompt: holds an unpaired surrogate")
    assert messages["entry-deep"].startswith("manifest batch[1].width.a.a.a")
    assert "nested more than 64 levels deep" in messages["entry-deep"]
    assert messages["metadata-deep"].startswith("manifest metadata.a.a.a")
    assert local_bucket.status("good-1").payload["prompt"] == "\U0001f600"
    assert local_bucket.status("good-2").state is JobState.succeeded
    assert ended(local_bucket, "good", "_done")
    executed = fake_comfyui.stats()["executed"]
    assert len(executed) == 2 and set(executed.values()) == {1}  # the good batch, once each


# -- 6. names no key can carry -------------------------------------------------------------


async def test_a_control_character_name_is_set_aside_once(
    bucket: Bucket, fake_comfyui: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A name with a control character was warned about on every poll, for ever. It is moved
    aside once, with one log line, while a serving worker polls on."""
    bucket.put("input/bad\x07name.json", json.dumps({"workflow": "solid"}).encode())
    bucket.drop("good", {"workflow": "solid"})
    spy = SpyStorage(bucket.storage())
    stop = asyncio.Event()
    polls = 0

    async def poll(found_work: bool) -> None:
        nonlocal polls
        polls += 1
        if polls >= 5:
            stop.set()
        await asyncio.sleep(0.05)

    settings = worker_settings(fake_comfyui)
    async with open_worker(storage=spy, layout=LAYOUT, settings=settings) as worker:
        counts = await worker.run(wait_for_work=poll, stop=stop)

    assert polls >= 5
    assert "input/bad\x07name.json" not in bucket.keys("input/")
    assert bucket.keys("input/_failed/") == ["input/_failed/bad%07name.json"]
    mentioned = [r for r in caplog.records if "bad\\x07name" in r.getMessage()]
    assert len(mentioned) == 1, [r.getMessage() for r in mentioned]
    assert mentioned[0].levelno == logging.ERROR
    assert "moved it to input/_failed/bad%07name.json" in mentioned[0].getMessage()
    assert "contains a control character" in mentioned[0].getMessage()
    moves = [call.keys for call in spy.calls if call.op == "move"]
    assert moves == [("input/bad\x07name.json", "input/_failed/bad%07name.json")]
    assert "bad\x07name" not in claim_creates(spy.calls)  # never claimed
    assert counts.succeeded == 1 and bucket.status("good").state is JobState.succeeded
    assert bucket.keys("output/") == [k for k in bucket.keys("output/") if "good" in k]


async def test_a_name_that_is_not_utf8_ends_once(tmp_path: Path, fake_comfyui: Any) -> None:
    """Only a folder can hold such a name (an S3 key is UTF-8): it is listed with its bad byte
    escaped, claimed, and failed once, since no job id can be made of it."""
    (tmp_path / "input").mkdir()
    odd = tmp_path / "input" / os.fsdecode(b"bad\xffname.json")
    odd.write_text('{"workflow": "solid"}')
    bucket = LocalBucket(tmp_path)
    bucket.drop("good", {"workflow": "solid"})

    drained = await drain(bucket, fake_comfyui)

    name = os.fsdecode(b"bad\xffname")
    assert drained.won() == {name: 1, "good": 1}
    assert os.listdir(os.fsencode(tmp_path / "input" / "_failed")) == [b"bad\xffname.json"]
    assert bucket.pending() == [] and bucket.keys("input/_claims/") == []
    assert (drained.counts.succeeded, drained.counts.failed) == (1, 1)


# -- 8. input files no attempt can use -----------------------------------------------------


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels, with one tiny IDAT: what a
    decompression bomb looks like to a reader that trusts the header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def image_files() -> dict[str, bytes]:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 10), "red").save(buffer, format="PNG")
    return {
        "empty": b"",
        "text": b"this is a text file, not a picture\n",
        "bomb": png_header(100_000, 100_000),
        "big": png_header(9_000, 9_000),  # a header Pillow accepts, past COMFYS3_MAX_INPUT_PIXELS
        "good": buffer.getvalue(),
    }


async def test_unusable_input_files_fail_at_once_without_a_prompt(
    local_bucket: Bucket, fake_comfyui: Any
) -> None:
    """Each of these used to fail inside ComfyUI's LoadImage, as a runtime error, retried
    until the attempts ran out. They fail on the first attempt, before ComfyUI sees a prompt."""
    for name, data in image_files().items():
        local_bucket.put(f"uploads/{name}.png", data)
        local_bucket.drop(
            name, {"workflow": "img2img", "payload": {"image": f"uploads/{name}.png", "steps": 1}}
        )

    drained = await drain(local_bucket, fake_comfyui)

    reasons = {
        "empty": "is empty (0 bytes)",
        "text": "is not an image ComfyUI can load",
        "bomb": "is not an image ComfyUI can load (or it is too large to decode safely)",
        "big": "is 9000x9000 = 81,000,000 pixels; the limit is 67,108,864",
    }
    for name, reason in reasons.items():
        status = local_bucket.status(name)
        assert status.state is JobState.failed and status.error is not None, name
        assert status.error.type == "input_invalid", (name, status.error)
        assert f"uploads/{name}.png" in status.error.message and reason in status.error.message
        assert status.attempt == 1, name
        assert drained.won()[name] == 1, name
        assert ended(local_bucket, name), name
    assert local_bucket.status("good").state is JobState.succeeded
    assert drained.counts.retried == 0
    stats = fake_comfyui.stats()
    assert stats["queued"] == 1 and stats["rejected"] == 0  # the good job's prompt only
    assert sum(stats["executed"].values()) == 1
