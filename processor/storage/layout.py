"""Where everything lives in the bucket (or the local root). One place, so docs/layout.md and
the code cannot drift apart.

```
<input>/<name>.json                  pending manifests (only these are listed by a poll)
<input>/_claims/<name>.json          who runs a manifest now, and how many attempts went before
<input>/_done/<name>.json            manifests whose jobs all finished (succeeded or skipped)
<input>/_failed/<name>.json          manifests that failed for good
<input>/_dispatched/<name>.json      `comfys3 dispatch`: the RunPod request sent for a manifest
<input>/_cancel/<job id>.json        a request to cancel a job (or every job of a batch)
<input>/!<ppp>.<name>.json           a pending manifest of priority 1..999 (ppp = 1000 - priority)
<input>/~<ppp>.<name>.json           a pending manifest of priority -1..-999 (ppp = -priority)
<output>/<job id>/status.json        the job's status document
<output>/<job id>/<node>_<ClassType>_<nnn>.<ext>    the job's outputs (first try of its claim)
<output>/<job id>/try-<n>/<node>_<ClassType>_<nnn>.<ext>   outputs of a later try
<output>/<job id>/inputs/<name>      files sent with a RunPod request (worker-comfyui's images)
```
Sub-prefixes of ``<input>`` are not listed by a poll (it lists with a delimiter), so the cost of
a poll depends on the pending work, never on history.

Priority lives in the name, not only in the manifest, so that a listing shows it without a GET
per manifest: ``!`` sorts before every character a job id may have and ``~`` after, so the
manifests to take first are the head of ``<input>/`` and those to take last its tail, and the
three digits sort higher priorities first. The job id is the name without the marker.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import quote

from processor.errors import StorageError
from processor.settings import normalise_prefix
from processor.storage.base import validate_key

CLAIMS = "_claims"
DONE = "_done"
FAILED = "_failed"
DISPATCHED = "_dispatched"
CANCEL = "_cancel"

# Priority markers: the first sorts before [-.0-9A-Z_a-z], the second after.
HIGH_MARK = "!"
LOW_MARK = "~"
MAX_PRIORITY = 999
_PRIORITY_NAME = re.compile(r"^([!~])(\d{3})\.(.+)$")


def priority_name(name: str, priority: int) -> str:
    """The manifest name that makes a listing show ``priority``: ``cat`` at 5 is
    ``!995.cat``, at -5 ``~005.cat``, at 0 just ``cat``."""
    if not -MAX_PRIORITY <= priority <= MAX_PRIORITY:
        raise ValueError(f"priority {priority} is outside -{MAX_PRIORITY}..{MAX_PRIORITY}")
    if priority > 0:
        return f"{HIGH_MARK}{1000 - priority:03d}.{name}"
    if priority < 0:
        return f"{LOW_MARK}{-priority:03d}.{name}"
    return name


def split_priority(name: str) -> tuple[int, str]:
    """A manifest name -> (the priority its name carries, the name without the marker)."""
    match = _PRIORITY_NAME.match(name)
    if match is None:
        return 0, name
    mark, digits, rest = match.groups()
    number = int(digits)
    if mark == HIGH_MARK and 1 <= number <= MAX_PRIORITY:
        return 1000 - number, rest
    if mark == LOW_MARK and 1 <= number <= MAX_PRIORITY:
        return -number, rest
    return 0, name


@dataclass(frozen=True)
class Layout:
    input_dir: str = "input"
    output_dir: str = "output"

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_dir", normalise_prefix(self.input_dir))
        object.__setattr__(self, "output_dir", normalise_prefix(self.output_dir))

    @property
    def claims_prefix(self) -> str:
        return f"{self.input_dir}/{CLAIMS}"

    @property
    def cancel_prefix(self) -> str:
        return f"{self.input_dir}/{CANCEL}"

    def cancel_key(self, job_id: str) -> str:
        """A request to cancel job ``job_id``, or, named by a batch manifest's id, every job
        of that batch."""
        return f"{self.cancel_prefix}/{job_id}.json"

    def is_manifest(self, key: str) -> bool:
        path = PurePosixPath(key)
        return str(path.parent) == self.input_dir and path.suffix == ".json"

    def manifest_key(self, name: str) -> str:
        return f"{self.input_dir}/{name}.json"

    def submit_key(self, name: str, priority: int) -> str:
        """Where a manifest of ``priority`` goes, so that workers see its priority in a
        listing (see :func:`priority_name`)."""
        return self.manifest_key(priority_name(name, priority))

    @staticmethod
    def manifest_name(key: str) -> str:
        return PurePosixPath(key).stem

    def name_problem(self, name: str) -> str | None:
        """Why a manifest named ``name`` cannot be claimed and retired like others, if so
        (a control character or backslash in it: not a key every backend can use)."""
        try:
            validate_key(self.manifest_key(name))
        except StorageError as error:
            return str(error).split(": ", 1)[-1]
        return None

    def aside_key(self, name: str) -> str:
        """Where a manifest with an unusable name goes: ``_failed/`` under a name made safe,
        so it leaves the intake once instead of being warned about on every poll."""
        return self.failed_key(quote(name, safe="") or "_")

    def done_key(self, name: str) -> str:
        return f"{self.input_dir}/{DONE}/{name}.json"

    def failed_key(self, name: str) -> str:
        return f"{self.input_dir}/{FAILED}/{name}.json"

    def dispatched_key(self, name: str) -> str:
        """The dispatcher's marker: a RunPod request for ``<name>`` is pending."""
        return f"{self.input_dir}/{DISPATCHED}/{name}.json"

    def job_prefix(self, job_id: str) -> str:
        return f"{self.output_dir}/{job_id}" if self.output_dir else job_id

    def status_key(self, job_id: str) -> str:
        return f"{self.job_prefix(job_id)}/status.json"

    def upload_key(self, job_id: str, name: str) -> str:
        """Where a file that came with a request (not from the bucket) is kept for its job:
        beside the job's outputs, so it lives and is cleaned up with them."""
        return f"{self.job_prefix(job_id)}/inputs/{name}"

    def output_key(
        self,
        job_id: str,
        node_id: str,
        class_type: str,
        index: int,
        ext: str,
        claim_try: int | None = None,
    ) -> str:
        """Where an output of a job goes. The first try of a manifest's claim (nearly every
        job) writes beside status.json; a later try writes under ``try-<n>/``, so an earlier
        try that wakes up late (frozen past its lease) can never write over what the later
        one published and its status lists."""
        safe_type = "".join(c for c in class_type if c.isalnum() or c in "-_") or "node"
        safe_node = "".join(c for c in node_id if c.isalnum() or c in "-_.") or "node"
        folder = self.job_prefix(job_id)
        if claim_try is not None and claim_try > 1:
            folder = f"{folder}/try-{claim_try}"
        return f"{folder}/{safe_node}_{safe_type}_{index:03d}{ext}"
