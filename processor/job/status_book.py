"""The status book: the one place that builds, writes and reads job status documents.

Every transition of a job's record is a method here (an attempt begins, makes progress,
succeeds, fails or is given back; a manifest that never ran is recorded invalid or given up
on; a webhook's fate is written back), so "what did the user see" is answerable from this file
alone. Two rules live here and nowhere else:

- **Never bury a success.** A later write for the same job id (a broken manifest arriving
  again, a manifest given up on, a duplicate upload) never turns a succeeded status into
  anything else: the success stays and gets a note.
- **Read the bucket as untrusted.** A status is parsed through :mod:`processor.safejson` with a
  size cap; one that cannot be read is treated as absent (never as success) when deciding, and
  reported as a one-line problem when shown.
"""

from __future__ import annotations

import asyncio
import enum
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from pydantic import ValidationError

from processor.errors import (
    JsonLimitError,
    LeaseLost,
    ManifestError,
    ObjectNotFound,
    ObjectTooLarge,
    PreconditionFailed,
    StorageError,
    problems_from_validation,
)
from processor.job.retry_table import describe
from processor.job.status import (
    ErrorInfo,
    JobState,
    JobStatus,
    ModelRecord,
    NotifyRecord,
    OutputRecord,
    ProgressInfo,
    TimeLimit,
    utcnow,
)
from processor.logsafe import printable_logger
from processor.safejson import load_json
from processor.storage.base import ObjectStore
from processor.storage.layout import Layout

if TYPE_CHECKING:
    from processor.job.manifest import Job

log = printable_logger("comfys3.job")

# A status larger than this is not read: a real one is a few kB (outputs, notes, payload).
MAX_STATUS_BYTES = 4 * 1024 * 1024
STATUS_CONCURRENCY = 32  # status reads at once when many are read (report, submit --wait)
_PROBLEMS_SHOWN = 3
FINAL = (JobState.succeeded, JobState.failed, JobState.cancelled)
NO_STATUS = "no status document"

# Send a final status to its webhook in the background: (manifest URL or None for the
# worker's default, message id, body, what to do with the delivery's record) -> sent at all.
Announce = Callable[[str | None, str, bytes, Callable[[NotifyRecord], Awaitable[None]]], bool]


# -- reading ----------------------------------------------------------------------------------


def parse_status(data: bytes, job_id: str | None = None) -> JobStatus | str:
    """Bytes of a status document -> the status, or a one-line reason it is unreadable.

    With ``job_id``, a document that names another job is unreadable too: written back with a
    note, it would land in that job's folder (or at no valid key at all).
    """
    if len(data) > MAX_STATUS_BYTES:
        return f"status is {len(data)} bytes; the limit is {MAX_STATUS_BYTES}"
    try:
        document = load_json(data)
    except JsonLimitError as error:
        text = str(error)
        if text.startswith(("is not valid JSON", "is not UTF-8")):
            return "not valid JSON"
        return f"not a job status: {text}"
    try:
        status = JobStatus.model_validate(document)
    except ValidationError as error:
        problems = [str(p) for p in problems_from_validation(error)]
        more = len(problems) - _PROBLEMS_SHOWN
        shown = "; ".join(problems[:_PROBLEMS_SHOWN]) + (f"; and {more} more" if more > 0 else "")
        return f"not a job status: {shown}"
    except (ValueError, RecursionError) as error:  # defensive: the validator's own limits
        return f"not a job status: {type(error).__name__}"
    if job_id is not None and status.id != job_id:
        return f"not this job's status: it names job {status.id[:128]!r}"
    return status


@dataclass(frozen=True)
class JobRecord:
    """One job's status as found, or why it could not be read (for people: report, status).

    ``job_id`` is the folder the status lives in, not the id the document claims: the folder
    is what links and thumbnails are made from, and a document may say anything.
    """

    job_id: str
    key: str
    status: JobStatus | None = None
    problem: str | None = None

    @property
    def missing(self) -> bool:
        """No status document at all (the job never ran, or its id is wrong)."""
        return self.problem == NO_STATUS


# -- one attempt ------------------------------------------------------------------------------


class Fence(Protocol):
    """Proof that an attempt still holds its manifest's claim (the claim's heartbeat)."""

    @property
    def tries(self) -> int: ...  # the attempt's fencing token: grows with every claim

    async def ensure(self) -> object: ...  # LeaseLost if taken over; renews a stale lease


