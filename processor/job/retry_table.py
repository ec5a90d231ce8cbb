"""Whether a failure is retried, charged, waited out or final: one row per error class.

Every place that meets an error asks this table instead of deciding for itself: the job runner
(an attempt failed), the lane loop (something went wrong handling a claimed manifest), the
publisher (storage trouble after ComfyUI has run the prompt) and the RunPod handler (run the
manifest again or answer now). A new error type is one row here, not a branch in every caller.

The row of an error is the one of the nearest class in its MRO, so a subclass without a row of
its own behaves like its parent, and anything unforeseen falls through to ``Exception``: an
internal error, retried and charged, so a manifest that always crashes still ends.

The columns:

- ``error_type``: what the status document says (``error.type``);
- ``retry``: another attempt could succeed (a bad graph never gets better; a crash might);
- ``charge``: the attempt counts against ``COMFYS3_MAX_ATTEMPTS``. A try the job was not to
  blame for (ComfyUI died running another job, storage was unreachable) does not count, but
  every try is still bounded by ``max_tries`` so even those end;
- ``wait_out``: an outage that waiting may fix, worth riding out for a while before giving the
  job back (storage trouble); a property of the request itself (a bad key) is not;
- ``internal``: unforeseen; the status keeps the exception's type and traceback.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass

import processor.errors as errors
from processor.job.status import ErrorInfo

# Back-off for a job given back: retry_delay doubled per try, at most this long.
MAX_RETRY_DELAY = 300.0
# Storage refusing claims: the longest pause before this worker tries a claim again.
MAX_CLAIM_RETRY_DELAY = 10.0


@dataclass(frozen=True)
class Policy:
    error_type: str
    retry: bool
    charge: bool = True
    wait_out: bool = False
    internal: bool = False


TABLE: dict[type[BaseException], Policy] = {
    # Nothing another attempt could change: fail at once.
    errors.ManifestError: Policy("invalid_manifest", retry=False),
    errors.InputMissing: Policy("input_missing", retry=False),
    errors.InputInvalid: Policy("input_invalid", retry=False),
    errors.ComfyValidationError: Policy("validation", retry=False),
    errors.ModelInvalid: Policy("model_invalid", retry=False),
    errors.FetchRefused: Policy("fetch_refused", retry=False),
    errors.CapabilityWaitOver: Policy("capability_missing", retry=False),
    # A download that broke may work next time; it is the outside world's fault, but charged,
    # so a source that is down for good ends the job.
    errors.ModelDownloadFailed: Policy("model_download", retry=True),
    errors.FetchError: Policy("fetch", retry=True),
    # Left for another worker that has the node types or models: not the job's fault.
    errors.CapabilityMissing: Policy("capability_missing", retry=True, charge=False),
    # ComfyUI failed this prompt: another attempt may not.
    errors.ComfyRuntimeError: Policy("runtime", retry=True),
    errors.ComfyTimeout: Policy("timeout", retry=True),
    # The job's own timeout_s: it asked for that bound, another try would run as long.
    errors.JobTimeLimitExceeded: Policy("timeout", retry=False, charge=True),
    errors.ComfyInterrupted: Policy("interrupted", retry=True),
    errors.ComfyUnavailable: Policy("comfyui_unavailable", retry=True),
    errors.ComfyDiedWhileWaiting: Policy("comfyui_unavailable", retry=True, charge=False),
    errors.ComfyError: Policy("comfyui", retry=True),
    # Storage: an outage is not the job's fault and may pass; a bad key or an oversized object
    # is a property of the request and will not.
    errors.StorageError: Policy("storage", retry=True, charge=False, wait_out=True),
    errors.PreconditionFailed: Policy("storage", retry=True, charge=False),
    errors.InvalidKey: Policy("storage", retry=True),
    errors.ObjectTooLarge: Policy("storage", retry=True),
    # Another worker took the claim over: this try's results are dropped, the job is theirs.
    errors.LeaseLost: Policy("claim_lost", retry=True, charge=False),
    # Someone asked for it to stop: final, and not the job's fault, so never charged.
    errors.JobCancelled: Policy("cancelled", retry=False, charge=False),
    # Anything else is a bug somewhere: retried and charged, so it ends.
    Exception: Policy("internal", retry=True, internal=True),
}


def policy_for(error: BaseException) -> Policy:
    """The row of ``error``: the nearest class in its MRO that has one."""
    for cls in type(error).__mro__:
        policy = TABLE.get(cls)
        if policy is not None:
            return policy
    return TABLE[Exception]  # a BaseException that is not an Exception: treat as internal


def describe(error: BaseException) -> tuple[ErrorInfo, Policy]:
    """An exception -> what the status says about it, and its row."""
    policy = policy_for(error)
    details = dict(getattr(error, "details", {}) or {})
    if policy.internal:
        details["exception_type"] = type(error).__name__
        details["traceback"] = "".join(traceback.format_exception(error))
    message = str(error) or type(error).__name__
    return ErrorInfo(type=policy.error_type, message=message, details=details), policy


def will_retry(policy: Policy, attempt: int, max_attempts: int) -> bool:
    """Whether a job whose attempt ``attempt`` failed under ``policy`` gets another one: a try
    that is not charged always does (``max_tries`` bounds those), a charged one while attempts
    remain."""
    return policy.retry and (not policy.charge or attempt < max_attempts)


def max_tries(max_attempts: int) -> int:
    """Every try of a manifest, counted or not: one given back this often ends anyway."""
    return max(10, 4 * max_attempts)


def retry_pause(tries: int, base: float) -> float:
    """Seconds before this worker tries a manifest again that it gave back after ``tries``
    tries: ``base`` doubled each time, at most :data:`MAX_RETRY_DELAY`."""
    return min(MAX_RETRY_DELAY, base * 2 ** max(0, tries - 1))


def claim_retry_pause(failures: int, base: float) -> float:
    """Seconds before trying a claim again after ``failures`` claim attempts in a row that
    storage refused: a few tries per key, not one every ``base`` for the whole outage."""
    return min(MAX_CLAIM_RETRY_DELAY, retry_pause(failures, base))
