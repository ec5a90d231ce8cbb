"""Every error comfys3 raises, in one tree, each with a message a person can act on.

Everything the product raises derives from :class:`Comfys3Error`, whose ``str()`` is the
sentence a user reads (in a status document, a log line or a CLI message) and whose
``details`` is a JSON-ready dict a status can carry. Whether an error is retried, charged
against a job's attempts or final is *not* decided here: that is one row per class in
:mod:`processor.job.retry_table`.

```
Comfys3Error
├── SettingsError              configuration that cannot work
├── WorkflowLoadError          a template broken on disk
├── ManifestError              a manifest that cannot run (every problem listed)
├── InputMissing               an input file the payload names is not there
├── InputInvalid               an input file no attempt could use
├── JsonLimitError             JSON beyond what comfys3 reads (also a ValueError)
├── LeaseLost                  a claim was taken over: the job is no longer ours
├── JobCancelled               someone asked for the job to stop (comfys3 cancel, RunPod)
├── FetchError                 a fetch from outside failed in a way that may pass
│   └── FetchRefused           the guard refused it, or the answer can never be used
├── ModelDownloadFailed        a model could not be fetched this time
├── ModelInvalid               a model no attempt could use (wrong sha256, refused, too large)
├── CapabilityMissing          this worker's ComfyUI lacks node types or models the job needs
│   └── CapabilityWaitOver     ... and no worker that has them took it in time
├── StorageError               a storage operation failed
│   ├── ObjectNotFound
│   ├── PreconditionFailed     a conditional write lost
│   ├── InvalidKey             a key no backend should use
│   ├── ObjectTooLarge
│   ├── ConditionalWritesIgnored   the storage cannot referee claims
│   └── RetireFailed
└── ComfyError                 talking to ComfyUI failed
    ├── ComfyValidationError   ComfyUI refused the graph
    ├── ComfyRuntimeError      a node raised while the prompt ran
    ├── ComfyTimeout
    │   └── JobTimeLimitExceeded   the manifest's own timeout_s ended it
    ├── ComfyInterrupted
    └── ComfyUnavailable       ComfyUI cannot be reached, or died
        └── ComfyDiedWhileWaiting
```
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError


class Comfys3Error(Exception):
    """Base of everything comfys3 raises: ``str()`` is for a person, ``details`` for a status."""

    def __init__(self, message: str = "", details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.details: dict[str, Any] = details if details is not None else {}

    @property
    def message(self) -> str:
        """The sentence a person reads; never empty."""
        return str(self) or type(self).__name__


class SettingsError(Comfys3Error):
    """Configuration that cannot work; its message is meant for the person running the worker."""


class WorkflowLoadError(Comfys3Error):
    """A template that is broken on disk: a bug in the template, not in a user's manifest."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a manifest, located by a dotted path such as ``payload.steps``."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ManifestError(Comfys3Error):
    """A manifest that cannot run. Every problem is listed, not only the first."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__(
            "\n".join(str(p) for p in self.problems),
            {"problems": [{"path": p.path, "message": p.message} for p in self.problems]},
        )

    @classmethod
    def single(cls, message: str, path: str = "") -> ManifestError:
        return cls([Problem(path, message)])


class InputMissing(Comfys3Error):
    """An input file the payload names is not in storage; uploading it later will not help
    this attempt, so the job fails at once, naming it."""


class InputInvalid(Comfys3Error):
    """An input file that no attempt could use; the message names it and says why."""


class JsonLimitError(Comfys3Error, ValueError):
    """A document that is not JSON, or is JSON beyond what comfys3 accepts; says where."""


class FetchError(Comfys3Error):
    """A fetch from outside (an input or model URL) failed in a way that may pass: the
    connection was refused or broke, it timed out, the server answered 5xx or 429."""


class FetchRefused(FetchError):
    """The fetch guard refused the URL or an address it resolved to, or the answer can never
    be used (404, 403, larger than the limit, a redirect loop): asking again cannot help."""


class ModelDownloadFailed(Comfys3Error):
    """A model named in the manifest could not be fetched this time (a network error); the
    message names the model and its source."""


class ModelInvalid(Comfys3Error):
    """A model named in the manifest that no attempt could use: its sha256 is not the one the
    manifest gives, its URL is refused or missing, or it is larger than the cache."""


class CapabilityMissing(Comfys3Error):
    """The job needs node types or models this worker's ComfyUI lacks: it is left for another
    worker that has them, without counting an attempt. ``details`` lists what is missing."""


class CapabilityWaitOver(CapabilityMissing):
    """No worker that has what the job needs took it within COMFYS3_CAPABILITY_WAIT: the job
    fails, naming what is missing."""


class LeaseLost(Comfys3Error):
    """Someone else replaced or removed our claim; the job is no longer ours to report on."""


class JobCancelled(Comfys3Error):
    """Someone asked for the job to stop (``comfys3 cancel``, a cancel object in the bucket,
    RunPod's cancel). ``details`` say who and when; it is final, and it is nobody's failure."""


class StorageError(Comfys3Error):
    """A storage operation that failed; the message names the operation and key, never secrets."""


class ObjectNotFound(StorageError):
    """The key does not exist (S3 ``NoSuchKey``, or no such file under the local root)."""


class PreconditionFailed(StorageError):
    """A conditional write lost: the key exists (``if_none_match``) or changed (``if_match``)."""


class InvalidKey(StorageError):
    """A key no backend should use (see :func:`processor.storage.base.validate_key`). It is a
    property of the name, not an outage: retrying the same name can never help."""


class ObjectTooLarge(StorageError):
    """An object larger than the reader's limit; refused before its body is read."""


class ConditionalWritesIgnored(StorageError):
    """The storage accepted a write its condition should have refused."""


class RetireFailed(StorageError):
    """Retiring did not succeed within its tries; the manifest is left for the next claim."""


class ComfyError(Comfys3Error):
    """Base of every ComfyUI failure; ``str()`` is the readable summary, ``details`` the facts
    (node ids, exception types, tracebacks) a status document carries."""


class ComfyValidationError(ComfyError):
    """ComfyUI refused the graph (HTTP 400): nothing was queued, and resubmitting cannot help."""

    def __init__(self, message: str, lines: list[str], details: dict[str, Any]) -> None:
        text = message if not lines else message + "\n" + "\n".join(f"  - {ln}" for ln in lines)
        super().__init__(text, {**details})
        self.details.setdefault("lines", lines)
        self.lines = lines


class ComfyRuntimeError(ComfyError):
    """A node raised while the prompt ran; the traceback stays in ``details``."""

    def __init__(
        self,
        *,
        prompt_id: str,
        node_id: str | None,
        node_type: str | None,
        exception_type: str,
        exception_message: str,
        traceback: str,
    ) -> None:
        where = f"node {node_id} ({node_type})" if node_id else "ComfyUI"
        message = exception_message.strip() or "(no message)"
        super().__init__(
            f"{where} failed: {exception_type}: {message}",
            {
                "kind": "runtime_error",
                "prompt_id": prompt_id,
                "node_id": node_id,
                "node_type": node_type,
                "exception_type": exception_type,
                "exception_message": exception_message,
                "traceback": traceback,
            },
        )
        self.node_id = node_id
        self.node_type = node_type
        self.exception_type = exception_type
        self.exception_message = exception_message
        self.traceback = traceback


class ComfyTimeout(ComfyError):
    """The prompt ran past the job timeout and was interrupted."""


class JobTimeLimitExceeded(ComfyTimeout):
    """The prompt ran past the manifest's own ``timeout_s``: the job asked for that bound, and
    another attempt would run just as long, so it is final (the worker's COMFYS3_JOB_TIMEOUT,
    a guard against a hung ComfyUI, is retried)."""


class ComfyInterrupted(ComfyError):
    """Someone (not this client's timeout) interrupted the prompt."""


class ComfyUnavailable(ComfyError):
    """ComfyUI cannot be reached or died; a later attempt on a restarted ComfyUI may succeed."""


class ComfyDiedWhileWaiting(ComfyUnavailable):
    """ComfyUI died while another prompt ran, and this one was only waiting in its queue.

    The prompt that ran is the suspect (a node that runs out of memory kills the process);
    this one is a bystander, so its attempt is not counted: a job that crashes ComfyUI every
    time must not use up the attempts of whatever happened to be queued behind it.
    """


def _path(prefix: str, loc: Iterable[Any]) -> str:
    parts = [prefix] if prefix else []
    for item in loc:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
        else:
            parts.append(str(item))
    return ".".join(parts)


def problems_from_validation(
    error: ValidationError, prefix: str = "", known_fields: Iterable[str] = ()
) -> list[Problem]:
    """Turn pydantic's errors into lines a person can act on.

    An unknown field is the commonest mistake (a typo in ``seed``); naming the closest known
    field turns a silent default into an obvious fix.
    """
    known = list(known_fields)
    problems = []
    for item in error.errors(include_url=False):
        loc = list(item["loc"])
        path = _path(prefix, loc)
        if item["type"] == "extra_forbidden":
            name = str(loc[-1]) if loc else "?"
            message = "unknown field"
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
            if close:
                message += f"; did you mean '{close[0]}'?"
            elif known:
                message += f"; known fields: {', '.join(known)}"
            problems.append(Problem(path, message))
            continue
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "missing":
            message = "required field is missing"
        elif "input" in item and not isinstance(item["input"], dict | list):
            # A whole object echoed back is noise; a scalar shows what was actually sent.
            shown = repr(item["input"])
            if len(shown) <= 80:
                message += f" (got {shown})"
        if item["type"] == "literal_error":
            message += _closest_choice(item)
        problems.append(Problem(path, message))
    return problems


def _closest_choice(item: Any) -> str:
    """A misspelt enum value ('eulr') gets the nearest allowed one named."""
    expected = re.findall(r"'([^']*)'", str(item.get("ctx", {}).get("expected", "")))
    close = difflib.get_close_matches(str(item.get("input")), expected, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""