class Begun(enum.Enum):
    """What the first write of an attempt found."""

    run = "run"  # no final status stands in the way: run the job
    leftover = "leftover"  # this very upload already ran to its end; only its retirement is left
    already_succeeded = "already_succeeded"  # an earlier run succeeded and no rerun is asked


@dataclass
class Beginning:
    begun: Begun
    previous: JobStatus | None = None


class AttemptRecord:
    """The status document of one attempt at one job, written as the attempt moves."""

    def __init__(self, book: StatusBook, status: JobStatus, fence: Fence | None = None) -> None:
        self._book = book
        self.status = status
        self.fence = fence
        self.etag: str | None = None  # of this attempt's last write: the next one is fenced on it

    @property
    def job_id(self) -> str:
        return self.status.id

    async def begin(self, job: Job, *, resumed: bool) -> Beginning:
        """Write the "running" status, and learn from the same conditional write whether this
        job already has one.

        - no status yet (nearly every job): the create is the only request;
        - a final status written for this very upload of a manifest claimed before: it ran to
          its end and only its retirement was cut short (an outage between status and move),
          so it is retired now, not run again. A fresh claim never means this: the same bytes
          uploaded again within a second (S3 times have one-second steps) still run;
        - an earlier success of the same id: not run again unless the manifest says ``rerun``
          (never bury a success: it gets a note);
        - a later try of this manifest has written (this worker was frozen past its lease and
          the job was taken over): :class:`LeaseLost`, nothing is written;
        - anything else (an earlier failure, an attempt cut short): run, and say so.
        """
        status = self.status
        try:
            self.etag = await self._book.write(status, create=True)
            return Beginning(Begun.run)
        except PreconditionFailed:
            previous, etag = await self._book.read_versioned(status.id)
        if (
            resumed
            and previous is not None
            and previous.state in FINAL
            and status.manifest_version is not None
            and previous.manifest_version == status.manifest_version
        ):
            return Beginning(Begun.leftover, previous)
        note = (
            f"manifest {job.manifest_key} arrived again and was not run: "
            'this id already succeeded (set "rerun": true to run it again)'
        )
        if not job.rerun and previous is not None and await self._book.keep_success(previous, note):
            return Beginning(Begun.already_succeeded, previous)
        await self._write_over(previous, etag)
        return Beginning(Begun.run)

    def timing(self, phase: str, seconds: float) -> None:
        self.status.timings[phase] = round(seconds, 3)

    def progress(self, info: ProgressInfo) -> None:
        self.status.progress = info

    def limited(self, limit: TimeLimit) -> None:
        """The time this attempt may run on ComfyUI, and which limit set it."""
        self.status.time_limit = limit

    def note(self, text: str) -> None:
        """Something a person should know that is not an error (ComfyUI dropped an output)."""
        self.status.notes.append(text)

    def models_ready(self, records: list[ModelRecord]) -> None:
        """The models the manifest named, found in the cache or fetched for this attempt."""
        self.status.models = records

    async def save(self) -> None:
        """Write the document as it stands (progress, or the final state set just before).

        Fenced: the write is conditional on this attempt's own last write. If someone wrote in
        between, a later try of this manifest (this attempt lost its claim) makes it
        :class:`LeaseLost` and nothing is written; anyone else (another manifest of the same
        job id) is written over, as the last writer always was."""
        if self.fence is not None:
            await self.fence.ensure()
        if self.etag is None:
            self.etag = await self._book.write(self.status)
            return
        try:
            self.etag = await self._book.write(self.status, if_match=self.etag)
        except PreconditionFailed:
            await self._write_over(*await self._book.read_versioned(self.status.id))

    async def _write_over(self, current: JobStatus | None, etag: str | None) -> None:
        """Write this attempt's document over ``current`` (read with ``etag``), unless a later
        try of the same upload wrote it; a few rounds if others keep writing in between."""
        for _ in range(3):
            if self._superseded_by(current):
                assert current is not None
                raise LeaseLost(
                    f"job {self.job_id}: try {current.claim_try} of manifest "
                    f"{current.manifest_key} wrote its status after this try "
                    f"({self.status.claim_try}) lost the claim"
                )
            try:
                if etag is None:
                    self.etag = await self._book.write(self.status, create=True)
                else:
                    self.etag = await self._book.write(self.status, if_match=etag)
                return
            except PreconditionFailed:
                current, etag = await self._book.read_versioned(self.status.id)
        raise PreconditionFailed(f"job {self.job_id}: its status kept changing while written")

    def _superseded_by(self, current: JobStatus | None) -> bool:
        ours = self.status
        return (
            current is not None
            and ours.claim_try is not None
            and current.claim_try is not None
            and current.manifest_key == ours.manifest_key
            and current.manifest_version == ours.manifest_version
            and current.claim_try > ours.claim_try
        )

    def succeeded(self, outputs: list[OutputRecord], texts: dict[str, list[str]]) -> None:
        self.status.outputs = outputs
        self.status.texts = texts
        self.status.state = JobState.succeeded
        self.status.progress = ProgressInfo(fraction=1.0, node=None)

    def failed(self, info: ErrorInfo, *, retrying: bool, charged: bool) -> None:
        """Record a failed attempt: queued for another one, or failed for good."""
        status = self.status
        status.error = info
        attempt, most = status.attempt, status.max_attempts or status.attempt
        if retrying and not charged:
            status.state = JobState.queued
            status.notes.append(
                f"attempt {attempt} did not run: ComfyUI died while another job ran; "
                "it will be retried and this try does not count"
                if info.type == "comfyui_unavailable"
                else f"attempt {attempt} failed ({info.type}) through no fault of the job; "
                "it will be retried and this try does not count"
            )
        elif retrying:
            status.state = JobState.queued
            status.notes.append(
                f"attempt {attempt} of {most} failed ({info.type}); it will be retried"
            )
        else:
            status.state = JobState.failed

    def cancelled(self, info: ErrorInfo) -> None:
        """Someone asked for the job to stop, and it did: final, with who and when in
        ``error.details``."""
        self.status.error = info
        self.status.state = JobState.cancelled

    def gave_up(self) -> None:
        """A retryable failure on the last attempt: the status says the attempts ran out."""
        self.status.notes.append(f"gave up after {self.status.attempt} attempt(s)")

    def given_back(self) -> None:
        """The worker stopped mid-attempt: the job waits for another worker, uncounted."""
        self.status.state = JobState.queued
        self.status.notes.append(
            f"attempt {self.status.attempt} was stopped with its worker; the job was given back "
            "and this try does not count"
        )


