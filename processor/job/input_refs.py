"""The input files a payload names, checked the way the worker will read them.

The rule, everywhere: an input file is

- a key relative to the storage root: a key in the bucket, a path under DIR with
  ``--local DIR``, a path under the current folder for ``comfys3 exec``; never ``..`` or a
  leading ``/``;
- or an ``https://`` URL (``http://`` where the worker allows it), fetched through the fetch
  guard (:mod:`processor.ops.fetch_guard`);
- or ``s3://bucket/key``, a key in a bucket the worker's credentials can read.

The worker refuses anything else when it stages the file, so ``validate`` and ``submit`` refuse
it first, and ``submit`` also looks the keys up before uploading, saying where it looked (a URL
is not fetched then: the worker fetches it when the job runs): a typo costs a message, not a
failed job.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote, urlsplit

from processor.errors import InputInvalid, Problem, StorageError
from processor.job.manifest import Job
from processor.ops.fetch_guard import FetchPolicy, fetch_policy
from processor.settings import FetchSettings
from processor.storage.base import Storage, validate_key

RULE = (
    "an input file is a path relative to the storage root (a key in the bucket, a path under "
    "DIR with --local DIR, a path under the current folder for exec), an https:// URL, or "
    "s3://bucket/key"
)
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class InputSource:
    """Where one input file comes from: a ``key`` of the job's storage, a ``url``, or an
    ``s3`` object (``bucket`` and ``key``)."""

    kind: Literal["key", "url", "s3"]
    key: str = ""
    url: str = ""
    bucket: str = ""

    @property
    def file_name(self) -> str:
        """The name the file is given in ComfyUI's input folder (its last path part)."""
        path = urlsplit(self.url).path if self.kind == "url" else self.key
        name = unquote(path.rstrip("/").rsplit("/", 1)[-1])
        return name or "input"


def input_source(text: str) -> InputSource:
    """What an input-file value names. Raises StorageError (with the reason) for a key the
    worker would refuse, or a malformed ``s3://`` reference; a URL is checked by the fetch
    policy, not here."""
    lowered = text[:8].lower()
    if lowered.startswith(("https://", "http://")):
        return InputSource("url", url=text)
    if lowered.startswith("s3://"):
        bucket, _, key = text[5:].partition("/")
        if not _BUCKET.match(bucket):
            raise StorageError(f"invalid storage key {text!r}: {bucket!r} is not a bucket name")
        try:
            validate_key(key)
        except StorageError as error:
            reason = str(error).removeprefix(f"invalid storage key {key!r}: ")
            raise StorageError(f"invalid storage key {text!r}: {reason}") from None
        return InputSource("s3", key=key, bucket=bucket)
    return InputSource("key", key=validate_key(text))


@dataclass(frozen=True)
class InputFile:
    """One input file of one job: the field that names it, where that field is (``payload``,
    or ``graph_inputs`` for a raw graph) and its key."""

    job_id: str
    field: str
    key: str
    where: str = "payload"


def input_files(jobs: Iterable[Job]) -> list[InputFile]:
    return [
        InputFile(job.id, item.field, item.source, item.where)
        for job in jobs
        for item in job.inputs
    ]


def readable_source(text: str) -> InputSource:
    """Where an input-file value points: a key, an object or a URL (which the fetch guard
    judges), or :class:`InputInvalid` when it can never be read (``/etc/passwd``, ``../x``, a
    malformed ``s3://``), in the one sentence ``validate``, ``submit``, ``exec`` and the
    worker all give."""
    try:
        return input_source(text)
    except StorageError as error:
        reason = str(error).removeprefix(f"invalid storage key {text!r}: ")
        raise InputInvalid(f"input file {text!r} cannot be read: {reason} ({RULE})") from None


def key_problems(jobs: Iterable[Job], policy: FetchPolicy | None = None) -> list[Problem]:
    """One problem per input file the worker would refuse (a bad key, a URL its fetch guard
    refuses), at its payload field (once, however many jobs of a batch share it). ``policy``:
    the worker's fetch guard (default: the one COMFYS3_FETCH_* describes here)."""
    problems: dict[tuple[str, str], Problem] = {}
    for item in input_files(jobs):
        message = None
        try:
            source = readable_source(item.key)
        except InputInvalid as error:
            message = str(error)
        else:
            if source.kind == "url":
                policy = policy or fetch_policy(FetchSettings())
                refusal = policy.refusal(source.url)
                if refusal is not None:
                    message = f"input URL {item.key!r} {refusal}"
        if message is not None:
            problems.setdefault(
                (item.field, item.key), Problem(f"{item.where}.{item.field}", message)
            )
    return list(problems.values())


async def missing_inputs(storage: Storage, jobs: Iterable[Job]) -> list[str]:
    """A sentence per input file that is not in ``storage``, naming where it was looked for.
    Keys the worker would refuse are left to :func:`key_problems`; URLs and ``s3://`` objects
    are not looked up (the worker fetches them when the job runs)."""
    wanted: dict[str, InputFile] = {}
    for item in input_files(jobs):
        try:
            source = input_source(item.key)
        except StorageError:
            continue
        if source.kind == "key":
            wanted.setdefault(source.key, item)
    found = await asyncio.gather(*(storage.head(key) for key in wanted))
    return [
        f"input '{item.field}': file {key!r} was not found at {storage.location(key)}"
        for (key, item), info in zip(wanted.items(), found, strict=True)
        if info is None
    ]
