"""The input files a payload names, checked the way the worker will read them.

The rule, everywhere: an input file is a key relative to the storage root: a key in the bucket,
a path under DIR with ``--local DIR``, a path under the current folder for ``comfys3 exec``;
never ``..``, a leading ``/`` or a URL. The worker refuses anything else when it stages the
file, so ``validate`` and ``submit`` refuse it first, and ``submit`` also looks the files up
before uploading, saying where it looked: a typo costs a message, not a failed job.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

from processor.errors import Problem, StorageError
from processor.job.manifest import Job
from processor.storage.base import Storage, validate_key

RULE = (
    "an input file is a path relative to the storage root: a key in the bucket, a path under "
    "DIR with --local DIR, a path under the current folder for exec"
)


@dataclass(frozen=True)
class InputFile:
    """One input file of one job: the payload field that names it and its key."""

    job_id: str
    field: str
    key: str


def input_files(jobs: Iterable[Job]) -> list[InputFile]:
    return [InputFile(job.id, item.field, item.source) for job in jobs for item in job.inputs]


def key_refusal(key: str) -> str | None:
    """Why an input file's name can never be read (``/etc/passwd``, ``../x``, a URL), in the
    one sentence ``validate``, ``submit``, ``exec`` and the worker all give; None when fine."""
    try:
        validate_key(key)
    except StorageError as error:
        reason = str(error).removeprefix(f"invalid storage key {key!r}: ")
        return f"input file {key!r} cannot be read: {reason} ({RULE})"
    return None


def key_problems(jobs: Iterable[Job]) -> list[Problem]:
    """One problem per input file the worker would refuse as a key, at its payload field
    (once, however many jobs of a batch share it)."""
    problems: dict[tuple[str, str], Problem] = {}
    for item in input_files(jobs):
        message = key_refusal(item.key)
        if message is not None:
            problems.setdefault((item.field, item.key), Problem(f"payload.{item.field}", message))
    return list(problems.values())


async def missing_inputs(storage: Storage, jobs: Iterable[Job]) -> list[str]:
    """A sentence per input file that is not in ``storage``, naming where it was looked for.
    Keys the worker would refuse are left to :func:`key_problems`."""
    wanted: dict[str, InputFile] = {}
    for item in input_files(jobs):
        try:
            wanted.setdefault(validate_key(item.key), item)
        except StorageError:
            continue
    found = await asyncio.gather(*(storage.head(key) for key in wanted))
    return [
        f"input '{item.field}': file {key!r} was not found at {storage.location(key)}"
        for (key, item), info in zip(wanted.items(), found, strict=True)
        if info is None
    ]