# -- the book ---------------------------------------------------------------------------------


class StatusBook:
    """Reads and writes the status documents of one storage and layout.

    ``worker`` names the writer in documents it creates; ``announce`` sends final statuses to
    their webhooks (None: no webhooks, e.g. ``comfys3 exec``). Readers (``status``, ``report``,
    ``submit --wait``) need neither.
    """

    def __init__(
        self,
        storage: ObjectStore,
        layout: Layout,
        *,
        worker: str | None = None,
        announce: Announce | None = None,
    ) -> None:
        self.storage = storage
        self.layout = layout
        self.worker = worker
        self.announce = announce

    def key(self, job_id: str) -> str:
        return self.layout.status_key(job_id)

    # -- reading --------------------------------------------------------------------------

    async def read(self, job_id: str) -> JobStatus | None:
        """The job's status, for a decision: absent, unreadable, oversized or naming another
        job all read as None, never as success. Storage trouble raises."""
        try:
            stored = await self.storage.get(self.key(job_id), max_bytes=MAX_STATUS_BYTES)
        except (ObjectNotFound, ObjectTooLarge):
            return None
        parsed = parse_status(stored.data, job_id)
        return parsed if isinstance(parsed, JobStatus) else None

    async def read_versioned(self, job_id: str) -> tuple[JobStatus | None, str | None]:
        """(the status as :meth:`read` gives it, the ETag of the document found): a document
        that cannot be read is still a version, to be written over conditionally."""
        try:
            stored = await self.storage.get(self.key(job_id), max_bytes=MAX_STATUS_BYTES)
        except ObjectNotFound:
            return None, None
        except ObjectTooLarge:
            return None, None  # written over unconditionally: no reader could use it anyway
        parsed = parse_status(stored.data, job_id)
        return (parsed if isinstance(parsed, JobStatus) else None), stored.etag

    async def read_record(self, job_id: str) -> JobRecord:
        """The job's status for a person; every way reading can fail ends as a ``problem``."""
        key = self.key(job_id)
        try:
            data = (await self.storage.get(key, max_bytes=MAX_STATUS_BYTES)).data
        except ObjectNotFound:
            return JobRecord(job_id, key, problem=NO_STATUS)
        except ObjectTooLarge as error:
            return JobRecord(job_id, key, problem=f"too large: {error}")
        except StorageError as error:
            return JobRecord(job_id, key, problem=f"cannot read it: {error}")
        parsed = parse_status(data)
        if isinstance(parsed, str):
            return JobRecord(job_id, key, problem=parsed)
        return JobRecord(job_id, key, status=parsed)

    async def read_records(
        self, job_ids: Iterable[str], concurrency: int = STATUS_CONCURRENCY
    ) -> list[JobRecord]:
        """Every job's record, in the order given, with at most ``concurrency`` reads at once."""
        gate = asyncio.Semaphore(concurrency)

        async def one(job_id: str) -> JobRecord:
            async with gate:
                return await self.read_record(job_id)

        return list(await asyncio.gather(*(one(job_id) for job_id in job_ids)))

    async def read_many(
        self, job_ids: Iterable[str], concurrency: int = STATUS_CONCURRENCY
    ) -> list[JobStatus | None]:
        """Each job's status for a decision (see :meth:`read`), at most ``concurrency`` at once;
        an unreadable one (half-written by a foreign tool, say) is None until it is fixed."""
        gate = asyncio.Semaphore(concurrency)

        async def one(job_id: str) -> JobStatus | None:
            async with gate:
                return await self.read(job_id)

        return list(await asyncio.gather(*(one(job_id) for job_id in job_ids)))

    # -- writing --------------------------------------------------------------------------

    async def write(
        self, status: JobStatus, *, create: bool = False, if_match: str | None = None
    ) -> str:
        """Write ``status``, and return its ETag; with ``create``, only if the job has no status
        yet, with ``if_match``, only if it is still that version (:class:`PreconditionFailed`
        otherwise)."""
        status.updated_at = utcnow()
        return await self.storage.put(
            self.key(status.id),
            status.to_json(),
            content_type="application/json",
            if_none_match=create,
            if_match=if_match,
        )

    def attempt(
        self,
        job: Job,
        *,
        attempt: int,
        max_attempts: int,
        notes: list[str] | None = None,
        manifest_version: str | None = None,
        fence: Fence | None = None,
    ) -> AttemptRecord:
        """The document of a new attempt at ``job``, not written yet (see
        :meth:`AttemptRecord.begin`). With ``fence`` (the claim's heartbeat), every write of
        the attempt is made only while it holds the claim, and says which try wrote it."""
        return AttemptRecord(
            self,
            JobStatus(
                id=job.id,
                state=JobState.running,
                attempt=attempt,
                max_attempts=max_attempts,
                worker=self.worker,
                manifest_key=job.manifest_key,
                manifest_version=manifest_version,
                workflow=job.workflow,
                payload=job.payload,
                metadata=job.metadata,
                notes=list(notes or []),
                claim_try=fence.tries if fence is not None else None,
            ),
            fence,
        )

    async def keep_success(
        self, previous: JobStatus | None, note: str | None = None, *, unless: str | None = None
    ) -> bool:
        """The never-bury rule, the one place it is written: if ``previous`` is a success, it
        stands (with ``note`` added, unless it records this very upload, ``unless`` being that
        upload's version) and nothing may replace it. True when it stood."""
        if previous is None or previous.state is not JobState.succeeded:
            return False
        if note is not None and (unless is None or previous.manifest_version != unless):
            previous.notes.append(note)
            await self.write(previous)
        return True

    async def never_ran(
        self,
        job_id: str,
        manifest_key: str,
        error: BaseException,
        *,
        manifest_version: str | None = None,
    ) -> JobStatus:
        """A job that never got to run (a broken manifest, say) fails with a status that says
        why; it is written whatever stood before, so call :meth:`manifest_invalid` where an
        earlier success may stand."""
        info, _ = describe(error)
        status = JobStatus(
            id=job_id,
            state=JobState.failed,
            worker=self.worker,
            manifest_key=manifest_key,
            manifest_version=manifest_version,
            error=info,
        )
        await self.write(status)
        return status

    async def manifest_invalid(
        self, job_id: str, manifest_key: str, error: ManifestError, version: str | None
    ) -> tuple[JobStatus, bool]:
        """A manifest that cannot run: (its status, whether an earlier success was kept)."""
        previous = await self.read(job_id)
        note = (
            f"manifest {manifest_key} arrived again but was not run, because it is not valid: "
            f"{error}"
        )
        if previous is not None and await self.keep_success(previous, note, unless=version):
            return previous, True
        status = await self.never_ran(job_id, manifest_key, error, manifest_version=version)
        self.announce_final(status, None)  # its own URL is not to be trusted
        return status, False

    async def gave_up(
        self,
        job_id: str,
        manifest_key: str,
        *,
        job: Job | None,
        manifest_version: str | None,
        attempts: int,
        max_attempts: int,
        info: ErrorInfo,
        note: str,
    ) -> tuple[JobStatus, bool]:
        """A job whose manifest will not run again: (its status, whether an earlier success
        was kept). Its last status, if any, gets the error and the note."""
        previous = await self.read(job_id)
        if previous is not None and await self.keep_success(previous):
            return previous, True
        status = previous or JobStatus(id=job_id, state=JobState.failed, manifest_key=manifest_key)
        if job is not None:
            status.workflow, status.payload = job.workflow, job.payload
        status.state = JobState.failed
        status.attempt = attempts
        status.max_attempts = max_attempts
        status.manifest_version = manifest_version
        status.error = info
        status.notes.append(note)
        await self.write(status)
        self.announce_final(status, job.notify_url if job is not None else None)
        return status, False

    async def cancelled_before_start(
        self, job: Job, record: AttemptRecord, info: ErrorInfo
    ) -> tuple[JobStatus, bool]:
        """A job cancelled before it ran: (its status, whether an earlier success was kept).
        Nothing of it reached ComfyUI; an earlier success of the same id is never buried.
        ``record`` is the attempt's (not begun), so the write is fenced like any of its own."""
        previous = await self.read(job.id)
        note = f"manifest {job.manifest_key} was cancelled before it ran: {info.message}"
        if previous is not None and await self.keep_success(
            previous, note, unless=record.status.manifest_version
        ):
            return previous, True
        record.cancelled(info)
        await record.save()
        self.announce_final(record.status, job.notify_url)
        return record.status, False

    @staticmethod
    def unrecordable(job: Job) -> str | None:
        """Why ``job``'s status could not be written (a payload no serialiser takes), or None.
        Checked when a manifest is loaded: found later, it would fail after its GPU time."""
        try:
            JobStatus(
                id=job.id,
                state=JobState.queued,
                manifest_key=job.manifest_key,
                workflow=job.workflow,
                payload=job.payload,
                metadata=job.metadata,
            ).to_json()
        except Exception as error:  # whatever the serialiser refuses, said once
            return str(error)
        return None

    @staticmethod
    def unnamed(job_id: str, manifest_key: str) -> JobStatus:
        """The record of a manifest with no usable job id: never written (there is no key for
        it), only counted and logged."""
        return JobStatus(id=job_id, state=JobState.failed, manifest_key=manifest_key)

    # -- webhooks -------------------------------------------------------------------------

    def announce_final(self, status: JobStatus, manifest_url: str | None) -> None:
        """Send a final status to its webhook without waiting; the delivery's record is
        written back into that status when it is known."""
        if self.announce is None:
            return
        sent = status.model_copy(deep=True)

        async def record(result: NotifyRecord) -> None:
            await self._record_notify(sent, result)

        self.announce(manifest_url, f"msg_{uuid.uuid4().hex}", sent.to_json(), record)

    async def _record_notify(self, sent: JobStatus, record: NotifyRecord) -> None:
        """Put the webhook's record into the status it announced, unless a newer run has
        replaced that status since: a conditional write, re-read if a note slipped in."""
        key = self.key(sent.id)
        for _ in range(3):
            try:
                stored = await self.storage.get(key, max_bytes=MAX_STATUS_BYTES)
            except StorageError as error:
                log.warning("job %s: webhook record not saved: %s", sent.id, error)
                return
            current = parse_status(stored.data, sent.id)
            if isinstance(current, str):
                log.warning("job %s: webhook record not saved: the status is %s", sent.id, current)
                return
            if (current.attempt, current.state, current.manifest_version) != (
                sent.attempt,
                sent.state,
                sent.manifest_version,
            ):
                return  # a newer run owns the status now
            current.notify = record
            current.updated_at = utcnow()
            try:
                await self.storage.put(
                    key, current.to_json(), content_type="application/json", if_match=stored.etag
                )
                return
            except PreconditionFailed:
                continue
            except StorageError as error:
                log.warning("job %s: webhook record not saved: %s", sent.id, error)
                return
